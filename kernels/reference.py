"""Plain-PyTorch reference ops: the CPU path of the engine and the oracle of every Triton kernel.

Each function here has a Triton twin in this package with the same signature; `river.ops`
dispatches between them. Conventions shared by all ops:

- Row masks (`row_mask`, bool [M]) select the rows an op works on. Rows outside the mask are left
  exactly as they were in `out` (and nothing is written to the KV cache for them). This is how one
  decode step runs two weight sets (the bf16 backbone and the 4-bit river) over one batch without
  gathering rows, which would need the host to know how many rows each path has.
- Paged KV cache (one layer): `k_cache`, `v_cache` [num_blocks, block_size, kv_heads, head_dim];
  slot `s` is block `s // block_size`, offset `s % block_size`. Block tables are int32
  [rows, max_blocks] padded with -1.
- RoPE follows Hugging Face Llama: the two halves of head_dim are rotated together
  (`rotate_half`), with cos/sin tables [max_positions, head_dim // 2] in float32.
"""

from __future__ import annotations

import torch

__all__ = [
    "rms_norm",
    "linear",
    "gate_up_silu",
    "apply_rope",
    "qkv_rope_store",
    "paged_decode_attention",
    "prefill_attention",
    "sample",
    "hash_uniform",
]


def rms_norm(x, weight, eps, residual=None):
    """y = x / sqrt(mean(x^2) + eps) * weight, after `x += residual` when a residual is given.

    x, residual: [M, H]; weight: [H]. Returns (y, x + residual) so the caller keeps the new
    residual stream (the fused-add form of vLLM). Accumulates in float32 like HF's LlamaRMSNorm.
    """
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y.to(x.dtype) * weight), x


def _dense(weight, dtype):
    # W4 weights (river.quantize.W4Weight) are dequantized here only in the oracle; the CPU engine
    # keeps its river weights dequantized once at load time.
    if isinstance(weight, torch.Tensor):
        return weight
    return weight.dequantize(dtype)


def _masked_store(out, value, row_mask):
    if row_mask is None:
        out.copy_(value)
    else:
        shape = (-1,) + (1,) * (value.dim() - 1)
        out.copy_(torch.where(row_mask.view(shape), value, out))
    return out


def linear(x, weight, row_mask=None, out=None):
    """out[m] = x[m] @ W.T for rows in row_mask. x [M, K]; W [N, K] tensor or a twin
    (W4Weight, W6Weight, W8Weight)."""
    y = x @ _dense(weight, x.dtype).t()
    if out is None and row_mask is None:
        return y
    if out is None:
        out = torch.zeros_like(y)
    return _masked_store(out, y, row_mask)


def gate_up_silu(x, weight, row_mask=None, out=None):
    """SiLU(x @ Wg.T) * (x @ Wu.T); weight is the fused [2 * I, K] (gate rows first, then up)."""
    gu = x @ _dense(weight, x.dtype).t()
    gate, up = gu.chunk(2, dim=-1)
    y = torch.nn.functional.silu(gate.float()).to(x.dtype) * up
    if out is None and row_mask is None:
        return y
    if out is None:
        out = torch.zeros_like(y)
    return _masked_store(out, y, row_mask)


def apply_rope(x, cos, sin, positions):
    """x [M, heads, D]; cos, sin [max_pos, D // 2] float32; positions int [M]."""
    c = cos[positions].unsqueeze(1)  # [M, 1, D/2]
    s = sin[positions].unsqueeze(1)
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out.to(x.dtype)


