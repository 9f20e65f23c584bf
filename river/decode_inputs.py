"""The decode step's static inputs: one byte buffer holding every per-row field of a step.

A captured CUDA graph reads fixed addresses, so a decode step's inputs (token ids, positions,
slots, block tables, context lengths, exit settings, sampling settings) live in one
preallocated DecodeInputs sized for the largest bucket; each step writes its rows there and pads
the rest. Its fields are views of one byte buffer, so a pinned host twin uploads a whole step's
inputs in a single copy (Staging). river/graphs.py replays the graphs over it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from river.exits import AFTER_RIVER, ExitParams
from river.model import ForwardBatch

__all__ = ["DecodeInputs", "Staging", "SAMPLING_FIELDS", "row_sources", "check_rows"]

# Fields of the shared byte buffer, each starting at a multiple of _ALIGN bytes: any dtype can
# be viewed there, and the kernels see the same (16-byte aligned) pointers as for a tensor of
# their own, so Triton's alignment specialisation is the same as in eager runs.
_ALIGN = 256
_LAYOUT = (
    ("input_ids", torch.int64),
    ("positions", torch.int64),
    ("slot_mapping", torch.int64),
    ("block_tables", torch.int32),
    ("context_lens", torch.int32),
    ("min_layer", torch.int32),
    ("threshold", torch.float32),
    ("active", torch.bool),
    ("start_exited", torch.bool),
    ("after", torch.int8),
    ("batch_min", torch.bool),
    ("signal", torch.int8),
    ("src_index", torch.int64),
    ("host_tokens", torch.int64),
    ("temperature", torch.float32),
    ("top_k", torch.int32),
    ("top_p", torch.float32),
    ("seed", torch.int64),
    ("offset", torch.int64),
)
_BATCH_FIELDS = ("input_ids", "positions", "slot_mapping", "block_tables", "context_lens")
_EXIT_FIELDS = ("threshold", "min_layer", "start_exited", "after", "batch_min", "signal")
# The fields of a sampling step (sampler=True): where each row's input token comes from, and
# the row's sampling settings.
SAMPLING_FIELDS = ("src_index", "host_tokens", "temperature", "top_k", "top_p", "seed", "offset")


@dataclass(frozen=True)
class DecodeInputs:
    """The inputs of one captured decode step (frozen: the tensors are written in place, never
    rebound, since a graph holds their addresses). R rows, the largest bucket."""

    buffer: torch.Tensor  # uint8 [nbytes]: every field below is a view of it
    input_ids: torch.Tensor  # int64 [R]
    positions: torch.Tensor  # int64 [R]
    slot_mapping: torch.Tensor  # int64 [R]
    block_tables: torch.Tensor  # int32 [R, max_blocks], -1 past a row's blocks
    context_lens: torch.Tensor  # int32 [R]
    min_layer: torch.Tensor  # int32 [R]   ExitParams fields from here ...
    threshold: torch.Tensor  # float32 [R]
    active: torch.Tensor  # bool [R]: False on padding rows
    start_exited: torch.Tensor  # bool [R]
    after: torch.Tensor  # int8 [R]
    batch_min: torch.Tensor  # bool [R]
    signal: torch.Tensor  # int8 [R]   ... to here (but active)
    # Sampling steps: the input token of row r is board[src_index[r]] of the runner's token
    # board, or host_tokens[r] where src_index[r] < 0 (a token the host knows, e.g. after a
    # preempted request was recomputed); then the row's sampling settings.
    src_index: torch.Tensor  # int64 [R]
    host_tokens: torch.Tensor  # int64 [R]
    temperature: torch.Tensor  # float32 [R]; 0 = greedy
    top_k: torch.Tensor  # int32 [R]; 0 = off
    top_p: torch.Tensor  # float32 [R]; 1 = off
    seed: torch.Tensor  # int64 [R]
    offset: torch.Tensor  # int64 [R]: the row's generated-token index (its sampling counter)

    @classmethod
    def allocate(cls, rows: int, max_blocks: int, device, pin_memory: bool = False):
        shapes = {n: (rows, max_blocks) if n == "block_tables" else (rows,) for n, _ in _LAYOUT}
        offsets, end = {}, 0
        for name, dtype in _LAYOUT:
            offsets[name] = end
            nbytes = math.prod(shapes[name]) * torch.empty((), dtype=dtype).element_size()
            end += -(-nbytes // _ALIGN) * _ALIGN
        buf = torch.zeros(end, dtype=torch.uint8, device=device, pin_memory=pin_memory)
        views = {}
        for name, dtype in _LAYOUT:
            nbytes = math.prod(shapes[name]) * torch.empty((), dtype=dtype).element_size()
            off = offsets[name]
            views[name] = buf[off : off + nbytes].view(dtype).view(shapes[name])
        return cls(buffer=buf, **views)

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def max_blocks(self) -> int:
        return self.block_tables.shape[1]

    def head(self, n: int) -> DecodeInputs:
        """Views of the first n rows (what the graph of bucket n reads)."""
        return replace(
            self, **{f.name: getattr(self, f.name)[:n] for f in fields(self) if f.name != "buffer"}
        )

    def forward_batch(self) -> ForwardBatch:
        return ForwardBatch(
            self.input_ids, self.positions, self.slot_mapping, self.block_tables, self.context_lens
        )

    def exit_params(self, uses_river: bool) -> ExitParams:
        """Every path on (host flags True): each weight set's kernels skip by device mask."""
        return ExitParams(
            *(getattr(self, n) for n in _EXIT_FIELDS),
            uses_backbone=True,
            uses_river=uses_river,
            uses_kv_mask=True,
        )

    def write_rows(self, sources: dict, n: int) -> None:
        """Rows 0..n-1 from row_sources() (block table columns past the source's width are left
        as they are; a None `active` means every row is active)."""
        for name, src in sources.items():
            if name == "block_tables":
                self.block_tables[:n, : src.shape[1]].copy_(src)
            elif src is None:
                self.active[:n].fill_(True)
            else:
                getattr(self, name)[:n].copy_(src)

    def write_padding(self, start: int, stop: int, padding_block: int, block_size: int) -> None:
        """Rows start..stop-1 become padding: inactive rows that write (nothing but) the first
        slot of the padding block and never exit."""
        if start >= stop:
            return
        rows = slice(start, stop)
        self.input_ids[rows].fill_(0)
        self.positions[rows].fill_(0)
        self.slot_mapping[rows].fill_(padding_block * block_size)
        self.block_tables[rows].fill_(-1)
        # A real block id in column 0 keeps even an unmasked read of the row in bounds.
        self.block_tables[rows, 0].fill_(padding_block)
        self.context_lens[rows].fill_(1)
        self.active[rows].fill_(False)
        self.threshold[rows].fill_(float("inf"))
        self.min_layer[rows].fill_(0)
        self.start_exited[rows].fill_(False)
        self.after[rows].fill_(AFTER_RIVER)
        self.batch_min[rows].fill_(False)
        self.signal[rows].fill_(0)
        self.src_index[rows].fill_(-1)
        self.host_tokens[rows].fill_(0)
        self.temperature[rows].fill_(0.0)
        self.top_k[rows].fill_(0)
        self.top_p[rows].fill_(1.0)
        self.seed[rows].fill_(0)
        self.offset[rows].fill_(0)


