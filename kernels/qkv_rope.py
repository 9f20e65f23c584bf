"""The river KV projection, fused: QKV projection -> RoPE -> K/V into the paged cache, Q out.

One program owns one head (q, k or v) and computes the two rotary halves of it, weight rows
[h D, h D + D/2) and [h D + D/2, (h + 1) D), as two accumulators. RoPE (HF rotate_half:
out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin) then needs nothing but those two tiles, so it is
the epilogue of the projection and Q/K/V never go through HBM before being stored where they
belong. The inner loop is the projection loop of kernels/matmul.py (kernels/tiles.py: bf16 or W4A16,
GEMV or tl.dot, split-K with the last-arriving program running the epilogue), so a river token
costs one launch for its whole KV projection.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import check_device, check_rows, dot_precision, num_sms, weight_operands
from .matmul_settings import m_bucket
from .splitk import (
    arrive,
    pick_split,
    split_launch,
    split_traffic_cap,
    store_partial,
    sum_partials,
)
from .tiles import W4_MAGIC, matmul_tile, rows_active

__all__ = ["qkv_rope_store"]


@triton.jit
def _qkv_rope_epilogue(
    acc_a,  # [BLOCK_M, BLOCK_N] float32: first half of the head (columns d < D/2)
    acc_b,  # [BLOCK_M, BLOCK_N] float32: second half
    head,
    offs_m,
    active,
    offs_d,  # [BLOCK_N] column within a half
    d_ok,
    x_dtype_ptr,  # any pointer of the activations' dtype (the projection is rounded to it)
    cos_ptr,  # [max_pos, D/2] float32
    sin_ptr,
    pos_ptr,  # int [M]
    k_cache_ptr,  # [num_blocks, page, Hkv, D]
    v_cache_ptr,
    slot_ptr,  # int [M]
    q_out_ptr,  # [M, Hq, D]
    NUM_HEADS,
    NUM_KV_HEADS,
    HALF,
    PAGE,
    stride_cos_p,
    stride_sin_p,
    stride_c_b,  # strides of both caches (the k and v caches share their layout: checked)
    stride_c_s,
    stride_c_h,
    stride_q_m,
    stride_q_h,
):
    """RoPE for q/k heads (in float32 on the projection rounded to the activation dtype, as the
    reference does), then Q to q_out or K/V to each active row's cache slot."""
    dt = x_dtype_ptr.dtype.element_ty
    a = acc_a.to(dt).to(tl.float32)
    b = acc_b.to(dt).to(tl.float32)
    ok = active[:, None] & d_ok[None, :]
    if head < NUM_HEADS + NUM_KV_HEADS:  # q or k: rotate
        pos = tl.load(pos_ptr + offs_m, mask=active, other=0).to(tl.int64)
        c = tl.load(cos_ptr + pos[:, None] * stride_cos_p + offs_d[None, :], mask=ok, other=0.0)
        s = tl.load(sin_ptr + pos[:, None] * stride_sin_p + offs_d[None, :], mask=ok, other=0.0)
        out_a = a * c - b * s
        out_b = b * c + a * s
    else:
        out_a = a
        out_b = b
    out_a = out_a.to(dt)
    out_b = out_b.to(dt)
    if head < NUM_HEADS:
        q_ptrs = q_out_ptr + offs_m.to(tl.int64)[:, None] * stride_q_m + head * stride_q_h
        q_ptrs += offs_d[None, :]
        tl.store(q_ptrs, out_a.to(q_out_ptr.dtype.element_ty), mask=ok)
        tl.store(q_ptrs + HALF, out_b.to(q_out_ptr.dtype.element_ty), mask=ok)
    else:
        slot = tl.load(slot_ptr + offs_m, mask=active, other=-1).to(tl.int64)
        # a negative slot is a padding row: it writes nothing
        ok = ok & (slot >= 0)[:, None]
        blk = slot // PAGE
        off = slot % PAGE
        if head < NUM_HEADS + NUM_KV_HEADS:
            kvh = head - NUM_HEADS
            ptrs = k_cache_ptr + blk * stride_c_b + off * stride_c_s + kvh * stride_c_h
        else:
            kvh = head - NUM_HEADS - NUM_KV_HEADS
            ptrs = v_cache_ptr + blk * stride_c_b + off * stride_c_s + kvh * stride_c_h
        ptrs = ptrs[:, None] + offs_d[None, :]
        cache_dt = k_cache_ptr.dtype.element_ty  # k and v caches share a dtype (checked)
        tl.store(ptrs, out_a.to(cache_dt), mask=ok)
        tl.store(ptrs + HALF, out_b.to(cache_dt), mask=ok)