def qkv_rope_store(
    x,  # [M, K] normed hidden state
    weight,  # [(Hq + 2 * Hkv) * D, K] tensor or a twin: q rows, then k rows, then v rows
    cos,  # [max_pos, D // 2] float32
    sin,  # [max_pos, D // 2] float32
    positions,  # int [M]
    k_cache,  # [num_blocks, block_size, Hkv, D]
    v_cache,  # [num_blocks, block_size, Hkv, D]
    slot_mapping,  # int [M]: flat cache slot of each row
    num_heads,
    num_kv_heads,
    row_mask=None,  # bool [M]
    q_out=None,  # [M, Hq, D]
):
    """The river KV projection: Q/K/V projection, RoPE on Q and K, K/V written into each row's
    paged-cache slot. Returns Q [M, Hq, D] (rows outside row_mask keep q_out's content)."""
    m = x.shape[0]
    head_dim = k_cache.shape[-1]
    qkv = x @ _dense(weight, x.dtype).t()
    q, k, v = qkv.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1
    )
    q = apply_rope(q.view(m, num_heads, head_dim), cos, sin, positions)
    k = apply_rope(k.view(m, num_kv_heads, head_dim), cos, sin, positions)
    v = v.view(m, num_kv_heads, head_dim)
    kc = k_cache.view(-1, num_kv_heads, head_dim)
    vc = v_cache.view(-1, num_kv_heads, head_dim)
    slots = slot_mapping.long()
    if row_mask is not None:
        # Read-modify-write so masked-out rows leave their slot untouched without a host-side
        # gather (a row outside the mask may share nothing with the rows inside it).
        keep = row_mask.view(-1, 1, 1)
        k = torch.where(keep, k.to(kc.dtype), kc[slots])
        v = torch.where(keep, v.to(vc.dtype), vc[slots])
    kc[slots] = k.to(kc.dtype)
    vc[slots] = v.to(vc.dtype)
    if q_out is None and row_mask is None:
        return q
    if q_out is None:
        q_out = torch.zeros_like(q)
    return _masked_store(q_out, q, row_mask)


