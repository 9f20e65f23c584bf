"""Host-side request bookkeeping: admission, KV block reservation and batch building.

A request reserves the blocks for its whole budget (prompt + max_tokens) when it is admitted,
so a running request can never run out of KV mid-generation; requests that do not fit yet wait
in the queue, and a request that could never fit is refused when it is added.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from river.errors import OutOfBlocksError
from river.kv_cache import BlockAllocator, blocks_needed, pad_block_tables, slots_for
from river.model import ForwardBatch
from river.sampling import SamplingParams

_ids = itertools.count()


@dataclass
class Request:
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens capped by the context window
    seed: int
    request_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    backbone_layers: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""
    start_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    end_time: float | None = None
    decoder: object = None  # the tokenizer's incremental decoder for this request
    # A request owned by a stream whose generator is suspended is paused: no step decodes it,
    # and a step run by anyone else preempts it (its blocks go back to the pool).
    paused: bool = False
    preempted: bool = False
    # Decode bookkeeping from counts (the runner hands tokens back one step behind):
    # scheduled = generated tokens launched so far (read back or not); the next input token is
    # on the runner's token board at `source`, or is `host_token` when source is -1;
    # source_step = the decode step whose outputs `source` points into (None: the prefill's).
    scheduled: int = 0
    source: int = -1
    host_token: int = 0
    source_step: int | None = None
    # Lossless mode (river.lossless): the draft length rule and what the verify passes kept.
    draft: object = None  # river.speculative.DraftLength
    drafted: int = 0
    accepted: int = 0
    verify_passes: int = 0
    draft_layers: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefill_ids(self) -> list[int]:
        """The tokens a prefill writes into the cache: the prompt, and for a request resumed
        after preemption every generated token but the last (which the next decode feeds)."""
        return self.prompt_ids + self.output_ids[:-1]


class Scheduler:
    def __init__(
        self, allocator: BlockAllocator, block_size: int, max_num_seqs: int, max_prefill_tokens: int
    ):
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def budget_blocks(self, req: Request) -> int:
        # The last generated token is never fed back, so the cache holds at most
        # prompt + max_tokens - 1 tokens.
        return blocks_needed(len(req.prompt_ids) + req.max_tokens - 1, self.block_size)

    def add(self, req: Request) -> None:
        need = self.budget_blocks(req)
        if need > self.allocator.num_blocks:
            raise OutOfBlocksError(
                f"request needs {need} KV blocks ({len(req.prompt_ids)} prompt + "
                f"{req.max_tokens} new tokens) but the pool has only {self.allocator.num_blocks}; "
                "lower max_tokens or give the engine a larger KV pool"
            )
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[Request]:
        """Move waiting requests (FIFO) into running while rows, blocks and prefill budget last."""
        admitted, tokens = [], 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            need = self.budget_blocks(req)
            if not self.allocator.can_allocate(need):
                break
            if admitted and tokens + len(req.prefill_ids) > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            req.blocks = self.allocator.allocate(need)
            tokens += len(req.prefill_ids)
            admitted.append(req)
            self.running.append(req)
        return admitted

    def preempt_paused(self) -> None:
        """Paused running requests give their blocks back; resume() queues them again."""
        for req in [r for r in self.running if r.paused]:
            self.running.remove(req)
            self.allocator.free(req.blocks)
            req.blocks = []
            req.preempted = True

    def resume(self, req: Request) -> None:
        """Queue a preempted request first in line; its prefill recomputes its cache."""
        if req.preempted:
            req.preempted = False
            req.source, req.source_step = -1, None
            self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Return a finished (or aborted) request's blocks to the pool."""
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        req.preempted = False
        req.source, req.source_step = -1, None
        if req.blocks:
            self.allocator.free(req.blocks)
            req.blocks = []

    # ------------------------------------------------------------------ batch building
    def prefill_batch(self, reqs: list[Request], device) -> ForwardBatch:
        return prefill_forward_batch(
            [r.prefill_ids for r in reqs], [r.blocks for r in reqs], self.block_size, device
        )

    def decode_batch(self, reqs: list[Request], device) -> ForwardBatch:
        ids, pos, slots = [], [], []
        for r in reqs:
            p = r.num_tokens - 1  # the last sampled token enters the cache now
            ids.append(r.output_ids[-1])
            pos.append(p)
            slots += slots_for(r.blocks, p, p + 1, self.block_size)
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=torch.tensor(pos, dtype=torch.long, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            block_tables=pad_block_tables([r.blocks for r in reqs]).to(device),
            context_lens=torch.tensor(
                [r.num_tokens for r in reqs], dtype=torch.int32, device=device
            ),
        )


def prefill_forward_batch(
    prompts: list[list[int]], tables: list[list[int]], block_size: int, device
) -> ForwardBatch:
    """The prefill batch of whole prompts, prompt i written into the blocks of tables[i]."""
    ids, pos, slots, cu = [], [], [], [0]
    for prompt, table in zip(prompts, tables, strict=True):
        n = len(prompt)
        ids += prompt
        pos += range(n)
        slots += slots_for(table, 0, n, block_size)
        cu.append(cu[-1] + n)
    return ForwardBatch(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.tensor(pos, dtype=torch.long, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        block_tables=pad_block_tables(tables).to(device),
        context_lens=torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=device),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
        max_seqlen=max((len(p) for p in prompts), default=0),
    )
