"""Causal varlen prefill attention over the paged KV cache (flash attention, forward only).

Each sequence's new tokens (concatenated in q, offsets cu_seqlens) attend to its cached prefix
and to themselves causally; their K/V are already in the cache (written by qkv_rope_store), so
K/V are read from the pages through the block table, one gathered [BLOCK_N, D] tile per step.

One program per (query tile of BLOCK_M tokens, sequence, query head). The KV loop runs in two
phases: tiles entirely before the tile's first query position need no causal mask; only the
last few tiles (the diagonal) compute it. Online softmax in base 2.

The grid needs an upper bound on the new tokens of a sequence. With `max_seqlen` given it is
exact; without, the total token count q.shape[0] bounds it, which needs no host read of
cu_seqlens (programs past their sequence's end return at once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_tiles import load_kv_tile, online_softmax_step
from .launch import check_device, check_index, check_paged_cache, dot_precision

__all__ = ["prefill_attention"]

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    q,  # [BLOCK_M, D_PAD]
    m_i,
    l_i,
    acc,
    k_cache_ptr,
    v_cache_ptr,
    table,  # block table row of the sequence
    kv_head_off,  # kvh * stride_c_h
    t0,
    qpos,  # [BLOCK_M] absolute query positions
    length,
    qk_scale,
    offs_d,
    d_ok,
    stride_c_b,
    stride_c_s,
    CAUSAL: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over keys [t0, t0 + BLOCK_N)."""
    t = t0 + tl.arange(0, BLOCK_N)
    t_ok = t < length
    k, v, _, _ = load_kv_tile(
        k_cache_ptr, v_cache_ptr, table, t, t_ok, kv_head_off, offs_d, d_ok, stride_c_b,
        stride_c_s, PAGE,
    )  # fmt: skip
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if CAUSAL:
        s = tl.where((t[None, :] <= qpos[:, None]) & t_ok[None, :], s, float("-inf"))
    return online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)


@triton.jit
def _prefill_attention_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [num_blocks, page, Hkv, D]
    v_cache_ptr,  # [num_blocks, page, Hkv, D]
    cu_seqlens_ptr,  # int32 [S + 1]
    block_tables_ptr,  # int32 [S, max_blocks]
    context_lens_ptr,  # int32 [S]: cached prefix + new tokens
    out_ptr,  # [T, Hq, D]
    qk_scale,  # softmax scale * log2(e)
    stride_q_t,
    stride_q_h,
    stride_c_b,  # strides of both caches (the k and v caches share their layout: checked)
    stride_c_s,
    stride_c_h,
    stride_bt_s,
    stride_out_t,
    stride_out_h,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[i] = softmax_j<=pos(i)(q_i k_j * scale) v_j for the new tokens i of each sequence;
    grid (query tiles, S, Hq)."""
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    first = tl.load(cu_seqlens_ptr + seq)
    n_new = tl.load(cu_seqlens_ptr + seq + 1) - first
    if tile * BLOCK_M >= n_new:
        return  # past this sequence's new tokens (the grid is sized for the longest)
    length = tl.load(context_lens_ptr + seq)
    prefix = length - n_new
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < n_new
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    rows = (first + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_q_t + head * stride_q_h + offs_d[None, :],
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    qpos = prefix + offs_m
    kvh = head // GROUP
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt_s
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    # keys before the tile's first query position are visible to every row: no mask
    full_end = ((prefix + tile * BLOCK_M) // BLOCK_N) * BLOCK_N
    for t0 in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, kvh * stride_c_h, t0, qpos,
            length, qk_scale, offs_d, d_ok, stride_c_b, stride_c_s, False, PAGE, BLOCK_N,
            DOT_PRECISION,
        )  # fmt: skip
    # the diagonal: up to the last query position of the tile
    end = tl.minimum(length, prefix + (tile + 1) * BLOCK_M)
    for t0 in range(full_end, end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, kvh * stride_c_h, t0, qpos,
            length, qk_scale, offs_d, d_ok, stride_c_b, stride_c_s, True, PAGE, BLOCK_N,
            DOT_PRECISION,
        )  # fmt: skip
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_out_t + head * stride_out_h + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )


# fmt: off
def prefill_attention(
    q, k_cache, v_cache, cu_seqlens, block_tables, context_lens, scale,
    max_seqlen=None,  # optional host int: most new tokens of one sequence (tightens the grid)
):
    # fmt: on
    """Causal attention of each sequence's new tokens over its cached prefix and themselves.
    Same semantics as reference.prefill_attention; reads no device value on the host."""
    num_blocks, page, hkv, d = check_paged_cache(q, k_cache, v_cache)
    t, hq = q.shape[0], q.shape[1]
    s = context_lens.shape[0]
    cu_seqlens = check_index("cu_seqlens", cu_seqlens, (s + 1,))
    context_lens = check_index("context_lens", context_lens, (s,))
    block_tables = check_index("block_tables", block_tables, (s, None))
    check_device(
        q, "q", cu_seqlens=cu_seqlens, block_tables=block_tables, context_lens=context_lens
    )
    out = torch.empty_like(q)
    if t == 0 or s == 0:
        return out
    d_pad = max(16, triton.next_power_of_2(d))
    # 128 query rows x 64 keys per step with 8 warps (two warpgroups for wgmma); smaller tiles
    # for wide heads to stay in registers
    block_m, block_n, warps = (128, 64, 8) if d_pad <= 128 else (64, 32, 4)
    bound = t if max_seqlen is None else max(1, min(int(max_seqlen), t))
    grid = (triton.cdiv(bound, block_m), s, hq)
    _prefill_attention_kernel[grid](
        q_ptr=q, k_cache_ptr=k_cache, v_cache_ptr=v_cache, cu_seqlens_ptr=cu_seqlens,
        block_tables_ptr=block_tables, context_lens_ptr=context_lens, out_ptr=out,
        qk_scale=float(scale) * _LOG2E, stride_q_t=q.stride(0), stride_q_h=q.stride(1),
        stride_c_b=k_cache.stride(0), stride_c_s=k_cache.stride(1), stride_c_h=k_cache.stride(2),
        stride_bt_s=block_tables.stride(0), stride_out_t=out.stride(0), stride_out_h=out.stride(1),
        HEAD_DIM=d, D_PAD=d_pad, GROUP=hq // hkv, PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=warps, num_stages=3,
    )  # fmt: skip
    return out
