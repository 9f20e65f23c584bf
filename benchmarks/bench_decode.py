"""Decode throughput per exit mode: river's CUDA-graph decode step against HF transformers.

On a GPU (H100 is the target):
    python benchmarks/bench_decode.py                         # default model, 1B and 8B shapes
    python benchmarks/bench_decode.py --models 1b,8b --rtn    # random weights only, RTN twins
    python benchmarks/bench_decode.py --exit-histogram hist.json
    python benchmarks/bench_decode.py --record-histogram hist.json   # record on the real model
    python benchmarks/bench_decode.py --hf-skip 8b:32                # HF too slow there
    python benchmarks/bench_decode.py --tp 2 --model DIR   # engine decode, TP 1 vs 2 (tp_timing)
On a CPU-only machine (a smoke test, times mean nothing):
    python benchmarks/bench_decode.py --tiny               # eager decode
    python benchmarks/bench_decode.py --tiny --pad-eager   # the padded step the graphs capture

What is timed: N decode steps of DecodeGraphRunner (CUDA-graph replays; eager on CPU) over a
KV cache prefilled with `--context` random tokens per row, between CUDA events, after warm-up.
The batch is loaded into the graph's static inputs once (run()); each step then replays
(replay()), feeds the argmax token back and advances positions, slots and lengths in place, all
on the device: the device work of an engine that keeps its decode state on the GPU, not its
Python loop. Modes: full (backbone-only graph: the no-early-exit baseline), full-shared
(full requests in the graph that also holds the river, as the engine runs them), w4, river,
propagate, mask. Random weights make cosine similarities meaningless, so every exit is forced:
`--exit-layers K` (each token runs K backbone layers) or `--exit-histogram FILE` (per-row depths
drawn each step from a histogram recorded on the real model, rescaled to each model's depth).
HF baseline: transformers `generate` (eager PyTorch, SDPA attention, same bf16 weights as
views of river's tensors), decode-only time per step = (t(2 + N new tokens) - t(2)) / N.

tok_s = batch * steps / time; ms_per_token = time per decode step (each row gets one token).
ideal_speedup = weight bytes read per step in `full` / in the mode, counting a layer's bf16
weights when any row of the batch is in the backbone there and its twins when any row is in
the river (the default model's at the engine's precision plan, e.g. 6- and 8-bit for the
default `mix6:0.43`; the random models' all 4-bit: 0.5 byte per weight + bf16 scale and zero
per group), plus the LM head (the river head's bytes for rows that left on the river path);
ideal_speedup_kv also counts the K/V reads of attention. Results go to
benchmarks/results/decode-<device>.json and a PNG beside it; a markdown table is printed.
"""

from __future__ import annotations

import gc
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import arguments  # noqa: E402
from common import (  # noqa: E402
    device_slug,
    pick_device,
    plot_path,
    result_path,
    run_metadata,
    write_json,
)
from decode_cost import bytes_per_step, exit_distribution  # noqa: E402
from prompts import prompts  # noqa: E402
from shapes import LLAMA_3_1_8B, LLAMA_3_2_1B, TINY  # noqa: E402

MODES = ("full", "full-shared", "w4", "river", "propagate", "mask")
# --models key -> (the name results carry, the shape of its random weights)
RANDOM = {
    "1b": ("llama-3.2-1b-shape", LLAMA_3_2_1B),
    "8b": ("llama-3.1-8b-shape", LLAMA_3_1_8B),
    "tiny": ("tiny-random", TINY),
}
RECORD_PROMPTS = prompts(
    "quicksort", "lighthouse", "thermodynamics", "numpy-moving-average", "hash-map",
    "linked-list", "france", "arithmetic",
)  # fmt: skip