class Staging:
    """A DecodeInputs plus what the host knows about its rows, so that a step rewrites only what
    changed: padding rows stay padding, and stale block ids are cleared only when needed."""

    def __init__(self, inputs: DecodeInputs, padding_block: int, block_size: int):
        self.inputs = inputs
        self.padding_block, self.block_size = padding_block, block_size
        self.is_pad = [True] * inputs.rows
        # Invariant: in every row, block table columns >= table_dirty hold -1.
        self.table_dirty = 1
        inputs.write_padding(0, inputs.rows, padding_block, block_size)

    def load(self, sources: dict, n: int, width: int, bucket: int) -> None:
        """Write n real rows (those of `sources` present: the caller may write the others
        itself), pad rows n..bucket-1, and clear block table columns >= width of the n rows."""
        inp, w = self.inputs, width
        stale = [r for r in range(n, bucket) if not self.is_pad[r]]
        if stale:
            inp.write_padding(stale[0], stale[-1] + 1, self.padding_block, self.block_size)
            for r in range(stale[0], stale[-1] + 1):
                self.is_pad[r] = True
        inp.write_rows(sources, n)
        if w < self.table_dirty:
            inp.block_tables[:n, w : self.table_dirty].fill_(-1)
        self.table_dirty = max(self.table_dirty, w)
        self.is_pad[:n] = [False] * n

    def adopt(self, other: Staging) -> None:
        """Take over another staging's bookkeeping after its buffer was copied into ours."""
        self.is_pad = list(other.is_pad)
        self.table_dirty = other.table_dirty


def row_sources(batch: ForwardBatch, exits: ExitParams, active, sampling=None) -> dict:
    """{DecodeInputs field: the tensor its rows come from} (active: None = all rows active;
    sampling: None, or {SAMPLING_FIELDS name: tensor})."""
    src = {name: getattr(batch, name) for name in _BATCH_FIELDS}
    src.update({name: getattr(exits, name) for name in _EXIT_FIELDS})
    src["active"] = active
    if sampling is not None:
        src.update(sampling)
    return src


def check_rows(batch: ForwardBatch, exits: ExitParams, active, n: int, max_blocks: int):
    # Shapes only (host metadata): reading values here would be a device sync.
    for name in ("positions", "slot_mapping", "context_lens"):
        if getattr(batch, name).shape != (n,):
            raise ValueError(f"ForwardBatch.{name} must have {n} rows like input_ids")
    if batch.block_tables.dim() != 2 or batch.block_tables.shape[0] != n:
        raise ValueError(f"block_tables must be [{n}, max_blocks]")
    if batch.block_tables.shape[1] < 1:
        raise ValueError("block_tables need at least one column")
    if batch.block_tables.shape[1] > max_blocks:
        raise ValueError(
            f"block tables are {batch.block_tables.shape[1]} wide; the runner was "
            f"built for max_blocks_per_seq={max_blocks}"
        )
    for name in _EXIT_FIELDS:
        if getattr(exits, name).shape != (n,):
            raise ValueError(f"ExitParams.{name} must have {n} rows (one per decode row)")
    if active is not None and active.shape != (n,):
        raise ValueError(f"active must be bool [{n}]")
