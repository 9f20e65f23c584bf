"""Teacher-forced scoring through the decode path (like vLLM's prompt logprobs, but with exits).

The continuation is fed token by token through `LlamaModel.decode`, so a token's exit decides
which weights wrote its K/V and every later token attends to that cache, exactly as in free
generation. The first continuation token is predicted by the full-backbone prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from river.exits import ExitConfig, ExitParams
from river.sampling import SamplingParams
from river.scheduler import Request


@dataclass
class ScoreOutput:
    token_ids: list[int]  # the continuation
    logprobs: list[float]  # log p(token | prefix) per continuation token
    top1_ids: list[int]  # the model's argmax at each position
    backbone_layers: list[int]  # backbone layers that produced each position's logits

    @property
    def is_top1(self) -> list[bool]:
        return [a == b for a, b in zip(self.token_ids, self.top1_ids)]


def score_batch(
    engine, prompts: list[list[int]], conts: list[list[int]], exit: ExitConfig, progress=None
) -> list[ScoreOutput]:
    """Score every (prompt, continuation) pair; runs as many pairs at once as rows and KV blocks
    allow. `progress` is an optional callable(num_done) for a progress bar."""
    sched, model = engine.scheduler, engine.model
    if exit.mode in ("w4", "river"):
        engine.ensure_river()
    num_layers = engine.model_config.num_layers
    reqs = [
        Request(
            prompt=None,
            prompt_ids=list(p),
            params=SamplingParams(max_tokens=len(c), exit=exit),
            max_tokens=len(c),
            seed=0,
        )
        for p, c in zip(prompts, conts)
    ]
    for r, c in zip(reqs, conts):
        if not c:
            raise ValueError("an empty continuation has nothing to score")
        r.cont = list(c)
        r.rec = ([], [], [])  # logprob tensors, argmax tensors, layers tensors (on device)
    pending = list(reqs)
    done = 0
    while pending:
        group = []
        while pending and len(group) < sched.max_num_seqs:
            need = sched.budget_blocks(pending[0])
            if not engine.allocator.can_allocate(need):
                break
            r = pending.pop(0)
            r.blocks = engine.allocator.allocate(need)
            group.append(r)
        if not group:
            raise RuntimeError("the KV pool cannot hold one scoring request; enlarge it")
        try:
            _run_group(engine, model, sched, group, exit, num_layers)
        finally:
            for r in group:
                engine.allocator.free(r.blocks)
                r.blocks = []
        done += len(group)
        if progress is not None:
            progress(done)
    outs = []
    for r in reqs:
        lp, top, used = (torch.stack(x).tolist() for x in r.rec)
        outs.append(ScoreOutput(r.cont, lp, top, used))
    return outs


def _record(rows, logits, used):
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor([r.cont[len(r.output_ids)] for r in rows], device=logits.device)
    lp = logp.gather(1, target.unsqueeze(1)).squeeze(1)
    top = logits.argmax(-1)
    for i, r in enumerate(rows):
        r.rec[0].append(lp[i])
        r.rec[1].append(top[i])
        r.rec[2].append(used[i])
        r.output_ids.append(r.cont[len(r.output_ids)])


def _run_group(engine, model, sched, group, exit, num_layers):
    dev = engine.device
    logits = model.prefill(sched.prefill_batch(group, dev), engine.kv)
    _record(group, logits, torch.full((len(group),), num_layers, device=dev))
    while True:
        rows = [r for r in group if len(r.output_ids) < len(r.cont)]
        if not rows:
            return
        exits = ExitParams.build([exit] * len(rows), dev)
        logits, used = model.decode(sched.decode_batch(rows, dev), engine.kv, exits)
        _record(rows, logits, used)
