"""CPU decode speed of river's Engine (the path users run) per exit mode, beside Hugging Face
transformers (eager, fp32 and bf16) with the same weights and, when the `llama_cpp` package
happens to be installed, llama.cpp on the same GGUF. All in one run, one process.

What is timed: Engine.generate on B prompts with greedy decoding and ignore_eos, T new tokens
each. Decode tok/s = B * (T - 1) / (end - time of the last first token): the prefill is left
out so that prompt length does not blur the per-token cost. Each row is repeated --repeats
times; the JSON keeps every repeat and the table shows the median with its min-max spread.

    python benchmarks/bench_cpu.py                     # default model, batches 1 and 8
    python benchmarks/bench_cpu.py --batches 1 --tokens 32 --repeats 2 --skip-hf
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import RESULTS, run_metadata, write_json  # noqa: E402

PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "import numpy as np\n",
    "Once upon a time, in a small village,",
    "class Stack:\n    def __init__(self):",
    "def quicksort(arr):",
    "# Binary search over a sorted list\n",
    "The three laws of thermodynamics are",
]
# name -> ExitConfig kwargs; river4 is the river forced to leave after exactly 4 layers.
MODES = {
    "full": {"mode": "full"},
    "w4": {"mode": "w4"},
    "river": {"mode": "river"},
    "river4": {"mode": "river", "threshold": -1.0, "min_layer": 4},
    "propagate": {"mode": "propagate"},
    "mask": {"mode": "mask"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="CPU decode tok/s of river's Engine per exit mode vs HF transformers "
        "(and llama.cpp when installed); JSON, markdown table and plot.",
    )
    p.add_argument("--model", default=None, help="HF Llama dir (default: the default model)")
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes (default 1,8)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per row (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per row (default 3)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None)
    p.add_argument("--skip-hf", action="store_true", help="no transformers baseline")
    p.add_argument("--out", default=str(RESULTS / "decode-cpu.json"), help="JSON path")
    p.add_argument("--plot", default=None, help="PNG path (default: beside the JSON)")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.modes = args.modes.split(",")
    for m in args.modes:
        if m not in MODES:
            p.error(f"argument --modes: unknown mode {m!r} (choose from {list(MODES)})")
    if args.tokens < 2 or args.repeats < 1:
        p.error("argument --tokens: need >= 2 tokens and >= 1 repeat")
    return args


def decode_rate(outs) -> float:
    """B * (T - 1) / decode window; all rows of one generate() share their start time."""
    first = max(o.first_token_s for o in outs)
    end = max(o.elapsed_s for o in outs)
    return sum(len(o.token_ids) - 1 for o in outs) / (end - first)


def time_engine(engine, mode_kw, batch, args) -> dict:
    from river import ExitConfig, SamplingParams

    exit_cfg = ExitConfig(**mode_kw)
    sp = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True, exit=exit_cfg)
    prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
    engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, exit=exit_cfg))
    rates, layers = [], []
    for _ in range(args.repeats):
        outs = engine.generate(prompts, sp)
        rates.append(decode_rate(outs))
        # Decode tokens only: the first token of each row comes from the full prefill.
        layers.append(statistics.mean(x for o in outs for x in o.backbone_layers[1:]))
    return {"tok_s": rates, "backbone_layers": statistics.mean(layers)}


def time_hf(model_dir, dtype, batch, args) -> dict:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    hf.eval()
    prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
    enc = tok(prompts, return_tensors="pt", padding=True)

    def run(n):
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(
                **enc,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        return time.perf_counter() - t

    run(4)
    rates = []
    for _ in range(args.repeats):
        prefill = run(1)
        total = run(args.tokens)
        rates.append(batch * (args.tokens - 1) / max(total - prefill, 1e-9))
    return {"tok_s": rates}


def time_llama_cpp(gguf, threads, args) -> dict | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_ctx=512, verbose=False)
    rates = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        llm(PROMPTS[0], max_tokens=1)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        llm(PROMPTS[0], max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
        rates.append((args.tokens - 1) / max(time.perf_counter() - t - prefill, 1e-9))
    return {"tok_s": rates}


def summary(rates) -> tuple[float, float, float]:
    return statistics.median(rates), min(rates), max(rates)


def print_table(rows) -> str:
    lines = [
        "| engine / mode | batch | decode tok/s (median, min-max) | x full | bf16 layers/token |",
        "|---|---|---|---|---|",
    ]
    full = {r["batch"]: summary(r["tok_s"])[0] for r in rows if r["name"] == "river full"}
    for r in rows:
        med, lo, hi = summary(r["tok_s"])
        ref = full.get(r["batch"])
        ratio = f"{med / ref:.2f}x" if ref else ""
        layers = f"{r['backbone_layers']:.2f}" if "backbone_layers" in r else ""
        lines.append(
            f"| {r['name']} | {r['batch']} | {med:.1f} ({lo:.1f}-{hi:.1f}) | {ratio} | {layers} |"
        )
    text = "\n".join(lines)
    print(text)
    return text


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        sel = [r for r in rows if r["batch"] == b]
        names = [r["name"] for r in sel]
        meds = [summary(r["tok_s"])[0] for r in sel]
        errs = [
            [m - summary(r["tok_s"])[1] for m, r in zip(meds, sel)],
            [summary(r["tok_s"])[2] - m for m, r in zip(meds, sel)],
        ]
        colors = ["tab:blue" if n.startswith("river") else "tab:gray" for n in names]
        ax.barh(names, meds, xerr=errs, color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("decode tok/s (higher is better)")
        ax.set_title(f"batch {b}")
    fig.suptitle("CPU decode speed (median of repeats, bars = min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    from river import Engine
    from river.checkpoint import resolve_model_dir

    kw = {"device": "cpu"}
    if args.dtype:
        kw["dtype"] = getattr(torch, args.dtype)
    engine = Engine(args.model, **kw)
    engine.ensure_river(progress=False)
    print(f"river: {engine.dtype}, {engine.num_threads} threads, ops {engine.model.ops.kind}")
    rows = []
    for b in args.batches:
        for m in args.modes:
            r = time_engine(engine, MODES[m], b, args)
            rows.append({"name": f"river {m}", "batch": b, **r})
            print(f"river {m} b={b}: {summary(r['tok_s'])[0]:.1f} tok/s", flush=True)
    model_dir = resolve_model_dir(args.model)
    if not args.skip_hf:
        for dt in (torch.float32, torch.bfloat16):
            for b in args.batches:
                r = time_hf(model_dir, dt, b, args)
                rows.append({"name": f"HF transformers eager {str(dt)[6:]}", "batch": b, **r})
                print(f"HF {dt} b={b}: {summary(r['tok_s'])[0]:.1f} tok/s", flush=True)
    if args.model is None:
        from river.convert import default_gguf_path

        r = time_llama_cpp(default_gguf_path(), engine.num_threads, args)
        if r is not None:
            rows.append({"name": "llama.cpp (same GGUF)", "batch": 1, **r})
    table = print_table(rows)
    out = pathlib.Path(args.out)
    meta = run_metadata("cpu")
    meta.update(dtype=str(engine.dtype), threads=engine.num_threads, ops=engine.model.ops.kind)
    payload = {
        "meta": meta,
        "config": {"tokens": args.tokens, "repeats": args.repeats, "model": str(model_dir)},
        "rows": rows,
        "table": table,
    }
    write_json(out, payload)
    png = pathlib.Path(args.plot) if args.plot else out.with_suffix(".png")
    plot(rows, png)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
