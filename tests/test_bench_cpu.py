"""bench_cpu.py's table: each river row against river full, repeat by repeat."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_cpu")


def test_x_full_pairs_each_repeat_with_its_full_repeat(capsys):
    full = {"name": "river full (compiled)", "batch": 1, "tok_s": [40.0, 20.0, 30.0],
            "backbone_layers": 30}  # fmt: skip
    river = {"name": "river river (compiled)", "batch": 1, "tok_s": [60.0, 40.0, 45.0],
             "backbone_layers": 1}  # fmt: skip
    eager = {"name": "river river", "batch": 1, "tok_s": [10.0, 10.0, 10.0], "backbone_layers": 1}
    hf = {"name": "HF transformers eager float32", "batch": 1, "tok_s": [20.0, 21.0, 22.0]}
    text = bench.print_table([full, river, eager, hf])
    # pairs: 1.5, 2.0, 1.5 -> median 1.5 (the ratio of the medians, 45 / 30, is also 1.5, but
    # the spread shows the pairs: 1.50-2.00)
    assert river["x_full"] == [1.5, 2.0, 1.5]
    assert "| river river (compiled) | 1 | 45.0 (40.0-60.0) | 1.50x (1.50-2.00) | 1.00 |" in text
    assert full["x_full"] == [1.0, 1.0, 1.0]
    assert "x_full" not in eager  # no eager full row to pair with
    assert "x_full" not in hf  # timed apart from the river rows: no pairing
    assert "| HF transformers eager float32 | 1 | 21.0 (20.0-22.0) |  |  |" in text


def test_a_crashing_llama_cpp_costs_only_its_row(monkeypatch, capsys):
    """llama.cpp runs in a child process: one that dies (here of SIGILL, as a build with
    instructions the VM forbids did) gives no row instead of ending the benchmark."""
    import importlib.util
    import subprocess
    from types import SimpleNamespace

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    died = subprocess.CompletedProcess([], -4, "", "")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: died)
    args = SimpleNamespace(tokens=8, repeats=1)
    assert bench.time_llama_cpp("m.gguf", 2, args) is None
    assert "signal 4" in capsys.readouterr().err
    ok = subprocess.CompletedProcess([], 0, '{"tok_s": [100.0], "version": "0.3"}\n', "")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: ok)
    assert bench.time_llama_cpp("m.gguf", 2, args) == {"tok_s": [100.0], "version": "0.3"}
