"""Shared helpers for the benchmark scripts: run metadata and result files."""

from __future__ import annotations

import json
import pathlib
import platform
import subprocess
import sys

import torch

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def device_slug(device: str) -> str:
    name = device_name(device).lower()
    if str(device).startswith("cuda"):
        for key in ("h100", "h200", "a100", "l40", "a40"):
            if key in name:
                return key
        return name.replace(" ", "-")
    return "cpu"


def git_commit() -> str:
    try:
        root = pathlib.Path(__file__).resolve().parent.parent
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_metadata(device: str) -> dict:
    import triton

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "command": " ".join([pathlib.Path(sys.argv[0]).name] + sys.argv[1:]),
    }


def write_json(path: pathlib.Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
