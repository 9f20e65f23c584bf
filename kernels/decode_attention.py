"""Paged decode attention: one query token per row over its paged KV context (flash-decoding).

Design:
* One program per (KV split, KV head, row). The GROUP query heads that share a KV head are the
  M dimension of both tl.dot calls (padded to >= 16 rows), so every K/V byte is read once per
  row and the tensor cores do the work, whatever the GQA ratio.
* Split-K over the context ("flash-decoding"): a batch-1 decode step has only Hkv (8) (row, KV
  head) pairs, far too few programs for 132 SMs, so the context is cut into NUM_SPLITS chunks.
  Each split writes its normalised partial output and log-sum-exp (base 2) to a scratch the
  caller owns, takes a ticket, and the last split of a (row, KV head) to arrive merges them:
  out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max). One launch, no separate merge kernel
  and no host synchronisation; tickets reset themselves (CUDA-graph safe).
* NUM_SPLITS is static: it comes from a small table keyed on (rows x KV heads, context
  *capacity* = block_tables.shape[1] * block_size), never from context_lens values, so a
  captured CUDA graph stays valid for every context length. Splits past a row's length run no
  iteration and only report an empty partial.
* Rows outside row_mask return immediately (split 0 writes their zero output first).
* Online softmax in base 2 (exp2 with log2(e) folded into the scale). A row with nothing to
  attend to (length 0, or every slot masked by kv_valid) outputs zeros, like the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .attention_tiles import load_kv_tile, online_softmax_step
from .launch import (
    check_device,
    check_index,
    check_paged_cache,
    check_row_mask,
    dot_precision,
    num_sms,
)
from .splitk import arrive

__all__ = [
    "paged_decode_attention",
    "DecodeAttentionScratch",
    "alloc_decode_scratch",
    "decode_num_splits",
]

_LOG2E = 1.4426950408889634  # log2(e): softmax in base 2 (exp2 is one MUFU op)


@triton.jit
def _decode_attention_kernel(
    q_ptr,  # [B, Hq, D]
    k_cache_ptr,  # [num_blocks, page, Hkv, D]
    v_cache_ptr,  # [num_blocks, page, Hkv, D]
    block_tables_ptr,  # int32 [B, max_blocks]
    context_lens_ptr,  # int32 [B]
    row_mask_ptr,  # bool [B] (HAS_ROW_MASK)
    kv_valid_ptr,  # bool [num_blocks, page] (HAS_KV_VALID)
    out_ptr,  # [B, Hq, D]
    part_o_ptr,  # float32 [max_batch, max_splits, Hq, D] normalised partial outputs
    part_lse_ptr,  # float32 [max_batch, max_splits, Hq] base-2 log-sum-exp of each split
    counter_ptr,  # int32 [max_batch * Hq] tickets, 0 between launches
    qk_scale,  # softmax scale * log2(e)
    SPLIT_LEN,  # tokens per split, a multiple of BLOCK_N
    stride_q_b,
    stride_q_h,
    stride_c_b,  # strides of both caches (the k and v caches share their layout: checked)
    stride_c_s,
    stride_c_h,
    stride_bt_b,
    stride_kvv_b,
    stride_out_b,
    stride_out_h,
    stride_po_b,
    stride_po_s,
    stride_po_h,
    stride_pl_b,
    stride_pl_s,
    HEAD_DIM: tl.constexpr,  # constexpr: a run-time bound on d would defeat 16-byte loads
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # >= 16, power of two (tl.dot M dimension)
    D_PAD: tl.constexpr,
    PAGE: tl.constexpr,  # tokens per cache block (power of two)
    BLOCK_N: tl.constexpr,  # tokens per step
    NUM_SPLITS: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr,
    HAS_KV_VALID: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[b, h G + g] = softmax(q k^T * scale) v over the row's first context_lens[b] tokens.
    Grid (NUM_SPLITS, Hkv, B)."""
    split = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_PAD)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g  # query heads of this program
    out_ptrs = out_ptr + b * stride_out_b + heads[:, None] * stride_out_h + offs_d[None, :]
    out_mask = g_ok[:, None] & d_ok[None, :]
    if HAS_ROW_MASK:
        if tl.load(row_mask_ptr + b) == 0:
            if split == 0:
                zero = tl.zeros([GROUP_PAD, D_PAD], dtype=out_ptr.dtype.element_ty)
                tl.store(out_ptrs, zero, mask=out_mask)
            return  # inactive row: no K/V traffic at all
    length = tl.load(context_lens_ptr + b)
    start = split * SPLIT_LEN
    stop = tl.minimum(start + SPLIT_LEN, length)

    q = tl.load(
        q_ptr + b * stride_q_b + heads[:, None] * stride_q_h + offs_d[None, :],
        mask=out_mask,
        other=0.0,
    )
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
    table = block_tables_ptr + b * stride_bt_b
    for t0 in range(start, stop, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_ok = t < stop
        k, v, blk, off = load_kv_tile(
            k_cache_ptr, v_cache_ptr, table, t, t_ok, kvh * stride_c_h, offs_d, d_ok, stride_c_b,
            stride_c_s, PAGE,
        )  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [G_PAD, BLOCK_N]
        valid = t_ok
        if HAS_KV_VALID:
            flags = tl.load(kv_valid_ptr + blk * stride_kvv_b + off, mask=t_ok, other=0)
            valid = valid & (flags != 0)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    has_mass = l_i > 0.0
    o = acc / tl.where(has_mass, l_i, 1.0)[:, None]  # rows with no mass: acc is 0 -> 0
    if NUM_SPLITS == 1:
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        lse = tl.where(has_mass, m_i + tl.log2(tl.where(has_mass, l_i, 1.0)), float("-inf"))
        po = part_o_ptr + b * stride_po_b + heads[:, None] * stride_po_h + offs_d[None, :]
        pl = part_lse_ptr + b * stride_pl_b + heads
        tl.store(po + split * stride_po_s, o, mask=out_mask)
        tl.store(pl + split * stride_pl_s, lse, mask=g_ok)
        # the ticket of (row, KV head); the last split to arrive merges all of them
        if arrive(counter_ptr + b * tl.num_programs(1) + kvh, NUM_SPLITS):
            m_all = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
            w_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)
            o_sum = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
            for sp in tl.static_range(NUM_SPLITS):  # unrolled: the loads issue together
                lse_s = tl.load(pl + sp * stride_pl_s, mask=g_ok, other=float("-inf"),
                                cache_modifier=".cg")  # fmt: skip
                o_s = tl.load(po + sp * stride_po_s, mask=out_mask, other=0.0, cache_modifier=".cg")
                m_new = tl.maximum(m_all, lse_s)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                scale_old = tl.exp2(m_all - m_safe)
                w_s = tl.exp2(lse_s - m_safe)
                w_sum = w_sum * scale_old + w_s
                o_sum = o_sum * scale_old[:, None] + w_s[:, None] * o_s
                m_all = m_new
            o = o_sum / tl.where(w_sum > 0.0, w_sum, 1.0)[:, None]
            tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=out_mask)


