"""What `make gpu-check` runs: its steps with their time limits (on a GPU and in the --dry run),
the run's budget, and each step's command line and environment."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib

from common import ROOT

GPU_CHECK = pathlib.Path(__file__).resolve().parent / "gpu_check.py"
GPU_BUDGET_S = 420  # the 7 minutes
DRY_BUDGET_S = 300


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    gpu_limit_s: int
    dry_limit_s: int
    what: str


STEPS = (
    Step("copy-bandwidth", 30, 60, "torch copy of a large buffer, GB/s"),
    Step("kernel-tests", 95, 120, 'pytest tests/test_kernels.py -m "not cpu_only"'),
    Step(
        "graph-tests",
        60,
        120,
        "pytest tests/test_graphs.py tests/test_exits.py tests/test_runner.py",
    ),
    Step("engine", 70, 120, "greedy full on the default model == CPU reference"),
    Step("bench-kernels", 60, 90, "benchmarks/bench_kernels.py"),
    Step("bench-decode", 95, 90, "benchmarks/bench_decode.py"),
)
STEP_NAMES = [s.name for s in STEPS]
WHAT = {s.name: s.what for s in STEPS}
assert sum(s.gpu_limit_s for s in STEPS) <= GPU_BUDGET_S


def _pytest(out: pathlib.Path, name: str, files: list[str], extra: list[str]) -> list[str]:
    return ["-m", "pytest", *files, "-q", "-rfEs", "-p", "no:cacheprovider",
            f"--junitxml={out / (name + '.xml')}", *extra]  # fmt: skip


def _xdist_workers() -> int:
    if importlib.util.find_spec("xdist") is None:
        return 0
    return min(8, os.cpu_count() or 1)


def step_command(step: str, args, out: pathlib.Path, model) -> list[str]:
    """The argv (after `python gpu_check.py --exec`) of one step; model = (dir or None, note)."""
    model_dir, note = model
    if step in ("copy-bandwidth", "engine"):
        cmd = [str(GPU_CHECK), "--run-step", step, "--out", str(out)]
        cmd += ["--dry"] if args.dry else []
        if step == "engine":
            cmd += ["--tie-nats", str(args.tie_nats), "--model-note", note]
            cmd += ["--model-dir", str(model_dir)] if model_dir is not None else []
        return cmd
    if step == "kernel-tests":
        if args.dry:  # the float32 cases of each family (the interpreter cannot do bf16 dots)
            sel = ["-k", "(float32 and not m_sweep) or sample_edge_cases or decode_num_splits"]
        else:
            workers = _xdist_workers()  # compiling dominates: one compiler per core
            sel = ["-n", str(workers)] if workers > 1 else []
        return _pytest(out, step, ["tests/test_kernels.py"], ["-m", "not cpu_only", *sel])
    if step == "graph-tests":
        files = ["tests/test_graphs.py", "tests/test_exits.py", "tests/test_runner.py"]
        return _pytest(out, step, files, ["-m", "not slow"])
    if step == "bench-kernels":
        cmd = ["benchmarks/bench_kernels.py", "--out", str(out / "bench-kernels.json")]
        return cmd + (["--dry-run"] if args.dry else [])
    if step == "bench-decode":
        cmd = ["benchmarks/bench_decode.py", "--out", str(out / "bench-decode.json"),
               "--plot", str(out / "bench-decode.png")]  # fmt: skip
        if args.dry:
            return cmd + ["--tiny", "--device", "cpu"]
        models = "8b" if model_dir is None else "default,8b"
        cmd += ["--models", models, "--batches", "1,32", "--rtn", "--steps", "64", "--warmup", "8"]
        return cmd + (["--model", str(model_dir)] if model_dir is not None else [])
    raise ValueError(f"unknown step {step!r}")


def step_env(args) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHONUNBUFFERED"] = "1"
    if args.dry:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a machine with a GPU
    else:
        env.pop("TRITON_INTERPRET", None)  # the CUDA tests must compile, not interpret
    return env
