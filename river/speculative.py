"""Lossless river: the river drafts k tokens, the bf16 backbone verifies them in one pass.

A lossless step of a row whose last token t0 sits at position p (not yet in the cache):

1. Draft: k decode passes through the river (ExitConfig.draft: the paper's exit, or every layer
   in its 4-bit twin), t0, d1, .., d(k-1) at positions p .. p+k-1. The drafts write their K/V
   into the request's own slots (KV share: no second cache).
2. Verify: one backbone pass over [t0, d1, .., dk] at positions p .. p+k, attending to the
   cached prefix (the prefill path's ragged "extend"). It overwrites every draft K/V with the
   backbone's and gives the backbone's distribution at each of the k+1 positions.
3. Accept: the longest prefix of drafts the backbone agrees with, then one token of the
   backbone's own. Greedy: accept while d_i == argmax p_i. Sampling: the speculative-sampling
   rule (accept d_i with probability min(1, p_i(d_i) / q_i(d_i)), else draw from
   normalise(max(0, p_i - q_i)); all accepted: draw from p_(k+1)), whose output distribution
   is exactly the backbone's. The cache then holds the backbone's K/V at every kept position;
   slots past them hold rejected drafts and are overwritten by the next step.

p and q are the *warped* distributions (temperature, top-k, top-p: the kept set of
river.kernels.reference.sample). Randomness is counter-based (hash_uniform of the request's
seed and the token's index), one stream per use, so a request's output does not depend on the
batch it shares or on k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from river.kernels.reference import hash_uniform

# Distinct streams of the counter-based noise (xor-ed into the request's seed).
_DRAFT, _ACCEPT, _RESIDUAL = 0x3A1F_0001, 0x3A1F_0002, 0x3A1F_0003


def warped_probs(logits, temperature, top_k, top_p):
    """The distribution a row samples from: softmax(logits / T) restricted to the tokens
    reference.sample keeps (rank < top_k, mass before < top_p), renormalised; greedy rows
    (T == 0) get a one-hot on the argmax. logits float [N, V]; settings [N]. -> float32 [N, V]."""
    logits = logits.float()
    v = logits.shape[-1]
    t = temperature.float().clamp_min(1e-6).unsqueeze(1)
    probs = torch.softmax(logits / t, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(v, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, v).unsqueeze(1)
    before = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = (rank < k) & (before < top_p.float().unsqueeze(1))
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    kept = kept / kept.sum(-1, keepdim=True)
    greedy = torch.nn.functional.one_hot(logits.argmax(-1), v).float()
    return torch.where((temperature > 0).unsqueeze(1), kept, greedy)


def draw(probs, seeds, offsets, stream: int):
    """One token per row from probs [N, V] (exponential race: argmax p_i / E_i, E_i ~ Exp(1)
    from the row's seed and offset). A one-hot row returns its token."""
    u = hash_uniform(seeds ^ stream, offsets, probs.shape[-1])
    score = torch.where(probs > 0, probs / -torch.log(u), torch.full_like(probs, -1.0))
    return score.argmax(-1)


@dataclass
class Verdict:
    """The outcome of one verify pass, per row (device tensors)."""

    accepted: torch.Tensor  # int64 [N]: drafts kept (0..k_i)
    tokens: torch.Tensor  # int64 [N, K + 1]: drafts 0..accepted-1, then the backbone's token


def accept(drafts, draft_probs, target_probs, lengths, seeds, offsets) -> Verdict:
    """The speculative-sampling decision of N rows.

    drafts int64 [N, K]: d_1..d_K (columns >= lengths[i] unused); draft_probs float [N, K, V]:
    q_i; target_probs float [N, K + 1, V]: p_1..p_(K+1); lengths int64 [N]: k_i; offsets
    int64 [N]: index of d_1 among the request's generated tokens (the noise counter)."""
    n, kmax = drafts.shape
    dev = drafts.device
    steps = torch.arange(kmax, device=dev)
    if kmax:
        p_d = target_probs[:, :kmax].gather(2, drafts.unsqueeze(2)).squeeze(2)  # [N, K]
        q_d = draft_probs.gather(2, drafts.unsqueeze(2)).squeeze(2)
        u = torch.stack(
            [hash_uniform(seeds ^ _ACCEPT, offsets + j, 1)[:, 0] for j in range(kmax)], dim=1
        )
        # u < p/q, written without the division (q_d > 0: the draft was drawn from q)
        ok = (u * q_d < p_d) & (steps.unsqueeze(0) < lengths.unsqueeze(1))
        # accepted = index of the first rejection (or k_i when none)
        accepted = torch.where(ok, 0, 1).cumsum(1).eq(0).sum(1)
    else:
        accepted = torch.zeros(n, dtype=torch.int64, device=dev)
    rows = torch.arange(n, device=dev)
    p_next = target_probs[rows, accepted]  # [N, V]
    rejected = accepted < lengths
    if kmax:
        q_next = draft_probs[rows, accepted.clamp_max(kmax - 1)]
        residual = (p_next - q_next).clamp_min(0)
        mass = residual.sum(-1, keepdim=True)
        # p == q on the rejected token's row cannot reject (u < 1); guard the division anyway
        residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_next)
        p_next = torch.where(rejected.unsqueeze(1), residual, p_next)
    last = draw(p_next, seeds, offsets + accepted, _RESIDUAL)
    tokens = torch.cat([drafts, drafts.new_zeros(n, 1)], dim=1)
    tokens[rows, accepted] = last
    return Verdict(accepted, tokens)


def accept_greedy(drafts, target_tokens, lengths) -> Verdict:
    """accept() for rows that are all greedy, without building distributions: keep drafts while
    they equal the backbone's argmax. target_tokens int64 [N, K + 1]: argmax p_1..p_(K+1)."""
    n, kmax = drafts.shape
    rows = torch.arange(n, device=drafts.device)
    steps = torch.arange(kmax, device=drafts.device)
    ok = (drafts == target_tokens[:, :kmax]) & (steps.unsqueeze(0) < lengths.unsqueeze(1))
    accepted = torch.where(ok, 0, 1).cumsum(1).eq(0).sum(1)
    tokens = torch.cat([drafts, drafts.new_zeros(n, 1)], dim=1)
    tokens[rows, accepted] = target_tokens[rows, accepted]
    return Verdict(accepted, tokens)


def draft_token(logits, temperature, top_k, top_p, seeds, offsets):
    """(token [N], q [N, V]) of one draft step: drawn from the warped draft distribution."""
    q = warped_probs(logits, temperature, top_k, top_p)
    return draw(q, seeds, offsets, _DRAFT), q


@dataclass
class DraftLength:
    """k per row: fixed, or adaptive (grow by one while every draft is accepted, fall to the
    accepted count + 1 after a rejection), within [1, max_len]."""

    fixed: int | None
    max_len: int
    current: int

    @classmethod
    def start(cls, fixed: int | None, max_len: int) -> DraftLength:
        return cls(fixed, max_len, fixed if fixed is not None else min(4, max_len))

    def update(self, drafted: int, accepted: int) -> None:
        if self.fixed is not None or drafted == 0:
            return
        if accepted == drafted:
            self.current = min(self.max_len, self.current + 1)
        else:
            self.current = max(1, accepted + 1)
