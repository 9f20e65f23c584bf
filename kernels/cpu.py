"""The CPU fast path: the reference ops' signatures and semantics, doing only the work each row
needs, on bf16 weights and torch's packed int4 CPU matmul.

Why a second CPU op set: decode on a CPU is bound by the weight bytes it reads, and the
reference ops (the test oracles, written to be sync-free like the GPU kernels) compute both
weight sets over every row and select with masks. Here:

- A row mask is read on the host (a cheap check on a CPU, where there is no device to stall):
  an empty mask skips the projection, a partial one gathers its rows, computes and scatters.
  So a river batch reads the bf16 weights only for the layers its rows run in the backbone.
- bf16 weights on CPUs with native bf16 (AVX512-BF16/AMX) halve the bytes of fp32. torch's
  bf16 GEMM at M = 1 is slower than its GEMV, so single rows go through torch.mv.
- River twins are `Int4CpuWeight`: torch's packed int4 layout for
  `aten._weight_int4pack_mm_for_cpu` (0.28x of bf16's bytes at group 64), `Int8CpuWeight`
  for 8-bit twins (`aten._weight_int8pack_mm`, 0.5x), or `Int6CpuWeight` for 6-bit twins (the
  int4 matmul over twice the columns, 0.56x: see there).

Results match the reference ops to the dtype's rounding (the reference stays the exact fp32
oracle); this path is not meant for the no-host-sync guard, which checks the device path.

Compiled. Under torch.compile (river.graphs' CPU step with `compile=True`) the same ops trace
into one graph: the parts that read a row mask or a context length on the host (the matmuls,
the K/V store, attention) are opaque custom ops (`river_cpu::*`, whose bodies are the eager
functions below), and the glue around them (norms, RoPE, SiLU, residuals, the exit rule, the
row selects) is fused by inductor. A decode step is ~40 small ops per layer; eager, each costs a
dispatch and a parallel region, which on a small model is as much time as the weight reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from river.kernels import reference

from river.ops import HELPER_NAMES, OP_NAMES

__all__ = [
    "Int4CpuWeight",
    "Int6CpuWeight",
    "Int8CpuWeight",
    *OP_NAMES,
    *HELPER_NAMES,
]  # the op set interface (river.ops)


@dataclass(frozen=True)
class Int4CpuWeight:
    """W [N, K] as torch's CPU int4 pack: w = (q - 8) * scale + zero per group of G columns."""

    packed: torch.Tensor  # uint8 [N, K // 2] in torch's CPU int4 layout
    scales_zeros: torch.Tensor  # bf16 [K // G, N, 2]: (scale, zero) of each group
    group_size: int
    n: int
    k: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k

    bits = 4

    @classmethod
    def from_quantized(cls, w) -> Int4CpuWeight:
        """From river's W4Weight (w = (q - z) * s, z in quantized units). The scale is kept as
        is; the zero becomes the value of code 8, (8 - z) * s, rounded once to bf16: exact
        whenever that product is a bf16 number (z an integer and s a power-of-two multiple),
        else within half a bf16 ulp of it."""
        from river.quantize import unpack_int4

        n, k = w.shape
        g = w.group_size
        if n % 16:  # the pack's tiling
            raise ValueError(f"torch's CPU int4 pack needs N divisible by 16, got N={n}")
        q = unpack_int4(w.qweight.cpu()).to(torch.int32)  # [N, K] in 0..15
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        s = w.scales.float().cpu()  # [N, K // G]
        zero = (8.0 - w.zeros.float().cpu()) * s
        sz = torch.stack([s.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        return cls(packed=packed, scales_zeros=sz, group_size=g, n=n, k=k)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """W [N, K] exactly as the packed matmul sees it (for tests)."""
        eye = torch.eye(self.k, dtype=torch.bfloat16)
        return _matmul(eye, self).t().contiguous().to(dtype)


@dataclass(frozen=True)
class Int6CpuWeight:
    """A 6-bit twin W [N, K] (river.quantize.W6Weight) as ONE torch int4 CPU matmul over
    K' = 2K columns. With q = 16 hi + lo (hi in 0..3, lo in 0..15):

        W x = sum_k s (q_k - z) x_k = sum_k 16 s (hi_k - 8) x_k + sum_k s (lo_k - 8) x_k
              + sum_k (128 s + (8 - z) s) x_k

    so the packed weight is [hi | lo] (two K-column blocks, each group in one block), the input
    [x | x], the hi groups' (scale, zero) (16 s, 128 s) and the lo groups' (s, (8 - z) s), the
    last rounded once to bf16 as in Int4CpuWeight. It reads 1 byte a weight plus two groups'
    scales, more than the 6-bit twin's 0.81 (torch has no 6-bit matmul), but the int4 kernel
    converts weights ~2x faster than the int8 one: out of cache it ran a 3072 x 576 weight in
    170-184 us against 185-203 us for int8 (BENCHMARKS.md, "6-bit twins")."""

    packed: torch.Tensor  # uint8 [N, K] (torch's CPU int4 layout of [N, 2K])
    scales_zeros: torch.Tensor  # bf16 [2K // G, N, 2]
    group_size: int
    n: int
    k: int

    bits = 6

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k

    @classmethod
    def from_quantized(cls, w) -> Int6CpuWeight:
        from river.quantize import unpack_int2, unpack_int4

        n, k = w.shape
        if n % 16:  # the pack's tiling
            raise ValueError(f"torch's CPU int4 pack needs N divisible by 16, got N={n}")
        hi = unpack_int2(w.qweight_hi.cpu()).to(torch.int32)  # [N, K] in 0..3
        lo = unpack_int4(w.qweight.cpu()).to(torch.int32)  # [N, K] in 0..15
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.cat([hi, lo], 1).contiguous(), 1
        )
        s = w.scales.float().cpu()  # [N, K // G]
        scales = torch.cat([16.0 * s, s], 1)
        zeros = torch.cat([128.0 * s, (8.0 - w.zeros.float().cpu()) * s], 1)
        sz = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
        return cls(packed=packed, scales_zeros=sz, group_size=w.group_size, n=n, k=k)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """W [N, K] exactly as the packed matmul sees it (for tests)."""
        eye = torch.eye(self.k, dtype=torch.bfloat16)
        return _matmul(eye, self).t().contiguous().to(dtype)


# Rows at which the int8 matmul stops paying: torch's int8 kernel is a GEMV-style loop, ~18 us
# a row on a [1536, 576] weight (39 us at M = 1, 139 at M = 8, 5.5 ms at M = 300, against
# 0.7 ms for the bf16 GEMM at M = 300 plus ~0.4 ms to dequantize), so prefill-sized batches
# dequantize to bf16 and use the GEMM; decode batches stay on the int8 bytes.
_INT8_MAX_ROWS = 32


@dataclass(frozen=True)
class Int8CpuWeight:
    """W [N, K] for torch's CPU int8 weight-only matmul: w = q * scale per output row."""

    q: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # bf16 [N]

    bits = 8

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @classmethod
    def from_quantized(cls, w) -> Int8CpuWeight:
        """From river's W8Weight (the same layout; its scales are bf16-representable, so the
        cast is exact)."""
        return cls(q=w.qweight.cpu().contiguous(), scales=w.scales.cpu().to(torch.bfloat16))

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return (self.q.float() * self.scales.float().unsqueeze(1)).to(dtype)


def rms_norm(x, weight, eps, residual=None):
    """reference.rms_norm in three ops (float32 statistics as in HF's LlamaRMSNorm)."""
    if residual is not None:
        x = x + residual
    y = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return y.to(x.dtype) * weight, x


def _rope(x, cos, sin):
    # x [M, heads, D]; cos, sin [M, 1, D/2] float32: reference.apply_rope with the tables
    # already gathered, so Q and K share one gather.
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _matmul(x, w):
    """x [M, K] @ W.T for a dense weight [N, K] or an Int4/Int6/Int8CpuWeight."""
    if isinstance(w, Int8CpuWeight):
        if x.dtype != torch.bfloat16:
            raise TypeError("Int8CpuWeight runs with bf16 activations")
        if x.shape[0] <= _INT8_MAX_ROWS:
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), w.q, w.scales)
        w = w.dequantize(torch.bfloat16)
    if isinstance(w, Int4CpuWeight | Int6CpuWeight):
        if x.dtype != torch.bfloat16:
            raise TypeError(f"{type(w).__name__} runs with bf16 activations")
        if isinstance(w, Int6CpuWeight):
            x = torch.cat([x, x], -1)  # [M, 2K]: the hi and the lo column blocks
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.contiguous(), w.packed, w.group_size, w.scales_zeros
        )
    if not isinstance(w, torch.Tensor):  # a W4Weight: the oracle's dequantize-per-call path
        w = w.dequantize(x.dtype)
    if x.shape[0] == 1 and x.dtype == torch.bfloat16:  # torch's bf16 GEMV beats its M = 1 GEMM
        return (torch.ops.river_cpu.mv if _compiling() else torch.mv)(w, x[0]).unsqueeze(0)
    return x @ w.t()


