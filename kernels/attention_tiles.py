"""The @triton.jit steps both attention kernels share: a paged K/V tile, an online-softmax update.

kernels/decode_attention.py (one query token per row, split over the context) and
kernels/prefill.py (a block of query tokens per program, causal) walk a sequence's paged cache
in tiles of BLOCK_N tokens the same way: gather the tile's K and V through the block table, then
fold its scores into a running max, sum and output (base-2 exponentials; the softmax scale is
pre-multiplied by log2(e)).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["load_kv_tile", "online_softmax_step"]


@triton.jit
def load_kv_tile(
    k_cache_ptr,  # [num_blocks, PAGE, Hkv, D]
    v_cache_ptr,  # same layout as the k cache (checked by the launchers)
    table,  # the sequence's block table row
    t,  # [BLOCK_N] token positions of the tile
    t_ok,  # [BLOCK_N] positions that exist
    kv_head_off,  # kv head * stride_c_h
    offs_d,  # [D_PAD]
    d_ok,
    stride_c_b,
    stride_c_s,
    PAGE: tl.constexpr,
):
    """(K [BLOCK_N, D_PAD], V [BLOCK_N, D_PAD], block ids, offsets in block); zeros where
    a position or a dimension does not exist."""
    blk = tl.load(table + t // PAGE, mask=t_ok, other=0).to(tl.int64)
    off = t % PAGE
    mask = t_ok[:, None] & d_ok[None, :]
    kv_off = (blk * stride_c_b + off * stride_c_s + kv_head_off)[:, None] + offs_d[None, :]
    k = tl.load(k_cache_ptr + kv_off, mask=mask, other=0.0)
    v = tl.load(v_cache_ptr + kv_off, mask=mask, other=0.0)
    return k, v, blk, off


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """Fold scores s [ROWS, BLOCK_N] (-inf where masked, base 2) and their values v into the
    running max m_i, sum l_i [ROWS] and output acc [ROWS, D_PAD]."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # all -inf so far (nothing valid yet): subtract 0 so exp2 gives 0, not NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc
