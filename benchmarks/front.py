"""bench_quality.py's bytes/quality front: weight bytes per decode token for a row, the
static-split passes and the oracle curve built from them.

Bytes are what decide decode speed at small batch, so every quality row is placed by the weight
bytes one decode token reads relative to full's (decode_cost.token_bytes_ratio), on the default
model's own shapes and on Llama-3.1-8B's (where the LM head is a smaller share).

The oracle: for each token, the shallowest static split k (of the grid run) whose top-1 equals
full's, capped at `cap` layers (a token with no match up to the cap runs `cap` layers and counts
as a miss). It is computed from the static-split passes, i.e. with the context's K/V written by
the same split, so it is an upper bound for per-token rules only approximately (a real rule's
context mixes depths); it answers how much any exit rule could win over the static split.
"""

from __future__ import annotations

import math

import torch
from decode_cost import token_bytes_ratio
from models import model_config
from shapes import LLAMA_3_1_8B

TARGETS = {"model": None, "8b": LLAMA_3_1_8B}


def bytes_fields(engine, counts, bits) -> dict:
    """{"bytes_model": ..., "bytes_8b": ...}: weight bytes per decode token over full's, for
    tokens that ran `counts` bf16 layers each and twins planned by `bits` (None: full)."""
    out = {}
    for name, shape in TARGETS.items():
        target = engine.model_config if shape is None else model_config(shape, 4096)
        ratio = token_bytes_ratio(
            target, bits, counts, engine.config.river_group_size, engine.river_head_bits or 16
        )
        out[f"bytes_{name}"] = round(ratio, 4)
    return out


def static_passes(engine, seqs, splits, progress=True) -> dict:
    """{k: SplitScores} for every static split k (None: full), one batched prefill each, with
    the engine's current twins dequantized for the pass (torch's packed CPU matmuls are slow
    at prefill-sized batches); the engine's own twins are put back afterwards."""
    import static_split

    from river.twins import build_twins

    engine.ensure_river(progress=False)
    quantized, _, head = build_twins(engine, progress=False)
    engine.model.attach_river(quantized, packed=False, head=head)
    out = {}
    try:
        for k in splits:
            out[k] = static_split.score(engine.model, seqs, twins_from=k)
            if progress:
                print(f"  static split {k}: ppl {out[k].ppl():.4f}", flush=True)
    finally:
        engine.model.attach_river(quantized, head=head)
    return out


def oracle_curve(full, passes: dict, caps, engine, bits) -> list[dict]:
    """One point per cap: mean bf16 layers, agreement with full, perplexity and bytes of the
    per-token oracle over the static splits in `passes` (see the module docstring)."""
    ks = sorted(k for k in passes if k is not None)
    agree = torch.stack([passes[k].top1 == full.top1 for k in ks])  # [K, N]
    lps = torch.stack([passes[k].logprobs for k in ks])
    points = []
    for cap in caps:
        usable = [i for i, k in enumerate(ks) if k <= cap]
        if not usable:
            continue
        last = usable[-1]
        hit = agree[usable]  # [K', N]
        any_hit = hit.any(0)
        first = torch.where(
            any_hit, hit.float().argmax(0), torch.full_like(any_hit, last, dtype=torch.long)
        )
        chosen_k = torch.tensor(ks)[first]
        lp = lps[first, torch.arange(lps.shape[1])]
        points.append(
            {
                "cap": cap,
                "backbone_layers": float(chosen_k.float().mean()),
                "top1_agree": float(any_hit.float().mean()),
                "ppl": math.exp(-float(lp.mean())),
                **bytes_fields(engine, chosen_k.tolist(), bits),
            }
        )
    return points