@dataclass
class DecodeAttentionScratch:
    """Caller-owned scratch of the split-K decode attention (allocate once, before CUDA-graph
    capture, with alloc_decode_scratch). `counters` must stay zero between launches (the
    kernel restores them); do not share one scratch between concurrent streams."""

    part_o: torch.Tensor  # float32 [max_batch, max_splits, num_heads, head_dim]
    part_lse: torch.Tensor  # float32 [max_batch, max_splits, num_heads]
    counters: torch.Tensor  # int32 [max_batch * num_heads]

    @property
    def max_batch(self) -> int:
        return self.part_o.shape[0]

    @property
    def max_splits(self) -> int:
        return self.part_o.shape[1]


def alloc_decode_scratch(max_batch, num_heads, head_dim, max_splits=16, device="cuda"):
    """Scratch for batches up to max_batch rows and up to max_splits context splits."""
    return DecodeAttentionScratch(
        part_o=torch.empty(
            (max_batch, max_splits, num_heads, head_dim), dtype=torch.float32, device=device
        ),
        part_lse=torch.empty(
            (max_batch, max_splits, num_heads), dtype=torch.float32, device=device
        ),
        counters=torch.zeros(max_batch * num_heads, dtype=torch.int32, device=device),
    )


MAX_SPLITS = 16  # the merge is unrolled over the splits: keep the register footprint bounded
_MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost (q load, merge share) dominates
_TARGET_PROGRAMS_PER_SM = 2


