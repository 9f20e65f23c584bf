"""Tensor parallelism over torch.distributed: the model sharded Megatron-style across N ranks.

Sharding (rank r of N, `shard_weights` / `shard_twins`):
- qkv and gate_up are split by output rows: rank r holds query heads [r Hq/N, (r+1) Hq/N), the
  KV heads those query heads read (whole KV heads: Hkv must divide by N), and I/N rows of gate
  and of up. Its paged KV cache holds only its KV heads.
- o and down are split by input columns (the same heads, the same I/N channels); each rank's
  product is a partial sum of the full output, all-reduced. The residual stream, the norms and
  everything read from them (the exit rule's cosine) are then replicated bit for bit: an
  all-reduce hands every rank the same reduced bits (tests/test_parallel.py checks it).
- the embedding and the LM heads (bf16, the river head, the lossless draft head) are split by
  vocabulary in ceil(V/N) rows (the last shard zero-padded): a lookup is exact (one rank
  contributes the row, the others zeros) and the logits are all-gathered.
- the river twins are quantized once, over the whole weight, and sliced: row slices are exact,
  and a column slice of a 4-bit twin falls on group boundaries (the group size must divide the
  shard width), so every rank holds exactly its slice of the one-rank twins.

Processes: one per device. Rank 0 owns the scheduler and the API; ranks 1.. run `serve`, a loop
that executes the calls rank 0 makes on its model and runner (`mirrored` methods: prefill,
decode, the runner's steps, attaching twins), with the arguments rank 0 sent (pickled with
torch.save over a gloo group, tensors placed on the worker's device). The calls run in the same
order on every rank, so their collectives pair up without other coordination; on CUDA each rank
captures its own decode graphs with the all-reduces inside. `Engine(tensor_parallel_size=N)`
starts ranks 1.. itself (fresh interpreters, see launch()); under torchrun every rank constructs the
Engine and on ranks 1.. it serves rank 0 and exits the process when rank 0 closes.
"""

from __future__ import annotations

import atexit
import base64
import datetime
import functools
import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from river.config import FUSED, ModelConfig
from river.errors import ConfigError

# The forward's collectives and the start-up wait at most this long for the slowest rank.
_OP_TIMEOUT = datetime.timedelta(minutes=30)
# Control messages wait as long as a server idles; a dead peer still fails them at once (its
# sockets close).
_IDLE_TIMEOUT = datetime.timedelta(days=365)