@triton.jit
def _qkv_rope_kernel(
    x_ptr,  # [M, K] normed hidden state
    w_ptr,  # dense [(Hq + 2 Hkv) D, K] or W4 int32 [(Hq + 2 Hkv) D, K // 8]
    h_ptr,  # W6 high plane int16 [N, K // 8] (HI_PLANE; a dummy otherwise)
    s_ptr,  # W4 scales [N, K // G]
    z_ptr,  # W4 zeros [N, K // G]
    cos_ptr,  # [max_pos, D/2] float32
    sin_ptr,  # [max_pos, D/2] float32
    pos_ptr,  # int [M]
    k_cache_ptr,  # [num_blocks, page, Hkv, D]
    v_cache_ptr,  # [num_blocks, page, Hkv, D]
    slot_ptr,  # int [M] flat cache slot of each row
    q_out_ptr,  # [M, Hq, D]
    row_mask_ptr,  # bool [M] (HAS_ROW_MASK)
    ws_ptr,  # float32 split-K partials [tiles, SPLIT_K, 2, BLOCK_M, BLOCK_N]
    counter_ptr,  # int32 [tiles] split-K tickets, 0 between launches
    M,
    K,
    K_PER_SPLIT,
    W4_MAGIC,  # int32 0x4B000000 (see tiles.w4_nibble)
    NUM_HEADS,
    NUM_KV_HEADS,
    HALF,  # D / 2
    PAGE,  # tokens per cache block
    stride_x_m,
    stride_w_n,
    stride_h_n,
    stride_s_n,
    stride_z_n,
    stride_cos_p,
    stride_sin_p,
    stride_c_b,  # strides of both caches (the k and v caches share their layout: checked)
    stride_c_s,
    stride_c_h,
    stride_q_m,
    stride_q_h,
    USE_W4: tl.constexpr,
    HI_PLANE: tl.constexpr,  # W6: USE_W4's nibbles plus a 2-bit plane (tiles.matmul_tile)
    ROW_SCALE: tl.constexpr,  # W8: int8 [N, K] weight, s_ptr its row scales [N]
    GROUP: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # >= D / 2
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """[q | k | v][m, h, :] = x[m] @ W[h D : (h + 1) D].T, RoPE on q/k, K/V to the cache.
    Grid (SPLIT_K, Hq + 2 Hkv heads, M tiles)."""
    pid_k = tl.program_id(0)
    head = tl.program_id(1)
    pid_m = tl.program_id(2)
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    active, any_active = rows_active(row_mask_ptr, offs_m, M, HAS_ROW_MASK)
    if any_active == 0:
        return  # no active row: no weight traffic, no cache write
    m_ok = offs_m < M
    offs_d = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HALF
    rows_a = head * (2 * HALF) + offs_d
    k_start = pid_k * K_PER_SPLIT
    k_stop = tl.minimum(k_start + K_PER_SPLIT, K)
    acc_a = matmul_tile(
        x_ptr, stride_x_m, row0, offs_m, m_ok, w_ptr, h_ptr, s_ptr, z_ptr, stride_w_n,
        stride_h_n, stride_s_n, stride_z_n, rows_a, d_ok, k_start, k_stop, K, W4_MAGIC, USE_W4,
        HI_PLANE, ROW_SCALE, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION,
    )  # fmt: skip
    acc_b = matmul_tile(
        x_ptr, stride_x_m, row0, offs_m, m_ok, w_ptr, h_ptr, s_ptr, z_ptr, stride_w_n,
        stride_h_n, stride_s_n, stride_z_n, rows_a + HALF, d_ok, k_start, k_stop, K, W4_MAGIC,
        USE_W4, HI_PLANE, ROW_SCALE, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION,
    )  # fmt: skip
    if SPLIT_K > 1:
        tile = pid_m * tl.num_programs(1) + head
        store_partial(ws_ptr, acc_a, m_ok, tile, pid_k, 0, 2, SPLIT_K, BLOCK_M, BLOCK_N)
        store_partial(ws_ptr, acc_b, m_ok, tile, pid_k, 1, 2, SPLIT_K, BLOCK_M, BLOCK_N)
        if arrive(counter_ptr + tile, SPLIT_K):
            acc_a = sum_partials(ws_ptr, m_ok, tile, 0, 2, SPLIT_K, BLOCK_M, BLOCK_N)
            acc_b = sum_partials(ws_ptr, m_ok, tile, 1, 2, SPLIT_K, BLOCK_M, BLOCK_N)
            _qkv_rope_epilogue(
                acc_a, acc_b, head, offs_m, active, offs_d, d_ok, x_ptr, cos_ptr, sin_ptr,
                pos_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, q_out_ptr, NUM_HEADS, NUM_KV_HEADS,
                HALF, PAGE, stride_cos_p, stride_sin_p, stride_c_b, stride_c_s, stride_c_h,
                stride_q_m, stride_q_h,
            )  # fmt: skip
    else:
        _qkv_rope_epilogue(
            acc_a, acc_b, head, offs_m, active, offs_d, d_ok, x_ptr, cos_ptr, sin_ptr, pos_ptr,
            k_cache_ptr, v_cache_ptr, slot_ptr, q_out_ptr, NUM_HEADS, NUM_KV_HEADS, HALF, PAGE,
            stride_cos_p, stride_sin_p, stride_c_b, stride_c_s, stride_c_h, stride_q_m, stride_q_h,
        )  # fmt: skip


def _qkv_settings(m, k, half, heads, use_w4, group, num_sms, hi_plane=False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps): BLOCK_N covers half a head; the split
    follows the linear heuristic (~4 programs per SM)."""
    bucket = m_bucket(m)
    block_n = max(16, triton.next_power_of_2(half))
    if bucket == 1:
        block_m = 1
        # W4: one K step = whole groups; dense: [BLOCK_N, 64] x 2 accumulators in registers
        block_k = max(group, 256) if use_w4 else 64
        if hi_plane:  # W6: half the K step keeps the two planes' words in ~80 registers
            block_k = max(group, 128)
        warps = 4
    else:
        block_m = 64 if bucket == "big" else bucket
        block_k = 128 if use_w4 else 64
        warps = 4 if block_m < 64 else 8
    if not use_w4:
        block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    tiles = heads * triton.cdiv(m, block_m)
    cap = split_traffic_cap(k, min(m, block_m), use_w4, group, hi_plane)
    split = pick_split(triton.cdiv(k, block_k), tiles, num_sms, cap)
    return block_m, block_n, block_k, split, warps


# fmt: off
def qkv_rope_store(
    x, weight, cos, sin, positions, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
    row_mask=None, q_out=None,
):
    # fmt: on
    """Q/K/V projection, RoPE on Q and K, K/V written into each active row's paged-cache slot.
    Returns Q [M, Hq, D] (rows outside row_mask keep q_out's content, zeros when q_out is None).
    Same semantics as reference.qkv_rope_store; a negative slot (padding) writes nothing."""
    x, row_mask = check_rows(x, row_mask)
    w, h, s, z, n, k, group, bits = weight_operands(weight, x)
    use_w4 = bits in (4, 6)  # W6 is W4's nibbles plus a 2-bit plane
    m = x.shape[0]
    if k_cache.dim() != 4 or k_cache.shape[2] != num_kv_heads or k_cache.stride(3) != 1:
        raise ValueError(
            f"the caches must be [num_blocks, block_size, {num_kv_heads}, head_dim], unit stride "
            "along head_dim"
        )
    head_dim = k_cache.shape[-1]
    same = (v_cache.shape, v_cache.stride(), v_cache.dtype)
    if same != (k_cache.shape, k_cache.stride(), k_cache.dtype) or head_dim % 2:
        raise ValueError(
            "k_cache and v_cache must match in shape, strides and dtype; head_dim even"
        )
    heads = num_heads + 2 * num_kv_heads
    if n != heads * head_dim or k != x.shape[1]:
        raise ValueError(f"weight is [{n}, {k}], expected [{heads * head_dim}, {x.shape[1]}]")
    half = head_dim // 2
    if tuple(cos.shape[1:]) != (half,) or cos.shape != sin.shape:
        raise ValueError(f"cos/sin must be [max_pos, {half}]")
    if cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError("cos/sin must have unit stride along the last dimension")
    if tuple(positions.shape) != (m,) or tuple(slot_mapping.shape) != (m,):
        raise ValueError("positions and slot_mapping must be [M]")
    check_device(
        x, "x", cos=cos, sin=sin, positions=positions, slot_mapping=slot_mapping,
        k_cache=k_cache, v_cache=v_cache,
    )  # fmt: skip
    if q_out is None:
        alloc = torch.empty if row_mask is None else torch.zeros
        q_out = alloc((m, num_heads, head_dim), dtype=x.dtype, device=x.device)
    elif tuple(q_out.shape) != (m, num_heads, head_dim) or q_out.stride(2) != 1:
        raise ValueError(f"q_out must be [{m}, {num_heads}, {head_dim}] with unit last stride")
    if m == 0:
        return q_out
    positions = positions.contiguous()
    slot_mapping = slot_mapping.contiguous()
    block_m, block_n, block_k, split_k, warps = _qkv_settings(
        m, k, half, heads, use_w4, group, num_sms(x.device), bits == 6
    )
    tiles_m = triton.cdiv(m, block_m)
    k_per_split, split, ws, cnt = split_launch(
        k, block_k, split_k, heads * tiles_m, 2 * block_m * block_n, x.device, q_out
    )
    mask = row_mask if row_mask is not None else x
    _qkv_rope_kernel[(split, heads, tiles_m)](
        x, w, h, s, z, cos, sin, positions, k_cache, v_cache, slot_mapping, q_out, mask, ws,
        cnt, m, k, k_per_split, W4_MAGIC, num_heads, num_kv_heads, half, k_cache.shape[1],
        x.stride(0), w.stride(0), h.stride(0), s.stride(0), z.stride(0), cos.stride(0),
        sin.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), q_out.stride(0),
        q_out.stride(1), USE_W4=use_w4, HI_PLANE=bits == 6, ROW_SCALE=bits == 8, GROUP=group,
        HAS_ROW_MASK=row_mask is not None, SPLIT_K=split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        DOT_PRECISION=dot_precision(x.dtype), num_warps=warps, num_stages=3,
    )  # fmt: skip
    return q_out
