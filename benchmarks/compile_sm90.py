"""Compile every Triton kernel variant river launches for Hopper (sm_90), with no GPU.

    python benchmarks/compile_sm90.py                        # all variants, both models
    python benchmarks/compile_sm90.py --models smollm2-135m --batches 1,8
    python benchmarks/compile_sm90.py --json report.json     # also: RIVER_COMPILE_REPORT=path
    python benchmarks/compile_sm90.py --list                 # the launches, nothing compiled

What is compiled: each op the engine launches on CUDA (river/model.py through river/ops.py),
through its real host launcher in kernels/*.py, so the settings table, split-K choices, grid
and constexprs are the engine's own: rms_norm with and without the residual; the decode-step
projections (o, down, lm_head, gate_up_silu) in bf16, W4, W6 (group 64) and W8 with the row
mask the two-path decode passes; qkv_rope_store in each format, with and without a row mask,
at decode sizes and at a prefill size; paged decode attention with a row mask, with and without
kv_valid, at the context capacity of the graph runner (the model's window) and at a short
eager one (each picks its own split count); prefill attention; sampling. Shapes: the default
model (SmolLM2-135M) and Llama-3.1-8B at batch 1, 8, 32 and 64. Distinct variants compile
once (the JIT's cache, and TRITON_CACHE_DIR across runs); the table has one row per compiled
kernel with the launches that map to it.

How it compiles without a GPU:
* A stand-in driver: triton.runtime.driver.set_active() takes a DriverBase whose
  get_current_target() is GPUTarget("cuda", 90, 32), device 0, stream 0. The JIT asks the
  active driver only for the target (to build its binder and backend), the device and the
  stream; Triton -> LLVM -> PTX runs in-process and PTX -> cubin in the ptxas inside the
  triton wheel (Triton targets sm_90a for capability 9.0). Nothing else of it is used, since
  nothing launches.
* Launches become warm-ups: inside compile_only(), `kernel[grid](...)` calls
  kernel.run(..., warmup=True): the same binding, specialisation and compile as a launch,
  minus loading the cubin. The launchers run unchanged.
* Tensors are meta tensors (shape, dtype and strides without storage) of a subclass whose
  is_cuda is True, so the one launcher choice that asks (sampling's libdevice exp/log) takes
  its CUDA branch. data_ptr() is 0: pointers specialise as 16-byte aligned, as CUDA
  allocations are. A meta device has no index, so the launchers size split-K for 132 SMs
  (kernels/launch.py num_sms): the H100 SXM's and the H200's count.
* Registers and spills come from ptxas -v (TRITON_DUMP_PTXAS_LOG, captured per compile); a
  kernel loaded from TRITON_CACHE_DIR is re-assembled with ptxas -v from its cached PTX.

Exit status 1 if any launch fails to compile or a kernel could not be loaded on an H100/H200
(over 255 registers a thread, 64K registers or 227 KiB of shared memory a block).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

# Compile for real: this script exists to run the CUDA backend, never the interpreter. Triton
# reads TRITON_INTERPRET when a kernel module is imported, so drop it before any import.
os.environ.pop("TRITON_INTERPRET", None)
# Triton 3.9 warns once that FP fusion is on by default (as in 3.6, the version on the GPU
# machines) when TRITON_DEFAULT_FP_FUSION is unset. Setting the variable would silence it but
# also change every kernel's cache key, so that a later engine run would not find these in
# TRITON_CACHE_DIR: silence the warning instead.
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import arguments  # noqa: E402
from checkout import use_checkout  # noqa: E402
from common import ROOT, command_line  # noqa: E402
from sm90_driver import ARCH, compile_only  # noqa: E402
from sm90_launches import BATCHES, MODELS, engine_launches  # noqa: E402
from sm90_report import (  # noqa: E402
    constexprs_of,
    launch_problems,
    parse_ptxas,
    ptxas_usage,
    table,
    variant_label,
)


def parse_args(argv=None):
    p = arguments.parser(__doc__)
    arguments.add_list(p, "--models", "models", ",".join(MODELS), choices=MODELS, note="all")
    arguments.add_list(
        p, "--batches", "decode batch sizes", ",".join(map(str, BATCHES)), arguments.positive_int
    )
    arguments.add_only(p, "op names")
    p.add_argument(
        "--json",
        default=os.environ.get("RIVER_COMPILE_REPORT"),
        help="write the report here (default: $RIVER_COMPILE_REPORT, else no file)",
    )
    p.add_argument("--list", action="store_true", help="print the launches and exit")
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="compile in this many processes (default: 2, or 1 on a single core)",
    )
    p.add_argument("--shard", type=int, default=None, help=arguments.SUPPRESS)  # internal
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.shard is not None and not (0 <= args.shard < args.jobs and args.json):
        p.error("--shard K (internal) needs 0 <= K < --jobs and --json")
    return args


# ----------------------------------------------------------------------------- compiling


def compile_all(launches):
    """Run every launch in compile-only mode; returns (variants by hash, launch records)."""
    import triton

    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed: captured below
    variants: dict[str, dict] = {}
    records = []
    current: dict = {}

    def on_compile(kernel_fn, grid, kwargs, compiled):
        key = compiled.hash
        current["hashes"].append(key)
        v = variants.get(key)
        if v is None:
            constexprs = constexprs_of(kernel_fn, kwargs)
            v = variants[key] = {
                "kernel": compiled.metadata.name,
                "variant": variant_label(constexprs, compiled.metadata.num_warps),
                "constexprs": constexprs,
                "num_warps": compiled.metadata.num_warps,
                "shared": compiled.metadata.shared,
                "seconds": round(time.perf_counter() - current["t0"], 2),
                "ops": [],
                "launches": [],
                "grids": [],
            }
            usage = parse_ptxas(current["log"].getvalue())
            if usage is None:  # loaded from TRITON_CACHE_DIR: no ptxas ran
                usage = ptxas_usage(compiled.asm["ptx"])
                v["usage_from"] = "ptxas -v on the cached ptx"
            v.update(usage or {"regs": None})
        launch = current["launch"]
        if launch["op"] not in v["ops"]:
            v["ops"].append(launch["op"])
        v["launches"].append({k: launch[k] for k in ("model", "batch", "what")})
        if list(grid) not in v["grids"]:
            v["grids"].append(list(grid))
        current["log"] = io.StringIO()  # a second kernel in one launcher call logs afresh

    with compile_only(on_compile):
        for index, lc in launches:
            tag = {"index": index, "op": lc.op, "model": lc.model, "batch": lc.batch,
                   "what": lc.what}  # fmt: skip
            current.update(launch=tag, t0=time.perf_counter(), log=io.StringIO(), hashes=[])
            try:
                with contextlib.redirect_stdout(current["log"]):
                    lc.fn()
                status, error = "ok", None
            except Exception as e:  # a compile error fails the run, after the others compiled
                status, error = "error", f"{type(e).__name__}: {e}"
                traceback.print_exc(file=sys.stderr)
            if status == "ok" and not current["hashes"]:
                status, error = "error", "the launcher launched no kernel"
            records.append({**tag, "status": status, "error": error, "kernels": current["hashes"]})
    return variants, records


def _shards(launches, jobs):
    """Split the launches into `jobs` lists, keeping each (model, op) together (its batches
    share variants, which should compile in one process) and balancing the launch counts."""
    groups: dict[tuple, list] = {}
    for index, lc in enumerate(launches):
        groups.setdefault((lc.model, lc.op), []).append(index)
    shards = [[] for _ in range(jobs)]
    for g in sorted(groups.values(), key=len, reverse=True):
        min(shards, key=len).extend(g)
    return [sorted(s) for s in shards if s]


def _run_shards(args, n_launches):
    """Compile in `args.jobs` child processes of this script (one ptxas and one LLVM at a time
    each) and merge what they report."""
    with tempfile.TemporaryDirectory(prefix="compile-sm90-") as tmp:
        procs = []
        for k in range(args.jobs):
            part = pathlib.Path(tmp) / f"shard{k}.json"
            cmd = [sys.executable, __file__, "--models", ",".join(args.models),
                   "--batches", ",".join(map(str, args.batches)), "--only", args.only,
                   "--jobs", str(args.jobs), "--shard", str(k), "--json", str(part)]  # fmt: skip
            procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL), part))
        variants, records = {}, []
        for proc, part in procs:
            proc.wait()
            if not part.exists():
                raise SystemExit(f"a compile shard exited with status {proc.returncode}: no report")
            doc = json.loads(part.read_text())
            records += doc["launches"]
            for h, v in doc["variants"].items():
                if h not in variants:
                    variants[h] = v
                    continue
                seen = variants[h]  # the same kernel reached from two shards (e.g. sample)
                seen["ops"] += [op for op in v["ops"] if op not in seen["ops"]]
                seen["launches"] += v["launches"]
                seen["grids"] += [g for g in v["grids"] if g not in seen["grids"]]
    records.sort(key=lambda r: r["index"])
    if len(records) != n_launches:
        raise SystemExit(f"the shards reported {len(records)} of {n_launches} launches")
    return variants, records


def main(argv=None) -> int:
    args = parse_args(argv)
    use_checkout()
    import torch
    import triton

    launches = [
        lc
        for lc in engine_launches(args.models, args.batches)
        if arguments.selected(lc.op, args.only)
    ]
    if args.list:
        for lc in launches:
            print(f"{lc.op:24s} {lc.model:14s} b{lc.batch:<4d} {lc.what}")
        return 0
    t0 = time.perf_counter()
    if args.shard is not None:  # a child of _run_shards: compile my share, report raw
        mine = _shards(launches, args.jobs)
        picked = mine[args.shard] if args.shard < len(mine) else []
        variants, records = compile_all([(i, launches[i]) for i in picked])
        doc = {"variants": variants, "launches": records}
        pathlib.Path(args.json).write_text(json.dumps(doc) + "\n")
        return 0
    if args.jobs > 1:
        variants, records = _run_shards(args, len(launches))
    else:
        variants, records = compile_all(list(enumerate(launches)))
    seconds = time.perf_counter() - t0
    for v in variants.values():
        v["problems"] = launch_problems(v)
    errors = [r for r in records if r["status"] != "ok"]
    unloadable = {h: v["problems"] for h, v in variants.items() if v["problems"]}
    print(table(variants))
    print(
        f"\n{len(records)} launches -> {len(variants)} kernels compiled for sm_{ARCH} "
        f"in {seconds:.1f} s with {args.jobs} process(es) (triton {triton.__version__}); "
        f"{len(errors)} failed, {len(unloadable)} would not load on an H100/H200"
    )
    for r in errors:
        print(f"FAILED {r['op']} {r['model']} b{r['batch']} ({r['what']}): {r['error']}")
    for h, problems in unloadable.items():
        print(
            f"WOULD NOT LOAD {', '.join(variants[h]['ops'])} {variants[h]['variant']}: {problems}"
        )
    if args.json:
        doc = {
            "target": f"cuda sm_{ARCH}",
            "triton": triton.__version__,
            "torch": torch.__version__,
            "command": command_line(),
            "root": str(ROOT),
            "jobs": args.jobs,
            "seconds": round(seconds, 1),
            "variants": [{"hash": h, **v} for h, v in variants.items()],
            "launches": records,
        }
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}")
    return 1 if errors or unloadable else 0


if __name__ == "__main__":
    sys.exit(main())