def decode_num_splits(batch, num_kv_heads, capacity, num_sms=132, max_splits=MAX_SPLITS):
    """Static split count: enough programs for ~2 per SM, at least 256 tokens per split."""
    want = triton.cdiv(_TARGET_PROGRAMS_PER_SM * num_sms, max(1, batch * num_kv_heads))
    limit = min(max(1, capacity // _MIN_SPLIT_TOKENS), max_splits)
    splits = 1
    while splits < want and splits * 2 <= limit:  # smallest power of two >= want, capped
        splits *= 2
    return splits


# fmt: off
def paged_decode_attention(
    q, k_cache, v_cache, block_tables, context_lens, scale, row_mask=None, kv_valid=None,
    scratch=None,  # DecodeAttentionScratch (allocated per call when None)
    num_splits=None,  # force the context split count (tests, the benchmark sweep)
):
    # fmt: on
    """One query token per row attending to its whole paged context; same semantics as
    reference.paged_decode_attention. Never reads a device value on the host."""
    num_blocks, page, hkv, d = check_paged_cache(q, k_cache, v_cache)
    b, hq = q.shape[0], q.shape[1]
    block_tables = check_index("block_tables", block_tables, (b, None))
    context_lens = check_index("context_lens", context_lens, (b,))
    check_device(q, "q", block_tables=block_tables, context_lens=context_lens, kv_valid=kv_valid)
    row_mask = check_row_mask(row_mask, b, q.device)
    if kv_valid is not None:
        kv_valid = check_index("kv_valid", kv_valid, (num_blocks, page), torch.bool)
    out = torch.empty_like(q)
    if b == 0:
        return out
    group = hq // hkv
    capacity = block_tables.shape[1] * page
    max_splits = MAX_SPLITS if scratch is None else min(MAX_SPLITS, scratch.max_splits)
    if num_splits is None:
        splits = decode_num_splits(b, hkv, capacity, num_sms(q.device), max_splits)
    else:
        splits = min(int(num_splits), max_splits)
    block_n = 64 if d <= 128 else 32
    split_len = triton.cdiv(triton.cdiv(max(capacity, 1), splits), block_n) * block_n
    if splits > 1:
        if scratch is None:
            scratch = alloc_decode_scratch(b, hq, d, splits, q.device)
        if (
            scratch.max_batch < b
            or scratch.part_o.shape[2:] != (hq, d)
            or scratch.part_o.device != q.device
        ):
            raise ValueError(
                f"scratch is for <= {scratch.max_batch} rows of {tuple(scratch.part_o.shape[2:])}"
                f" heads x dim on {scratch.part_o.device}; need {b} rows of ({hq}, {d})"
            )
        po, pl, cnt = scratch.part_o, scratch.part_lse, scratch.counters
    else:
        po, pl, cnt = out, out, out  # unused
    # (without splits the partial buffers are `out`: never read, any strides do)
    _decode_attention_kernel[(splits, hkv, b)](
        q_ptr=q, k_cache_ptr=k_cache, v_cache_ptr=v_cache, block_tables_ptr=block_tables,
        context_lens_ptr=context_lens,
        row_mask_ptr=row_mask if row_mask is not None else context_lens,
        kv_valid_ptr=kv_valid if kv_valid is not None else context_lens,
        out_ptr=out, part_o_ptr=po, part_lse_ptr=pl, counter_ptr=cnt,
        qk_scale=float(scale) * _LOG2E, HEAD_DIM=d, SPLIT_LEN=split_len,
        stride_q_b=q.stride(0), stride_q_h=q.stride(1),
        stride_c_b=k_cache.stride(0), stride_c_s=k_cache.stride(1), stride_c_h=k_cache.stride(2),
        stride_bt_b=block_tables.stride(0),
        stride_kvv_b=kv_valid.stride(0) if kv_valid is not None else 0,
        stride_out_b=out.stride(0), stride_out_h=out.stride(1),
        stride_po_b=po.stride(0), stride_po_s=po.stride(1), stride_po_h=po.stride(2),
        stride_pl_b=pl.stride(0), stride_pl_s=pl.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), D_PAD=max(16, triton.next_power_of_2(d)),
        PAGE=page, BLOCK_N=block_n, NUM_SPLITS=splits, HAS_ROW_MASK=row_mask is not None,
        HAS_KV_VALID=kv_valid is not None, DOT_PRECISION=dot_precision(q.dtype), num_warps=4,
        num_stages=3,
    )  # fmt: skip
    return out