def _gather_kv(cache, block_table, length):
    # cache [num_blocks, block_size, Hkv, D]; block_table int [max_blocks] -> [length, Hkv, D]
    block_size = cache.shape[1]
    idx = torch.arange(length, device=cache.device)
    blocks = block_table.long()[idx // block_size]
    return cache[blocks, idx % block_size]


def _attend(q, k, v, scale, mask):
    # q [Tq, Hq, D]; k, v [Tk, Hkv, D]; mask bool [Tq, Tk] (True = attend) -> [Tq, Hq, D]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    s = s.masked_fill(~mask.unsqueeze(0), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with nothing to attend gives zeros
    return torch.einsum("hqk,khd->qhd", p, v.float()).to(q.dtype)


def paged_decode_attention(
    q,  # [B, Hq, D]
    k_cache,  # [num_blocks, block_size, Hkv, D]
    v_cache,  # [num_blocks, block_size, Hkv, D]
    block_tables,  # int32 [B, max_blocks]
    context_lens,  # int32 [B]: keys per row, the current token included
    scale,
    row_mask=None,  # bool [B]; rows outside it output zeros
    kv_valid=None,  # bool [num_blocks, block_size]; False slots are ignored (KV masking)
    scratch=None,  # unused: the op set's alloc_decode_scratch gives None
):
    """One query token per row attending to its whole paged context.

    Vectorised over rows with padding to the block table's width, so that it reads no tensor
    value on the host: the CPU decode step must be free of host synchronisation too.
    """
    b, hq, d = q.shape
    num_blocks, block_size, hkv, _ = k_cache.shape
    tables = block_tables.long().clamp_min(0)  # padding (-1) reads block 0, masked below
    k = k_cache[tables].reshape(b, -1, hkv, d)  # [B, max_blocks * block_size, Hkv, D]
    v = v_cache[tables].reshape(b, -1, hkv, d)
    n = k.shape[1]
    mask = torch.arange(n, device=q.device).unsqueeze(0) < context_lens.unsqueeze(1).long()
    if kv_valid is not None:
        mask &= kv_valid[tables].reshape(b, n)
    if row_mask is not None:
        mask &= row_mask.unsqueeze(1)
    group = hq // hkv
    qf = q.float().view(b, hkv, group, d)
    s = torch.einsum("bhgd,bnhd->bhgn", qf, k.float()) * scale
    s = s.masked_fill(~mask.view(b, 1, 1, n), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with nothing to attend gives zeros
    out = torch.einsum("bhgn,bnhd->bhgd", p, v.float())
    return out.reshape(b, hq, d).to(q.dtype)


def prefill_attention(
    q,  # [T, Hq, D]: new tokens of all sequences, concatenated
    k_cache,  # [num_blocks, block_size, Hkv, D]: already holds the new tokens' K/V
    v_cache,
    cu_seqlens,  # int32 [S + 1]: offsets of each sequence's new tokens in q
    block_tables,  # int32 [S, max_blocks]
    context_lens,  # int32 [S]: cached prefix + new tokens
    scale,
    max_seqlen=None,  # unused here (sizes the Triton grid)
):
    """Causal attention of each sequence's new tokens over its cached prefix and themselves."""
    out = torch.empty_like(q)
    cu = cu_seqlens.tolist()
    lens = context_lens.tolist()
    for s in range(len(lens)):
        a, e = cu[s], cu[s + 1]
        n_new, n = e - a, lens[s]
        if n_new == 0:
            continue
        k = _gather_kv(k_cache, block_tables[s], n)
        v = _gather_kv(v_cache, block_tables[s], n)
        qpos = torch.arange(n - n_new, n, device=q.device)
        mask = torch.arange(n, device=q.device).unsqueeze(0) <= qpos.unsqueeze(1)
        out[a:e] = _attend(q[a:e], k, v, scale, mask)
    return out


_U32 = 0xFFFFFFFF


def _mix32(x):
    # lowbias32 integer hash (Chris Wellons), in int64 with explicit 32-bit wrap so the Triton
    # sampler can reproduce it bit for bit with uint32 arithmetic.
    x = x & _U32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _U32
    x = x ^ (x >> 16)
    return x


def hash_uniform(seeds, offsets, vocab_size):
    """Counter-based uniform noise in (0, 1): [B, V] from per-row seed and step offset (int64 [B]).

    u = (mix32(mix32(seed ^ mix32(offset)) + index) >> 8 + 0.5) / 2^24, so a request's samples
    depend only on its seed and step, never on which batch it shares or on a host-side RNG.
    """
    idx = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    row = _mix32(seeds.long() ^ _mix32(offsets.long()))
    h = _mix32(row.unsqueeze(1) + idx.unsqueeze(0))
    return ((h >> 8).double() + 0.5).float() / float(1 << 24)


def sample(
    logits,  # [B, V]
    temperature,  # float32 [B]; 0 means greedy
    top_k,  # int32 [B]; 0 means no top-k
    top_p,  # float32 [B]; 1.0 means no top-p
    seeds,  # int64 [B]
    offsets,  # int64 [B]: the step of each row (its number of generated tokens)
):
    """Next token per row: greedy, or temperature / top-k / top-p sampling by the exponential race
    (argmax of p_i / E_i with E_i ~ Exp(1) picks token i with probability p_i), all on the device.
    Returns int64 [B]."""
    logits = logits.float()
    greedy = logits.argmax(-1)
    v = logits.shape[-1]
    t = temperature.clamp_min(1e-6).unsqueeze(1)
    probs = torch.softmax(logits / t, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # ties: lowest index first
    rank = torch.arange(v, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, v).unsqueeze(1)
    # keep a token while the mass before it is < top_p (so the top token always survives)
    before = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = (rank < k) & (before < top_p.unsqueeze(1))
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    u = hash_uniform(seeds, offsets, v)
    e = -torch.log(u)
    score = torch.where(keep, probs / e, torch.full_like(probs, -1.0))
    sampled = score.argmax(-1)
    return torch.where(temperature > 0, sampled, greedy)


def alloc_decode_scratch(max_batch, num_heads, head_dim, device=None):
    """No scratch: the PyTorch ops allocate per call (they are never captured in a graph)."""
    return None
