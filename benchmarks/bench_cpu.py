"""CPU decode speed of river's Engine (the path users run) per exit mode, beside Hugging Face
transformers (eager, fp32 and bf16) with the same weights and, when the `llama_cpp` package
happens to be installed, llama.cpp on the same GGUF. All in one run (llama.cpp in a child
process, so that a build the CPU cannot run costs only its row).

What is timed: Engine.generate on B prompts with greedy decoding and ignore_eos, T new tokens
each. Decode tok/s = B * (T - 1) / (end - time of the last first token): the prefill is left
out so that prompt length does not blur the per-token cost. Each row is repeated --repeats
times, the repeats interleaved across the rows of a batch size (every row's first repeat, then
every row's second, ...) so that the machine's drift does not favour one row; the JSON keeps
every repeat and the table shows the median with its min-max spread.

    python benchmarks/bench_cpu.py                     # default model, batches 1 and 8
    python benchmarks/bench_cpu.py --batches 1 --tokens 32 --repeats 2 --skip-hf
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import arguments  # noqa: E402
from common import RESULTS, plot_path, run_metadata, write_json  # noqa: E402
from plots import cpu_speed  # noqa: E402
from prompts import prompts  # noqa: E402
from timing import median_spread  # noqa: E402

PROMPTS = prompts(
    "fibonacci", "france", "numpy", "village", "stack", "quicksort", "binary-search",
    "thermodynamics",
)  # fmt: skip
COMPILED = " (compiled)"  # row-name suffix of the torch.compile'd step
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
    p = arguments.parser(
        "CPU decode tok/s of river's Engine per exit mode vs HF transformers "
        "(and llama.cpp when installed); JSON, markdown table and plot.",
        raw=False,
    )
    arguments.add_model(p)
    arguments.add_list(p, "--batches", "batch sizes", "1,8", arguments.positive_int)
    arguments.add_list(p, "--modes", "modes", ",".join(MODES), choices=MODES, note="all")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per row (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per row (default 3)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None)
    from river.cli import precision_spec

    p.add_argument(
        "--river-precision",
        type=precision_spec,
        default=None,
        help="twin precision: w4, w6, w8, mix:B or mix6:B (default: the engine's, mix6:0.43)",
    )
    p.add_argument(
        "--compile",
        choices=("both", "on", "off"),
        default="both",
        help="river's decode step through torch.compile (Engine(torch_compile=True)): 'both' "
        "times each mode compiled and eager, repeats interleaved (default both)",
    )
    arguments.add_switches(p, {"--skip-hf": "no transformers baseline"})
    arguments.add_outputs(p, "decode-cpu.json", default=str(RESULTS / "decode-cpu.json"))
    args = p.parse_args(argv)
    if args.tokens < 2 or args.repeats < 1:
        p.error("argument --tokens: need >= 2 tokens and >= 1 repeat")
    return args


def decode_rate(outs) -> float:
    """B * (T - 1) / decode window; all rows of one generate() share their start time."""
    first = max(o.first_token_s for o in outs)
    end = max(o.elapsed_s for o in outs)
    return sum(len(o.token_ids) - 1 for o in outs) / (end - first)


def _compilable(mode_kw) -> bool:
    """Whether Engine(torch_compile=True) runs this mode's decode steps compiled."""
    from river import ExitConfig
    from river.exits import ExitParams
    from river.graphs import compilable, step_flags

    return compilable(step_flags(ExitParams.build([ExitConfig(**mode_kw)], "cpu")))


def time_engine(engine, batch, args, todo) -> list[dict]:
    """One row per (mode, variant) in `todo` (variant "eager" or "compiled"). Repeats are
    interleaved across all of them (repeat 1 of every row, then repeat 2, ...), so that the
    machine's drift, 15-30% over minutes on a shared VM, hits every row alike."""
    from river import ExitConfig, SamplingParams

    prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
    compiled = engine.runner.decode.compiled  # None unless Engine(torch_compile=True)
    rows = []
    for mode, variant in todo:
        exit_cfg = ExitConfig(**MODES[mode])
        rows.append(
            {
                "name": f"river {mode}" + (COMPILED if variant == "compiled" else ""),
                "batch": batch,
                "variant": variant,
                "params": SamplingParams(
                    max_tokens=args.tokens, temperature=0.0, ignore_eos=True, exit=exit_cfg
                ),
                "tok_s": [],
                "layers": [],
            }
        )

    def use(row):
        if compiled is not None:
            compiled.enabled = row["variant"] == "compiled"

    for row in rows:  # warm-up; compiled: the first call of each variant compiles it
        use(row)
        t = time.perf_counter()
        warm = SamplingParams(max_tokens=4, temperature=0.0, exit=row["params"].exit)
        engine.generate(prompts, warm)
        row["warmup_s"] = time.perf_counter() - t
    for _ in range(args.repeats):
        for row in rows:
            use(row)
            outs = engine.generate(prompts, row["params"])
            row["tok_s"].append(decode_rate(outs))
            # Decode tokens only: the first token of each row comes from the full prefill.
            row["layers"].append(statistics.mean(x for o in outs for x in o.backbone_layers[1:]))
    if compiled is not None:
        compiled.enabled = True
    for row in rows:
        row["backbone_layers"] = statistics.mean(row.pop("layers"))
        del row["params"], row["variant"]
        print(f"{row['name']} b={batch}: {median_spread(row['tok_s'])[0]:.1f} tok/s", flush=True)
    return rows


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


