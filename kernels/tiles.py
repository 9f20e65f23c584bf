"""The @triton.jit tiles of every projection kernel (linear, gate_up_silu, qkv_rope_store).

`matmul_tile` is the one inner loop: a [BLOCK_M, BLOCK_N] float32 partial product of the
activations and a bf16, W4A16, W6A16 or W8A16 weight over a K range, by CUDA-core GEMV
(BLOCK_M == 1) or tensor-core `tl.dot` (BLOCK_M >= 16). The W4 unpacking (`w4_nibble`), the
6-bit twins' 2-bit plane (`w2_field`) and the row-mask probe (`rows_active`) live here too.
kernels/matmul.py explains the design; this module holds only device code, so the kernels
that share it stay one copy.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["W4_MAGIC", "rows_active", "w4_nibble", "w2_field", "matmul_tile"]

W4_MAGIC = 0x4B000000  # the float 2^23: see w4_nibble


@triton.jit
def rows_active(row_mask_ptr, offs_m, M, HAS_ROW_MASK: tl.constexpr):
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
def w4_nibble(words, magic, NIBBLE: tl.constexpr, EXACT: tl.constexpr):
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
def w2_field(hwords, magic, FIELD: tl.constexpr):
    """Field FIELD (k = 8 word + FIELD) of the 6-bit twins' high plane as the float32
    h * 4^FIELD (h in 0..3), by the same OR-into-2^23 trick as w4_nibble (one LOP3 + one FADD).

    `hwords` are that plane's 16-bit words widened to int32 (field i in bits 2i, 2i + 1; the
    sign extension of the widening only touches bits 16..31, which the mask drops). The
    caller folds 16 / 4^FIELD into the activations (GEMV) or the dequantization (tl.dot):
    q = low nibble + 16 h."""
    bits = (hwords & (3 << (2 * FIELD))) | magic
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _w4_gemv_load(
    w_rows,  # [BLOCK_N, 1, 1] row pointers into int32 [N, K // 8]
    h_rows,  # [BLOCK_N, 1, 1] row pointers into the int16 high plane [N, K // 8] (HI_PLANE)
    s_rows,  # [BLOCK_N, 1] row pointers into [N, K // G]
    z_rows,
    rows_ok,
    word,  # [NGB, WPG] word offsets within a step
    offs_g,  # [NGB]
    k0,  # first column of the step (a multiple of BLOCK_K)
    k_stop,
    K,
    HI_PLANE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Packed words [BLOCK_N, NGB, WPG] (and, HI_PLANE, the high plane's words widened to
    int32; else the low words again, unused), scales and zeros [BLOCK_N, NGB] of the K step at
    k0; zeros (and no memory traffic) when k0 >= k_stop (the prefetch past the last step)."""
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
    if HI_PLANE:
        hwords = tl.load(h_rows + kw[None, :, :], mask=w_ok, other=0).to(tl.int32)
    else:
        hwords = words
    s = tl.load(s_rows + kg[None, :], mask=g_ok, other=0.0)
    z = tl.load(z_rows + kg[None, :], mask=g_ok, other=0.0)
    return words, hwords, s, z


