"""CUDA-graph decode: one captured decode step per batch-size bucket, replayed with new inputs.

A decode step launches ~15 kernels per layer, hundreds per token; launched one by one from
Python their CPU cost exceeds the GPU time of a small-batch step. LlamaModel.decode has no host
syncs and no data-dependent shapes (exits are device-side row masks), so it can be captured once
per batch size and replayed:

* Buckets. A batch of n rows runs in the graph of the smallest bucket >= n (GraphBuckets, cut at
  max_num_seqs). Rows n..bucket-1 are padding: inactive, input id 0, position 0, context length
  1, and their slot is the first slot of a reserved padding KV block, so their (masked)
  read-modify-write of the cache can never touch a real sequence's slot.
* Static inputs. One DecodeInputs sized for the largest bucket; every graph reads views of its
  first `bucket` rows, so all graphs share one set of input buffers. Its fields are views of one
  byte buffer: a pinned host twin uploads a whole step's inputs in a single copy.
* Both weight sets in every graph. The captured step runs with ExitParams host flags
  uses_backbone / uses_river / uses_kv_mask all True, so each weight set's kernels are in the
  graph and skip on the device when none of their rows is active; one graph per bucket serves
  every mix of exit modes. Without river weights a backbone-only variant is captured and
  requests that need the river are refused.

Reserving the padding block: the runner writes padding rows to block `kv.num_blocks - 1` (or
`padding_block=`), which must never be handed to a sequence. The engine does that by giving its
allocator one block less than the cache: `BlockAllocator(kv.num_blocks - 1)`.

Feeding a step: run(batch, exits) copies a batch into the static inputs (device tensors: one
device copy per field; host tensors: staged in a pinned twin and uploaded in one copy, with any
field already on the device, typically input_ids = last step's sampled tokens, copied after it)
and replays. replay(n) replays the static inputs as the caller updated them in place (tokens,
positions + 1, ...), the cheapest step when the decode state lives on the device.

Outputs: run() and replay() return views of the graph's static output buffers (first n rows).
They are only valid until the next run()/replay() of any bucket (the graphs share one memory
pool), so consume them (argmax, sampling, a copy) before the next step.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace

import torch

from river.decode_inputs import SAMPLING_FIELDS, DecodeInputs, Staging, check_rows, row_sources
from river.exits import ExitParams
from river.model import ForwardBatch

__all__ = [
    "CompiledStep",
    "cpp_compiler",
    "compilable",
    "step_flags",
    "GraphBuckets",
    "graph_buckets",
    "bucket_for",
    "DecodeGraphRunner",
]

GraphBuckets = (1, 2, 4, 8, 16, 32, 64)


def graph_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """GraphBuckets cut at max_num_seqs, which is always the last bucket (48 -> ..., 32, 48)."""
    if max_num_seqs <= 0:
        raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
    return tuple(b for b in GraphBuckets if b < max_num_seqs) + (max_num_seqs,)


def bucket_for(n: int, buckets: tuple[int, ...] = GraphBuckets) -> int:
    """The smallest bucket that holds n rows."""
    if n <= 0:
        raise ValueError(f"a decode batch needs at least one row, got {n}")
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"decode batch of {n} rows exceeds the largest graph bucket ({buckets[-1]})")


# ------------------------------------------------------------------------------ compiled step
def step_flags(exits: ExitParams, include_river: bool = True) -> dict:
    """The host facts of a batch (ExitParams' host-side fields) an uncaptured step uses to
    skip work; a CUDA graph ignores them (it has every path)."""
    return {
        "uses_backbone": exits.uses_backbone,
        "uses_river": exits.uses_river and include_river,
        "uses_kv_mask": exits.uses_kv_mask,
        "may_exit": exits.may_exit,
        "uses_update": exits.uses_update,
        "backbone_until": exits.backbone_until,
        "river_from": exits.river_from,
    }


def compilable(flags: dict | None) -> bool:
    """Whether the host flags fix which weight set every layer runs, so that a compiled step
    (whose ops compute a projection for every row and select, river.kernels.cpu) reads no
    bytes the eager step would skip: no row can leave the backbone mid-way (full, w4 and their
    mixes), or every row leaves at a fixed layer (a static split)."""
    return bool(flags) and (not flags["may_exit"] or flags["backbone_until"] is not None)


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would build the compiled CPU step with, or None (then
    torch_compile cannot work: inductor's CPU code is C++)."""
    try:
        from torch._inductor import cpp_builder

        return cpp_builder.get_cpp_compiler()
    except Exception:  # inductor raises its own error types when it finds none
        return None


# Each compiled variant (bucket x host flags x greedy) is one recompile of the same function;
# dynamo's default limit of 8 would silently fall back to eager after that.
_RECOMPILE_LIMIT = 64


class CompiledStep:
    """fn(bucket, flags, greedy) through torch.compile, under inference mode. The first call
    of each variant compiles it (tens of seconds: the generated C++ is cached on disk by
    inductor, so a later process mostly retraces); later calls run one fused graph."""

    # Steps a smaller batch runs padded in a larger compiled bucket before its own compiles:
    # padding rows cost the int4/int8 matmuls their per-row work, a compile tens of seconds.
    REUSE_STEPS = 32

    def __init__(self, fn):
        import torch._dynamo

        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, _RECOMPILE_LIMIT)
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * _RECOMPILE_LIMIT)
        # emulate_precision_casts: fused kernels round to bf16 where the eager ops do, so the
        # compiled step gives the eager step's tokens (fp32: identical; bf16: up to the order of
        # the norms' reductions). size_asserts off: the generated code would check the size and
        # stride of ~500 tensors per step at ~0.6 us each (0.3-0.6 ms of a ~19 ms river step at
        # batch 1), which dynamo's guards already vouch for.
        self._fn = torch.compile(
            fn, dynamic=False, options={"emulate_precision_casts": True, "size_asserts": False}
        )
        self.variants: set = set()  # (bucket, flags, greedy) run so far
        self._asked: dict = {}  # steps that wanted a variant not compiled yet (see reuse)
        self.enabled = True  # False: the runner takes the eager step (benchmarks compare both)

    @staticmethod
    def key(bucket: int, flags: dict, greedy: bool) -> tuple:
        """How `variants` names the compiled step of (bucket, flags, greedy)."""
        return (bucket, tuple(sorted(flags.items())), greedy)

    def reuse(self, bucket: int, flags: dict, greedy: bool) -> int:
        """The bucket to run a batch of `bucket`'s size in. Until its own variant has been
        asked for REUSE_STEPS times, that is the smallest larger bucket already compiled for
        these flags (its extra rows are padding), so that a batch shrinking as its requests
        finish does not stall on a compile for each smaller bucket; after that, or when no
        larger one is compiled, `bucket` itself (compiled on first use)."""
        want = self.key(bucket, flags, greedy)
        if want in self.variants:
            return bucket
        done = [b for b, f, g in self.variants if (f, g) == want[1:] and b > bucket]
        asked = self._asked.get(want, 0) + 1
        self._asked[want] = asked
        return min(done) if done and asked <= self.REUSE_STEPS else bucket

    def __call__(self, bucket: int, flags: dict, greedy: bool):
        self.variants.add(self.key(bucket, flags, greedy))
        with torch.inference_mode():
            return self._fn(bucket, flags, greedy)


