"""Decode-step linears: `linear` and `gate_up_silu`, bf16 or W4A16 weights, with a device row mask.

One kernel serves both weight formats (constexpr `USE_W4`) and both ops (constexpr `GATE_UP`).
The decode step multiplies M = 1..64 rows by a weight of N x K = 4096..28672 x 4096..14336, so
the time is the time to stream the weight from HBM once; everything below is about that:

* Split-K. One program owns BLOCK_N weight rows x K / SPLIT_K columns, so even N = 4096 gives
  ~4 programs per SM (enough bytes in flight to cover HBM latency). Partial sums go to a
  float32 workspace and the *last* program of a tile to arrive (an int32 ticket per tile, taken
  with an acq_rel atomic after a CTA barrier) adds the partials in split order and runs the
  epilogue. Compared with float32 atomics into the output this needs no zeroing launch and no
  cast launch, and the result is bitwise deterministic, so seeded sampling replays exactly.
  The tickets reset themselves, which keeps the kernel CUDA-graph safe.
* W4A16 (USE_W4). The uint8 qweight [N, K // 2] is read as int32 words [N, K // 8], 8 nibbles
  per word (k = 8 * word + i), with 16-byte vector loads. A nibble becomes a float without the
  slow int->float converter: `(word & (0xF << 4i)) | 0x4B000000` is the float 2^23 + q * 2^4i
  exactly, and subtracting 2^23 leaves q * 2^4i (one LOP3 + one FADD per weight; nibbles 5..7
  are shifted down by 12 first so the value stays below 2^23).
  - M == 1 (GEMV, BLOCK_M == 1): CUDA-core FMAs on [BLOCK_N, groups, words] tiles. The power of
    two is folded into the activations (per column, not per weight), and the scale and zero
    are applied per group, not per weight: sum_k x_k (q_k - z) s = s (sum_k x_k q_k -
    z sum_k x_k). So the inner loop is LOP3 + FADD + FFMA per weight (~4.5 SASS instructions
    per weight in total with the unpacking of x; ~123 registers, no spills, sm_90a). The
    packed words of the next K step are requested before the current one is unpacked.
  - M > 1 (BLOCK_M >= 16): dequantize (q - z) * s in float32 (two FMAs), cast to the
    activation dtype, re-interleave the 8 nibble planes into k order with a tree of `tl.join`
    (register moves only) and use `tl.dot` (tensor cores); the rows beyond M are padding.
* Dense (bf16) weights: the same two paths without the unpacking (GEMV with 16-byte loads and
  FMAs for M == 1; `tl.dot` for M > 1).
* Row mask: every program first reads the mask of its rows (a few bytes) and returns before
  touching the weight when none is active. That is how a CUDA-graph-captured decode step runs a
  weight set for a subset of rows with no host-side knowledge of the subset.

Launch settings come from a small table keyed on (format, N, K, M bucket) (LINEAR_TABLE, to
be filled from `benchmarks/bench_kernels.py --sweep` on an H100) with a heuristic fallback:
fixed GEMV tiles and ~4 programs per SM for M == 1; for M > 1 the (BLOCK_N, split) pair that
minimises a two-level bandwidth model (narrow tiles re-read x, splits add partials, both via
L2). Never autotuning: the split count sizes the workspace and the grid and must be fixed
before CUDA-graph capture, and autotuning's benchmark runs cannot happen inside a capture.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["linear", "gate_up_silu", "LaunchSettings", "linear_settings"]

# ------------------------------------------------------------------------------------------
# Shared @triton.jit helpers (also used by kernels/qkv_rope.py: keep them generic)
# ------------------------------------------------------------------------------------------


@triton.jit
def _rows_active(row_mask_ptr, offs_m, M, HAS_ROW_MASK: tl.constexpr):
    """(active [BLOCK_M] bool, any_active scalar) for the rows `offs_m` of a program.

    Reading the mask costs BLOCK_M bytes; it lets a program skip all its weight traffic when
    the mask selects none of its rows."""
    in_range = offs_m < M
    if HAS_ROW_MASK:
        active = (tl.load(row_mask_ptr + offs_m, mask=in_range, other=0) != 0) & in_range
    else:
        active = in_range
    return active, tl.max(active.to(tl.int32), axis=0)


@triton.jit
def _w4_nibble(words, magic, NIBBLE: tl.constexpr, EXACT: tl.constexpr):
    """Nibble NIBBLE (k = 8 word + NIBBLE) of int32 words as float32, with no int->float convert.

    OR-ing a value v < 2^23 into the mantissa of 2^23 (`magic` = 0x4B000000) gives the float
    2^23 + v exactly. Nibbles 0..4 are masked in place (v = q * 2^E, E = 4 NIBBLE < 20);
    nibbles 5..7 are first shifted down by 12 (E = 4 NIBBLE - 12). EXACT=False returns
    v = q * 2^E (one LOP3 + one FADD; the caller folds 2^-E into the activations);
    EXACT=True returns q (LOP3 + FFMA).
    `magic` is a run-time kernel argument on purpose: as a register operand it leaves the LOP3
    immediate slot to the nibble mask; two compile-time constants would cost an extra MOV per
    weight (ptxas re-materialises the second one under register pressure).
    """
    E: tl.constexpr = 4 * NIBBLE - 12 * (NIBBLE // 5)
    if NIBBLE < 5:
        bits = (words & (15 << (4 * NIBBLE))) | magic
    else:
        bits = ((words >> 12) & (15 << E)) | magic
    f = bits.to(tl.float32, bitcast=True)
    if EXACT:
        return f * (1.0 / (1 << E)) - (8388608.0 / (1 << E))
    else:
        return f - 8388608.0


@triton.jit
def _w4_gemv_load(
    w_rows,  # [BLOCK_N, 1, 1] row pointers into int32 [N, K // 8]
    s_rows,  # [BLOCK_N, 1] row pointers into [N, K // G]
    z_rows,
    rows_ok,
    word,  # [NGB, WPG] word offsets within a step
    offs_g,  # [NGB]
    k0,  # first column of the step (a multiple of BLOCK_K)
    k_stop,
    K,
    GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Packed words [BLOCK_N, NGB, WPG], scales and zeros [BLOCK_N, NGB] of the K step at k0;
    zeros (and no memory traffic) when k0 >= k_stop (the prefetch past the last step)."""
    k0 = tl.multiple_of(k0, BLOCK_K)
    kw = tl.multiple_of(k0 // 8, BLOCK_K // 8) + word
    kg = k0 // GROUP + offs_g
    # (a [1, 1] tensor rather than a scalar: the interpreter cannot AND a Python bool mask)
    live = (tl.zeros([1, 1], dtype=tl.int32) + k0) < k_stop
    w_ok = rows_ok[:, None, None] & live[None, :, :]
    g_ok = rows_ok[:, None] & live
    if not EVEN_K:
        w_ok = w_ok & (kw < K // 8)[None, :, :]
        g_ok = g_ok & (kg < K // GROUP)[None, :]
    words = tl.load(w_rows + kw[None, :, :], mask=w_ok, other=0)
    s = tl.load(s_rows + kg[None, :], mask=g_ok, other=0.0)
    z = tl.load(z_rows + kg[None, :], mask=g_ok, other=0.0)
    return words, s, z


@triton.jit
def _w4_gemv_tile(
    x_row_ptr,  # [K] the activation row (BLOCK_M == 1)
    w_ptr,  # int32 [N, K // 8]
    s_ptr,  # [N, K // G]
    z_ptr,  # [N, K // G]
    stride_w_n,
    stride_s_n,
    stride_z_n,
    rows,  # [BLOCK_N] weight rows
    rows_ok,
    k_start,
    k_stop,
    K,
    magic,  # int32 0x4B000000 (see _w4_nibble)
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """acc[n] = sum_k x[k] * (q[n, k] - z[n, k // G]) * s[n, k // G] over [k_start, k_stop).

    Tiles are [BLOCK_N, NGB groups, WPG words]; per group the scale/zero are applied once:
    s * (sum x q - z * sum x). Returns [1, BLOCK_N] float32."""
    WPG: tl.constexpr = GROUP // 8  # int32 words per quantization group
    NGB: tl.constexpr = BLOCK_K // GROUP  # groups per K step
    offs_g = tl.arange(0, NGB)
    word = offs_g[:, None] * WPG + tl.arange(0, WPG)[None, :]  # [NGB, WPG] word in the step
    rows64 = rows.to(tl.int64)
    w_rows = w_ptr + rows64[:, None, None] * stride_w_n
    s_rows = s_ptr + rows64[:, None] * stride_s_n
    z_rows = z_ptr + rows64[:, None] * stride_z_n
    acc = tl.zeros([BLOCK_N, NGB], dtype=tl.float32)
    # Software pipelining by hand (Triton only pipelines loads that feed tl.dot): the packed
    # words, scales and zeros of step k0 + BLOCK_K are requested before step k0 is unpacked,
    # so every warp keeps one step of HBM traffic in flight while it computes.
    words, s, z = _w4_gemv_load(
        w_rows, s_rows, z_rows, rows_ok, word, offs_g, k_start, k_stop, K, GROUP, BLOCK_K, EVEN_K
    )
    for k0 in range(k_start, k_stop, BLOCK_K):
        k0 = tl.multiple_of(k0, BLOCK_K)  # k_start is a multiple of BLOCK_K: 16-byte loads
        kw = tl.multiple_of(k0 // 8, BLOCK_K // 8) + word  # [NGB, WPG] global word index
        words_next, s_next, z_next = _w4_gemv_load(
            w_rows, s_rows, z_rows, rows_ok, word, offs_g, k0 + BLOCK_K, k_stop, K, GROUP,
            BLOCK_K, EVEN_K,
        )  # fmt: skip
        # sum of x over each group, from one contiguous (vectorised) load of the x chunk
        k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            xg = tl.load(x_row_ptr + k).to(tl.float32)
        else:
            xg = tl.load(x_row_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        xg = tl.sum(tl.reshape(xg, [NGB, GROUP]), axis=1)  # [NGB]
        # x of the 8 nibble planes: one 16-byte load per word (x[8 word .. 8 word + 7]), split
        # in registers (k = 8 word + 4 i2 + 2 i1 + i0; tl.split peels the fastest index)
        xk = kw[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]
        if EVEN_K:
            xv = tl.load(x_row_ptr + xk)
        else:
            xv = tl.load(x_row_ptr + xk, mask=xk < K, other=0.0)
        xe, xo = tl.split(tl.reshape(xv.to(tl.float32), [NGB, WPG, 2, 2, 2]))  # i0 = 0, 1
        xe0, xe1 = tl.split(xe)  # i1
        xo0, xo1 = tl.split(xo)
        x0, x4 = tl.split(xe0)  # i2
        x2, x6 = tl.split(xe1)
        x1, x5 = tl.split(xo0)
        x3, x7 = tl.split(xo1)
        part = _w4_nibble(words, magic, 0, False) * (x0 * 1.0)[None, :, :]
        part += _w4_nibble(words, magic, 1, False) * (x1 * 0.0625)[None, :, :]
        part += _w4_nibble(words, magic, 2, False) * (x2 * 0.00390625)[None, :, :]
        part += _w4_nibble(words, magic, 3, False) * (x3 * 0.000244140625)[None, :, :]
        part += _w4_nibble(words, magic, 4, False) * (x4 * 1.52587890625e-05)[None, :, :]
        part += _w4_nibble(words, magic, 5, False) * (x5 * 0.00390625)[None, :, :]
        part += _w4_nibble(words, magic, 6, False) * (x6 * 0.000244140625)[None, :, :]
        part += _w4_nibble(words, magic, 7, False) * (x7 * 1.52587890625e-05)[None, :, :]
        acc += s.to(tl.float32) * (tl.sum(part, axis=2) - z.to(tl.float32) * xg[None, :])
        words, s, z = words_next, s_next, z_next
    return tl.sum(acc, axis=1)[None, :]


@triton.jit
def _w4_dot_tile(
    x_ptr,  # [M, K]
    stride_x_m,
    offs_m,  # [BLOCK_M]
    m_ok,
    w_ptr,  # int32 [N, K // 8]
    s_ptr,  # [N, K // G]
    z_ptr,  # [N, K // G]
    stride_w_n,
    stride_s_n,
    stride_z_n,
    rows,  # [BLOCK_N]
    rows_ok,
    k_start,
    k_stop,
    K,
    magic,  # int32 0x4B000000 (see _w4_nibble)
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """acc[m, n] = sum_k x[m, k] * W[n, k] with W dequantized per tile and multiplied by tl.dot.

    The 8 nibble planes [BLOCK_N, BLOCK_K / 8] are dequantized separately (w = q * s - z * s,
    one exact FMA for q and one FMA for w), then interleaved back into k order by three levels
    of tl.join (k = 8 * word + 4 * i2 + 2 * i1 + i0; the last join is the fastest index)."""
    BKW: tl.constexpr = BLOCK_K // 8
    offs_w = tl.arange(0, BKW)
    offs_k = tl.arange(0, BLOCK_K)
    rows64 = rows.to(tl.int64)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x_m
    w_rows = w_ptr + rows64[:, None] * stride_w_n
    s_rows = s_ptr + rows64[:, None] * stride_s_n
    z_rows = z_ptr + rows64[:, None] * stride_z_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        k0 = tl.multiple_of(k0, BLOCK_K)  # k_start is a multiple of BLOCK_K: 16-byte loads
        kw = tl.multiple_of(k0 // 8, BKW) + offs_w  # [BKW]
        kg = kw // (GROUP // 8)  # [BKW] group of each word (a word never straddles groups)
        if EVEN_K:
            words = tl.load(w_rows + kw[None, :], mask=rows_ok[:, None], other=0)
            s = tl.load(s_rows + kg[None, :], mask=rows_ok[:, None], other=0.0)
            z = tl.load(z_rows + kg[None, :], mask=rows_ok[:, None], other=0.0)
            x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None], other=0.0)
        else:
            ok = rows_ok[:, None] & (kw < K // 8)[None, :]
            words = tl.load(w_rows + kw[None, :], mask=ok, other=0)
            s = tl.load(s_rows + kg[None, :], mask=ok, other=0.0)
            z = tl.load(z_rows + kg[None, :], mask=ok, other=0.0)
            x_ok = m_ok[:, None] & (k0 + offs_k < K)[None, :]
            x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=x_ok, other=0.0)
        s = s.to(tl.float32)
        zs = -z.to(tl.float32) * s
        dt = x.dtype
        n0 = (_w4_nibble(words, magic, 0, True) * s + zs).to(dt)
        n1 = (_w4_nibble(words, magic, 1, True) * s + zs).to(dt)
        n2 = (_w4_nibble(words, magic, 2, True) * s + zs).to(dt)
        n3 = (_w4_nibble(words, magic, 3, True) * s + zs).to(dt)
        n4 = (_w4_nibble(words, magic, 4, True) * s + zs).to(dt)
        n5 = (_w4_nibble(words, magic, 5, True) * s + zs).to(dt)
        n6 = (_w4_nibble(words, magic, 6, True) * s + zs).to(dt)
        n7 = (_w4_nibble(words, magic, 7, True) * s + zs).to(dt)
        b0 = tl.join(tl.join(n0, n4), tl.join(n2, n6))  # [BN, BKW, i2, i1], i0 = 0
        b1 = tl.join(tl.join(n1, n5), tl.join(n3, n7))  # i0 = 1
        w = tl.reshape(tl.join(b0, b1), [BLOCK_N, BLOCK_K])  # k = 8 * word + 4 i2 + 2 i1 + i0
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _dense_gemv_tile(
    x_row_ptr,  # [K]
    w_ptr,  # [N, K]
    stride_w_n,
    rows,  # [BLOCK_N]
    rows_ok,
    k_start,
    k_stop,
    K,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """acc[n] = sum_k x[k] * W[n, k]: [BLOCK_N, BLOCK_K] FMAs, reduced once after the loop."""
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w_n
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        k0 = tl.multiple_of(k0, BLOCK_K)  # k_start is a multiple of BLOCK_K: 16-byte loads
        k = k0 + offs_k
        if EVEN_K:
            w = tl.load(w_rows + k[None, :], mask=rows_ok[:, None], other=0.0)
            x = tl.load(x_row_ptr + k)
        else:
            w = tl.load(w_rows + k[None, :], mask=rows_ok[:, None] & (k < K)[None, :], other=0.0)
            x = tl.load(x_row_ptr + k, mask=k < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    return tl.sum(acc, axis=1)[None, :]


@triton.jit
def _dense_dot_tile(
    x_ptr,  # [M, K]
    stride_x_m,
    offs_m,
    m_ok,
    w_ptr,  # [N, K]
    stride_w_n,
    rows,
    rows_ok,
    k_start,
    k_stop,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """acc[m, n] = sum_k x[m, k] W[n, k]: tl.dot on [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]."""
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x_m
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        k0 = tl.multiple_of(k0, BLOCK_K)  # k_start is a multiple of BLOCK_K: 16-byte loads
        k = k0 + offs_k
        if EVEN_K:
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=rows_ok[:, None], other=0.0)
        else:
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=rows_ok[:, None] & (k < K)[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _matmul_tile(
    x_ptr,  # [M, K] activations
    stride_x_m,
    row0,  # first row of this program's row block
    offs_m,  # [BLOCK_M] rows of this program
    m_ok,
    w_ptr,  # dense [N, K], or W4 int32 [N, K // 8]
    s_ptr,  # W4 scales [N, K // G] (unused when dense)
    z_ptr,  # W4 zeros [N, K // G]
    stride_w_n,
    stride_s_n,
    stride_z_n,
    rows,  # [BLOCK_N] weight rows of this tile
    rows_ok,
    k_start,
    k_stop,
    K,
    magic,  # int32 0x4B000000, a run-time value on purpose (see _w4_nibble)
    USE_W4: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] float32 partial product x[rows_m, k_start:k_stop] @ W[rows, same].T.

    The one inner loop of every projection (linear, gate_up_silu, qkv_rope_store): the
    format (USE_W4) and the path (BLOCK_M == 1: CUDA-core GEMV; else tl.dot) are constexpr."""
    if USE_W4:
        if BLOCK_M == 1:
            acc = _w4_gemv_tile(
                x_ptr + row0.to(tl.int64) * stride_x_m,
                w_ptr,
                s_ptr,
                z_ptr,
                stride_w_n,
                stride_s_n,
                stride_z_n,
                rows,
                rows_ok,
                k_start,
                k_stop,
                K,
                magic,
                GROUP,
                BLOCK_N,
                BLOCK_K,
                EVEN_K,
            )
        else:
            acc = _w4_dot_tile(
                x_ptr,
                stride_x_m,
                offs_m,
                m_ok,
                w_ptr,
                s_ptr,
                z_ptr,
                stride_w_n,
                stride_s_n,
                stride_z_n,
                rows,
                rows_ok,
                k_start,
                k_stop,
                K,
                magic,
                GROUP,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                EVEN_K,
                DOT_PRECISION,
            )
    else:
        if BLOCK_M == 1:
            acc = _dense_gemv_tile(
                x_ptr + row0.to(tl.int64) * stride_x_m,
                w_ptr,
                stride_w_n,
                rows,
                rows_ok,
                k_start,
                k_stop,
                K,
                BLOCK_N,
                BLOCK_K,
                EVEN_K,
            )
        else:
            acc = _dense_dot_tile(
                x_ptr,
                stride_x_m,
                offs_m,
                m_ok,
                w_ptr,
                stride_w_n,
                rows,
                rows_ok,
                k_start,
                k_stop,
                K,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                EVEN_K,
                DOT_PRECISION,
            )
    return acc


@triton.jit
def _partial_offsets(
    tile,
    split,
    slot,
    NUM_ACC: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Offsets of accumulator `slot` of split `split` of `tile` in the workspace
    [tiles, SPLIT_K, NUM_ACC, BLOCK_M, BLOCK_N] (float32, no padding between tiles)."""
    base = ((tile.to(tl.int64) * SPLIT_K + split) * NUM_ACC + slot) * (BLOCK_M * BLOCK_N)
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    return base + offs


@triton.jit
def _store_partial(
    ws_ptr,
    acc,
    m_ok,  # [BLOCK_M] rows that exist: padding rows are neither written nor read back
    tile,
    split,
    slot,
    NUM_ACC: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs = _partial_offsets(tile, split, slot, NUM_ACC, SPLIT_K, BLOCK_M, BLOCK_N)
    tl.store(ws_ptr + offs, acc, mask=m_ok[:, None])


@triton.jit
def _arrive(counter_ptr, SPLIT_K: tl.constexpr):
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
def _sum_partials(
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
# The linear / gate_up_silu kernel
# ------------------------------------------------------------------------------------------


@triton.jit
def _linear_epilogue(
    out_ptr,  # [M, N_OUT]
    stride_out_m,
    acc,  # [BLOCK_M, BLOCK_N] float32 (gate rows when GATE_UP)
    acc_up,  # [BLOCK_M, BLOCK_N] float32 (up rows; unused otherwise)
    offs_m,
    active,
    offs_n,
    n_ok,
    GATE_UP: tl.constexpr,
):
    """Store y (or SiLU(gate) * up) for the active rows only.

    Rounds like the reference: the projection to the output dtype first, SiLU in float32,
    back to the output dtype, then the product rounded once more."""
    dt = out_ptr.dtype.element_ty
    if GATE_UP:
        g = acc.to(dt).to(tl.float32)
        u = acc_up.to(dt).to(tl.float32)
        y = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u
    else:
        y = acc
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_out_m + offs_n[None, :]
    tl.store(ptrs, y.to(dt), mask=active[:, None] & n_ok[None, :])


@triton.jit
def _linear_kernel(
    x_ptr,  # [M, K] activations
    w_ptr,  # dense [N, K] or W4 int32 [N, K // 8]; N = N_OUT (linear) or 2 * N_OUT (gate_up)
    s_ptr,  # W4 scales [N, K // G] (a dummy when dense)
    z_ptr,  # W4 zeros [N, K // G]
    out_ptr,  # [M, N_OUT]
    row_mask_ptr,  # bool [M] (HAS_ROW_MASK)
    ws_ptr,  # float32 split-K partials [tiles, SPLIT_K, NUM_ACC, BLOCK_M, BLOCK_N]
    counter_ptr,  # int32 [tiles] split-K tickets, 0 between launches
    M,
    N_OUT,
    K,
    K_PER_SPLIT,
    W4_MAGIC,  # int32 0x4B000000 (see _w4_nibble)
    stride_x_m,
    stride_w_n,
    stride_s_n,
    stride_z_n,
    stride_out_m,
    USE_W4: tl.constexpr,
    GROUP: tl.constexpr,
    GATE_UP: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] W[n, k] (GATE_UP: SiLU(x Wg^T) * (x Wu^T), Wu = rows N_OUT..)
    for the rows m with row_mask[m]; grid (SPLIT_K, N tiles, M tiles)."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_m = tl.program_id(2)
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    active, any_active = _rows_active(row_mask_ptr, offs_m, M, HAS_ROW_MASK)
    if any_active == 0:
        return  # no active row: not a byte of the weight is read
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N_OUT
    m_ok = offs_m < M
    k_start = pid_k * K_PER_SPLIT
    k_stop = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = _matmul_tile(
        x_ptr, stride_x_m, row0, offs_m, m_ok, w_ptr, s_ptr, z_ptr, stride_w_n, stride_s_n,
        stride_z_n, offs_n, n_ok, k_start, k_stop, K, W4_MAGIC, USE_W4, GROUP, BLOCK_M, BLOCK_N,
        BLOCK_K, EVEN_K, DOT_PRECISION,
    )  # fmt: skip
    if GATE_UP:
        acc_up = _matmul_tile(
            x_ptr, stride_x_m, row0, offs_m, m_ok, w_ptr, s_ptr, z_ptr, stride_w_n, stride_s_n,
            stride_z_n, offs_n + N_OUT, n_ok, k_start, k_stop, K, W4_MAGIC, USE_W4, GROUP, BLOCK_M,
            BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION,
        )  # fmt: skip
    else:
        acc_up = acc
    NUM_ACC: tl.constexpr = 2 if GATE_UP else 1
    if SPLIT_K > 1:
        tile = pid_m * tl.num_programs(1) + pid_n
        _store_partial(ws_ptr, acc, m_ok, tile, pid_k, 0, NUM_ACC, SPLIT_K, BLOCK_M, BLOCK_N)
        if GATE_UP:
            _store_partial(ws_ptr, acc_up, m_ok, tile, pid_k, 1, NUM_ACC, SPLIT_K, BLOCK_M, BLOCK_N)
        if _arrive(counter_ptr + tile, SPLIT_K):
            acc = _sum_partials(ws_ptr, m_ok, tile, 0, NUM_ACC, SPLIT_K, BLOCK_M, BLOCK_N)
            if GATE_UP:
                acc_up = _sum_partials(ws_ptr, m_ok, tile, 1, NUM_ACC, SPLIT_K, BLOCK_M, BLOCK_N)
            else:
                acc_up = acc
            _linear_epilogue(
                out_ptr, stride_out_m, acc, acc_up, offs_m, active, offs_n, n_ok, GATE_UP
            )
    else:
        _linear_epilogue(out_ptr, stride_out_m, acc, acc_up, offs_m, active, offs_n, n_ok, GATE_UP)


# ------------------------------------------------------------------------------------------
# Host side: settings, workspace, checks (the helpers are shared with kernels/qkv_rope.py)
# ------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _num_sms(device_index: int | None) -> int:
    if torch.cuda.is_available() and device_index is not None:
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return 132  # H100 SXM; only sizes the split heuristic on CPU (interpreter)


def _device_index(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 operands (tests) must not silently become TF32 on the GPU
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class LaunchSettings:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


# Measured-on-GPU overrides, keyed on ("w4" | "dense", N, K, M bucket), M bucket = 1, 16, 32, 64
# or "big". Empty until `benchmarks/bench_kernels.py --sweep` has been run on an H100: the
# heuristic below is what runs meanwhile (its choices for the Llama-3-8B shapes are listed in
# BENCHMARKS.md by the benchmark).
LINEAR_TABLE: dict[tuple, LaunchSettings] = {}

_TARGET_PROGRAMS_PER_SM = 4  # enough loads in flight per SM to cover HBM latency
_MAX_SPLIT_K = 32
_PARTIAL_TRAFFIC = 0.06  # split-K partials: at most ~6% extra memory traffic


def _m_bucket(m: int):
    if m == 1:
        return 1
    for b in (16, 32, 64):
        if m <= b:
            return b
    return "big"


def _pick_split(k_steps: int, tiles: int, num_sms: int, max_split: int = _MAX_SPLIT_K) -> int:
    """Smallest power-of-two split giving ~4 programs per SM, keeping >= 4 K steps per split
    and at most `max_split` splits."""
    split = 1
    while (
        tiles * split < _TARGET_PROGRAMS_PER_SM * num_sms
        and split * 2 <= min(_MAX_SPLIT_K, max_split)
        and k_steps >= 4 * split
    ):
        split *= 2
    return split


def _split_traffic_cap(k: int, m_rows: int, use_w4: bool, group_size: int) -> int:
    """Most splits whose float32 partials (written once, read once: 8 bytes per row and column
    per split) stay within _PARTIAL_TRAFFIC of the weight bytes (per column: K x 0.5 + the
    group's bf16 scale and zero for W4, K x 2 for bf16). Used where the tile is fixed (the
    qkv kernel's half-head tiles)."""
    weight_bytes = k * (0.5 + 4 / group_size) if use_w4 else 2 * k
    return max(1, int(_PARTIAL_TRAFFIC * weight_bytes / (8 * m_rows)))


# Rough H100 figures for the cost model below (HBM3 ~3.35 TB/s peak, L2 hit bandwidth); only
# their ratio matters to the choice, and the GPU sweep replaces the choice anyway.
_HBM_BW = 3.0e12
_L2_BW = 7.0e12


def _dot_path_cost(n, k, m, block_m, block_n, split, use_w4, group_size):
    """Estimated seconds of the tl.dot path: every weight byte comes from HBM once; every
    program re-reads its rows of x (from L2) and the split-K partials go through L2."""
    weight = n * k * ((0.5 + 4 / group_size) if use_w4 else 2)
    x_reads = triton.cdiv(n, block_n) * m * k * 2
    partials = 8 * split * n * m if split > 1 else 0
    return max(weight / _HBM_BW, (weight + x_reads + partials) / _L2_BW)


def linear_settings(
    n: int, k: int, m: int, use_w4: bool, group_size: int = 64, num_sms: int = 132
) -> LaunchSettings:
    """Launch settings of the projection kernels for weight N x K and M rows.

    n is the number of output columns one program's accumulator covers in total (N for
    linear, I for gate_up where each program also does the matching up rows).
    M == 1: fixed tiles and the smallest split giving ~4 programs per SM (x and the partials
    are a few hundred KiB, negligible). M > 1: the (BLOCK_N, split) pair minimising a
    two-level bandwidth model among those giving >= 2 programs per SM: narrow tiles re-read x
    once per program, splits add partials; both go through L2."""
    bucket = _m_bucket(m)
    key = ("w4" if use_w4 else "dense", n, k, bucket)
    if key in LINEAR_TABLE:
        return LINEAR_TABLE[key]
    return _heuristic_settings(n, k, m, use_w4, group_size, num_sms)


@functools.cache  # a pure function of its arguments; called on every eager launch
def _heuristic_settings(n, k, m, use_w4, group_size, num_sms) -> LaunchSettings:
    bucket = _m_bucket(m)
    if bucket == 1:
        # W4: [64 rows, 256 k] = 8 KiB of packed weight per step, 4 x 16-byte loads a thread;
        # bf16: [32 rows, 256 k] = 16 KiB per step
        block_n, block_k = (64, max(group_size, 256)) if use_w4 else (32, 256)
        block_k = min(block_k, max(group_size if use_w4 else 16, triton.next_power_of_2(k)))
        tiles = triton.cdiv(n, block_n)
        split = _pick_split(triton.cdiv(k, block_k), tiles, num_sms)
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
            cost = _dot_path_cost(n, k, m, block_m, block_n, split, use_w4, group_size)
            enough = programs >= 2 * num_sms
            # rank: enough programs first, then the estimate, then fewer splits
            rank = (not enough, cost if enough else -programs, split)
            if best is None or rank < best[0]:
                best = (rank, block_n, split)
            if split * 2 > _MAX_SPLIT_K or k_steps < 4 * split * 2:
                break
            split *= 2
    _, block_n, split = best
    # 8 warps at BLOCK_M = 64 (4 warps need 230 registers with the gate_up pair)
    warps = 8 if block_m == 64 or block_n == 128 else 4
    return LaunchSettings(block_m, block_n, block_k, split, warps, 3)


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


_WORKSPACE = _Workspace()

W4_MAGIC = 0x4B000000  # the float 2^23: see _w4_nibble


def _is_w4(weight) -> bool:
    return not isinstance(weight, torch.Tensor) and hasattr(weight, "qweight")


def _weight_operands(weight, x: torch.Tensor):
    """(w, scales, zeros, N, K, group, use_w4) with W4 qweight viewed as int32 [N, K // 8]."""
    if _is_w4(weight):
        q = weight.qweight
        n, half_k = q.shape
        k, g = 2 * half_k, int(weight.group_size)
        if q.dtype != torch.uint8:
            raise ValueError(f"W4 qweight must be uint8, got {q.dtype}")
        if g % 8 or g & (g - 1):
            raise ValueError(f"W4 kernels need a power-of-two group size >= 8, got {g}")
        if k % g:
            raise ValueError(f"W4 weight K={k} is not a multiple of group_size={g}")
        if q.stride(1) != 1 or q.stride(0) % 4 or q.storage_offset() % 4:
            raise ValueError("W4 qweight rows must be contiguous and 4-byte aligned")
        words = q.view(torch.int32)  # [N, K // 8], no copy
        s, z = weight.scales, weight.zeros
        for name, t in (("scales", s), ("zeros", z)):
            if tuple(t.shape) != (n, k // g) or t.stride(1) != 1:
                raise ValueError(f"W4 {name} must be [N, K // G] with unit column stride")
            if t.device != x.device:
                raise ValueError(f"W4 {name} on {t.device}, activations on {x.device}")
        if q.device != x.device:
            raise ValueError(f"W4 qweight on {q.device}, activations on {x.device}")
        return words, s, z, n, k, g, True
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D tensor [N, K] or a W4Weight")
    if weight.stride(1) != 1:
        raise ValueError("dense weight must have unit stride along K")
    if weight.device != x.device:
        raise ValueError(f"weight on {weight.device}, activations on {x.device}")
    n, k = weight.shape
    return weight, weight, weight, n, k, 64, False


def _check_rows(x: torch.Tensor, row_mask):
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if row_mask is not None:
        if row_mask.dtype != torch.bool or tuple(row_mask.shape) != (x.shape[0],):
            raise ValueError("row_mask must be bool [M]")
        if row_mask.device != x.device:
            raise ValueError("row_mask must be on the activations' device")
        if row_mask.stride(0) != 1:
            row_mask = row_mask.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    return x, row_mask


def _launch_linear(x, weight, row_mask, out, gate_up: bool):
    x, row_mask = _check_rows(x, row_mask)
    w, s, z, n_w, k, group, use_w4 = _weight_operands(weight, x)
    m = x.shape[0]
    if k != x.shape[1]:
        raise ValueError(f"x has K={x.shape[1]}, weight has K={k}")
    if gate_up and n_w % 2:
        raise ValueError(f"gate_up weight must have an even number of rows, got {n_w}")
    n_out = n_w // 2 if gate_up else n_w
    if out is None:
        alloc = torch.empty if row_mask is None else torch.zeros  # masked rows read as 0
        out = alloc((m, n_out), dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (m, n_out) or out.stride(1) != 1 or out.device != x.device:
        raise ValueError(f"out must be [{m}, {n_out}] on {x.device} with unit column stride")
    if m == 0 or n_out == 0:
        return out
    cfg = linear_settings(n_out, k, m, use_w4, group, _num_sms(_device_index(x.device)))
    if use_w4 and cfg.block_m == 1 and cfg.block_k % group:
        raise ValueError(f"W4 GEMV block_k={cfg.block_k} must be a multiple of group {group}")
    k_steps = triton.cdiv(k, cfg.block_k)
    k_per_split = triton.cdiv(k_steps, cfg.split_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)  # no empty split
    grid = (split, triton.cdiv(n_out, cfg.block_n), triton.cdiv(m, cfg.block_m))
    num_acc = 2 if gate_up else 1
    tiles = grid[1] * grid[2]
    if split > 1:
        ws, cnt = _WORKSPACE.get(
            x.device, tiles * split * num_acc * cfg.block_m * cfg.block_n, tiles
        )
    else:
        ws, cnt = out, out  # unused
    _linear_kernel[grid](
        x_ptr=x,
        w_ptr=w,
        s_ptr=s,
        z_ptr=z,
        out_ptr=out,
        row_mask_ptr=row_mask if row_mask is not None else x,
        ws_ptr=ws,
        counter_ptr=cnt,
        M=m,
        N_OUT=n_out,
        K=k,
        K_PER_SPLIT=k_per_split,
        W4_MAGIC=W4_MAGIC,
        stride_x_m=x.stride(0),
        stride_w_n=w.stride(0),
        stride_s_n=s.stride(0),
        stride_z_n=z.stride(0),
        stride_out_m=out.stride(0),
        USE_W4=use_w4,
        GROUP=group,
        GATE_UP=gate_up,
        HAS_ROW_MASK=row_mask is not None,
        SPLIT_K=split,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        EVEN_K=k % cfg.block_k == 0,
        DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def _use_cublas(x, weight, row_mask) -> bool:
    """Prefill-sized dense products without a mask go to cuBLAS: the kernel is built for the
    weight-streaming decode regime (M <= 64), cuBLAS wins on compute-bound shapes. The masked
    case always uses the kernel (the mask skip must not read device values on the host)."""
    return row_mask is None and not _is_w4(weight) and x.dim() == 2 and x.shape[0] > 64


def linear(x, weight, row_mask=None, out=None):
    """out[m] = x[m] @ W.T for the rows in row_mask (others keep out's content; zeros when out
    is None). x [M, K]; W [N, K] tensor or W4Weight. Same semantics as reference.linear."""
    if _use_cublas(x, weight, row_mask):
        if out is None:
            return x @ weight.t()
        return torch.matmul(x, weight.t(), out=out)
    return _launch_linear(x, weight, row_mask, out, gate_up=False)


def gate_up_silu(x, weight, row_mask=None, out=None):
    """SiLU(x @ Wg.T) * (x @ Wu.T) for the rows in row_mask; weight is the fused [2 I, K]
    (gate rows first). Same semantics as reference.gate_up_silu."""
    if _use_cublas(x, weight, row_mask):
        from .reference import gate_up_silu as ref

        y = ref(x, weight)
        if out is None:
            return y
        return out.copy_(y)
    return _launch_linear(x, weight, row_mask, out, gate_up=True)
