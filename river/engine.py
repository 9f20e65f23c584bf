# Over 400 lines, one concept: the Engine class is the public API (requests, step, generate).
"""The user-facing engine: load a model, queue requests, run prefill and decode steps."""

from __future__ import annotations

import contextlib
import json
import operator
import random
import time
from collections.abc import Iterator

import torch

from river import parallel
from river.checkpoint import load_config, load_weights, resolve_model_dir
from river.config import EngineConfig
from river.cpu import configure_threads, default_cpu_dtype
from river.errors import ConfigError, InvalidRequestError
from river.exits import FULL, ExitConfig
from river.kv_cache import BlockAllocator, KVCache
from river.lossless import lossless_step
from river.model import LlamaModel
from river.runner import ModelRunner
from river.sampling import RequestOutput, SamplingParams
from river.scheduler import Request, Scheduler
from river.speculative import DraftLength
from river.tokenizer import Tokenizer


class Engine:
    """Generate text with a Llama-family model.

    >>> engine = Engine()                       # the default model (SmolLM2-135M-Instruct)
    >>> engine.generate(["def fib(n):"], SamplingParams(max_tokens=32, temperature=0))[0].text
    """

    def __init__(self, model=None, config: EngineConfig | None = None, **overrides):
        if config is not None and overrides:
            raise ConfigError("pass either an EngineConfig or keyword overrides, not both")
        if config is None:
            unknown = sorted(set(overrides) - set(EngineConfig.__dataclass_fields__))
            if unknown:
                raise ConfigError(
                    f"unknown Engine setting(s) {unknown}; the settings are "
                    f"{sorted(EngineConfig.__dataclass_fields__)}"
                )
        cfg = config or EngineConfig(**overrides)
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {cfg.device!r}: CUDA is not available on this machine")
        if cfg.torch_compile and device.type != "cpu":
            raise ConfigError("torch_compile is for the CPU; CUDA decode steps are CUDA graphs")
        if cfg.torch_compile:
            from river.graphs import cpp_compiler

            if cpp_compiler() is None:
                raise ConfigError(
                    "torch_compile needs a C++ compiler for inductor's CPU code (g++ or "
                    "clang++ on PATH, or $CXX); none was found"
                )
        dtype = cfg.dtype or (torch.bfloat16 if device.type == "cuda" else default_cpu_dtype())
        world = cfg.tensor_parallel_size
        # Tensor parallelism (river.parallel): `group` is this process's rank when the group
        # already exists (torchrun, or a rank this engine's rank 0 spawned); rank 0 of a lone
        # process starts the other ranks below, once the model's caches are written.
        group, procs = None, []
        if world > 1:
            if device.type == "cuda" and device.index is not None:
                raise ConfigError(
                    f"device {cfg.device!r}: with tensor_parallel_size > 1 rank r runs on "
                    "cuda:r (cuda:LOCAL_RANK under torchrun); pass device='cuda'"
                )
            parallel.check_devices(world, device.type)
            group = parallel.join(world, device.type)
            if group is not None:
                device = group.device
                if group.rank != 0:
                    group.barrier()  # rank 0 resolves the model (and converts it) first
        self.config, self.device, self.dtype = cfg, device, dtype
        self.num_threads = (
            configure_threads(cfg.num_threads or parallel.threads_per_rank(world))
            if device.type == "cpu"
            else None
        )
        self.model_dir = resolve_model_dir(model)
        self.model_config, _ = load_config(self.model_dir)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        mc = self.model_config
        parallel.check_shardable(mc, world)  # (the twins' groups: at ensure_river)
        self.max_model_len = min(
            cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings
        )
        # a tensor-parallel rank reads only its shard (rank 0 before it starts the others)
        shard = parallel.shard_fn(mc, 0 if group is None else group.rank, world)
        weights = load_weights(self.model_dir, mc, dtype=dtype, shard=shard)
        if world > 1 and group is None:
            group, procs = parallel.launch(world, device.type, self.model_dir, cfg)
        try:
            self._build(weights, group, procs)
        except BaseException:
            if procs:  # rank 0 failed after starting the others: stop them, leave the group
                for p in procs:
                    p.kill()
                parallel.shutdown()
            raise

    def _build(self, weights, group, procs) -> None:
        """The model (this rank's shard under tensor parallelism), its cache, scheduler and
        runner; on ranks other than 0 this then serves rank 0 and never returns."""
        cfg, mc, device, dtype = self.config, self.model_config, self.device, self.dtype
        if group is not None and group.rank == 0:
            group.barrier()  # the other ranks may load the model now
        try:
            self.model = LlamaModel(
                mc, weights, device, dtype, self.max_model_len, ops=cfg.ops, tp=group
            )
        except ValueError as e:  # an op set the device cannot run
            raise ConfigError(str(e)) from e
        del weights
        num_blocks = cfg.num_blocks or max(1, cfg.kv_cache_tokens // cfg.block_size)
        self.kv = KVCache(
            mc.num_layers,
            num_blocks + 1,
            cfg.block_size,
            self.model.local.num_kv_heads,  # this rank's KV heads
            mc.head_dim,
            dtype,
            device,
        )
        # The cache has one block more than the pool: its last block is the decode runner's
        # padding block (padding rows of a bucket write there), never handed to a sequence.
        self.allocator = BlockAllocator(num_blocks)
        self.scheduler = Scheduler(
            self.allocator, cfg.block_size, cfg.max_num_seqs, cfg.max_prefill_tokens
        )
        self.eos_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(mc.eos_token_ids)
        self.generation_defaults = _generation_defaults(self.model_dir)
        self._rng = random.Random()
        self.runner = ModelRunner(
            self.model, self.kv, cfg.max_num_seqs, self.max_model_len, cfg.torch_compile
        )
        self._launched = []  # steps launched whose tokens the engine has not read yet
        # Tokens the last step() returned from a decode step (the rest came from a prefill);
        # with tokens read one step behind, a request can get one of each in one call.
        self.last_step_decode_rows = 0
        # {(layer, unit): 4 | 8} once the river twins are attached (river.precision)
        self.river_bits: dict | None = None
        self.river_head_bits: int | None = None  # the head exited tokens read: 16 or 8
        # rank 0 of a tensor-parallel group: the river.parallel.Leader that mirrors its model's
        # and runner's calls on the other ranks (None: one process)
        self.tp = None
        if group is not None:
            objects = {"model": self.model, "runner": self.runner, "kv": self.kv}
            if group.rank != 0:
                # This rank serves rank 0's calls until it closes, then the process ends:
                # under torchrun the script's code after Engine(...) runs on rank 0 only.
                parallel.serve(group, objects)
                parallel.shutdown()
                raise SystemExit(0)
            self.tp = parallel.Leader(group, objects, procs)
            self.model.mirror = self.runner.mirror = self.tp

    @property
    def tensor_parallel_size(self) -> int:
        return self.config.tensor_parallel_size

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (a no-op with one process). The engine cannot
        run steps after this."""
        if self.tp is not None:
            self.tp.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ river weights
    def ensure_river(self, progress: bool = True) -> None:
        """Build (or load from the cache beside the model) the river twins, at the precision
        EngineConfig.river_precision asks for (river.twins)."""
        if self.model.river is not None:
            return
        from river.twins import build_twins

        if self.tp is not None:  # before the build: a 4-bit group may not straddle two ranks
            parallel.check_shardable(self.model_config, self.tp.world, self.config.river_group_size)
        quantized, self.river_bits, head = build_twins(self, progress)
        self.river_head_bits = 16 if head is None else 8
        if self.tp is None:
            self.model.attach_river(quantized, head=head)
        else:  # every rank gets its slice of the one-rank twins

            def shard(rank):
                part, part_head = parallel.shard_twins(
                    quantized, head, self.model_config, rank, self.tp.world
                )
                return (part,), {"head": part_head}

            self.tp.call_each("model", "attach_river", shard)
        self.runner.on_river_attached()

    def set_river_precision(self, spec: str) -> None:
        """Switch the twins to another precision ("w4", "w8", "mix:B"; river.precision) between
        requests: the twins are rebuilt from the caches (quantized on first use). Refused while
        requests are in flight, since their K/V came from the old twins."""
        from dataclasses import replace

        from river.precision import TwinPrecision

        spec = TwinPrecision.parse(spec).spec
        if spec == TwinPrecision.parse(self.config.river_precision).spec:
            return
        if self.has_unfinished():
            raise InvalidRequestError("set_river_precision: requests are still in flight")
        self.config = replace(self.config, river_precision=spec)
        if self.model.river is not None:
            self.model.detach_river()
            self.river_bits = None
            self.ensure_river()

    def ensure_draft_head(self) -> None:
        """The 4-bit twin of the LM head that lossless drafts use (quantized here, plain weight
        error: a few seconds for the default model; not cached on disk)."""
        if self.model.draft_head is not None:
            return
        self.model.build_draft_head(self.config.river_group_size, self.config.river_method)

    def warmup(
        self, exit: ExitConfig | None = None, max_batch: int = 8, progress: bool = True
    ) -> int:
        """Compile the decode steps that requests of `exit` (default: full) will run, before
        the first request needs them: with torch_compile, every batch bucket up to
        `max_batch`, greedy and sampled (a server does this at start, as CUDA graphs are
        captured at construction). Each new variant compiles once: tens of seconds with a cold
        inductor cache, a few with a warm one. Returns how many variants it compiled: 0 without
        torch_compile, for exit rules that stay eager (river.graphs.compilable) and for
        lossless. The warm-up steps are taken back out of exit_histogram()."""
        from river.exits import ExitParams
        from river.graphs import compilable, step_flags
        from river.progress import progress_bar

        step = self.runner.decode.compiled
        exit = exit or FULL
        if step is None or max_batch <= 0 or exit.mode == "lossless":
            return 0  # (lossless rows run their own draft/verify step, not the decode step)
        if exit.mode in ("w4", "river"):
            self.ensure_river(progress=progress)
        flags = step_flags(ExitParams.build([exit], "cpu"), self.runner.decode.include_river)
        if not compilable(flags):
            return 0
        todo = [
            (b, greedy)
            for b in self.runner.decode.buckets
            if b <= max_batch
            for greedy in (True, False)
            if step.key(b, flags, greedy) not in step.variants
        ]
        hist = self.runner.hist.clone()
        prompt = self._ids("warm-up", True)
        # Ascending: had a larger bucket compiled first, a smaller batch would run padded in
        # it (CompiledStep.reuse) instead of compiling its own.
        with progress_bar(
            total=len(todo), desc="compiling decode steps", unit="step", enabled=progress
        ) as bar:
            for b, greedy in todo:
                # two tokens: the first comes from the prefill, the second from one decode step
                params = SamplingParams(
                    max_tokens=2, temperature=0.0 if greedy else 1.0, ignore_eos=True, exit=exit
                )
                self.generate([prompt] * b, params)
                bar.update()
        self.runner.hist.copy_(hist)
        return len(todo)

    # ------------------------------------------------------------------ requests
    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with this model's defaults filled in (its generation_config.json's
        temperature/top_k/top_p where present, else temperature 1.0, top_k 0, top_p 1.0)."""
        return SamplingParams().with_defaults(self.generation_defaults)

    def _make_request(self, prompt, params: SamplingParams, add_special_tokens=True) -> Request:
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(
                f"params must be a SamplingParams, got {type(params).__name__}"
            )
        params.exit.check_depth(self.model_config.num_layers)
        params = params.with_defaults(self.generation_defaults)
        ids = self._ids(prompt, add_special_tokens)
        text = prompt if isinstance(prompt, str) else None
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            bad = next(t for t in ids if t < 0 or t >= vocab)
            raise InvalidRequestError(f"prompt: token ids must be in [0, {vocab}), got {bad}")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; the context window is {self.max_model_len} "
                "and at least one token must be generated"
            )
        max_tokens = min(params.max_tokens, self.max_model_len - len(ids))
        seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        return Request(prompt=text, prompt_ids=ids, params=params, max_tokens=max_tokens, seed=seed)

    def add_request(
        self, prompt, params: SamplingParams | None = None, add_special_tokens: bool = True
    ) -> Request:
        """Queue one prompt; it joins the running batch at a later step()."""
        return self._queue(
            self._make_request(prompt, params or SamplingParams(), add_special_tokens)
        )

    def _queue(self, req: Request) -> Request:
        if req.params.exit.mode in ("w4", "river", "lossless"):
            self.ensure_river()
        if req.params.exit.mode == "lossless":
            e = req.params.exit
            req.draft = DraftLength.start(e.draft_len, e.max_draft_len)
            if e.draft_head == "w4":
                self.ensure_draft_head()
        req.decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        self.scheduler.add(req)
        req.start_time = time.perf_counter()  # after the twin build: it is not request time
        return req

    def abort(self, req: Request) -> None:
        if req.finish_reason is None:
            req.finish_reason = "abort"
        self.scheduler.finish(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ one step
    def step(self) -> list[Request]:
        """One engine step: the scheduler admits and the runner prefills waiting requests, the
        runner launches one decode step for every running row, and only then the engine reads
        back the previous step's tokens (one step behind: on a GPU the host's stop checks and
        detokenizing overlap the next step). Returns the requests that got tokens."""
        sched = self.scheduler
        sched.preempt_paused()
        earlier, self._launched = self._launched, []
        admitted, rows = sched.admit(), []
        try:
            if admitted:
                self._prefill(admitted)
            live = [
                r
                for r in sched.running
                if not r.paused and r.finish_reason is None and r.scheduled < r.max_tokens
            ]
            rows = [r for r in live if r.draft is None]
            if rows:
                self._decode(rows)
        except Exception:
            # The step's launches failed: end the requests they carried (a request left queued
            # would fail every later step too), keep the earlier steps' tokens for the next
            # step to read, and let the caller see the error.
            self._launched = earlier + self._launched
            self._fail(admitted + rows)
            raise
        progressed = []
        self.last_step_decode_rows = 0
        for launched in earlier:
            got = self._postprocess(launched)
            if launched.layers is None:  # a decode step (a prefill's rows all ran the backbone)
                self.last_step_decode_rows += len(got)
            progressed += got
        # Lossless rows whose last token is known on the host (the prefill's first token is
        # read back one step later) run their draft/verify step now, synchronously.
        lossless = [
            r
            for r in live
            if r.draft is not None
            and r.finish_reason is None
            and r.output_ids
            and r.scheduled == len(r.output_ids)
        ]
        if lossless:
            try:
                done = self._lossless(lossless)
            except Exception:
                self._fail(lossless)
                raise
            progressed += [r for r in done if r not in progressed]
        return progressed

    def _fail(self, reqs: list[Request]) -> None:
        """End `reqs` with finish_reason "error" and give their KV blocks back."""
        for r in reqs:
            if r.finish_reason is None:
                r.finish_reason = "error"
            self.abort(r)

    def _prefill(self, admitted: list[Request]) -> None:
        batch = self.scheduler.prefill_batch(admitted, self.device)
        fresh = [i for i, r in enumerate(admitted) if not r.output_ids]
        launched = self.runner.prefill(admitted, batch, fresh)
        for r in admitted:
            if r.output_ids:  # recomputed after preemption: its next input is known
                r.source, r.host_token = -1, r.output_ids[-1]
        if launched is not None:
            for j, r in enumerate(launched.reqs):
                r.source, r.host_token, r.source_step = self.runner.rows + j, 0, None
                r.scheduled = 1
            self._launched.append(launched)

    def _decode(self, rows: list[Request]) -> None:
        last = self.runner.num_decode_steps
        for r in rows:
            if r.source_step is not None and r.source_step != last:
                raise RuntimeError(  # a bookkeeping bug, never a user error
                    f"request {r.request_id}: its token is on the board of decode step "
                    f"{r.source_step}, but the board holds step {last}"
                )
        launched = self.runner.decode_step(
            rows, [r.source for r in rows], [r.host_token for r in rows]
        )
        for i, r in enumerate(rows):
            r.source, r.host_token, r.source_step = i, 0, last + 1
            r.scheduled += 1
        self._launched.append(launched)

    def _lossless(self, rows: list[Request]) -> list[Request]:
        """One lossless step (river.lossless) of `rows`; their tokens are appended at once."""
        # k never reaches past the request's reserved blocks: the verify pass writes k + 1
        # positions from the last token's, and at most max_tokens - 1 generated ones are cached
        ks = [max(0, min(r.draft.current, r.max_tokens - len(r.output_ids) - 1)) for r in rows]
        results = lossless_step(self.model, self.kv, rows, ks)
        layers = self.model_config.num_layers
        now = time.perf_counter()
        emitted = 0
        for r, res in zip(rows, results):
            r.verify_passes += 1
            r.drafted += res.drafted
            r.accepted += res.accepted
            r.draft_layers += res.draft_layers
            r.draft.update(res.drafted, res.accepted)
            for tok in res.tokens:
                r.output_ids.append(tok)
                r.backbone_layers.append(layers)  # every kept token is the backbone's
                emitted += 1
                self._check_stop(r, tok)
                if r.finish_reason is not None:
                    r.end_time = now
                    self.scheduler.finish(r)
                    break
            r.scheduled = len(r.output_ids)
        self.runner.hist[layers] += emitted
        return rows

    def _postprocess(self, launched) -> list[Request]:
        tokens, layers = self.runner.collect(launched)
        now = launched.done_time or time.perf_counter()
        got = []
        for r, tok, used in zip(launched.reqs, tokens, layers):
            if r.finish_reason is not None:
                continue  # finished (or aborted) while this step ran: a wasted row-step
            if r.first_token_time is None:
                r.first_token_time = now
            r.output_ids.append(tok)
            r.backbone_layers.append(used)
            got.append(r)
            self._check_stop(r, tok)
            if r.finish_reason is not None:
                r.end_time = now
                self.scheduler.finish(r)
        return got

    def _check_stop(self, r: Request, tok: int) -> None:
        is_eos = tok in self.eos_ids and not r.params.ignore_eos
        if not is_eos:
            piece = r.decoder.feed(tok)
            if piece:
                r.text += piece
                for s in r.params.stop:
                    # A stop string can straddle the previous text and the new piece.
                    at = r.text.find(s, max(0, len(r.text) - len(piece) - len(s)))
                    if at >= 0:
                        r.text = r.text[:at]
                        r.finish_reason = "stop"
                        return
        if is_eos:
            r.finish_reason = "stop"
        elif len(r.output_ids) >= r.max_tokens:
            r.finish_reason = "length"
        if r.finish_reason is not None:
            r.text += r.decoder.flush()  # text held back waiting for more bytes of a character

    # ------------------------------------------------------------------ high level
    def _output(self, r: Request) -> RequestOutput:
        end = r.end_time or time.perf_counter()
        return RequestOutput(
            request_id=r.request_id,
            prompt=r.prompt,
            prompt_token_ids=r.prompt_ids,
            text=r.text,
            token_ids=list(r.output_ids),
            finish_reason=r.finish_reason,
            backbone_layers=list(r.backbone_layers),
            num_layers=self.model_config.num_layers,
            elapsed_s=end - r.start_time,
            first_token_s=(r.first_token_time or end) - r.start_time,
            draft_tokens=r.drafted,
            accepted_tokens=r.accepted,
            verify_passes=r.verify_passes,
            draft_backbone_layers=r.draft_layers,
        )

    def generate(
        self,
        prompts,
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list; one RequestOutput per prompt, in order."""
        if _one_prompt(prompts):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InvalidRequestError(
                "prompts: expected a string, a list of token ids, or a non-empty list of those, "
                f"got {prompts!r:.80}"
            )
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        # Validate everything before queueing anything, so a bad prompt leaves no half batch.
        checked = [self._make_request(p, sp) for p, sp in zip(prompts, plist)]
        reqs = []
        try:
            for c in checked:
                reqs.append(self._queue(c))
            bar = None
            if use_tqdm:
                from tqdm import tqdm

                bar = tqdm(total=len(reqs), desc="generate", unit="req")
            while any(r.finish_reason is None for r in reqs):
                self.step()
                if bar is not None:
                    done = sum(r.finish_reason is not None for r in reqs)
                    if done != bar.n:
                        bar.update(done - bar.n)
            if bar is not None:
                bar.close()
        finally:
            for r in reqs:  # on error (or KeyboardInterrupt) free everything this call holds
                if r.finish_reason is None:
                    self.abort(r)
        return [self._output(r) for r in reqs]

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one prompt piece by piece as it is generated."""
        with contextlib.closing(self.stream_outputs(prompt, params)) as pieces:
            for piece, _ in pieces:
                if piece:
                    yield piece

    def stream_outputs(
        self, prompt, params: SamplingParams | None = None
    ) -> Iterator[tuple[str, RequestOutput]]:
        """Like stream(), but each new piece of text comes with the RequestOutput so far (the
        last one is the finished result: finish reason, timings, backbone layers).

        While the generator is suspended (its caller stopped reading) the request is paused:
        steps run by other calls never decode it, and the first of them gives its KV blocks
        back; reading again recomputes its cache (one prefill) and goes on. Closing or dropping
        the generator aborts the request."""
        req = self.add_request(prompt, params)
        hold = max((len(s) for s in req.params.stop), default=1) - 1
        sent = 0
        try:
            while req.finish_reason is None:
                self.scheduler.resume(req)
                req.paused = False
                try:
                    self.step()
                finally:
                    req.paused = True
                # Keep back a tail that could still become a stop string.
                end = len(req.text) if req.finish_reason is not None else len(req.text) - hold
                if end > sent and req.finish_reason is None:
                    piece, sent = req.text[sent:end], end
                    yield piece, self._output(req)
            yield req.text[sent:], self._output(req)  # the finished result, always last
        finally:
            if req.finish_reason is None:
                self.abort(req)

    def score(self, prompt, continuation, exit: ExitConfig | None = None, use_tqdm=False):
        """Teacher-forced log-probabilities of `continuation` after `prompt`, token by token
        through the decode path under `exit` (default: full backbone). Strings or token-id lists;
        pass lists of them to score many pairs in one batch (returns a list then). `lossless`
        scores as `full`: its tokens are the backbone's (its draft statistics come from
        generate)."""
        from river.scoring import score_batch

        if exit is not None and not isinstance(exit, ExitConfig):
            raise InvalidRequestError(f"exit must be an ExitConfig, got {type(exit).__name__}")
        if exit is not None and exit.mode == "lossless":
            exit = FULL
        single = _one_prompt(prompt)
        prompts, conts = ([prompt], [continuation]) if single else (prompt, continuation)
        if not isinstance(prompts, (list, tuple)) or not isinstance(conts, (list, tuple)):
            raise InvalidRequestError(
                "score: prompt and continuation are strings or token-id lists, or lists of "
                f"them, got {type(prompt).__name__} and {type(continuation).__name__}"
            )
        if len(prompts) != len(conts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(conts)} continuations")
        p_ids = [self._ids(p, True) for p in prompts]
        c_ids = [self._ids(c, False, "continuation") for c in conts]
        for p, c in zip(p_ids, c_ids):
            if not p or not c:
                raise InvalidRequestError("prompt and continuation must both be non-empty")
            if len(p) + len(c) > self.max_model_len:
                raise InvalidRequestError(
                    f"prompt + continuation is {len(p) + len(c)} tokens; the context window is "
                    f"{self.max_model_len}"
                )
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(p_ids), desc=f"score[{(exit or FULL).mode}]", unit="seq")
        try:
            outs = score_batch(
                self,
                p_ids,
                c_ids,
                exit or FULL,
                progress=(lambda n: bar.update(n - bar.n)) if bar else None,
            )
        finally:
            if bar is not None:
                bar.close()
        return outs[0] if single else outs

    def _ids(self, prompt, add_special_tokens, what="prompt") -> list[int]:
        """A prompt's token ids: a string is encoded; a list or tuple of integers (Python,
        numpy or 0-d torch integers) is taken as ids."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        if isinstance(prompt, (list, tuple)):
            try:
                return [_token_id(t) for t in prompt]
            except TypeError as e:
                raise InvalidRequestError(
                    f"{what}: a list of token ids must hold integers only ({e})"
                ) from None
        raise InvalidRequestError(
            f"{what}: expected a string or a list of token ids, got {type(prompt).__name__}"
        )

    def exit_histogram(self, reset: bool = False) -> list[int]:
        """counts[k] = decode row-steps (of generate/stream/serve) that ran k backbone layers
        (a row that hit a stop string may run one step more than it returns)."""
        counts = self.runner.hist.tolist()
        if reset:
            self.runner.hist.zero_()
        return counts

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        """One assistant reply to a conversation, formatted by the model's chat template."""
        prompt = self.chat_prompt(messages)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        out = self.generate([ids], params)[0]
        out.prompt = prompt
        return out

    def chat_prompt(self, messages: list[dict]) -> str:
        """The conversation rendered by the chat template, ending with the assistant's turn."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InvalidRequestError(
                "messages: a conversation is a non-empty list of {'role', 'content'} dicts, "
                f"got {messages!r:.80}"
            )
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise InvalidRequestError(
                    f"messages[{i}]: expected a dict with string 'role' and 'content', "
                    f"got {m!r:.80}"
                )
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)


def _one_prompt(x) -> bool:
    """Whether `x` is one prompt (a string, or token ids: a list whose items are not
    themselves prompts) rather than a list of prompts."""
    return isinstance(x, str) or (
        isinstance(x, (list, tuple)) and bool(x) and not isinstance(x[0], (str, list, tuple))
    )


def _token_id(t) -> int:
    """One token id as a Python int: ints, numpy and 0-d torch integers (operator.index), not
    bools or floats."""
    if isinstance(t, bool):
        raise TypeError("got a bool")
    try:
        return operator.index(t)
    except TypeError:
        raise TypeError(f"got {type(t).__name__}") from None


def _generation_defaults(model_dir) -> dict:
    """temperature / top_k / top_p from the model's generation_config.json, where present and
    valid (others are ignored: the file is advice, not a request)."""
    try:
        cfg = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    t, k, p = cfg.get("temperature"), cfg.get("top_k"), cfg.get("top_p")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < float("inf"):
        out["temperature"] = float(t)
    if isinstance(k, int) and not isinstance(k, bool) and k >= 0:
        out["top_k"] = k
    if isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= 1:
        out["top_p"] = float(p)
    if cfg.get("do_sample") is False:
        out["temperature"] = 0.0  # transformers: do_sample=False is greedy
    return out