# ------------------------------------------------------------------------------ the runner


@dataclass
class _Graph:
    graph: object  # torch.cuda.CUDAGraph
    out: torch.Tensor  # float32 logits [bucket, V], or int64 tokens [bucket] (sampler=True)
    used: torch.Tensor  # int32 [bucket]


class DecodeGraphRunner:
    """Decode steps through CUDA graphs (on CUDA) or model.decode (eagerly) behind one API.

    model: a LlamaModel; kv: its KVCache, whose block `padding_block` (default: the last) the
    caller keeps out of its allocator. max_blocks_per_seq: block-table width of the graphs (the
    context capacity is max_blocks_per_seq * block_size; it also fixes the attention kernel's
    split count, so it is part of what is captured).
    enabled: None = graphs on CUDA, eager on CPU. Eager runs model.decode on the batch as given
    (no padding); pad_eager=True instead runs the padded static step the graphs capture, eagerly
    (to test the padding on CPU). include_river: None = capture the river when it is attached;
    False = a backbone-only graph (requests that use the river are refused).
    """

    def __init__(
        self,
        model,
        kv,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        enabled: bool | None = None,
        *,
        include_river: bool | None = None,
        pad_eager: bool = False,
        padding_block: int | None = None,
        sampler: bool = False,
        torch_compile: bool = False,
    ):
        on_cuda = model.device.type == "cuda"
        # sampler=True: each step also gathers its input tokens from the token board, samples
        # the next tokens, writes them to the board and counts the exit histogram, all inside
        # the (captured) step; step() returns tokens instead of logits.
        self.sampler = sampler
        if sampler and not (pad_eager or enabled or (enabled is None and on_cuda)):
            raise ValueError("sampler=True needs the static inputs: graphs or pad_eager=True")
        rows = graph_buckets(max_num_seqs)[-1]
        self.board = torch.zeros(2 * rows, dtype=torch.int64, device=model.device)
        self.hist = torch.zeros(model.cfg.num_layers + 1, dtype=torch.int64, device=model.device)
        if enabled and not on_cuda:
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {model.device}")
        self.model, self.kv = model, kv
        self.use_graphs = on_cuda if enabled is None else bool(enabled)
        self.padded = self.use_graphs or pad_eager
        self.buckets = graph_buckets(max_num_seqs)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.padding_block = kv.num_blocks - 1 if padding_block is None else padding_block
        if not 0 <= self.padding_block < kv.num_blocks:
            raise ValueError(f"padding_block {self.padding_block} is not a block of the cache")
        self._river_choice = include_river
        self.include_river = self._want_river()
        self._graphs: dict[int, _Graph] = {}
        self._keep: list[torch.Tensor] = []  # buffers the graphs point into (see capture)
        self._scratch = None  # the op set's decode scratch (graph mode)
        self._host: Staging | None = None
        self._upload_done = None
        # Stage host-built batches in a pinned twin (one upload per step). Graph mode only by
        # default; tests switch it on for the padded eager step on CPU.
        self._stage_on_host = self.use_graphs
        self._dev: Staging | None = None
        if self.padded:
            inputs = DecodeInputs.allocate(self.buckets[-1], max_blocks_per_seq, model.device)
            self._dev = Staging(inputs, self.padding_block, kv.block_size)
        if torch_compile and (self.use_graphs or not pad_eager):
            raise ValueError("torch_compile=True compiles the CPU's padded step (pad_eager=True)")
        # The padded step through torch.compile (CPU): one graph per bucket and host-flag set,
        # used for the batches whose flags fix each layer's weight set (see compilable()).
        self.compiled = CompiledStep(self._decode_static) if torch_compile else None
        if self.use_graphs:
            self.capture()

    def _want_river(self) -> bool:
        if self._river_choice and self.model.river is None:
            raise ValueError("include_river=True but the model has no river weights attached")
        return self.model.river is not None if self._river_choice is None else self._river_choice

    @property
    def inputs(self) -> DecodeInputs | None:
        """The static inputs on the device (None when eager and unpadded)."""
        return self._dev.inputs if self._dev is not None else None

    # -------------------------------------------------------------------- capture
    def capture(self) -> None:
        """(Re)capture every bucket, largest first, into one shared memory pool. Call again after
        attaching river weights to include them."""
        if not self.use_graphs:
            raise RuntimeError("capture() needs a CUDA model and enabled graphs")
        self.include_river = self._want_river()
        self._graphs.clear()
        self._dev = Staging(self._dev.inputs, self.padding_block, self.kv.block_size)
        # The op set's decode scratch, allocated here, outside capture, so that it stays out
        # of the graph pool and nothing allocates inside a capture.
        cfg = self.model.cfg
        self._scratch = self.model.ops.alloc_decode_scratch(
            self.buckets[-1], cfg.num_heads, cfg.head_dim, device=self.model.device
        )
        torch.cuda.synchronize()
        # Warm up every bucket before capturing any: compiles the Triton kernels and grows
        # the split-K workspaces to their final size, so nothing allocates inside a capture
        # and no later warm-up reallocates a buffer an earlier graph points into.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for b in reversed(self.buckets):
                self._decode_static(b)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self._keep = importlib.import_module("river.kernels").workspace_tensors()
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):  # largest first: the pool grows to its size once
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits, used = self._decode_static(b)
            self._graphs[b] = _Graph(graph, logits, used)  # tokens when sampling
        torch.cuda.synchronize()

    def _decode_static(self, bucket: int, flags: dict | None = None, greedy: bool = False):
        """The step a graph captures, on the static inputs of `bucket`. flags: host facts of the
        batch (ExitParams' uses_*/may_exit) an eager step may use to skip work; a graph has
        every path. greedy: every row is greedy (eager only: argmax instead of the sampler)."""
        inp = self._dev.inputs.head(bucket)
        exits = inp.exit_params(self.include_river)
        if flags:
            exits = replace(exits, **flags)
        batch = inp.forward_batch()
        if self.sampler:
            # (the gathered ids feed the step directly: the static input_ids field is not
            # written, since a compiled step may not mutate one dtype view of the shared buffer)
            src = inp.src_index
            batch.input_ids = torch.where(src >= 0, self.board[src.clamp_min(0)], inp.host_tokens)
        logits, used = self.model.decode(
            batch, self.kv, exits, active=inp.active, scratch=self._scratch
        )
        if not self.sampler:
            return logits, used
        if greedy:
            tokens = logits.argmax(-1)
        else:
            tokens = self.model.ops.sample(
                logits, inp.temperature, inp.top_k, inp.top_p, inp.seed, inp.offset
            )
        self.board[:bucket].copy_(tokens)
        self.hist.index_add_(0, used.long(), inp.active.long())
        return tokens, used

    # -------------------------------------------------------------------- run
    def run(self, batch: ForwardBatch, exits: ExitParams, active=None, sampling=None, greedy=False):
        """One decode step for batch's n rows: (logits float32 [n, V], used int32 [n]); with
        sampler=True, (tokens int64 [n], used) and `sampling` ({SAMPLING_FIELDS: [n] tensors})
        is required (batch.input_ids is then ignored: src_index/host_tokens say where each
        row's token comes from).

        Graph mode copies the batch into the static inputs of bucket_for(n) and replays; the
        results are views valid until the next run(). Tensors may be on the device (copied on
        the device) or on the host (best pinned: staged in a pinned buffer, one upload). No host
        sync either way (the host path waits only for the previous step's upload to finish
        reading the pinned buffer)."""
        n = batch.input_ids.shape[0]
        if not self.padded:
            return self.model.decode(batch, self.kv, exits, active)
        if not self.use_graphs:
            self.include_river = self._want_river()  # eager: whatever is attached now
        if exits.uses_river and not self.include_river:
            raise RuntimeError(
                "this decode runner was captured without the river weights (backbone only), so "
                "it cannot run 'w4'/'river' requests: attach the river (Engine.ensure_river()) "
                "before building the runner, or call runner.capture() again after attaching it"
            )
        if self.sampler and sampling is None:
            raise ValueError("a sampler runner needs the rows' sampling settings")
        flags = step_flags(exits, self.include_river)
        bucket = bucket_for(n, self.buckets)
        if self._compiles(flags):
            bucket = self.compiled.reuse(bucket, flags, greedy)
        self._load(batch, exits, active, bucket, sampling)
        return self.replay(n, flags, greedy, bucket=bucket)

    def _compiles(self, flags) -> bool:
        """Whether an uncaptured step with these host flags runs compiled."""
        return (
            not self.use_graphs
            and self.compiled is not None
            and self.compiled.enabled
            and compilable(flags)
        )

    def replay(
        self, n: int, flags: dict | None = None, greedy: bool = False, bucket: int | None = None
    ):
        """The step of bucket_for(n) on the static inputs as they are: those run() loaded, as
        the caller has since updated them in place (e.g. `inputs.positions[:n] += 1` and the
        sampled tokens copied into `inputs.input_ids[:n]`, all on the device). Rows n.. of the
        bucket must still be padding, which holds while n stays the n of the last run().
        bucket: the bucket run() loaded (None: bucket_for(n)); a compiled CPU step may run a
        batch in a larger bucket it has already compiled (CompiledStep.reuse)."""
        if not self.padded:
            raise RuntimeError("replay() needs static inputs: graph mode or pad_eager=True")
        bucket = bucket or bucket_for(n, self.buckets)
        if any(self._dev.is_pad[:n]) or not all(self._dev.is_pad[n:bucket]):
            raise RuntimeError(f"the static inputs do not hold {n} real rows: run() first")
        if not self.use_graphs:
            step = self.compiled if self._compiles(flags) else self._decode_static
            out, used = step(bucket, flags, greedy)
        else:
            g = self._graphs[bucket]
            g.graph.replay()
            out, used = g.out, g.used
        return out[:n], used[:n]

    def _load(self, batch, exits, active, bucket, sampling=None):
        n, width = batch.input_ids.shape[0], batch.block_tables.shape[1]
        check_rows(batch, exits, active, n, self.max_blocks_per_seq)
        if sampling is not None:
            for name in SAMPLING_FIELDS:
                if sampling[name].shape != (n,):
                    raise ValueError(f"sampling[{name!r}] must have {n} rows")
        sources = row_sources(batch, exits, active, sampling)
        if not (self._stage_on_host and batch.positions.device.type == "cpu"):
            self._dev.load(sources, n, width, bucket)
            return
        # Host path: the host-side fields are written into a pinned twin of the static inputs
        # and uploaded in one copy; fields already on the device (typically input_ids, the
        # previous step's sampled tokens) are copied on the device after that upload.
        on_host = {k: v for k, v in sources.items() if v is None or v.device.type == "cpu"}
        on_dev = {k: v for k, v in sources.items() if k not in on_host}
        if self._host is None:
            rows, cuda = self._dev.inputs.rows, self.model.device.type == "cuda"
            host = DecodeInputs.allocate(rows, self.max_blocks_per_seq, "cpu", pin_memory=cuda)
            self._host = Staging(host, self.padding_block, self.kv.block_size)
            self._upload_done = torch.cuda.Event() if cuda else None
        if self._upload_done is not None:
            # The previous upload must have read the pinned buffer before we overwrite it. It
            # was queued before the previous replay, so this waits for the step before that
            # to finish on the GPU: the host stays at most one step ahead (no device sync).
            self._upload_done.synchronize()
        self._host.load(on_host, n, width, bucket)
        self._dev.inputs.buffer.copy_(self._host.inputs.buffer, non_blocking=True)
        if self._upload_done is not None:
            self._upload_done.record()
        self._dev.adopt(self._host)
        self._dev.inputs.write_rows(on_dev, n)
