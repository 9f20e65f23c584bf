"""bench_decode's tensor-parallel rows: the engine's decode throughput on one rank and on N.

Unlike bench_decode's model-level timing (one process, random weights at any shape), a sharded
model needs its ranks, so this times the Engine itself: `generate` over a batch of prompts,
greedy, a fixed number of new tokens (ignore_eos), after one warm-up call. Decode time per
request = elapsed - time to first token; tok/s = decode tokens of the batch / the longest decode
time. On a GPU machine with N devices this is the TP row the issue owes; on the CPU (gloo,
ranks sharing the cores) it only shows the path runs.
"""

from __future__ import annotations

TP_MODES = ("full", "w4", "river")


def time_engine(engine, prompts, steps: int, mode: str) -> tuple[float, float]:
    """(decode tok/s, mean backbone layers per decode token) of one generate call."""
    from river import ExitConfig, SamplingParams

    params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True,
                            exit=ExitConfig(mode))  # fmt: skip
    engine.generate(prompts, params)  # warm-up: caches, twins, graphs
    outs = engine.generate(prompts, params)
    tokens = sum(len(o.token_ids) - 1 for o in outs)
    secs = max(o.elapsed_s - o.first_token_s for o in outs)
    layers = [d for o in outs for d in o.backbone_layers[1:]]
    return tokens / secs, sum(layers) / max(1, len(layers))


def bench_tp(model, device: str, tp: int, batches, steps: int, prompt_pool, modes=TP_MODES):
    """Rows for TP 1 and TP `tp` (one engine at a time: a process holds one sharded engine)."""
    from river import Engine

    rows = []
    full = {}
    for size in (1, tp):
        engine = Engine(model, device=device, tensor_parallel_size=size)
        try:
            name = engine.model_dir.name
            for batch in batches:
                prompts = [prompt_pool[i % len(prompt_pool)] for i in range(batch)]
                for mode in modes:
                    tok_s, layers = time_engine(engine, prompts, steps, mode)
                    if mode == "full":
                        full[(size, batch)] = tok_s
                    base = full.get((1, batch))
                    rows.append(
                        {
                            "model": name,
                            "mode": mode,
                            "tp": size,
                            "batch": batch,
                            "backbone_layers": round(layers, 3),
                            "tok_s": round(tok_s, 2),
                            "speedup_vs_full_tp1": round(tok_s / base, 3) if base else None,
                        }
                    )
                    print(
                        f"  tp {size} batch {batch:3d} {mode:6s} {tok_s:10.1f} tok/s "
                        f"layers {layers:5.2f}",
                        flush=True,
                    )
        finally:
            engine.close()
    return rows
