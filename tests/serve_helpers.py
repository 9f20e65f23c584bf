"""Shared by the `river serve` tests (test_server.py, test_server_lifecycle.py): the engine
settings the servers run with, the reference engine that is the oracle of every greedy output,
request helpers, and a strict reader of the Prometheus text of /metrics."""

from __future__ import annotations

import re
import time

import httpx
import torch

from river import Engine, EngineConfig, ExitConfig, SamplingParams

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# The exact fp32 oracle path: served text must equal Engine.generate's token for token, and bf16
# rounding depends on the batch a row shares (a near-tie of the random tiny model can flip).
ENGINE = EngineConfig(
    device="cpu", block_size=8, num_blocks=512, max_num_seqs=64, dtype=torch.float32,
    ops="reference",
)  # fmt: skip
# On the 2-layer tiny model a river row may exit after layer 1; 0.5 is far from the cosines it
# sees, so the exit decision cannot flip with batch composition.
RIVER = {"mode": "river", "threshold": 0.5, "min_layer": 1}
EXITS = {
    "full": (None, ExitConfig("full")),
    "w4": ("w4", ExitConfig("w4")),
    "river": (RIVER, ExitConfig("river", 0.5, 1)),
    "lossless": (
        {"mode": "lossless", "threshold": 0.5, "min_layer": 1, "draft_len": 3},
        ExitConfig("lossless", 0.5, 1, draft_len=3),
    ),
}


def reference_engine(tiny_dir) -> Engine:
    engine = Engine(str(tiny_dir), ENGINE)
    engine.ensure_river(progress=False)  # also writes the twins' cache the servers then load
    return engine


def greedy(max_tokens, exit="full", **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, exit=EXITS[exit][1], **kw)


def extra(exit="full", **kw):
    body = dict(kw)
    if EXITS[exit][0] is not None:
        body["exit"] = EXITS[exit][0]
    return body


_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
_SAMPLE = re.compile(
    rf"^({_NAME})(?:\{{({_LABEL}(?:,{_LABEL})*)\}})? "
    r"([-+]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|Inf)|NaN)$"
)
_TYPE = re.compile(rf"^# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)$")
_HELP = re.compile(rf"^# HELP ({_NAME}) .*$")


def parse_metrics(text: str) -> dict:
    """Strict Prometheus text format: {(name, ((label, value), ...)): float}. Every sample must
    belong to a family whose TYPE came before it."""
    assert text.endswith("\n")
    types, out = {}, {}
    for line in text.splitlines():
        if m := _TYPE.match(line):
            assert m[1] not in types, f"family declared twice: {line}"
            types[m[1]] = m[2]
            continue
        if _HELP.match(line):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        name, labels, value = m[1], m[2], m[3]
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample before its TYPE: {line}"
        if types[family] == "counter":
            assert name.endswith("_total"), f"counter without _total: {name}"
        pairs = tuple(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or ""))
        assert (name, pairs) not in out, f"duplicate sample {line}"
        out[(name, pairs)] = float(value)
    return out


def metrics(server) -> dict:
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse_metrics(r.text)


def metric(m, name, **labels) -> float:
    return m[(name, tuple(labels.items()))]


def wait_idle(server, timeout=10.0) -> dict:
    """Metrics once nothing runs, waits or holds a KV block (aborts land between steps)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        idle = (
            metric(m, "river_requests_running") == 0
            and metric(m, "river_requests_waiting") == 0
            and metric(m, "river_kv_blocks_used") == 0
        )
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.02)
