"""The main figure of each gpu_check step, read back from what the step wrote in the output
folder (its JSON or pytest's JUnit XML): the number that goes in the run's summary table."""

from __future__ import annotations

import json
import pathlib
import xml.etree.ElementTree as ET


def junit_figure(path: pathlib.Path) -> str | None:
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


def read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main_figure(step: str, out: pathlib.Path) -> str:
    if step in ("copy-bandwidth", "engine"):
        doc = read_json(out / f"{step}.json") or {}
        return doc.get("figure", "")
    if step in ("kernel-tests", "graph-tests"):
        return junit_figure(out / f"{step}.xml") or ""
    if step == "bench-kernels":
        doc = read_json(out / "bench-kernels.json") or {}
        rows = [r for r in doc.get("results", []) if r.get("TBps") and "w4a16" in r["kernel"]]
        if not rows:  # the dry run's interpreter times mean nothing: just what ran
            return f"{len(doc['results'])} cases ran" if doc.get("results") else ""
        best = max(rows, key=lambda r: r["TBps"])
        fig = f"{best['kernel']} {best['shape']} M={best['M']}: {best['TBps']:.2f} TB/s"
        copy = (read_json(out / "copy-bandwidth.json") or {}).get("GBps")
        if copy and not doc.get("dry_run"):
            fig += f" ({100 * best['TBps'] * 1e3 / copy:.0f}% of copy)"
        return fig
    if step == "bench-decode":
        doc = read_json(out / "bench-decode.json") or {}
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
