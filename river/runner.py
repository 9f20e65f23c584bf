"""The model runner: runs what the scheduler chose, on the device, and hands tokens back one
step behind.

A step of the engine is three stops (as in nano-vllm): the scheduler decides who runs, this
runner runs it, the engine post-processes what came back. The runner never reads a token on the
host to build the next step:

- Every request's next input token stays on the device, in the decode graph's token board:
  slots [0, R) hold the last decode step's samples (row i of that step in slot i), slots
  [R, 2R) the samples of this step's prefill. The host only says, per row, where its token is
  (`src_index`), or gives a token it already knows (a preempted request recomputed).
- Positions, slots, block tables and context lengths come from counts (prompt length and
  tokens scheduled so far), so a step is built before the previous one's tokens are known.
- Each launched step copies its tokens (and backbone layers used) into a pinned ring slot and
  records an event; `collect()` waits on an event only after the next step was enqueued, so
  stop checks, streaming and detokenizing overlap the GPU. On the CPU the same code runs
  eagerly and the wait is a no-op.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from river.exits import ExitParams
from river.graphs import DecodeGraphRunner
from river.kv_cache import blocks_needed, pad_block_tables, slots_for
from river.model import ForwardBatch
from river.parallel import mirrored

_RING = 4  # readback slots: at most a prefill and a decode are in flight per step, two steps


@dataclass
class Launched:
    """A launched step whose tokens are not read yet."""

    reqs: list  # the requests of its rows, in row order
    slot: int  # ring slot its tokens/layers are copied to
    event: object  # torch.cuda.Event or None (CPU: already done)
    layers: int | None  # backbone layers of every row (prefill), or None: read `used`
    # When its tokens existed, where the host knows it at launch (CPU: the step ran inside
    # the launch). The engine collects a step after launching the next one, so stamping
    # tokens at collection would date them one step late (CUDA: collection time, which waits
    # for the step's event).
    done_time: float | None = None


class ModelRunner:
    """Owns the decode runner (CUDA graphs or the same step eagerly), the prefill sampling and
    the readback ring. `rows` = max_num_seqs."""

    def __init__(
        self, model, kv, max_num_seqs: int, max_model_len: int, torch_compile: bool = False
    ):
        self.model, self.kv = model, kv
        self.device = model.device
        max_blocks = blocks_needed(max_model_len, kv.block_size)
        # One code path on every device: graphs on CUDA; on the CPU the padded static step the
        # graphs capture, run eagerly (padding rows are masked out, so they cost ~nothing).
        self.decode = DecodeGraphRunner(
            model, kv, max_num_seqs, max_blocks, pad_eager=True, sampler=True,
            torch_compile=torch_compile,
        )  # fmt: skip
        self.rows = self.decode.board.shape[0] // 2
        cuda = self.device.type == "cuda"
        self._ring = torch.zeros(_RING, 2, 2 * self.rows, dtype=torch.int64, pin_memory=cuda)
        self._events = [torch.cuda.Event() for _ in range(_RING)] if cuda else None
        self._next_slot = 0
        self.num_decode_steps = 0  # steps launched; a row's board slot is valid for one step
        self.mirror = None  # rank 0's river.parallel.Leader under tensor parallelism
        self.exit_log: list | None = None  # backbone layers of every decode step, if recording

    @property
    def hist(self) -> torch.Tensor:
        """int64 [L + 1] on the device: decode row-steps per number of backbone layers."""
        return self.decode.hist

    @mirrored("runner")
    def on_river_attached(self) -> None:
        if self.decode.use_graphs:
            self.decode.capture()  # the graphs must hold the river's kernels too

    # ------------------------------------------------------------------ launch
    def _readback(self, reqs, tokens, used, layers) -> Launched:
        slot = self._next_slot
        self._next_slot = (slot + 1) % _RING
        if self._events is not None:
            self._events[slot].synchronize()  # its previous step was collected long ago
        n = len(reqs)
        self._ring[slot, 0, :n].copy_(tokens, non_blocking=True)
        if used is not None:
            self._ring[slot, 1, :n].copy_(used, non_blocking=True)
        event, done = None, None
        if self._events is not None:
            event = self._events[slot]
            event.record()
        else:
            done = time.perf_counter()
        return Launched(reqs, slot, event, layers, done)

    def prefill(self, reqs, batch: ForwardBatch, fresh: list[int]) -> Launched | None:
        """Prefill `reqs` (eager) and sample the first token of reqs[i] for i in `fresh` on
        the device, into board slot R + j for the j-th of them. (The others are preempted
        requests whose cache was recomputed: their next token is already known.)"""
        rows = [reqs[i] for i in fresh]
        greedy = all(r.params.temperature == 0 for r in rows)
        # (greedy rows skip the sampler's vocabulary sort)
        sampling = None if greedy else sampling_tensors(rows, [0] * len(rows), "cpu")
        tokens = self.prefill_tokens(batch, fresh, len(reqs), sampling)
        if tokens is None:
            return None
        return self._readback(rows, tokens, None, self.model.cfg.num_layers)

    @mirrored("runner")
    def prefill_tokens(self, batch: ForwardBatch, fresh: list[int], n: int, sampling):
        """The device half of prefill(): the forward over n sequences, then the first tokens
        of those in `fresh` sampled (argmax when `sampling` is None) onto the board."""
        logits = self.model.prefill(batch, self.kv)
        if not fresh:
            return None
        if len(fresh) != n:
            logits = logits[torch.tensor(fresh, device=logits.device)]
        if sampling is None:
            tokens = logits.argmax(-1)
        else:
            p = {k: v.to(self.device) for k, v in sampling.items()}
            tokens = self.model.ops.sample(
                logits, p["temperature"], p["top_k"], p["top_p"], p["seed"], p["offset"]
            )
        self.decode.board[self.rows : self.rows + len(fresh)].copy_(tokens)
        return tokens

    def decode_step(self, reqs, sources: list[int], host_tokens: list[int]):
        """One decode step over `reqs` (each has `scheduled` tokens so far). sources[i] is the
        board slot of row i's input token, or -1 with host_tokens[i] the token."""
        n, block_size = len(reqs), self.kv.block_size
        pos = [len(r.prompt_ids) + r.scheduled - 1 for r in reqs]
        slots = [slots_for(r.blocks, p, p + 1, block_size)[0] for r, p in zip(reqs, pos)]
        batch = ForwardBatch(
            input_ids=torch.zeros(n, dtype=torch.int64),  # unused: the board has the tokens
            positions=torch.tensor(pos, dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=pad_block_tables([r.blocks for r in reqs]),
            context_lens=torch.tensor([p + 1 for p in pos], dtype=torch.int32),
        )
        exits = ExitParams.build([r.params.exit for r in reqs], "cpu")
        sampling = sampling_tensors(reqs, [r.scheduled for r in reqs], "cpu")
        sampling["src_index"] = torch.tensor(sources, dtype=torch.int64)
        sampling["host_tokens"] = torch.tensor(host_tokens, dtype=torch.int64)
        greedy = all(r.params.temperature == 0 for r in reqs)
        tokens, used = self.decode_tokens(batch, exits, sampling, greedy)
        self.num_decode_steps += 1
        return self._readback(reqs, tokens, used, None)

    @mirrored("runner")
    def decode_tokens(self, batch: ForwardBatch, exits: ExitParams, sampling: dict, greedy):
        """The device half of decode_step(): one step, its tokens written to the board.
        Returns (tokens, backbone layers used), views valid until the next step."""
        tokens, used = self.decode.run(batch, exits, None, sampling, greedy)
        if self.exit_log is not None:
            self.exit_log.append(used.tolist())
        return tokens, used

    @mirrored("runner")
    def record_exits(self, on: bool = True) -> None:
        """Keep every decode step's backbone layers per row in `exit_log` (a host read per
        step: tests compare the ranks' exit decisions with it)."""
        self.exit_log = [] if on else None

    # ------------------------------------------------------------------ collect
    def collect(self, launched: Launched) -> tuple[list[int], list[int]]:
        """(tokens, backbone layers) of a launched step, waiting for it if it is still running."""
        if launched.event is not None:
            launched.event.synchronize()
        n = len(launched.reqs)
        tokens = self._ring[launched.slot, 0, :n].tolist()
        layers = (
            [launched.layers] * n
            if launched.layers is not None
            else self._ring[launched.slot, 1, :n].tolist()
        )
        return tokens, layers


def sampling_tensors(reqs, offsets: list[int], device) -> dict:
    """The rows' sampling settings as tensors (host tensors feed the runner's pinned upload)."""
    return {
        "temperature": torch.tensor(
            [r.params.temperature for r in reqs], dtype=torch.float32, device=device
        ),
        "top_k": torch.tensor([r.params.top_k for r in reqs], dtype=torch.int32, device=device),
        "top_p": torch.tensor([r.params.top_p for r in reqs], dtype=torch.float32, device=device),
        "seed": torch.tensor([r.seed for r in reqs], dtype=torch.int64, device=device),
        "offset": torch.tensor(offsets, dtype=torch.int64, device=device),
    }
