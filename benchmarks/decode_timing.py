"""The decode-step timing of bench_decode.py: river's decode steps (CUDA-graph replays, eager on
a CPU) over a KV cache prefilled with random tokens, under forced exits; and the per-step time
of HF transformers' generate, the baseline."""

from __future__ import annotations

import time

from timing import Timer, sync


class DecodeBench:
    """One model: a KV cache prefilled with `context` random tokens for max(batches) rows, each
    row owning a contiguous run of blocks (so a slot advances by +1 per token)."""

    def __init__(self, model, args, device):
        import torch

        from river.graphs import DecodeGraphRunner
        from river.kv_cache import KVCache

        self.model, self.args, self.device = model, args, device
        cfg = model.cfg
        self.rows = max(args.batches)
        bs = args.block_size
        tokens = args.context + args.warmup + args.steps + 1
        self.bps = -(-tokens // bs)  # blocks per row
        # + 1: the last block is the graph runner's padding block (never given to a row)
        self.kv = KVCache(
            cfg.num_layers,
            self.rows * self.bps + 1,
            bs,
            cfg.num_kv_heads,
            cfg.head_dim,
            model.dtype,
            device,
        )
        self.tables = torch.arange(self.rows * self.bps, dtype=torch.int32, device=device).view(
            self.rows, self.bps
        )
        self._prefill()
        graphs = False if args.no_graphs else None
        t = time.perf_counter()
        opts = dict(enabled=graphs, pad_eager=args.pad_eager)
        self.shared = DecodeGraphRunner(model, self.kv, self.rows, self.bps, **opts)
        self.backbone = DecodeGraphRunner(
            model, self.kv, self.rows, self.bps, include_river=False, **opts
        )
        if self.shared.use_graphs:
            print(
                f"  captured {2 * len(self.shared.buckets)} graphs in "
                f"{time.perf_counter() - t:.1f}s",
                flush=True,
            )

    def _prefill(self):
        import torch

        from river.model import ForwardBatch

        ctx, bs, dev = self.args.context, self.args.block_size, self.device
        g = torch.Generator(device=dev).manual_seed(self.args.seed + 1)
        per_call = max(1, 4096 // ctx)  # rows per prefill call: bounded activations
        for r0 in range(0, self.rows, per_call):
            rows = range(r0, min(self.rows, r0 + per_call))
            n = len(rows)
            pos = torch.arange(ctx, device=dev)
            self.model.prefill(
                ForwardBatch(
                    input_ids=torch.randint(
                        0, self.model.cfg.vocab_size, (n * ctx,), generator=g, device=dev
                    ),
                    positions=pos.repeat(n),
                    slot_mapping=torch.cat([r * self.bps * bs + pos for r in rows]),
                    block_tables=self.tables[r0 : r0 + n],
                    context_lens=torch.full((n,), ctx, dtype=torch.int32, device=dev),
                    cu_seqlens=torch.arange(0, n * ctx + 1, ctx, dtype=torch.int32, device=dev),
                ),
                self.kv,
            )
        sync(dev)

    def time_mode(self, mode, batch, hist):
        """(seconds for args.steps steps, mean backbone layers per token)."""
        import torch
        from forced_exits import ForcedExitSampler, forced_exit_configs

        from river.exits import ExitParams
        from river.model import ForwardBatch

        args, dev, cfg = self.args, self.device, self.model.cfg
        runner = self.backbone if mode == "full" else self.shared
        base = "full" if mode == "full-shared" else mode
        sampler = None
        if hist is not None and base in ("river", "propagate", "mask"):
            exits = ForcedExitSampler.exit_params(forced_exit_configs(base, batch, 1), dev)
            sampler = ForcedExitSampler(hist, cfg.num_layers, batch, dev, seed=args.seed)
        else:
            exits = ExitParams.build(forced_exit_configs(base, batch, args.exit_layers), dev)
        ctx, bs = args.context, args.block_size
        g = torch.Generator(device=dev).manual_seed(args.seed + 2)
        cur = ForwardBatch(
            input_ids=torch.randint(0, cfg.vocab_size, (batch,), generator=g, device=dev),
            positions=torch.full((batch,), ctx, dtype=torch.int64, device=dev),
            slot_mapping=torch.arange(batch, device=dev) * self.bps * bs + ctx,
            block_tables=self.tables[:batch],
            context_lens=torch.full((batch,), ctx + 1, dtype=torch.int32, device=dev),
        )
        used_sum = torch.zeros(batch, dtype=torch.int64, device=dev)

        def advance(b, logits):
            b.input_ids.copy_(logits.argmax(-1))  # the token goes back on the device
            b.positions.add_(1)
            b.slot_mapping.add_(1)  # contiguous blocks per row
            b.context_lens.add_(1)

        with torch.inference_mode():
            state = None
            if runner.padded:
                # Load the static inputs once (one step, at position ctx), then advance them in
                # place: the per-step device work is the replay, the argmax fed back and three
                # increments, as for an engine that keeps its decode state on the device.
                logits, _ = runner.run(cur, exits)
                state = runner.inputs.head(batch)
                advance(state, logits)

            def step():
                if state is None:
                    if sampler is not None:
                        sampler.fill(exits.min_layer, exits.start_exited)
                    logits, used = runner.run(cur, exits)
                    advance(cur, logits)
                else:
                    if sampler is not None:
                        sampler.fill(state.min_layer, state.start_exited)
                    logits, used = runner.replay(batch)
                    advance(state, logits)
                used_sum.add_(used)

            for _ in range(args.warmup):
                step()
            used_sum.zero_()
            with Timer(dev) as t:
                for _ in range(args.steps):
                    step()
        return t.seconds, used_sum.sum().item() / (batch * args.steps)


def time_hf(hf, batch, args, device, vocab):
    """Seconds per decode step of HF generate (greedy), prefill cancelled out."""
    import torch

    g = torch.Generator(device=device).manual_seed(args.seed + 3)
    ids = torch.randint(0, vocab, (batch, args.context), generator=g, device=device)
    mask = torch.ones_like(ids)

    def gen(n):
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
            )
        sync(device)
        assert out.shape[1] == args.context + n
        return time.perf_counter() - t

    gen(2)  # warm-up (kernels, allocator)
    short = min(gen(2) for _ in range(2))
    long = gen(2 + args.hf_steps)
    return max(long - short, 1e-9) / args.hf_steps