@triton.jit
def _gemv_code(words, hwords, magic, NIBBLE: tl.constexpr, HI_PLANE: tl.constexpr):
    """q * 2^E of column k = 8 word + NIBBLE, E as in w4_nibble (the GEMV folds 2^-E into x):
    the nibble, plus (HI_PLANE) 16 h from the 2-bit plane, combined before the multiply by x
    so a 6-bit weight costs one more LOP3 + FADD + FFMA than a 4-bit one, no extra x copies.
    Exact: q * 2^E <= 63 * 2^16 < 2^24."""
    q = w4_nibble(words, magic, NIBBLE, False)
    if HI_PLANE:
        E: tl.constexpr = 4 * NIBBLE - 12 * (NIBBLE // 5)
        # w2_field is h 4^NIBBLE; 16 h 2^E = that * 2^(4 + E - 2 NIBBLE), E >= 2 NIBBLE - 2
        q += w2_field(hwords, magic, NIBBLE) * (1 << (4 + E - 2 * NIBBLE))
    return q


@triton.jit
def _w4_gemv_tile(
    x_row_ptr,  # [K] the activation row (BLOCK_M == 1)
    w_ptr,  # int32 [N, K // 8]
    h_ptr,  # int16 [N, K // 8] the 6-bit twins' high plane (HI_PLANE)
    s_ptr,  # [N, K // G]
    z_ptr,  # [N, K // G]
    stride_w_n,
    stride_h_n,
    stride_s_n,
    stride_z_n,
    rows,  # [BLOCK_N] weight rows
    rows_ok,
    k_start,
    k_stop,
    K,
    magic,  # int32 0x4B000000 (see w4_nibble)
    HI_PLANE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """acc[n] = sum_k x[k] * (q[n, k] - z[n, k // G]) * s[n, k // G] over [k_start, k_stop).

    Tiles are [BLOCK_N, NGB groups, WPG words]; per group the scale/zero are applied once:
    s * (sum x q - z * sum x). HI_PLANE (6-bit): q = nibble + 16 h (_gemv_code). Returns
    [1, BLOCK_N] float32."""
    WPG: tl.constexpr = GROUP // 8  # int32 words per quantization group
    NGB: tl.constexpr = BLOCK_K // GROUP  # groups per K step
    offs_g = tl.arange(0, NGB)
    word = offs_g[:, None] * WPG + tl.arange(0, WPG)[None, :]  # [NGB, WPG] word in the step
    rows64 = rows.to(tl.int64)
    w_rows = w_ptr + rows64[:, None, None] * stride_w_n
    h_rows = h_ptr + rows64[:, None, None] * stride_h_n
    s_rows = s_ptr + rows64[:, None] * stride_s_n
    z_rows = z_ptr + rows64[:, None] * stride_z_n
    acc = tl.zeros([BLOCK_N, NGB], dtype=tl.float32)
    # Software pipelining by hand (Triton only pipelines loads that feed tl.dot): the packed
    # words, scales and zeros of step k0 + BLOCK_K are requested before step k0 is unpacked,
    # so every warp keeps one step of HBM traffic in flight while it computes.
    words, hwords, s, z = _w4_gemv_load(
        w_rows, h_rows, s_rows, z_rows, rows_ok, word, offs_g, k_start, k_stop, K, HI_PLANE,
        GROUP, BLOCK_K, EVEN_K,
    )  # fmt: skip
    for k0 in range(k_start, k_stop, BLOCK_K):
        k0 = tl.multiple_of(k0, BLOCK_K)  # k_start is a multiple of BLOCK_K: 16-byte loads
        kw = tl.multiple_of(k0 // 8, BLOCK_K // 8) + word  # [NGB, WPG] global word index
        words_next, hwords_next, s_next, z_next = _w4_gemv_load(
            w_rows, h_rows, s_rows, z_rows, rows_ok, word, offs_g, k0 + BLOCK_K, k_stop, K,
            HI_PLANE, GROUP, BLOCK_K, EVEN_K,
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
        part = _gemv_code(words, hwords, magic, 0, HI_PLANE) * (x0 * 1.0)[None, :, :]
        part += _gemv_code(words, hwords, magic, 1, HI_PLANE) * (x1 * 0.0625)[None, :, :]
        part += _gemv_code(words, hwords, magic, 2, HI_PLANE) * (x2 * 0.00390625)[None, :, :]
        part += _gemv_code(words, hwords, magic, 3, HI_PLANE) * (x3 * 0.000244140625)[None, :, :]
        part += _gemv_code(words, hwords, magic, 4, HI_PLANE) * (x4 * 1.52587890625e-05)[None, :, :]
        part += _gemv_code(words, hwords, magic, 5, HI_PLANE) * (x5 * 0.00390625)[None, :, :]
        part += _gemv_code(words, hwords, magic, 6, HI_PLANE) * (x6 * 0.000244140625)[None, :, :]
        part += _gemv_code(words, hwords, magic, 7, HI_PLANE) * (x7 * 1.52587890625e-05)[None, :, :]
        acc += s.to(tl.float32) * (tl.sum(part, axis=2) - z.to(tl.float32) * xg[None, :])
        words, hwords, s, z = words_next, hwords_next, s_next, z_next
    return tl.sum(acc, axis=1)[None, :]


@triton.jit
def _dot_code(words, hwords, magic, FIELD: tl.constexpr, HI_PLANE: tl.constexpr):
    """The code q of column k = 8 word + FIELD, exact in float32: the nibble, plus (HI_PLANE)
    16 h from the 2-bit plane (one more exact FMA)."""
    q = w4_nibble(words, magic, FIELD, True)
    if HI_PLANE:
        q += w2_field(hwords, magic, FIELD) * (16.0 / (1 << (2 * FIELD)))  # h 4^FIELD -> 16 h
    return q


@triton.jit
def _w4_dot_tile(
    x_ptr,  # [M, K]
    stride_x_m,
    offs_m,  # [BLOCK_M]
    m_ok,
    w_ptr,  # int32 [N, K // 8]
    h_ptr,  # int16 [N, K // 8] the 6-bit twins' high plane (HI_PLANE)
    s_ptr,  # [N, K // G]
    z_ptr,  # [N, K // G]
    stride_w_n,
    stride_h_n,
    stride_s_n,
    stride_z_n,
    rows,  # [BLOCK_N]
    rows_ok,
    k_start,
    k_stop,
    K,
    magic,  # int32 0x4B000000 (see w4_nibble)
    HI_PLANE: tl.constexpr,
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
    of tl.join (k = 8 * word + 4 * i2 + 2 * i1 + i0; the last join is the fastest index).
    HI_PLANE (6-bit): q = nibble + 16 h, one more exact FMA per weight."""
    BKW: tl.constexpr = BLOCK_K // 8
    offs_w = tl.arange(0, BKW)
    offs_k = tl.arange(0, BLOCK_K)
    rows64 = rows.to(tl.int64)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x_m
    w_rows = w_ptr + rows64[:, None] * stride_w_n
    h_rows = h_ptr + rows64[:, None] * stride_h_n
    s_rows = s_ptr + rows64[:, None] * stride_s_n
    z_rows = z_ptr + rows64[:, None] * stride_z_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        k0 = tl.multiple_of(k0, BLOCK_K)  # k_start is a multiple of BLOCK_K: 16-byte loads
        kw = tl.multiple_of(k0 // 8, BKW) + offs_w  # [BKW]
        kg = kw // (GROUP // 8)  # [BKW] group of each word (a word never straddles groups)
        w_ok = rows_ok[:, None]
        x_ok = m_ok[:, None]
        if not EVEN_K:
            w_ok = w_ok & (kw < K // 8)[None, :]
            x_ok = x_ok & (k0 + offs_k < K)[None, :]
        words = tl.load(w_rows + kw[None, :], mask=w_ok, other=0)
        if HI_PLANE:
            hw = tl.load(h_rows + kw[None, :], mask=w_ok, other=0).to(tl.int32)
        else:
            hw = words
        s = tl.load(s_rows + kg[None, :], mask=w_ok, other=0.0)
        z = tl.load(z_rows + kg[None, :], mask=w_ok, other=0.0)
        x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=x_ok, other=0.0)
        s = s.to(tl.float32)
        zs = -z.to(tl.float32) * s
        dt = x.dtype
        n0 = (_dot_code(words, hw, magic, 0, HI_PLANE) * s + zs).to(dt)
        n1 = (_dot_code(words, hw, magic, 1, HI_PLANE) * s + zs).to(dt)
        n2 = (_dot_code(words, hw, magic, 2, HI_PLANE) * s + zs).to(dt)
        n3 = (_dot_code(words, hw, magic, 3, HI_PLANE) * s + zs).to(dt)
        n4 = (_dot_code(words, hw, magic, 4, HI_PLANE) * s + zs).to(dt)
        n5 = (_dot_code(words, hw, magic, 5, HI_PLANE) * s + zs).to(dt)
        n6 = (_dot_code(words, hw, magic, 6, HI_PLANE) * s + zs).to(dt)
        n7 = (_dot_code(words, hw, magic, 7, HI_PLANE) * s + zs).to(dt)
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
def matmul_tile(
    x_ptr,  # [M, K] activations
    stride_x_m,
    row0,  # first row of this program's row block
    offs_m,  # [BLOCK_M] rows of this program
    m_ok,
    w_ptr,  # dense [N, K], or W4/W6 int32 [N, K // 8] (the low nibbles)
    h_ptr,  # W6 high plane int16 [N, K // 8] (unused otherwise)
    s_ptr,  # W4/W6 scales [N, K // G], W8 row scales [N] (unused when dense)
    z_ptr,  # W4/W6 zeros [N, K // G]
    stride_w_n,
    stride_h_n,
    stride_s_n,
    stride_z_n,
    rows,  # [BLOCK_N] weight rows of this tile
    rows_ok,
    k_start,
    k_stop,
    K,
    magic,  # int32 0x4B000000, a run-time value on purpose (see w4_nibble)
    USE_W4: tl.constexpr,
    HI_PLANE: tl.constexpr,  # with USE_W4: the 6-bit twins (W6A16), nibble + 16 * 2-bit plane
    ROW_SCALE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] float32 partial product x[rows_m, k_start:k_stop] @ W[rows, same].T.

    The one inner loop of every projection (linear, gate_up_silu, qkv_rope_store): the
    format (USE_W4; USE_W4 and HI_PLANE: W6; ROW_SCALE: W8, an int8 weight read by the dense
    tiles, its per-row scale applied once to the sum, which is linear in W, so split-K
    partials may be scaled too) and the path (BLOCK_M == 1: CUDA-core GEMV; else tl.dot) are
    constexpr."""
    x_row = x_ptr + row0.to(tl.int64) * stride_x_m  # the GEMV paths' single row
    if USE_W4 and BLOCK_M == 1:
        acc = _w4_gemv_tile(
            x_row, w_ptr, h_ptr, s_ptr, z_ptr, stride_w_n, stride_h_n, stride_s_n, stride_z_n,
            rows, rows_ok, k_start, k_stop, K, magic, HI_PLANE, GROUP, BLOCK_N, BLOCK_K, EVEN_K,
        )  # fmt: skip
    elif USE_W4:
        acc = _w4_dot_tile(
            x_ptr, stride_x_m, offs_m, m_ok, w_ptr, h_ptr, s_ptr, z_ptr, stride_w_n, stride_h_n,
            stride_s_n, stride_z_n, rows, rows_ok, k_start, k_stop, K, magic, HI_PLANE, GROUP,
            BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION,
        )  # fmt: skip
    elif BLOCK_M == 1:
        acc = _dense_gemv_tile(
            x_row, w_ptr, stride_w_n, rows, rows_ok, k_start, k_stop, K, BLOCK_N, BLOCK_K, EVEN_K
        )
    else:
        acc = _dense_dot_tile(
            x_ptr, stride_x_m, offs_m, m_ok, w_ptr, stride_w_n, rows, rows_ok, k_start, k_stop,
            K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION,
        )  # fmt: skip
    if ROW_SCALE:
        scale = tl.load(s_ptr + rows.to(tl.int64) * stride_s_n, mask=rows_ok, other=0.0)
        acc = acc * scale.to(tl.float32)[None, :]
    return acc
