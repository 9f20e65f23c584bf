"""Every Triton kernel variant the engine launches compiles for Hopper (sm_90), with no GPU.

benchmarks/compile_sm90.py does the compiling, in a subprocess: this test session runs kernels
in the interpreter (conftest.py sets TRITON_INTERPRET=1 before any kernel module is imported)
and that choice is made once per process, so real compilation needs a process of its own. The
script installs a stand-in triton driver that reports an sm_90 target and turns each launcher's
`kernel[grid](...)` into a warm-up (compile, no launch); its docstring says how.

`pytest -s tests/test_compile_sm90.py` prints the table (variant, shapes, registers, spills);
RIVER_COMPILE_REPORT=path also keeps the JSON report there.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

triton = pytest.importorskip("triton")

# Minutes of real work: `make test-slow` (CI runs it) rather than the quick `make test`.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compile_sm90.py"
sys.path.insert(0, str(SCRIPT.parent))

from checkout import run_script  # noqa: E402

MODELS = ("smollm2-135m", "llama-3.1-8b")
BATCHES = (1, 8, 32, 64)
# every op the engine launches on CUDA, per model and decode batch
OPS = (
    "rms_norm",
    "rms_norm+residual",
    "linear bf16",
    "linear w4",
    "linear w6",
    "linear w8",
    "gate_up_silu bf16",
    "gate_up_silu w4",
    "gate_up_silu w6",
    "gate_up_silu w8",
    "qkv_rope_store bf16",
    "qkv_rope_store w4",
    "qkv_rope_store w6",
    "qkv_rope_store w8",
    "paged_decode_attention",
    "prefill_attention",
    "sample",
)
# what an sm_90 block may use (CUDA occupancy tables, compute capability 9.0)
MAX_REGS, BLOCK_REGS, MAX_SMEM = 255, 65536, 232448
TIMEOUT_S = 600  # a cold run takes ~45-70 s on 2 cores; this only catches a hang


def _ptxas_missing() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(90).path
    except Exception as e:  # no CUDA backend in this triton build, or no ptxas
        return f"triton {triton.__version__} has no ptxas for sm_90: {type(e).__name__}: {e}"
    return None if os.path.exists(path) else f"ptxas not found at {path}"


def _run(*args, env=None):
    return run_script(SCRIPT, *args, env=env, timeout=TIMEOUT_S)


def test_help():
    res = _run("--help")
    assert res.returncode == 0, res.stderr
    for word in ("sm_90", "RIVER_COMPILE_REPORT", "--models", "--batches", "--json", "--jobs"):
        assert word in res.stdout, f"--help does not mention {word}"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One run of the script over the whole matrix: (process result, JSON report)."""
    missing = _ptxas_missing()
    if missing:
        pytest.skip(missing)
    tmp = tmp_path_factory.mktemp("compile_sm90")
    path = pathlib.Path(os.environ.get("RIVER_COMPILE_REPORT") or tmp / "report.json")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")  # this session's compiles only
    res = _run("--json", str(path), env=env)
    print(res.stdout)  # the table, shown with -s
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-20000:])
    assert path.exists(), f"no report written (exit {res.returncode}):\n{res.stderr[-4000:]}"
    return res, json.loads(path.read_text())


def test_every_launch_compiles(report):
    res, doc = report
    failed = [f"{r['op']} {r['model']} b{r['batch']}: {r['error']}" for r in doc["launches"]
              if r["status"] != "ok"]  # fmt: skip
    assert not failed, "compile errors for sm_90:\n" + "\n".join(failed)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert doc["target"] == "cuda sm_90"


def test_matrix_is_covered(report):
    _, doc = report
    seen = {(r["op"], r["model"], r["batch"]) for r in doc["launches"] if r["status"] == "ok"}
    missing = [
        f"{op} {model} b{b}"
        for op in OPS
        for model in MODELS
        for b in BATCHES
        if (op, model, b) not in seen
    ]
    assert not missing, "launches not compiled: " + ", ".join(missing)
    # the W4 and bf16 QKV kernels both with and without the row mask
    for fmt in ("bf16", "w4", "w6"):
        masks = {
            v["constexprs"]["HAS_ROW_MASK"]
            for v in doc["variants"]
            if f"qkv_rope_store {fmt}" in v["ops"]
        }
        assert masks == {True, False}, f"qkv_rope_store {fmt}: HAS_ROW_MASK took only {masks}"


def test_every_group_size_compiles(report):
    """The packed twins at river_group_size 32, 64 and 128 (the GEMV's K step follows the
    group, so each is its own variant), 4- and 6-bit."""
    _, doc = report
    for op in ("linear w4", "linear w6", "gate_up_silu w6", "qkv_rope_store w6"):
        groups = {v["constexprs"]["GROUP"] for v in doc["variants"] if op in v["ops"]}
        assert groups == {32, 64, 128}, f"{op}: GROUP took only {sorted(groups)}"


def test_split_variants_are_the_launchers(report):
    """The split-K paths (partials + last-arriving merge) are among what compiled: the
    launchers pick several split counts across these shapes, and both projection paths."""
    _, doc = report
    by_op: dict[str, list[dict]] = {}
    for v in doc["variants"]:
        for op in v["ops"]:
            by_op.setdefault(op, []).append(v["constexprs"])
    splits = {c["NUM_SPLITS"] for c in by_op["paged_decode_attention"]}
    assert 1 in splits and len(splits) >= 3, f"decode attention split counts: {sorted(splits)}"
    for op in ("linear bf16", "linear w4", "linear w6", "gate_up_silu w4", "qkv_rope_store w4"):
        block_m = {c["BLOCK_M"] for c in by_op[op]}
        split_k = {c["SPLIT_K"] for c in by_op[op]}
        assert 1 in block_m and max(block_m) > 1, f"{op}: BLOCK_M took only {block_m}"
        assert max(split_k) > 1, f"{op}: no split-K variant compiled ({split_k})"


def test_kernels_fit_hopper(report):
    """Registers and shared memory of every compiled kernel fit an sm_90 block (what triton's
    loader checks before a launch); spills are reported, not failed."""
    _, doc = report
    too_big = []
    for v in doc["variants"]:
        regs, threads = v["regs"], 32 * v["num_warps"]
        assert regs is not None, f"no ptxas report for {v['ops']} {v['variant']}"
        if regs > MAX_REGS or regs * threads > BLOCK_REGS or v["shared"] > MAX_SMEM:
            too_big.append(f"{v['ops']} {v['variant']}: {regs} regs x {threads}, {v['shared']} B")
    assert not too_big, "kernels that would not load on an H100/H200:\n" + "\n".join(too_big)
    spilling = [f"{v['ops']} {v['variant']}: {v['spill_stores']} B" for v in doc["variants"]
                if v["spill_stores"]]  # fmt: skip
    if spilling:
        print("register spills (stores):\n  " + "\n  ".join(spilling))