def _selected(row_mask):
    """None when every row is selected, else the int64 indices of the selected rows (maybe
    none). Reads the mask on the host: the point of this op set."""
    if row_mask is None:
        return None
    idx = row_mask.nonzero().squeeze(1)
    return None if idx.numel() == row_mask.numel() else idx


def _rowwise(fn, x, row_mask, out, width):
    """fn over the selected rows of x, scattered into out (zeros elsewhere when out is None)."""
    idx = _selected(row_mask)
    if idx is None:
        y = fn(x)
        return y if out is None else out.copy_(y)
    if out is None:
        out = x.new_zeros(x.shape[0], width)
    if idx.numel():
        out[idx] = fn(x[idx])
    return out


# ------------------------------------------------------------------ compiled (traced) path
# Three ops stay opaque to torch.compile. They are registered with torch.library's low-level
# API (a few us a call; `torch.library.custom_op` costs several times that): the K/V store and
# attention read row masks and context lengths on the host, and the bf16 GEMV would otherwise
# be decomposed by inductor into a generic reduction loop ~2x slower than torch.mv.
_LIB = torch.library.Library("river_cpu", "DEF")
_LIB.define("mv(Tensor w, Tensor x) -> Tensor")
_LIB.define(
    "store_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, Tensor k, Tensor v, "
    "Tensor? row_mask) -> ()"
)
_LIB.define(
    "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
    "Tensor context_lens, float scale, Tensor? row_mask, Tensor? kv_valid) -> Tensor"
)


