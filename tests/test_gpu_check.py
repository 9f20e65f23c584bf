"""benchmarks/gpu_check.py (`make gpu-check`): its arguments, the plan of each step in --dry and
GPU mode, the checkout import hook, and one cheap step run for real. The whole dry run
(`make gpu-check-dry`, ~1-3 min) is not part of the suite."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_check  # noqa: E402
from checkout import run_script  # noqa: E402
from gpu_figures import junit_figure  # noqa: E402
from gpu_steps import compare_greedy, greedy_figure  # noqa: E402

NO_MODEL = (None, "no default model here")


def _run(*args, cwd=ROOT):
    return run_script(SCRIPT, *args, cwd=cwd)


def test_help_lists_every_step():
    res = _run("--help")
    assert res.returncode == 0, res.stderr
    for word in (*gpu_check.STEP_NAMES, "--dry", "--out", "--gguf", "--steps", "summary.json"):
        assert word in res.stdout, f"--help does not mention {word}"


def test_budget_is_seven_minutes():
    assert sum(s.gpu_limit_s for s in gpu_check.STEPS) <= gpu_check.GPU_BUDGET_S <= 420


@pytest.mark.parametrize(
    "argv, error",
    [
        (["--steps", "kernel-tests,nope"], "unknown or no step"),
        (["--steps", ","], "unknown or no step"),
        (["--timeout", "engine"], "STEP=SECONDS"),
        (["--timeout", "nope=3"], "STEP=SECONDS"),
        (["--timeout", "engine=-1"], "STEP=SECONDS"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(argv, error, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(argv)
    assert e.value.code == 2
    assert error in capsys.readouterr().err


def test_steps_run_in_the_documented_order_with_their_limits():
    args = gpu_check.parse_args(["--dry", "--steps", "bench-decode,copy-bandwidth"])
    assert args.steps == ["copy-bandwidth", "bench-decode"]
    assert args.limits["bench-decode"] == next(
        s.dry_limit_s for s in gpu_check.STEPS if s.name == "bench-decode"
    )
    args = gpu_check.parse_args(["--timeout", "engine=12.5"])
    assert args.limits["engine"] == 12.5 and not args.dry


def test_dry_plan_is_the_cpu_equivalent(tmp_path):
    args = gpu_check.parse_args(["--dry"])
    env = gpu_check.step_env(args)
    assert env["TRITON_INTERPRET"] == "1" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert str(ROOT) == env["PYTHONPATH"].split(":")[0]
    plan = {s: gpu_check.step_command(s, args, tmp_path, NO_MODEL) for s in args.steps}
    kernel = plan["kernel-tests"]
    assert kernel[:3] == ["-m", "pytest", "tests/test_kernels.py"]
    assert "-k" in kernel and "not cpu_only" in kernel and "-n" not in kernel
    assert f"--junitxml={tmp_path / 'kernel-tests.xml'}" in kernel
    assert {"tests/test_graphs.py", "tests/test_exits.py"} <= set(plan["graph-tests"])
    assert "--dry-run" in plan["bench-kernels"] and "--sweep" not in plan["bench-kernels"]
    decode = plan["bench-decode"]
    assert decode[decode.index("--device") + 1] == "cpu" and "--tiny" in decode
    assert "--dry" in plan["engine"] and "--model-dir" not in plan["engine"]


def test_gpu_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = gpu_check.parse_args([])
    assert "TRITON_INTERPRET" not in gpu_check.step_env(args)  # CUDA tests must compile
    model = (tmp_path / "model", "converted copy")
    plan = {s: gpu_check.step_command(s, args, tmp_path, model) for s in args.steps}
    assert "-k" not in plan["kernel-tests"] and "not cpu_only" in plan["kernel-tests"]
    assert "--dry-run" not in plan["bench-kernels"] and "--sweep" not in plan["bench-kernels"]
    decode = plan["bench-decode"]
    assert decode[decode.index("--models") + 1] == "default,8b"
    assert decode[decode.index("--model") + 1] == str(tmp_path / "model")
    engine = plan["engine"]
    assert engine[engine.index("--model-dir") + 1] == str(tmp_path / "model")
    no_model = gpu_check.step_command("bench-decode", args, tmp_path, NO_MODEL)
    assert no_model[no_model.index("--models") + 1] == "8b" and "--model" not in no_model


def test_device_slug():
    assert gpu_check.device_slug("NVIDIA H200", dry=False) == "h200"
    assert gpu_check.device_slug("NVIDIA GeForce RTX 4090", dry=False) == "nvidia-geforce-rtx-4090"
    assert gpu_check.device_slug("anything", dry=True) == "cpu-dry"


def test_exec_imports_this_checkout(tmp_path):
    """Steps run through --exec: `river` and `river.kernels` come from this checkout, whatever
    the working directory or an install elsewhere."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys, river, river.kernels\n"
        "print(river.__file__)\nprint(river.kernels.__file__)\nprint(sys.argv[1:])\n"
    )
    res = _run("--exec", str(probe), "a", "b", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == str(ROOT / "river" / "__init__.py")
    assert lines[1] == str(ROOT / "kernels" / "__init__.py")
    assert lines[2] == "['a', 'b']"


def test_junit_figure(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite tests="7" failures="1" errors="1" skipped="2"/></testsuites>'
    )
    assert junit_figure(xml) == "3 passed, 2 skipped, 2 failed"
    assert junit_figure(tmp_path / "missing.xml") is None


def test_one_cheap_step_for_real(tmp_path):
    """The dry copy-bandwidth step end to end: its figure, the summary JSON; then the same step
    past its time limit is recorded as TIMEOUT and the run exits 1."""
    out = tmp_path / "out"
    res = _run("--dry", "--steps", "copy-bandwidth", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((out / "summary.json").read_text())
    (step,) = summary["steps"]
    assert step["step"] == "copy-bandwidth" and step["status"] == "ok", step
    assert step["figure"].endswith("GB/s (64 MiB, read + write)")
    assert json.loads((out / "copy-bandwidth.json").read_text())["GBps"] > 0
    for key in ("device", "torch", "triton", "commit", "command", "dry_run"):
        assert key in summary, key
    assert summary["dry_run"] is True and summary["failed"] == []
    assert "copy-bandwidth  ok" in res.stdout  # the table

    res = _run("--dry", "--steps", "copy-bandwidth", "--out", str(out),
               "--timeout", "copy-bandwidth=0.2")  # fmt: skip
    assert res.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"][0]["status"] == "TIMEOUT" and summary["failed"] == ["copy-bandwidth"]
    assert summary["steps"][0]["figure"] == ""  # not the previous run's figure


class _FakeReference:
    """ref.score stand-in: log-probs from a table keyed on the scored continuation's last id."""

    def __init__(self, logprob):
        self.logprob = logprob

    def score(self, prompt_ids, cont):
        class Out:
            logprobs = [0.0] * (len(cont) - 1) + [self.logprob[cont[-1]]]

        return Out()


def test_engine_comparison_accepts_only_near_ties():
    ref = _FakeReference({7: -0.50, 8: -0.55, 9: -3.0})
    prompts, ids = ["a", "b", "c"], [[1], [1], [1]]
    want = [[5, 6, 7], [5, 7, 4], [7, 7]]
    rows, ok = compare_greedy(ref, prompts, ids, want, [[5, 6, 7], [5, 8, 4], [7, 7]],
                                        tie_nats=0.15)  # fmt: skip
    assert ok and "first_difference" not in rows[0]
    assert rows[1]["first_difference"] == 1 and rows[1]["gap_nats"] == pytest.approx(0.05)
    assert greedy_figure(rows, ok, 3).startswith("2/3 prompts equal over 3 tokens")
    rows, ok = compare_greedy(ref, prompts, ids, want, [[5, 6, 7], [5, 9, 4], [7, 7]],
                                        tie_nats=0.15)  # fmt: skip
    assert not ok and rows[1]["gap_nats"] == pytest.approx(2.5)
    rows, ok = compare_greedy(ref, prompts, ids, want, [[5, 6, 7], [5, 7, 4], [7]],
                                        tie_nats=0.15)  # fmt: skip
    assert not ok and rows[2]["gap_nats"] is None  # a shorter output is never a tie


def test_budget_argument(capsys):
    assert gpu_check.parse_args([]).budget == gpu_check.GPU_BUDGET_S
    assert gpu_check.parse_args(["--dry"]).budget == gpu_check.DRY_BUDGET_S
    assert gpu_check.parse_args(["--budget", "90"]).budget == 90
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--budget", "0"])
    assert "--budget must be positive" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine with no GPU")
def test_gpu_mode_without_a_gpu_exits_2(tmp_path):
    res = _run("--out", str(tmp_path))
    assert res.returncode == 2
    assert "no CUDA device" in res.stderr and "gpu-check-dry" in res.stderr
    assert not (tmp_path / "summary.json").exists()
