"""Launch settings of the projection kernels (kernels/matmul.py, kernels/qkv_rope.py).

Never autotuned: the split count sizes the workspace and the grid and must be fixed before
CUDA-graph capture, and autotuning's benchmark runs cannot happen inside a capture. Instead a
pure function of the shapes: fixed GEMV tiles and ~4 programs per SM for M == 1; for M > 1 the
(BLOCK_N, split) pair that minimises a two-level bandwidth model (narrow tiles re-read x,
splits add partials, both via L2). `benchmarks/bench_kernels.py --sweep` measures the
alternatives on a GPU (passing `settings=` to the launchers) to check the model's choices.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import triton

from .splitk import MAX_SPLIT_K, pick_split, weight_byte_rate

__all__ = ["LaunchSettings", "linear_settings", "m_bucket"]


@dataclass(frozen=True)
class LaunchSettings:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


def m_bucket(m: int):
    """Row-count classes that share settings: 1 (GEMV), 16, 32, 64 or "big"."""
    if m == 1:
        return 1
    for b in (16, 32, 64):
        if m <= b:
            return b
    return "big"


# Rough H100 figures for the cost model below (HBM3 ~3.35 TB/s peak, L2 hit bandwidth); only
# their ratio matters to the choice, and the GPU sweep replaces the choice anyway.
_HBM_BW = 3.0e12
_L2_BW = 7.0e12


def _dot_path_cost(n, k, m, block_m, block_n, split, use_w4, group_size, hi_plane=False):
    """Estimated seconds of the tl.dot path: every weight byte comes from HBM once; every
    program re-reads its rows of x (from L2) and the split-K partials go through L2."""
    weight = n * k * weight_byte_rate(use_w4, group_size, hi_plane)
    x_reads = triton.cdiv(n, block_n) * m * k * 2
    partials = 8 * split * n * m if split > 1 else 0
    return max(weight / _HBM_BW, (weight + x_reads + partials) / _L2_BW)


@functools.cache  # a pure function of its arguments; called on every eager launch
def linear_settings(
    n: int,
    k: int,
    m: int,
    use_w4: bool,
    group_size: int = 64,
    num_sms: int = 132,
    hi_plane: bool = False,
) -> LaunchSettings:
    """Launch settings of the projection kernels for weight N x K and M rows (hi_plane: a
    6-bit twin, use_w4 with the 2-bit plane).

    n is the number of output columns one program's accumulator covers in total (N for
    linear, I for gate_up where each program also does the matching up rows).
    M == 1: fixed tiles and the smallest split giving ~4 programs per SM (x and the partials
    are a few hundred KiB, negligible). M > 1: the (BLOCK_N, split) pair minimising a
    two-level bandwidth model among those giving >= 2 programs per SM: narrow tiles re-read x
    once per program, splits add partials; both go through L2."""
    bucket = m_bucket(m)
    if bucket == 1:
        # W4: [64 rows, 256 k] = 8 KiB of packed weight per step, 4 x 16-byte loads a thread;
        # bf16: [32 rows, 256 k] = 16 KiB per step
        block_n, block_k = (64, max(group_size, 256)) if use_w4 else (32, 256)
        if hi_plane:
            # W6: [64 rows, 128 k] = 6 KiB of the two planes per step. At 256 k ptxas kept
            # both planes' prefetched words live in ~255 registers a thread (sm_90); at 128 k
            # in ~80, W4's occupancy or better (tests/test_compile_sm90.py reports them)
            block_k = max(group_size, 128)
        block_k = min(block_k, max(group_size if use_w4 else 16, triton.next_power_of_2(k)))
        tiles = triton.cdiv(n, block_n)
        split = pick_split(triton.cdiv(k, block_k), tiles, num_sms)
        return LaunchSettings(1, block_n, block_k, split, 4, 3)
    block_m = 64 if bucket == "big" else bucket
    block_k = 64 if (bucket == "big" and not use_w4) else 128
    block_k = min(block_k, max(group_size if use_w4 else 16, triton.next_power_of_2(k)))
    k_steps = triton.cdiv(k, block_k)
    best = None
    for block_n in (128, 64, 32, 16):
        if block_n == 128 and block_m == 64:
            continue  # two 64 x 128 accumulators (gate_up) spill registers even with 8 warps
        tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
        split = 1
        while True:
            programs = tiles * split
            cost = _dot_path_cost(n, k, m, block_m, block_n, split, use_w4, group_size, hi_plane)
            enough = programs >= 2 * num_sms
            # rank: enough programs first, then the estimate, then fewer splits
            rank = (not enough, cost if enough else -programs, split)
            if best is None or rank < best[0]:
                best = (rank, block_n, split)
            if split * 2 > MAX_SPLIT_K or k_steps < 4 * split * 2:
                break
            split *= 2
    _, block_n, split = best
    # 8 warps at BLOCK_M = 64 (4 warps need 230 registers with the gate_up pair)
    warps = 8 if block_m == 64 or block_n == 128 else 4
    return LaunchSettings(block_m, block_n, block_k, split, warps, 3)
