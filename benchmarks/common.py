"""Shared helpers for the benchmark scripts: run metadata and result files.

torch is imported inside the functions that need it, so that gpu_check.py, which must start
without it, can use the git and path helpers too.
"""

from __future__ import annotations

import json
import pathlib
import platform
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# the GPUs a result file is named after when their name contains one of these
GPU_KEYS = ("h100", "h200", "a100", "l40", "a40")


def gpu_key(name: str) -> str | None:
    low = name.lower()
    return next((key for key in GPU_KEYS if key in low), None)


def pick_device(device: str | None) -> str:
    """The --device flag's value, or cuda when there is one, else cpu."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def device_slug(device: str) -> str:
    if not str(device).startswith("cuda"):
        return "cpu"
    name = device_name(device)
    return gpu_key(name) or name.lower().replace(" ", "-")


def git_commit(unknown: str | None = "unknown", mark_dirty: bool = True) -> str | None:
    """HEAD's sha (+ "-dirty" when tracked files changed and mark_dirty), else `unknown`."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        if not mark_dirty:
            return sha
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return unknown


def command_line() -> str:
    return " ".join([pathlib.Path(sys.argv[0]).name] + sys.argv[1:])


def run_metadata(device: str) -> dict:
    import torch
    import triton

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "command": command_line(),
    }


def result_path(given: str | None, name: str) -> pathlib.Path:
    """--out's path, else benchmarks/results/<name>."""
    return pathlib.Path(given) if given else RESULTS / name


def plot_path(given: str | None, out: pathlib.Path) -> pathlib.Path:
    """--plot's path, else the PNG beside the JSON."""
    return pathlib.Path(given) if given else out.with_suffix(".png")


def write_json(path: pathlib.Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