def _store_kv(k_cache, v_cache, slot_mapping, k, v, row_mask):
    """K/V [M, Hkv, D] of the selected rows into their cache slots (the others write nothing)."""
    idx = _selected(row_mask)
    if idx is not None:
        if not idx.numel():
            return
        slot_mapping, k, v = slot_mapping[idx], k[idx], v[idx]
    slots = slot_mapping.long()
    k_cache.view(-1, *k.shape[1:])[slots] = k.to(k_cache.dtype)
    v_cache.view(-1, *v.shape[1:])[slots] = v.to(v_cache.dtype)


def _decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, row_mask, kv_valid):
    return paged_decode_attention(
        q, k_cache, v_cache, block_tables, context_lens, scale, row_mask, kv_valid
    )


_LIB.impl("mv", torch.mv, "CPU")
_LIB.impl("mv", lambda w, x: x.new_empty(w.shape[0]), "Meta")
_LIB.impl("store_kv", _store_kv, "CPU")
_LIB.impl("store_kv", lambda *args: None, "Meta")
_LIB.impl("decode_attention", _decode_attention, "CPU")
_LIB.impl("decode_attention", lambda q, *args: torch.empty_like(q), "Meta")


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _select_rows(y, row_mask, out):
    """Traced: y's selected rows into out (y already computed for every row). A compiled step
    runs only where the host flags say which weight set each layer needs (river.graphs), so
    computing a projection for every row of its set wastes only padding rows."""
    if row_mask is not None:
        row_mask = row_mask.view(-1, *(1,) * (y.dim() - 1))
    if out is None:
        return y if row_mask is None else torch.where(row_mask, y, 0)
    return out.copy_(y if row_mask is None else torch.where(row_mask, y, out))