# Run in a child process: a llama.cpp build can use instructions the VM does not allow (a
# build with AMX tiles died of SIGILL here), which would end the benchmark and lose its rows.
_LLAMA_CPP = """
import json, sys, time
import llama_cpp
gguf, threads, tokens, repeats, prompt = sys.argv[1:6]
tokens, repeats = int(tokens), int(repeats)
llm = llama_cpp.Llama(model_path=gguf, n_threads=int(threads), n_ctx=512, verbose=False)
rates = []
for _ in range(repeats):
    t = time.perf_counter()
    llm(prompt, max_tokens=1)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    # (no ignore_eos in llama-cpp-python: a -1e9 bias keeps the EOS token from being sampled)
    out = llm(prompt, max_tokens=tokens, temperature=0.0, logit_bias={llm.token_eos(): -1e9})
    n = out["usage"]["completion_tokens"]
    rates.append((n - 1) / max(time.perf_counter() - t - prefill, 1e-9))
print(json.dumps({"tok_s": rates, "version": llama_cpp.__version__}))
"""


def time_llama_cpp(gguf, threads, args) -> dict | None:
    """llama.cpp (llama-cpp-python) on the same GGUF at batch 1, or None when it is not
    installed or its process fails (reported on stderr)."""
    import importlib.util
    import json
    import subprocess

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    argv = [str(gguf), str(threads), str(args.tokens), str(args.repeats), PROMPTS[0]]
    r = subprocess.run(
        [sys.executable, "-c", _LLAMA_CPP, *argv], capture_output=True, text=True, timeout=3600
    )
    if r.returncode != 0:
        why = f"signal {-r.returncode}" if r.returncode < 0 else f"exit status {r.returncode}"
        tail = r.stderr.strip().splitlines()[-1:] or [""]
        print(f"llama.cpp failed ({why}) {tail[0][:200]}; no llama.cpp row", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def print_table(rows) -> str:
    lines = [
        "| engine / mode | batch | decode tok/s (median, min-max) | x full (median, min-max) "
        "| bf16 layers/token |",
        "|---|---|---|---|---|",
    ]
    # Each river row against river full of the same batch and the same step (compiled or
    # not), repeat by repeat: repeat i of both ran seconds apart (interleaved), so the ratio of
    # each pair cancels the VM's slower drift, which the ratio of the two medians would not.
    full = {
        (r["batch"], r["name"].endswith(COMPILED)): r["tok_s"]
        for r in rows
        if r["name"] in ("river full", "river full" + COMPILED)
    }
    for r in rows:
        med, lo, hi = median_spread(r["tok_s"])
        ref = full.get((r["batch"], r["name"].endswith(COMPILED)))
        ratio = ""
        if ref and "backbone_layers" in r:  # a river row: interleaved with its full row
            r["x_full"] = [a / b for a, b in zip(r["tok_s"], ref)]
            rm, rlo, rhi = median_spread(r["x_full"])
            ratio = f"{rm:.2f}x ({rlo:.2f}-{rhi:.2f})"
        layers = f"{r['backbone_layers']:.2f}" if "backbone_layers" in r else ""
        lines.append(
            f"| {r['name']} | {r['batch']} | {med:.1f} ({lo:.1f}-{hi:.1f}) | {ratio} | {layers} |"
        )
    text = "\n".join(lines)
    print(text)
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    from river import Engine
    from river.checkpoint import resolve_model_dir

    kw = {"device": "cpu", "torch_compile": args.compile != "off"}
    if args.dtype:
        kw["dtype"] = getattr(torch, args.dtype)
    if args.river_precision:
        kw["river_precision"] = args.river_precision
    engine = Engine(args.model, **kw)
    engine.ensure_river(progress=False)
    print(f"river: {engine.dtype}, {engine.num_threads} threads, ops {engine.model.ops.kind}")
    variants = {"both": ("compiled", "eager"), "on": ("compiled",), "off": ("eager",)}
    rows = []
    # per-token exits run eagerly even in a compiling engine: those modes get no compiled row
    todo = [
        (m, v)
        for m in args.modes
        for v in variants[args.compile]
        if v == "eager" or _compilable(MODES[m])
    ]
    for b in args.batches:
        rows += time_engine(engine, b, args, todo)
    model_dir = resolve_model_dir(args.model)
    if not args.skip_hf:
        for dt in (torch.float32, torch.bfloat16):
            for b in args.batches:
                r = time_hf(model_dir, dt, b, args)
                rows.append({"name": f"HF transformers eager {str(dt)[6:]}", "batch": b, **r})
                print(f"HF {dt} b={b}: {median_spread(r['tok_s'])[0]:.1f} tok/s", flush=True)
    if args.model is None:
        from river.model_cache import default_gguf_path

        r = time_llama_cpp(default_gguf_path(), engine.num_threads, args)
        if r is not None:
            name = f"llama.cpp {r.pop('version')} (same GGUF, {engine.num_threads} threads)"
            rows.append({"name": name, "batch": 1, **r})
    table = print_table(rows)
    out = pathlib.Path(args.out)
    meta = run_metadata("cpu")
    meta.update(
        dtype=str(engine.dtype),
        threads=engine.num_threads,
        ops=engine.model.ops.kind,
        river_precision=engine.config.river_precision,
        river_calibration=engine.config.river_calibration,
    )
    payload = {
        "meta": meta,
        "config": {"tokens": args.tokens, "repeats": args.repeats, "model": str(model_dir)},
        "rows": rows,
        "table": table,
    }
    write_json(out, payload)
    png = plot_path(args.plot, out)
    cpu_speed(rows, png)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
