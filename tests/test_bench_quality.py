"""The quality benchmark's bookkeeping: default choice, replot from a results file."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_quality")


def _rows():
    row = lambda mode, thr, ml, ppl, agree, layers: {  # noqa: E731
        "mode": mode,
        "threshold": thr,
        "min_layer": ml,
        "ppl": ppl,
        "top1_agree": agree,
        "backbone_layers": layers,
        "pass_at_1": None,
    }
    return [
        row("full", None, None, 3.0, 1.0, 30.0),
        row("w4", None, None, 3.2, 0.91, 0.0),
        row("river", 0.95, 4, 3.15, 0.92, 4.3),
        row("river", 0.96, 4, 3.14, 0.925, 5.0),
        row("river", 0.97, 4, 3.12, 0.93, 9.1),  # better, but over the layer budget
        row("propagate", 0.96, 4, 6e7, 0.04, 4.8),
        row("mask", 0.96, 4, 6e7, 0.04, 4.7),
    ]


def test_default_is_best_agreement_within_the_layer_budget():
    rows = _rows()
    best = bench.choose_default(rows, max_layers=6.0)
    assert (best["threshold"], best["min_layer"]) == (0.96, 4)
    assert bench.choose_default(rows, max_layers=10.0)["threshold"] == 0.97
    assert bench.choose_default(rows, max_layers=1.0) is None


def test_replot_reads_the_results_file(tmp_path, capsys):
    out = tmp_path / "quality-x.json"
    out.write_text(json.dumps({"num_layers": 30, "results": _rows()}))
    bench.main(["--replot", "--out", str(out)])
    png = tmp_path / "quality-x.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| river | 0.96 | 4 | 3.140 | 0.925 | 5.00 |" in table