def linear(x, weight, row_mask=None, out=None):
    """out[m] = x[m] @ W.T for rows in row_mask (see reference.linear)."""
    if _compiling():
        return _select_rows(_matmul(x, weight), row_mask, out)
    return _rowwise(lambda v: _matmul(v, weight), x, row_mask, out, weight.shape[0])


def _gate_up(x, weight):
    gate, up = _matmul(x, weight).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate.float()).to(x.dtype) * up


def gate_up_silu(x, weight, row_mask=None, out=None):
    """SiLU(x @ Wg.T) * (x @ Wu.T) over the fused [2 I, K] weight (see reference)."""
    if _compiling():
        return _select_rows(_gate_up(x, weight), row_mask, out)
    return _rowwise(lambda v: _gate_up(v, weight), x, row_mask, out, weight.shape[0] // 2)


def qkv_rope_store(
    x,
    weight,
    cos,
    sin,
    positions,
    k_cache,
    v_cache,
    slot_mapping,
    num_heads,
    num_kv_heads,
    row_mask=None,
    q_out=None,
):
    """Q/K/V projection, RoPE, K/V into the paged cache, for the selected rows only (see
    reference.qkv_rope_store: rows outside row_mask write nothing and keep q_out)."""
    head_dim = k_cache.shape[-1]
    if _compiling():
        return _traced_qkv_rope_store(
            x, weight, cos, sin, positions, k_cache, v_cache, slot_mapping, num_heads,
            num_kv_heads, row_mask, q_out, head_dim,
        )  # fmt: skip
    idx = _selected(row_mask)
    if idx is not None:
        if q_out is None:
            q_out = x.new_zeros(x.shape[0], num_heads, head_dim)
        if idx.numel():
            q_out[idx] = qkv_rope_store(
                x[idx],
                weight,
                cos,
                sin,
                positions[idx],
                k_cache,
                v_cache,
                slot_mapping[idx],
                num_heads,
                num_kv_heads,
            )
        return q_out
    m = x.shape[0]
    qkv = _matmul(x, weight)
    q, k, v = qkv.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1
    )
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    qk = _rope(qkv[:, : (num_heads + num_kv_heads) * head_dim].view(m, -1, head_dim), c, s)
    q, k = qk[:, :num_heads], qk[:, num_heads:]
    _store_kv(k_cache, v_cache, slot_mapping, k, v.view(m, num_kv_heads, head_dim), None)
    return q if q_out is None else q_out.copy_(q)


def _traced_qkv_rope_store(
    x, weight, cos, sin, positions, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
    row_mask, q_out, head_dim,
):  # fmt: skip
    # every row through RoPE (cheap, fused); only the selected rows reach the cache and q_out
    m = x.shape[0]
    qkv = _matmul(x, weight)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    qk = _rope(qkv[:, : (num_heads + num_kv_heads) * head_dim].view(m, -1, head_dim), c, s)
    q, k = qk[:, :num_heads], qk[:, num_heads:]
    v = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(m, num_kv_heads, head_dim)
    torch.ops.river_cpu.store_kv(k_cache, v_cache, slot_mapping, k, v, row_mask)
    return _select_rows(q, row_mask, q_out)


