"""Teacher-forced scoring of static splits in one batched prefill per split: every token runs
layers [0, k) in bf16 and [k, L) in its river twins, which is what decoding each token with
`ExitConfig("river", threshold=-1, min_layer=k)` computes (LlamaModel.prefill's twins_from),
at a fraction of the cost of scoring token by token. bench_quality.py uses it for the
static-split rows, the oracle curve and the precision sweep."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SplitScores:
    """Per continuation token, concatenated over the pairs."""

    logprobs: torch.Tensor  # float32 [N]
    top1: torch.Tensor  # int64 [N]

    def ppl(self) -> float:
        return math.exp(-float(self.logprobs.mean()))

    def agreement(self, ref: SplitScores) -> float:
        return float((self.top1 == ref.top1).float().mean())


def tokenize(engine, pairs):
    """[(prompt ids, continuation ids)] as Engine.score tokenizes them."""
    return [(engine._ids(p, True), engine._ids(c, False)) for p, c in pairs]


@torch.inference_mode()
def score(model, seqs, twins_from=None, max_tokens=3072) -> SplitScores:
    """Scores of every continuation token with the static split `twins_from` (None: full)."""
    from river.kv_cache import KVCache, blocks_needed
    from river.scheduler import prefill_forward_batch

    cfg, block = model.cfg, 16
    lps, tops = [], []
    i = 0
    while i < len(seqs):
        group, n = [], 0
        while i < len(seqs) and (not group or n + sum(map(len, seqs[i])) <= max_tokens):
            group.append(seqs[i])
            n += sum(map(len, seqs[i]))
            i += 1
        ids = [p + c for p, c in group]
        per = [blocks_needed(len(x), block) for x in ids]
        kv = KVCache(
            cfg.num_layers, sum(per), block, cfg.num_kv_heads, cfg.head_dim, model.dtype,
            model.device,
        )  # fmt: skip
        tables, start = [], 0
        for p in per:
            tables.append(list(range(start, start + p)))
            start += p
        batch = prefill_forward_batch(ids, tables, block, model.device)
        logits = model.prefill(batch, kv, all_logits=True, twins_from=twins_from)  # [T, V]
        offset = 0
        for (p, c), x in zip(group, ids):
            pos = torch.arange(len(c), device=logits.device) + offset + len(p) - 1
            lg = torch.log_softmax(logits[pos].float(), -1)
            target = torch.tensor(c, device=logits.device)
            lps.append(lg.gather(1, target[:, None]).squeeze(1).cpu())
            tops.append(lg.argmax(-1).cpu())
            offset += len(x)
    return SplitScores(torch.cat(lps), torch.cat(tops))