# ---------------------------------------------------------------------------- sharding
def check_shardable(cfg: ModelConfig, world: int, group_size: int | None = None) -> None:
    """A clear ConfigError when `cfg` cannot be split across `world` ranks."""
    if not isinstance(world, int) or isinstance(world, bool) or world <= 0:
        raise ConfigError(f"tensor_parallel_size must be a positive integer, got {world!r}")
    if world == 1:
        return
    if cfg.num_kv_heads % world:
        raise ConfigError(
            f"tensor_parallel_size={world} does not divide the model's {cfg.num_kv_heads} KV "
            f"heads (each rank holds whole KV heads); choose a divisor of {cfg.num_kv_heads}"
        )
    if cfg.intermediate_size % world:
        raise ConfigError(
            f"tensor_parallel_size={world} does not divide the MLP width {cfg.intermediate_size}"
        )
    if group_size is not None:
        for name, width in (
            ("o", cfg.num_heads * cfg.head_dim // world),
            ("down", cfg.intermediate_size // world),
        ):
            if width % group_size:
                raise ConfigError(
                    f"tensor_parallel_size={world}: the {name} projection's input shard is "
                    f"{width} wide, not a multiple of river_group_size={group_size} (a 4-bit "
                    "group may not straddle two ranks); choose another group size or TP size"
                )


def local_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The dimensions one rank computes: its heads, MLP channels and vocabulary shard."""
    if world == 1:
        return cfg
    return replace(
        cfg,
        num_heads=cfg.num_heads // world,
        num_kv_heads=cfg.num_kv_heads // world,
        intermediate_size=cfg.intermediate_size // world,
        vocab_size=-(-cfg.vocab_size // world),
    )


# the per-row tensors of a twin (W4Weight, W6Weight, W8Weight): what a shard slices
_TWIN_TENSORS = ("qweight", "qweight_hi", "scales", "zeros")


def _rows(w, start: int, stop: int):
    """Rows [start, stop) of a weight: a tensor, a W4Weight, W6Weight or W8Weight (no copy of the
    rest: cloned, so that pickling a shard never drags the whole storage along)."""
    if isinstance(w, torch.Tensor):
        return w[start:stop].clone()
    fields = {k: getattr(w, k)[start:stop].clone() for k in _TWIN_TENSORS if hasattr(w, k)}
    return replace(w, **fields)


def _cols(w, start: int, stop: int):
    """Input columns [start, stop) of a weight [N, K]. A 4- or 6-bit twin's groups must not
    straddle the cut; an 8-bit twin's per-row scale is shared by every column slice."""
    if isinstance(w, torch.Tensor):
        return w[:, start:stop].clone()
    if w.bits == 8:
        return replace(w, qweight=w.qweight[:, start:stop].clone())
    g = w.group_size
    if start % g or stop % g:
        raise ConfigError(
            f"a {w.bits}-bit group of {g} columns would straddle a shard at {start}:{stop}"
        )
    planes = {"qweight": w.qweight[:, start // 2 : stop // 2].clone()}
    if w.bits == 6:
        if start % 4 or stop % 4:  # four columns share a byte of the 2-bit plane
            raise ConfigError(f"a 6-bit shard must start and stop on a multiple of 4 columns, "
                              f"got {start}:{stop}")  # fmt: skip
        planes["qweight_hi"] = w.qweight_hi[:, start // 4 : stop // 4].clone()
    return replace(
        w,
        **planes,
        scales=w.scales[:, start // g : stop // g].clone(),
        zeros=w.zeros[:, start // g : stop // g].clone(),
    )


def _vocab_rows(w, rank: int, world: int, vocab: int):
    """Rank's ceil(V/N) rows of a vocabulary-sized weight, zero-padded past V."""
    size = -(-vocab // world)
    start, stop = rank * size, min((rank + 1) * size, vocab)
    return pad_rows(_rows(w, start, stop), size - (stop - start))


def pad_rows(w, pad: int):
    """w with `pad` zero rows appended (a tensor or a twin: zero scales)."""
    if pad == 0:
        return w
    if isinstance(w, torch.Tensor):
        return torch.cat([w, w.new_zeros(pad, *w.shape[1:])])
    fields = {
        k: torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
        for k in _TWIN_TENSORS
        if (t := getattr(w, k, None)) is not None
    }
    return replace(w, **fields)


def _projection(name: str, w, cfg: ModelConfig, rank: int, world: int):
    """Rank's share of one projection ("q", "k", "v", "o", "gate", "up", "down")."""
    d, hq, hkv = cfg.head_dim, cfg.num_heads // world, cfg.num_kv_heads // world
    inter = cfg.intermediate_size // world
    if name == "q":
        return _rows(w, rank * hq * d, (rank + 1) * hq * d)
    if name in ("k", "v"):
        return _rows(w, rank * hkv * d, (rank + 1) * hkv * d)
    if name in ("gate", "up"):
        return _rows(w, rank * inter, (rank + 1) * inter)
    if name == "o":
        return _cols(w, rank * hq * d, (rank + 1) * hq * d)
    if name == "down":
        return _cols(w, rank * inter, (rank + 1) * inter)
    raise ValueError(f"unknown projection {name!r}")


def shard_fn(cfg: ModelConfig, rank: int, world: int):
    """shard(short_name, tensor) -> rank's share of that checkpoint tensor (river.checkpoint's
    load_weights applies it as it reads, so a rank never holds the whole model); None with one
    rank."""
    if world == 1:
        return None
    projs = {p for ps in FUSED.values() for p in ps}

    def shard(name, t):
        if name in ("embed", "lm_head"):
            return _vocab_rows(t, rank, world, cfg.vocab_size)
        return _projection(name, t, cfg, rank, world) if name in projs else t

    return shard


def shard_weights(weights: dict, cfg: ModelConfig, rank: int, world: int) -> dict:
    """Rank's share of a whole load_weights dict (same layout, local shapes): what shard_fn
    gives at load time."""
    shard = shard_fn(cfg, rank, world)
    if shard is None:
        return weights
    out = {k: shard(k, weights[k]) for k in ("embed", "norm", "lm_head") if k in weights}
    out["layers"] = [{k: shard(k, t) for k, t in lw.items()} for lw in weights["layers"]]
    return out


def shard_twins(quantized: dict, head, cfg: ModelConfig, rank: int, world: int):
    """Rank's share of the river twins {"layers.N.proj": W4Weight | W8Weight} and of the LM
    head's twin (or None)."""
    if world == 1:
        return quantized, head
    shard = {
        name: _projection(name.rpartition(".")[2], w, cfg, rank, world)
        for name, w in quantized.items()
    }
    return shard, None if head is None else _vocab_rows(head, rank, world, cfg.vocab_size)


# ---------------------------------------------------------------------------- the group
@dataclass
class Group:
    """This process's place in the tensor-parallel group, and the forward's collectives."""

    rank: int
    world: int
    device: torch.device
    control: object  # the gloo group of the control messages (rank 0's calls)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (every rank gets the same bits)."""
        dist.all_reduce(t)
        return t

    def gather_vocab(self, x: torch.Tensor, vocab: int) -> torch.Tensor:
        """[..., V/N] logits of every rank -> [..., V] (the padding past V dropped)."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)[..., :vocab]

    def barrier(self) -> None:
        dist.barrier(group=self.control)


def threads_per_rank(world: int) -> int | None:
    """CPU: torch threads for each of `world` ranks on this machine (None: river.cpu's default,
    which honours RIVER_NUM_THREADS / OMP_NUM_THREADS and is all of them with one rank)."""
    if world == 1 or os.environ.get("RIVER_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        return None
    from river.cpu import _available_cores

    # never more threads than cores in all: a rank spinning on a core another rank needs
    # makes every op of both wait (river.cpu)
    return max(1, _available_cores() // world)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


_leader: Leader | None = None  # this process's live tensor-parallel engine, if any


def join(world: int, device_type: str) -> Group | None:
    """This process's Group when it is one rank of an already-started group: torch.distributed
    initialised (a spawned rank), or torchrun's environment (RANK, WORLD_SIZE). None: a lone
    process, which becomes rank 0 and starts the others itself (launch())."""
    if _leader is not None:
        raise ConfigError(
            f"this process already runs a tensor-parallel engine ({_leader.world} ranks); "
            "close() it before starting another"
        )
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        env_world = int(os.environ["WORLD_SIZE"])
        if env_world != world:
            raise ConfigError(
                f"tensor_parallel_size={world}, but torchrun started {env_world} processes "
                f"(--nproc-per-node {world})"
            )
        dist.init_process_group(_backend(device_type), timeout=_OP_TIMEOUT)
    if dist.get_world_size() != world:
        raise ConfigError(
            f"tensor_parallel_size={world}, but the process group has {dist.get_world_size()} ranks"
        )
    rank = dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK", rank))
    return _group(rank, world, device_type, local)


def _group(rank, world, device_type, local_rank) -> Group:
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return Group(rank, world, device, dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT))


def check_devices(world: int, device_type: str) -> None:
    if device_type == "cuda" and torch.cuda.device_count() < world:
        raise ConfigError(
            f"tensor_parallel_size={world} needs {world} CUDA devices (one per rank); this "
            f"machine has {torch.cuda.device_count()}"
        )


def launch(world: int, device_type: str, model_dir, config) -> tuple[Group, list]:
    """Start ranks 1..world-1 and join them as rank 0. Each rank is a fresh interpreter
    (`python -c`, not multiprocessing: the caller's script is never re-imported, so it needs no
    `if __name__ == "__main__"` guard) that builds its Engine shard from `model_dir` and
    `config`. A rank that dies while starting is reported, not waited for."""
    init = f"tcp://127.0.0.1:{_free_port()}"
    spec = base64.b64encode(pickle.dumps((world, init, device_type, str(model_dir), config)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", "from river.parallel import _worker_main; _worker_main()"],
            env={**env, "RIVER_TP_RANK": str(rank), "RIVER_TP_SPEC": spec.decode()},
        )
        for rank in range(1, world)
    ]
    joined: dict = {}

    def rendezvous():
        try:
            dist.init_process_group(
                _backend(device_type), init_method=init, rank=0, world_size=world,
                timeout=_OP_TIMEOUT,
            )  # fmt: skip
            joined["group"] = _group(0, world, device_type, 0)
        except BaseException as e:  # noqa: BLE001 -- re-raised below
            joined["error"] = e

    waiter = threading.Thread(target=rendezvous, daemon=True)
    waiter.start()
    while waiter.is_alive():
        waiter.join(timeout=0.2)
        dead = [(r, p.returncode) for r, p in enumerate(procs, 1) if p.poll() is not None]
        if dead:
            for p in procs:
                p.kill()
            rank, code = dead[0]
            raise RuntimeError(
                f"tensor parallelism: rank {rank} exited with code {code} while starting "
                "(its error is printed above)"
            )
    if "error" in joined:
        for p in procs:
            p.kill()
        raise joined["error"]
    return joined["group"], procs


def _worker_main() -> None:
    """A rank launch() started: join the group, then build the Engine, which serves rank 0
    until it closes (Engine.__init__ does not return on ranks other than 0)."""
    # Ctrl-C in a terminal reaches the whole process group: rank 0 handles it (its shutdown
    # tells this rank to stop; if it dies instead, the group's sockets close under this rank)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rank = int(os.environ.pop("RIVER_TP_RANK"))
    world, init, device_type, model_dir, config = pickle.loads(
        base64.b64decode(os.environ.pop("RIVER_TP_SPEC"))
    )
    dist.init_process_group(
        _backend(device_type), init_method=init, rank=rank, world_size=world, timeout=_OP_TIMEOUT
    )
    from river.engine import Engine

    try:
        Engine(model_dir, config=config)
    except SystemExit:
        pass


# ---------------------------------------------------------------------------- the calls
def _pack(obj) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)


def _unpack(data: torch.Tensor, device):
    return torch.load(io.BytesIO(data.numpy().tobytes()), map_location=device, weights_only=False)


def _bcast(obj, group) -> None:
    data = _pack(obj)
    dist.broadcast(torch.tensor([data.numel()], dtype=torch.int64), src=0, group=group)
    dist.broadcast(data, src=0, group=group)


def _recv_bcast(group, device):
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0, group=group)
    data = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(data, src=0, group=group)
    return _unpack(data, device)


def _send(obj, dst, group) -> None:
    data = _pack(obj)
    dist.send(torch.tensor([data.numel()], dtype=torch.int64), dst, group=group)
    dist.send(data, dst, group=group)


def _recv(src, group, device):
    size = torch.zeros(1, dtype=torch.int64)
    dist.recv(size, src, group=group)
    data = torch.empty(int(size), dtype=torch.uint8)
    dist.recv(data, src, group=group)
    return _unpack(data, device)


@dataclass(frozen=True)
class _Ref:
    """Stands for one of rank 0's objects (its KV cache, model, runner) inside a call's
    arguments; each rank substitutes its own."""

    name: str


def mirrored(target: str):
    """Decorate a method of the object rank 0 calls `target`: when the object has a `mirror`
    (rank 0 of a group), every rank runs the same call first. Calls nested inside a mirrored
    call (a runner step's model.decode) run locally: every rank is already making them."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(self, *args, **kwargs):
            leader = getattr(self, "mirror", None)
            if leader is None or leader.depth:
                return fn(self, *args, **kwargs)
            leader.send_call(target, fn.__name__, args, kwargs)
            leader.depth += 1
            try:
                return fn(self, *args, **kwargs)
            finally:
                leader.depth -= 1

        return call

    return wrap


class Leader:
    """Rank 0's side: sends the calls, collects values, stops the ranks."""

    def __init__(self, group: Group, objects: dict, procs: list):
        self.group, self.objects, self.procs = group, objects, procs
        self.depth = 0
        self.closed = False
        self._ids = {id(o): name for name, o in objects.items()}
        atexit.register(self.close)
        global _leader
        _leader = self

    @property
    def world(self) -> int:
        return self.group.world

    def _refs(self, value):
        name = self._ids.get(id(value))
        return value if name is None else _Ref(name)

    def send_call(self, target, method, args, kwargs) -> None:
        if self.closed:
            raise RuntimeError("the tensor-parallel ranks were shut down (Engine.close())")
        args = tuple(self._refs(a) for a in args)
        kwargs = {k: self._refs(v) for k, v in kwargs.items()}
        _bcast(("call", target, method, args, kwargs), self.group.control)

    def call_each(self, target: str, method: str, make_args) -> object:
        """Call `method` on every rank with its own arguments: make_args(rank) -> (args, kwargs)
        (built one rank at a time, so that rank 0 never holds every shard at once)."""
        if self.closed:
            raise RuntimeError("the tensor-parallel ranks were shut down (Engine.close())")
        _bcast(("each", target, method, (), {}), self.group.control)
        for rank in range(1, self.world):
            _send(make_args(rank), rank, self.group.control)
        args, kwargs = make_args(0)
        self.depth += 1
        try:
            return getattr(self.objects[target], method)(*args, **kwargs)
        finally:
            self.depth -= 1

    def collect(self, target: str, attr: str) -> list:
        """getattr(target, attr) on every rank, rank 0 first (tests: the ranks' exit logs)."""
        _bcast(("collect", target, attr, (), {}), self.group.control)
        values = [getattr(self.objects[target], attr)]
        for rank in range(1, self.world):
            values.append(_recv(rank, self.group.control, "cpu"))
        return values

    def close(self) -> None:
        """Stop ranks 1.. and leave the group (idempotent)."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        global _leader
        if _leader is self:
            _leader = None
        try:
            _bcast(("stop", None, None, (), {}), self.group.control)
        except RuntimeError:
            pass  # a rank already gone: nothing to stop
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


def serve(group: Group, objects: dict) -> None:
    """Ranks 1..: run rank 0's calls on this rank's objects until it says stop. A call that
    raises here raised on rank 0 too (the calls are deterministic), so the loop goes on."""
    while True:
        try:
            op, target, method, args, kwargs = _recv_bcast(group.control, group.device)
        except RuntimeError:  # rank 0 is gone
            return
        if op == "stop":
            return
        if op == "collect":
            _send(getattr(objects[target], method), 0, group.control)
            continue
        if op == "each":
            args, kwargs = _recv(0, group.control, group.device)

        def real(v):
            return objects[v.name] if isinstance(v, _Ref) else v

        try:
            getattr(objects[target], method)(
                *(real(a) for a in args), **{k: real(v) for k, v in kwargs.items()}
            )
        except Exception:  # noqa: BLE001 -- rank 0 raised the same and reports it
            if os.environ.get("RIVER_TP_DEBUG"):
                traceback.print_exc(file=sys.stderr)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