def _attend(q, k_cache, v_cache, tables, lens, lens_host, scale, kv_valid):
    # q [B, Hq, D]; tables [B, W] int32 (-1 padded); lens int32 [B] (lens_host: as a list)
    # -> [B, Hq, D]. Gather each row's blocks (index_select: about half aten::index's cost on
    # these sizes), then torch's SDPA with GQA; a key mask only where rows differ in length
    # (or KV masking left holes).
    b, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    n = tables.shape[1] * block_size
    one = b == 1 and kv_valid is None
    # one row, cut to its own width: every entry is a block of its (no -1 padding)
    blocks = tables.view(-1) if one else tables.clamp_min(0).view(-1)
    k = k_cache.index_select(0, blocks).view(b, n, hkv, d)
    v = v_cache.index_select(0, blocks).view(b, n, hkv, d)
    mask = None
    if one:
        k, v = k[:, : lens_host[0]], v[:, : lens_host[0]]
    elif kv_valid is not None or min(lens_host) != n:
        mask = torch.arange(n).unsqueeze(0) < lens.unsqueeze(1).long()  # [B, N]
        if kv_valid is not None:
            mask &= kv_valid.index_select(0, blocks).view(b, n)
        mask = mask.view(b, 1, 1, n)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale,
        enable_gqa=hq != hkv,
    )  # [B, Hq, 1, D]  # fmt: skip
    if mask is not None:  # a row with nothing to attend gives zeros, as in the reference
        out = out.nan_to_num(0.0)
    return out.view(b, hq, d)


def paged_decode_attention(
    q, k_cache, v_cache, block_tables, context_lens, scale, row_mask=None, kv_valid=None,
    scratch=None,
):  # fmt: skip
    """reference.paged_decode_attention over the selected rows (others output zeros), with
    the block tables cut to the longest selected context (the reference reads every column)."""
    if _compiling():
        return torch.ops.river_cpu.decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, scale, row_mask, kv_valid
        )
    idx = _selected(row_mask)
    b = q.shape[0]
    if idx is not None and not idx.numel():
        return torch.zeros_like(q)
    rows = slice(None) if idx is None else idx
    lens = context_lens[rows]
    lens_host = lens.tolist()
    width = -(-max(lens_host) // k_cache.shape[1])
    tables = block_tables[rows, :width]
    out = _attend(q[rows], k_cache, v_cache, tables, lens, lens_host, scale, kv_valid)
    if idx is None:
        return out
    full = q.new_zeros(b, *q.shape[1:])
    full[idx] = out
    return full


# Up to this many new tokens per sequence, prefill attention runs as one batched SDPA over all
# sequences (padded); longer prompts go one sequence at a time (the reference), where padding
# would waste more than the loop costs.
_BATCHED_EXTEND = 16


def prefill_attention(
    q, k_cache, v_cache, cu_seqlens, block_tables, context_lens, scale, max_seqlen=None
):
    """reference.prefill_attention; short "extends" of many sequences (a lossless verify pass:
    k + 1 tokens per row over a cached prefix) as one batched SDPA instead of a loop."""
    if max_seqlen is None or max_seqlen > _BATCHED_EXTEND or context_lens.shape[0] < 2:
        return reference.prefill_attention(
            q, k_cache, v_cache, cu_seqlens, block_tables, context_lens, scale
        )
    s, m = context_lens.shape[0], max_seqlen
    t, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    cu, lens = cu_seqlens.tolist(), context_lens.tolist()
    new = [cu[i + 1] - cu[i] for i in range(s)]
    # [S, m] rows of q (padding points at row 0 and is dropped at the end)
    slot = [[cu[i] + j if j < new[i] else 0 for j in range(m)] for i in range(s)]
    qpos = [[lens[i] - new[i] + j for j in range(m)] for i in range(s)]
    width = -(-max(lens) // block_size)
    n = width * block_size
    safe = block_tables[:, :width].long().clamp_min(0)
    k = k_cache[safe].view(s, n, hkv, d).transpose(1, 2)  # [S, Hkv, N, D]
    v = v_cache[safe].view(s, n, hkv, d).transpose(1, 2)
    qs = q[torch.tensor(slot)].transpose(1, 2)  # [S, Hq, m, D]
    keys = torch.arange(n)
    mask = keys.view(1, 1, n) <= torch.tensor(qpos).unsqueeze(2)  # causal, and within length
    out = torch.nn.functional.scaled_dot_product_attention(
        qs, k, v, attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=hq != hkv
    ).transpose(1, 2)  # [S, m, Hq, D]
    keep = torch.tensor([j < new[i] for i in range(s) for j in range(m)])
    return out.reshape(s * m, hq, d)[keep].to(q.dtype)


sample = reference.sample
alloc_decode_scratch = reference.alloc_decode_scratch
