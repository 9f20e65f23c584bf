"""Split-K for the projection and attention kernels: partials, tickets, workspace, split count.

A weight of N x K streamed by too few programs leaves HBM idle, so K is split over SPLIT_K
programs per output tile. Each writes a float32 partial into a workspace; an int32 ticket per
tile (taken with an acq_rel atomic) tells the last program to arrive, which sums the partials
in split order (bitwise deterministic) and runs the epilogue, then puts the ticket back to 0:
no zeroing launch, and the kernels stay CUDA-graph safe. The split count is a pure function of
the shapes (never autotuned): it sizes the workspace and the grid before any graph capture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "store_partial",
    "arrive",
    "sum_partials",
    "pick_split",
    "split_traffic_cap",
    "weight_byte_rate",
    "MAX_SPLIT_K",
    "workspace",
    "workspace_tensors",
    "split_launch",
]


# fmt: off
@triton.jit
def _partial_offsets(
    tile, split, slot,
    NUM_ACC: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # fmt: on
    """Offsets of accumulator `slot` of split `split` of `tile` in the workspace
    [tiles, SPLIT_K, NUM_ACC, BLOCK_M, BLOCK_N] (float32, no padding between tiles)."""
    base = ((tile.to(tl.int64) * SPLIT_K + split) * NUM_ACC + slot) * (BLOCK_M * BLOCK_N)
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    return base + offs


# fmt: off
@triton.jit
def store_partial(
    ws_ptr, acc,
    m_ok,  # [BLOCK_M] rows that exist: padding rows are neither written nor read back
    tile, split, slot,
    NUM_ACC: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # fmt: on
    offs = _partial_offsets(tile, split, slot, NUM_ACC, SPLIT_K, BLOCK_M, BLOCK_N)
    tl.store(ws_ptr + offs, acc, mask=m_ok[:, None])


@triton.jit
def arrive(counter_ptr, SPLIT_K: tl.constexpr):
    """Take a ticket for this tile; True for the last of its SPLIT_K programs to arrive.

    The CTA barrier orders every thread's partial stores before the (single-thread) release
    of the acq_rel atomic, and its acquire side orders the last program's partial loads after
    all the other programs' stores (the CUTLASS semaphore pattern). The last program puts the
    ticket back to 0 for the next launch (no memset, CUDA-graph safe)."""
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    is_last = ticket == SPLIT_K - 1
    if is_last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return is_last


@triton.jit
def sum_partials(
    ws_ptr,
    m_ok,
    tile,
    slot,
    NUM_ACC: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Sum of the SPLIT_K partials of one accumulator, in split order (deterministic).
    `.cg` loads go to L2, the coherence point, never to a possibly stale L1 line."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):  # unrolled: all the loads are in flight together
        offs = _partial_offsets(tile, split, slot, NUM_ACC, SPLIT_K, BLOCK_M, BLOCK_N)
        acc += tl.load(ws_ptr + offs, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
    return acc


# ------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------

_TARGET_PROGRAMS_PER_SM = 4  # enough loads in flight per SM to cover HBM latency
MAX_SPLIT_K = 32
_PARTIAL_TRAFFIC = 0.06  # split-K partials: at most ~6% extra memory traffic


def pick_split(k_steps: int, tiles: int, num_sms: int, max_split: int = MAX_SPLIT_K) -> int:
    """Smallest power-of-two split giving ~4 programs per SM, keeping >= 4 K steps per split
    and at most `max_split` splits."""
    split = 1
    while (
        tiles * split < _TARGET_PROGRAMS_PER_SM * num_sms
        and split * 2 <= min(MAX_SPLIT_K, max_split)
        and k_steps >= 4 * split
    ):
        split *= 2
    return split


def weight_byte_rate(use_w4: bool, group_size: int, hi_plane: bool = False) -> float:
    """Bytes a kernel reads per weight element: bf16 2; W4 the nibble plus its group's bf16
    scale and zero (0.5 + 4 / G); W6 (use_w4 with the 2-bit plane) 0.75 + 4 / G."""
    if not use_w4:
        return 2.0
    return (0.75 if hi_plane else 0.5) + 4 / group_size


def split_traffic_cap(
    k: int, m_rows: int, use_w4: bool, group_size: int, hi_plane: bool = False
) -> int:
    """Most splits whose float32 partials (written once, read once: 8 bytes per row and column
    per split) stay within _PARTIAL_TRAFFIC of the weight bytes (per column: K x
    weight_byte_rate). Used where the tile is fixed (the qkv kernel's half-head tiles)."""
    weight_bytes = k * weight_byte_rate(use_w4, group_size, hi_plane)
    return max(1, int(_PARTIAL_TRAFFIC * weight_bytes / (8 * m_rows)))


class _Workspace:
    """Per-device split-K scratch: float32 partials and int32 tickets (kept at zero by the
    kernels). Grown on demand; warm up eagerly with the largest shapes before CUDA-graph
    capture so that no allocation happens inside a capture. Not shared between streams."""

    def __init__(self):
        self._ws: dict = {}
        self._cnt: dict = {}

    def get(self, device: torch.device, num_floats: int, num_counters: int):
        key = (device.type, device.index)
        ws = self._ws.get(key)
        if ws is None or ws.numel() < num_floats:
            ws = torch.empty(max(num_floats, 1 << 16), dtype=torch.float32, device=device)
            self._ws[key] = ws
        cnt = self._cnt.get(key)
        if cnt is None or cnt.numel() < num_counters:
            cnt = torch.zeros(max(num_counters, 4096), dtype=torch.int32, device=device)
            self._cnt[key] = cnt
        return ws, cnt

    def tensors(self) -> list[torch.Tensor]:
        return [*self._ws.values(), *self._cnt.values()]


_WORKSPACE = _Workspace()


def workspace(device: torch.device, num_floats: int, num_counters: int):
    """(float32 partials >= num_floats, int32 tickets >= num_counters) of `device`."""
    return _WORKSPACE.get(device, num_floats, num_counters)


def split_launch(k, block_k, split_k, tiles, floats_per_split, device, unused):
    """(K_PER_SPLIT, SPLIT_K, partials, tickets) of a launch over `tiles` output tiles: K cut
    into split_k parts of whole BLOCK_K steps, no empty part; the buffers are the workspace's
    when the launch splits, else `unused` (a pointer the kernel never reads)."""
    k_per_split = triton.cdiv(triton.cdiv(k, block_k), split_k) * block_k
    split = triton.cdiv(k, k_per_split)
    if split == 1:
        return k_per_split, 1, unused, unused
    ws, cnt = workspace(device, tiles * split * floats_per_split, tiles)
    return k_per_split, split, ws, cnt


def workspace_tensors() -> list[torch.Tensor]:
    """Every workspace tensor allocated so far. CUDA graphs bake in their addresses: a graph
    runner holds these references so that a later, larger eager launch that grows (reallocates)
    the workspace cannot free memory a captured graph still points into."""
    return _WORKSPACE.tensors()
