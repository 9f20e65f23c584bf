"""The lossless step: k river drafts per row, one backbone verify pass, the agreed prefix kept.

river/speculative.py holds the rule; this module runs it over a batch of requests on the
model and the paged cache. Every row of a batch drafts up to its own k (rows that have drafted
enough are inactive in the later draft passes, and write nothing), and the verify pass is one
ragged prefill-style "extend" of every row's k+1 tokens over its cached prefix. The positions,
slots and the verify batch's layout come from host counts, so the drafts and the verify pass
are enqueued without reading a device value; the accepted counts and tokens are read once, at
the end of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from river.exits import ExitParams
from river.kv_cache import pad_block_tables, slots_for
from river.model import ForwardBatch
from river.runner import sampling_tensors
from river.speculative import accept, accept_greedy, draft_token, warped_probs


@dataclass
class LosslessResult:
    """One row's outcome of a lossless step."""

    tokens: list[int]  # 1..k+1 tokens, the backbone's own
    drafted: int  # k
    accepted: int  # drafts kept
    draft_layers: int  # bf16 backbone layers its k draft passes ran, in all


def lossless_step(model, kv, reqs, draft_lens: list[int]) -> list[LosslessResult]:
    """One lossless step of `reqs`, each with its last generated token not yet in the cache
    (`output_ids[-1]` at position len(prompt) + len(output) - 1). draft_lens[i]: k of row i,
    already capped so that the step never writes past the request's reserved blocks."""
    dev, bs = model.device, kv.block_size
    n = len(reqs)
    ks = list(draft_lens)
    kmax = max(ks, default=0)
    pos0 = [len(r.prompt_ids) + len(r.output_ids) - 1 for r in reqs]
    tables = pad_block_tables([r.blocks for r in reqs]).to(dev)
    # the noise counter of a row's first draft is its number of generated tokens
    samp = sampling_tensors(reqs, [len(r.output_ids) for r in reqs], dev)
    temperature, top_k, top_p = samp["temperature"], samp["top_k"], samp["top_p"]
    seeds, offsets = samp["seed"], samp["offset"]
    greedy = all(r.params.temperature == 0 for r in reqs)
    first = torch.tensor([r.output_ids[-1] for r in reqs], dtype=torch.int64, device=dev)

    # ---- draft: kmax decode passes through the river (each row active for its own k)
    exits = ExitParams.build([r.params.exit.draft_config() for r in reqs], dev)
    # the rows' drafts share one head: the 4-bit twin only if every row asks for it
    exits.draft_head = all(r.params.exit.draft_head == "w4" for r in reqs)
    # "bf16" means the backbone's head, not the river head of the exited rows
    exits.river_head = False
    drafts = torch.zeros(n, kmax, dtype=torch.int64, device=dev)
    qs = None if greedy else torch.empty(n, kmax, model.cfg.vocab_size, device=dev)
    cur = first
    layers = torch.zeros(n, dtype=torch.int64, device=dev)
    for s in range(kmax):
        live = [k > s for k in ks]
        # rows done drafting keep their first position: they are inactive and write nothing
        pos = [p + s if on else p for p, on in zip(pos0, live)]
        batch = ForwardBatch(
            input_ids=cur,
            positions=torch.tensor(pos, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(
                [slots_for(r.blocks, q, q + 1, bs)[0] for r, q in zip(reqs, pos)],
                dtype=torch.int64,
                device=dev,
            ),
            block_tables=tables,
            context_lens=torch.tensor([q + 1 for q in pos], dtype=torch.int32, device=dev),
        )
        active = torch.tensor(live, dtype=torch.bool, device=dev)
        logits, used = model.decode(batch, kv, exits, active=active)
        layers += used.long() * active
        if greedy:
            d = logits.argmax(-1)
        else:
            d, q = draft_token(logits, temperature, top_k, top_p, seeds, offsets + s)
            qs[:, s] = q
        drafts[:, s] = d
        cur = d

    # ---- verify: one backbone pass over every row's [t0, d1 .. dk], causal over its prefix
    seq = torch.cat([first.unsqueeze(1), drafts], dim=1)  # [n, kmax + 1]
    flat, positions, slots, cu = [], [], [], [0]
    for i, (r, p, k) in enumerate(zip(reqs, pos0, ks)):
        flat += [i * (kmax + 1) + j for j in range(k + 1)]
        positions += range(p, p + k + 1)
        slots += slots_for(r.blocks, p, p + k + 1, bs)
        cu.append(cu[-1] + k + 1)
    index = torch.tensor(flat, dtype=torch.int64, device=dev)
    batch = ForwardBatch(
        input_ids=seq.reshape(-1)[index],
        positions=torch.tensor(positions, dtype=torch.int64, device=dev),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
        block_tables=tables,
        context_lens=torch.tensor(
            [p + k + 1 for p, k in zip(pos0, ks)], dtype=torch.int32, device=dev
        ),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=dev),
        max_seqlen=kmax + 1,
    )
    logits = model.prefill(batch, kv, all_logits=True)  # [T, V] float32
    rows = torch.tensor([i for i, k in enumerate(ks) for _ in range(k + 1)], device=dev)
    cols = torch.tensor([j for k in ks for j in range(k + 1)], device=dev)
    lengths = torch.tensor(ks, dtype=torch.int64, device=dev)
    if greedy:
        target = torch.zeros(n, kmax + 1, dtype=torch.int64, device=dev)
        target[rows, cols] = logits.argmax(-1)
        verdict = accept_greedy(drafts, target, lengths)
    else:
        p = warped_probs(logits, temperature[rows], top_k[rows], top_p[rows])
        target = torch.zeros(n, kmax + 1, p.shape[-1], device=dev)
        target[rows, cols] = p
        verdict = accept(drafts, qs, target, lengths, seeds, offsets)

    # ---- the one read of the step
    accepted = verdict.accepted.tolist()
    tokens = verdict.tokens.tolist()
    draft_layers = layers.tolist()
    return [
        LosslessResult(tokens[i][: accepted[i] + 1], ks[i], accepted[i], draft_layers[i])
        for i in range(n)
    ]
