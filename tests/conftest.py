"""Shared fixtures: deterministic seeds, and the default model converted once per session."""

from __future__ import annotations

import os
import pathlib
import random

import numpy as np

# Triton reads TRITON_INTERPRET when a kernel is decorated (at import), so it must be set before
# any test module imports river.kernels: on a machine without CUDA every kernel test runs in the
# interpreter.
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# As the engine does (river.cpu): never more torch threads than idle cores, so a suite that
# shares the machine with another job does not spin-wait its way to 10x slower.
from river.cpu import configure_threads  # noqa: E402

configure_threads()


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _river_home(tmp_path_factory):
    """Point RIVER_HOME at a per-session temp dir unless the caller (CI) set it to a cache."""
    if os.environ.get("RIVER_HOME"):
        yield pathlib.Path(os.environ["RIVER_HOME"])
        return
    home = tmp_path_factory.mktemp("river_home")
    os.environ["RIVER_HOME"] = str(home)
    try:
        yield home
    finally:
        os.environ.pop("RIVER_HOME", None)


@pytest.fixture(scope="session")
def default_model_dir(_river_home) -> pathlib.Path:
    """The default SmolLM2 model as an HF directory (converted from the GGUF at most once)."""
    from river.model_cache import default_model_path

    return default_model_path(progress=False)


@pytest.fixture(scope="session")
def default_gguf() -> pathlib.Path:
    from river.model_cache import default_gguf_path

    return default_gguf_path()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, default_model_dir) -> pathlib.Path:
    """A 2-layer random Llama with the default model's vocabulary and tokenizer: an engine on it
    runs in milliseconds per step, with real text in and out."""
    from helpers import tiny_text_model

    return tiny_text_model(
        tmp_path_factory.mktemp("tiny"), default_model_dir,
        hidden=64, inter=128, layers=2, heads=4, kv_heads=2,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """An engine on the tiny model with a small KV pool (one per test module)."""
    from river import Engine, EngineConfig

    return Engine(
        str(tiny_dir), EngineConfig(device="cpu", block_size=8, num_blocks=64, max_num_seqs=8)
    )
