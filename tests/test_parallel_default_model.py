"""The default model (9 query, 3 KV heads) at tensor-parallel size 3 on CPU gloo ranks gives one
rank's output. Its own module: test_parallel.py keeps its sharded engines alive for the whole
module, and a process runs one tensor-parallel engine at a time, so this test must not share a
module with them (run together, `pytest tests/test_parallel.py` used to fail here)."""

from __future__ import annotations

import pytest
import torch
from helpers import run_modes

from river import Engine
from river.exits import ExitConfig


@pytest.mark.slow
def test_default_model_tp3_equals_one_rank(default_model_dir):
    """fp32: full, w4, river and lossless give one rank's tokens and backbone layers over 5
    prompts x 32 tokens; every rank decides the same exits."""
    prompts = ["def fib(n):", "The capital of France is", "import numpy as np\n",
               "Once upon a time", "SELECT name FROM"]  # fmt: skip
    modes = {m: ExitConfig(m) for m in ("full", "w4", "river", "lossless")}
    # 4-bit twins: the mixed precision's sensitivity pass would cost ~100 s here, and the 8-bit
    # shards are covered on the small model of test_parallel.py
    kw = dict(device="cpu", dtype=torch.float32, max_num_seqs=8, kv_cache_tokens=4096,
              river_precision="w4")  # fmt: skip
    ref = run_modes(Engine(str(default_model_dir), **kw), modes, prompts)
    with Engine(str(default_model_dir), tensor_parallel_size=3, **kw) as engine:
        engine.runner.record_exits()
        got = run_modes(engine, modes, prompts)
        logs = engine.tp.collect("runner", "exit_log")
    for mode in modes:
        assert got[mode] == ref[mode], mode
    assert logs[1] == logs[0] and logs[2] == logs[0]