def parse_args(argv=None):
    p = arguments.parser(__doc__)
    models = ("default", *RANDOM)
    arguments.add_list(p, "--models", "models", choices=models, note="default,1b,8b; --tiny: tiny")
    arguments.add_model(p, default="Engine() default", what="HF Llama dir for 'default'")
    arguments.add_switches(p, {"--tiny": "CPU smoke test: tiny random model, eager"})
    arguments.add_device(p)
    arguments.add_list(
        p, "--batches", "batch sizes", of=arguments.positive_int, note="1,8,32; --tiny: 1,4"
    )
    arguments.add_list(p, "--modes", "modes", ",".join(MODES), choices=MODES, note="all")
    ex = p.add_mutually_exclusive_group()
    ex.add_argument(
        "--exit-layers",
        type=int,
        default=None,
        help="forced exit after K backbone layers (default 4; tiny: 2)",
    )
    ex.add_argument(
        "--exit-histogram",
        default=None,
        help="JSON of Engine.exit_histogram() counts: per-row depths drawn per step",
    )
    p.add_argument("--context", type=int, default=None, help="prefilled tokens per row (512)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (128; tiny: 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed decode steps (16; tiny: 1)")
    p.add_argument("--block-size", type=int, default=16)
    arguments.add_group_size(p, "random twins")
    arguments.add_switches(
        p,
        {
            "--rtn": "RTN twins for random models (fast)",
            "--no-graphs": "eager decode steps on the GPU too",
            "--pad-eager": "without graphs, run the padded static step the graphs capture "
            "(CPU smoke test)",
            "--skip-hf": "no HF transformers baseline",
        },
    )
    p.add_argument("--hf-skip", default="", help="model:batch pairs to skip HF for, e.g. 8b:32")
    p.add_argument("--hf-steps", type=int, default=None, help="HF timed new tokens (32)")
    p.add_argument("--seed", type=int, default=0)
    arguments.add_outputs(p, "decode-<dev>.json")
    p.add_argument(
        "--record-histogram",
        default=None,
        metavar="FILE",
        help="record an exit histogram on the real model with river exits at "
        "--threshold/--min-layer, write it to FILE, and exit",
    )
    arguments.add_exit(p, threshold=0.9, min_layer=8, note=" (recording)")
    p.add_argument("--record-tokens", type=int, default=256, help="tokens per prompt (recording)")
    p.add_argument(
        "--tp",
        type=arguments.positive_int,
        default=1,
        help="time only the engine's decode at tensor_parallel_size 1 and TP (one rank per GPU; "
        "benchmarks/tp_timing.py) on --model, and exit",
    )
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = dict(
        models=["tiny"] if tiny else ["default", "1b", "8b"],
        batches=[1, 4] if tiny else [1, 8, 32],
        context=24 if tiny else 512,
        steps=4 if tiny else 128,
        warmup=1 if tiny else 16,
        hf_steps=4 if tiny else 32,
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.exit_layers is None and args.exit_histogram is None:
        args.exit_layers = 2 if tiny else 4
    return args


def print_table(rows):
    print(
        "| model | mode | batch | backbone layers | tok/s | ms/token | speedup vs full "
        "| ideal (weights) | ideal (+KV) | efficiency |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def f(x, spec):
        return "" if x is None else format(x, spec)

    for r in rows:
        eff = None
        if r.get("ideal_speedup") and r.get("speedup_vs_full"):
            eff = r["speedup_vs_full"] / r["ideal_speedup"]
        print(
            f"| {r['model']} | {r['mode']} | {r['batch']} | {f(r['backbone_layers'], '.2f')} "
            f"| {f(r['tok_s'], '.1f')} | {f(r['ms_per_token'], '.3f')} "
            f"| {f(r['speedup_vs_full'], '.2f')} | {f(r['ideal_speedup'], '.2f')} "
            f"| {f(r.get('ideal_speedup_kv'), '.2f')} | {f(eff, '.0%')} |"
        )


def record_histogram(args):
    from river import Engine, ExitConfig, SamplingParams

    engine = Engine(args.model, device=args.device)
    sp = SamplingParams(
        max_tokens=args.record_tokens,
        temperature=0,
        ignore_eos=True,
        exit=ExitConfig("river", args.threshold, args.min_layer),
    )
    engine.exit_histogram(reset=True)
    engine.generate(RECORD_PROMPTS, sp)
    counts = engine.exit_histogram()
    mean = sum(k * c for k, c in enumerate(counts)) / max(sum(counts), 1)
    out = {
        "counts": counts,
        "model": engine.model_dir.name,
        "threshold": args.threshold,
        "min_layer": args.min_layer,
        "mean_backbone_layers": mean,
    }
    pathlib.Path(args.record_histogram).write_text(json.dumps(out, indent=1))
    print(
        f"wrote {args.record_histogram}: {sum(counts)} tokens, mean {mean:.2f} backbone "
        f"layers of {engine.model_config.num_layers}"
    )


def build_model(key, args, device, dtype, max_positions):
    """(name, model, HF model dir or None, note, (twin bits plan or None, river head bits)) of
    one --models entry: the default model's twins follow the engine's precision plan, the
    random models' are all 4-bit with the bf16 head."""
    from models import build_default, build_random

    if key == "default":
        return build_default(args.model, device, max_positions)
    name, shape = RANDOM[key]
    method = "rtn" if args.rtn else "hqq"
    model, note = build_random(
        shape, device, dtype, max_positions, args.seed, args.group_size, method
    )
    return name, model, None, note, (None, 16)


def bench_model(key, args, device, dtype, modes, hist, rows, save):
    """Time every mode (and HF) of one model at every batch; append rows, save after each."""
    from decode_timing import DecodeBench, time_hf
    from models import check_hf_twin, hf_twin

    hf_skip = {tuple(x.split(":")) for x in arguments.split(args.hf_skip)}
    max_positions = args.context + args.warmup + args.steps + max(args.hf_steps, 0) + 64
    name, model, model_dir, note, (plan, head_bits) = build_model(
        key, args, device, dtype, max_positions
    )
    cfg = model.cfg
    print(f"  {name}: {cfg.num_layers} layers, hidden {cfg.hidden_size} ({note})", flush=True)
    bench = DecodeBench(model, args, device)
    hf = None
    if not args.skip_hf:
        hf = hf_twin(model, model_dir)
        check_hf_twin(model, hf, bench.kv, device)
    probs = exit_distribution(cfg.num_layers, args.exit_layers, hist)
    # the twins' real group size (CPU twins are dequantized: assume the flag's)
    group = getattr(model.river[0].qkv, "group_size", args.group_size)
    for batch in args.batches:
        full_w, full_kv = bytes_per_step(cfg, "full", batch, probs, args.context, group)
        planned = {"bits": plan, "head_bits": head_bits}
        full_tok = None
        for mode in modes:
            secs, layers = bench.time_mode(mode, batch, hist)
            tok_s = batch * args.steps / secs
            if mode == "full":
                full_tok = tok_s
            w, kvb = bytes_per_step(cfg, mode, batch, probs, args.context, group, **planned)
            rows.append(
                {
                    "model": name,
                    "mode": mode,
                    "batch": batch,
                    "backbone_layers": round(layers, 3),
                    "tok_s": round(tok_s, 2),
                    "ms_per_token": round(1e3 * secs / args.steps, 4),
                    "speedup_vs_full": round(tok_s / full_tok, 3) if full_tok else None,
                    "ideal_speedup": round(full_w / w, 3),
                    "ideal_speedup_kv": round((full_w + full_kv) / (w + kvb), 3),
                    "weight_gb_per_step": round(w / 1e9, 4),
                }
            )
            print(
                f"  batch {batch:3d} {mode:12s} {tok_s:10.1f} tok/s "
                f"{1e3 * secs / args.steps:8.3f} ms/step  layers {layers:5.2f}  "
                f"ideal x{full_w / w:.2f}",
                flush=True,
            )
        if hf is not None and (key, str(batch)) not in hf_skip:
            per_step = time_hf(hf, batch, args, device, cfg.vocab_size)
            rows.append(
                {
                    "model": name,
                    "mode": "hf-transformers",
                    "batch": batch,
                    "backbone_layers": cfg.num_layers,
                    "tok_s": round(batch / per_step, 2),
                    "ms_per_token": round(1e3 * per_step, 4),
                    "speedup_vs_full": round(batch / per_step / full_tok, 3) if full_tok else None,
                    "ideal_speedup": None,
                    "ideal_speedup_kv": None,
                }
            )
            print(
                f"  batch {batch:3d} {'hf':12s} {batch / per_step:10.1f} tok/s "
                f"{1e3 * per_step:8.3f} ms/step",
                flush=True,
            )
        save()


def bench_tensor_parallel(args):
    """--tp N: the engine's decode tok/s at TP 1 and N (full, w4, river), JSON beside the
    others (decode-tp<N>-<device>.json)."""
    from tp_timing import bench_tp

    device = pick_device(args.device)
    out = result_path(args.out, f"decode-tp{args.tp}-{device_slug(device)}.json")
    print(f"== engine decode, tensor_parallel_size 1 and {args.tp} ({device}) ==", flush=True)
    rows = bench_tp(args.model, device, args.tp, args.batches, args.steps, RECORD_PROMPTS)
    write_json(out, {**run_metadata(device), "steps": args.steps, "results": rows})
    print(f"wrote {out}")


def main(argv=None):
    args = parse_args(argv)
    if args.record_histogram:
        record_histogram(args)
        return
    if args.tp > 1:
        bench_tensor_parallel(args)
        return
    import torch
    from forced_exits import ExitHistogram
    from plots import decode_speed

    device = torch.device(pick_device(args.device))
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    modes = args.modes
    if (device.type != "cuda" or args.no_graphs) and not args.pad_eager:
        modes = [m for m in modes if m != "full-shared"]  # plain eager: the same as full
    hist = None
    if args.exit_histogram:
        hist = ExitHistogram.from_json(json.loads(pathlib.Path(args.exit_histogram).read_text()))
    out = result_path(args.out, f"decode-{device_slug(device)}.json")
    meta = run_metadata(str(device))
    exit_spec = (
        {"exit_histogram": args.exit_histogram, "mean_layers_source": hist.mean_layers()}
        if hist
        else {"exit_layers": args.exit_layers}
    )
    rows = []

    def save():
        write_json(
            out,
            {
                **meta,
                "context": args.context,
                "steps": args.steps,
                "graphs": device.type == "cuda" and not args.no_graphs,
                **exit_spec,
                "results": rows,
            },
        )

    for key in args.models:
        torch.manual_seed(args.seed)
        print(f"== {key} ==", flush=True)
        bench_model(key, args, device, dtype, modes, hist, rows, save)
        gc.collect()  # the model, its KV cache, graphs and HF twin are garbage now
        if device.type == "cuda":
            torch.cuda.empty_cache()

    save()
    png = plot_path(args.plot, out)
    decode_speed(rows, png)
    print_table(rows)
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
