"""On-device sampling: greedy / temperature / top-k / top-p by the exponential race, no host sync.

Same decisions as reference.sample (which sorts): token i is kept iff its rank r_i in the
stable descending order of probabilities is < k and the mass before it, before_i, is < top_p;
the kept token maximising p_i / E_i, E_i = -log(u_i), wins, with u_i the counter-based
hash_uniform noise reproduced bit for bit in uint32 arithmetic.

No sort is needed. The kept set is a prefix of the stable order, so it is fixed by a threshold
on the probability's bit pattern (non-negative floats order like their int32 bits): a bisection
over the bits keeps the invariant
    lo: the prefix {key > lo} contains every kept token,
    hi: some kept token has key <= hi (and cnt_hi = #{key > hi}, mass_hi = their mass),
each pass over the row counting #{key > mid} and summing their mass (<= 31 passes, fewer for
pure top-k: it stops when #{key > mid} == k exactly). Tokens with key > lo are kept, except
that among the tokens tied at key == hi the stable order decides: the last pass walks them in
index order with a running count / mass (tl.cumsum) and applies the exact rule above.

One program per row; the passes stream the row's probabilities (written once to a float32
scratch) from L2. Probabilities differ from torch's softmax in the last bits (summation order),
so a decision can differ from the reference only when `before` or a score lands within float
rounding of the threshold or of another score.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .launch import interpreting

__all__ = ["sample"]


@triton.jit
def _mix32(x):
    """lowbias32 (the reference's _mix32) on uint32: wraps mod 2^32 like the reference's masks."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


# libdevice's expf/logf match torch's CUDA results closely; the interpreter has no libdevice
@triton.jit
def _exp(x, ACCURATE: tl.constexpr):
    return libdevice.exp(x) if ACCURATE else tl.exp(x)


@triton.jit
def _log(x, ACCURATE: tl.constexpr):
    return libdevice.log(x) if ACCURATE else tl.log(x)


@triton.jit
def _count_above(p_row, V_PAD, mid, BLOCK: tl.constexpr):
    """(#{key > mid}, sum of p over them) for key = int32 bits of p (p >= 0: monotone).

    Reads the zero-padded row without masks (16-byte loads): a pad has key 0 and mid >= 0."""
    cnt = tl.zeros([BLOCK], dtype=tl.int32)
    mass = tl.zeros([BLOCK], dtype=tl.float32)
    for v0 in range(0, V_PAD, BLOCK):
        v0 = tl.multiple_of(v0, BLOCK)
        p = tl.load(p_row + v0 + tl.arange(0, BLOCK))
        above = p.to(tl.int32, bitcast=True) > mid
        cnt += above.to(tl.int32)
        mass += tl.where(above, p, 0.0)
    return tl.sum(cnt, axis=0), tl.sum(mass, axis=0)


@triton.jit
def _sample_kernel(
    logits_ptr,  # [B, V]
    temperature_ptr,  # float32 [B]; <= 0 means greedy
    top_k_ptr,  # int32 [B]; <= 0 means no top-k
    top_p_ptr,  # float32 [B]; >= 1 means no top-p
    seeds_ptr,  # int64 [B]
    offsets_ptr,  # int64 [B]
    probs_ptr,  # float32 [B, V_PAD] scratch, zero past V
    out_ptr,  # int64 [B]
    V,
    V_PAD,  # V rounded up to BLOCK
    stride_l_b,
    stride_p_b,
    BLOCK: tl.constexpr,
    ACCURATE: tl.constexpr,
):
    """Next token of row b; one program per row."""
    b = tl.program_id(0).to(tl.int64)
    l_row = logits_ptr + b * stride_l_b
    p_row = probs_ptr + b * stride_p_b
    lanes = tl.arange(0, BLOCK)

    # pass 1: max logit and its first index (greedy); lane-wise, strict > keeps the earliest
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK], dtype=tl.int32)
    for v0 in range(0, V, BLOCK):
        offs = v0 + lanes
        x = tl.load(l_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        better = x > best
        best = tl.where(better, x, best)
        best_i = tl.where(better, offs, best_i)
    top = tl.max(best, axis=0)
    greedy = tl.min(tl.where(best == top, best_i, V), axis=0)
    temp = tl.load(temperature_ptr + b)
    if temp <= 0.0:
        tl.store(out_ptr + b, greedy.to(tl.int64))
        return

    # pass 2: softmax of logits / t (as the reference: divide, subtract the max, exp)
    t = tl.maximum(temp, 1e-6)
    z_max = tl.math.div_rn(top, t)
    zsum = tl.zeros([BLOCK], dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        offs = v0 + lanes
        x = tl.load(l_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        zsum += _exp(tl.math.div_rn(x, t) - z_max, ACCURATE)
    total = tl.sum(zsum, axis=0)
    for v0 in range(0, V_PAD, BLOCK):
        offs = v0 + lanes
        x = tl.load(l_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        p = tl.math.div_rn(_exp(tl.math.div_rn(x, t) - z_max, ACCURATE), total)
        tl.store(p_row + offs, tl.where(offs < V, p, 0.0))  # zero pad up to V_PAD
    p_top = tl.math.div_rn(tl.full([], 1.0, tl.float32), total)  # exp(0) / total

    # bisection on the bits of p (see the module docstring for the invariant)
    k = tl.load(top_k_ptr + b)
    k = tl.where((k > 0) & (k < V), k, V)
    top_p = tl.load(top_p_ptr + b)
    lo = tl.full([], -1, tl.int32)
    hi = p_top.to(tl.int32, bitcast=True)
    cnt_hi = tl.full([], 0, tl.int32)
    mass_hi = tl.full([], 0.0, tl.float32)
    filtering = (k < V) | (top_p < 1.0)
    pure_top_k = top_p >= 1.0
    done = ~filtering
    while (hi - lo > 1) & ~done:
        mid = lo + (hi - lo) // 2
        cnt, mass = _count_above(p_row, V_PAD, mid, BLOCK)
        if (cnt < k) & (mass < top_p):
            hi = mid
            cnt_hi = cnt
            mass_hi = mass
        else:
            lo = mid
        done = pure_top_k & (cnt == k)  # {key > mid} is exactly the top k

    # last pass: keep, break ties at key == hi in index order, race p / E with hashed E
    seed = (tl.load(seeds_ptr + b) & 0xFFFFFFFF).to(tl.uint32)
    step = (tl.load(offsets_ptr + b) & 0xFFFFFFFF).to(tl.uint32)
    row_key = _mix32(seed ^ _mix32(step))
    tie_cnt = cnt_hi
    tie_mass = mass_hi
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK], dtype=tl.int32)
    for v0 in range(0, V, BLOCK):
        offs = v0 + lanes
        in_row = offs < V
        p = tl.load(p_row + offs)  # zero-padded row
        key = p.to(tl.int32, bitcast=True)
        tie = (key == hi) & in_row & filtering
        tie_i = tie.to(tl.int32)
        tie_p = tl.where(tie, p, 0.0)
        rank = tie_cnt + tl.cumsum(tie_i, axis=0) - tie_i  # stable rank of a tied token
        before = tie_mass + tl.cumsum(tie_p, axis=0) - tie_p  # mass before it
        tie_cnt += tl.sum(tie_i, axis=0)
        tie_mass += tl.sum(tie_p, axis=0)
        kept = (key > lo) & (~tie | ((rank < k) & (before < top_p)))
        kept = (kept | ~filtering) & in_row
        h = _mix32(row_key + offs.to(tl.uint32))
        u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        score = tl.where(kept, tl.math.div_rn(p, -_log(u, ACCURATE)), -1.0)
        score = tl.where(in_row, score, float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_i = tl.where(better, offs, best_i)
    top_score = tl.max(best, axis=0)
    sampled = tl.min(tl.where(best == top_score, best_i, V), axis=0)
    tl.store(out_ptr + b, sampled.to(tl.int64))


def sample(logits, temperature, top_k, top_p, seeds, offsets):
    """Next token per row (int64 [B]); same arguments and semantics as reference.sample, all on
    the device."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    b, v = logits.shape
    for name, x in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                    ("seeds", seeds), ("offsets", offsets)):  # fmt: skip
        if tuple(x.shape) != (b,) or x.device != logits.device:
            raise ValueError(f"{name} must be [{b}] on {logits.device}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b == 0:
        return out
    block = min(4096, triton.next_power_of_2(v))
    v_pad = triton.cdiv(v, block) * block
    probs = torch.empty((b, v_pad), dtype=torch.float32, device=logits.device)
    _sample_kernel[(b,)](
        logits_ptr=logits, temperature_ptr=temperature.to(torch.float32).contiguous(),
        top_k_ptr=top_k.to(torch.int32).contiguous(),
        top_p_ptr=top_p.to(torch.float32).contiguous(),
        seeds_ptr=seeds.to(torch.int64).contiguous(),
        offsets_ptr=offsets.to(torch.int64).contiguous(), probs_ptr=probs, out_ptr=out, V=v,
        V_PAD=v_pad, stride_l_b=logits.stride(0), stride_p_b=probs.stride(0), BLOCK=block,
        ACCURATE=not interpreting() and logits.is_cuda, num_warps=8,
    )  # fmt: skip
    return out
