"""Tensor parallelism (river.parallel): the sharding is exact, bad sizes give clear errors, and
an engine sharded over 2 and 3 gloo ranks on the CPU generates what one rank generates.

The multi-process tests build one sharded engine per world size (module-scoped: ranks are
started once) on a 3-layer random model with 12 query and 6 KV heads; the default model at TP 3
(9 query, 3 KV heads) is in the slow suite, in its own module
(test_parallel_default_model.py): this one's TP engines live as long as the module, and a
process runs one tensor-parallel engine at a time.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import run_modes

from river import Engine, EngineConfig, SamplingParams
from river.config import PROJECTIONS, ModelConfig
from river.errors import ConfigError, InvalidRequestError
from river.exits import ExitConfig
from river.parallel import (
    _cols,
    check_shardable,
    join,
    local_config,
    shard_twins,
    shard_weights,
)
from river.quantize import quantize_w4, quantize_w6
from river.w8 import quantize_w8

PROMPTS = [[1, 2, 3, 4, 5], [100, 200, 300], [7] * 9, [4000, 5000], [12, 13, 14, 15, 16, 17]]
# full, w4, the default river (a static split), the paper's per-token cosine rule at a threshold
# this random model crosses at different layers, and lossless
MODES = {
    "full": ExitConfig("full"),
    "w4": ExitConfig("w4"),
    "river": ExitConfig("river"),
    "cosine": ExitConfig("river", threshold=0.6, min_layer=1),
    "lossless": ExitConfig("lossless"),
}
ENGINE = dict(
    device="cpu",
    dtype=torch.float32,
    river_group_size=32,
    max_num_seqs=8,
    kv_cache_tokens=2048,
    block_size=8,
)


def _cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=200,
        hidden_size=192,
        intermediate_size=384,
        num_layers=2,
        num_heads=12,
        num_kv_heads=6,
        head_dim=16,
    )
    return ModelConfig(**(base | kw))


# ------------------------------------------------------------------------------ sharding math
def _weights(cfg: ModelConfig) -> dict:
    g = torch.Generator().manual_seed(0)
    d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    shapes = {
        "q": (hq * d, cfg.hidden_size),
        "k": (hkv * d, cfg.hidden_size),
        "v": (hkv * d, cfg.hidden_size),
        "o": (cfg.hidden_size, hq * d),
        "gate": (cfg.intermediate_size, cfg.hidden_size),
        "up": (cfg.intermediate_size, cfg.hidden_size),
        "down": (cfg.hidden_size, cfg.intermediate_size),
    }
    layer = {p: torch.randn(*s, generator=g) for p, s in shapes.items()}
    layer |= {"input_norm": torch.ones(cfg.hidden_size), "post_norm": torch.ones(cfg.hidden_size)}
    embed = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g)
    return {"embed": embed, "lm_head": embed, "norm": torch.ones(cfg.hidden_size),
            "layers": [layer]}  # fmt: skip


@pytest.mark.parametrize("world", [2, 3])
def test_shards_reassemble_the_weights(world):
    """Row shards (q, k, v, gate, up, vocabulary) and column shards (o, down) put back together
    give the whole weight; the vocabulary's last shard is zero-padded (200 = 3 x 67 - 1)."""
    cfg = _cfg()
    w = _weights(cfg)
    shards = [shard_weights(w, cfg, r, world) for r in range(world)]
    for p in ("q", "k", "v", "gate", "up"):
        assert torch.equal(torch.cat([s["layers"][0][p] for s in shards]), w["layers"][0][p])
    for p in ("o", "down"):
        assert torch.equal(torch.cat([s["layers"][0][p] for s in shards], 1), w["layers"][0][p])
    embed = torch.cat([s["embed"] for s in shards])
    assert embed.shape[0] == world * local_config(cfg, world).vocab_size
    assert torch.equal(embed[: cfg.vocab_size], w["embed"])
    assert not embed[cfg.vocab_size :].any()
    # rank r's query heads read exactly its KV heads (GQA groups stay whole)
    lc = local_config(cfg, world)
    assert (lc.num_heads, lc.num_kv_heads) == (12 // world, 6 // world)
    assert lc.num_heads // lc.num_kv_heads == cfg.num_heads // cfg.num_kv_heads


@pytest.mark.parametrize("world", [2, 3])
def test_twin_shards_are_slices_of_the_one_rank_twins(world):
    """Each rank's twins dequantize to its slice of the one-rank twins, bit for bit: 4- and
    6-bit column shards fall on group boundaries, 8-bit ones keep the row's scale."""
    cfg = _cfg(num_layers=1)
    w = _weights(cfg)["layers"][0]
    for quantize in (
        lambda t: quantize_w4(t, group_size=32),
        lambda t: quantize_w6(t, group_size=32),
        quantize_w8,
    ):
        q = {f"layers.0.{p}": quantize(w[p]) for p in PROJECTIONS}
        head = quantize_w8(torch.randn(cfg.vocab_size, cfg.hidden_size))
        parts = [shard_twins(q, head, cfg, r, world) for r in range(world)]
        for p in PROJECTIONS:
            full = q[f"layers.0.{p}"].dequantize()
            got = [part[0][f"layers.0.{p}"].dequantize() for part in parts]
            dim = 1 if p in ("o", "down") else 0
            assert torch.equal(torch.cat(got, dim), full), p
        heads = torch.cat([part[1].dequantize() for part in parts])
        assert torch.equal(heads[: cfg.vocab_size], head.dequantize())


@pytest.mark.parametrize("world", [2, 3])
def test_a_rank_loads_only_its_shard(tmp_path, world):
    """load_weights(shard=shard_fn(...)) reads rank r's share tensor by tensor: the same as
    sharding the whole checkpoint after loading it."""
    from helpers import tiny_checkpoint

    from river.checkpoint import load_weights
    from river.parallel import shard_fn

    mc, weights, _ = tiny_checkpoint(tmp_path, layers=2, hidden=96, inter=192, heads=6,
                                     kv_heads=6, vocab=200)  # fmt: skip
    for rank in range(world):
        got = load_weights(tmp_path, mc, shard=shard_fn(mc, rank, world))
        want = shard_weights(weights, mc, rank, world)
        assert got.keys() == want.keys()
        for k in ("embed", "lm_head", "norm"):
            assert torch.equal(got[k], want[k]), k
        for a, b in zip(got["layers"], want["layers"]):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert got["layers"][0]["o"].shape == (96, 96 // world)


def test_a_group_never_straddles_two_ranks():
    w = quantize_w4(torch.randn(8, 128), group_size=64)
    with pytest.raises(ConfigError, match="straddle"):
        _cols(w, 32, 96)
    with pytest.raises(ConfigError, match="river_group_size=64"):
        check_shardable(_cfg(), 2, group_size=64)  # o's shard: 6 heads x 16 = 96 columns
    check_shardable(_cfg(), 2, group_size=32)
    check_shardable(_cfg(), 3, group_size=32)


@pytest.mark.parametrize(
    "world, match",
    [
        (4, "does not divide the model's 6 KV heads"),
        (0, "positive integer"),
        (-2, "positive integer"),
        (2.0, "positive integer"),
        (True, "positive integer"),
    ],
)
def test_bad_tensor_parallel_size_is_a_clear_error(world, match):
    with pytest.raises(ConfigError, match=match):
        check_shardable(_cfg(), world)


def test_mlp_width_must_divide():
    with pytest.raises(ConfigError, match="MLP width 385"):
        check_shardable(_cfg(intermediate_size=385), 2)


@pytest.mark.parametrize("value", [0, -1, 1.5, "2"])
def test_engine_config_refuses_a_bad_size(value):
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=value)


def test_torchrun_world_must_match(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="torchrun started 3 processes"):
        join(2, "cpu")


# ------------------------------------------------------------------------------ the engine
def _tiny_tp_model(path, src_dir):
    """3 layers, 12 query / 6 KV heads, hidden 192: divisible by TP 2 and 3 with 32-wide
    groups; the default model's tokenizer, one vocabulary row short (49151 rows: neither 2 nor
    3 divides it, so the last vocabulary shard is padded), an untied LM head; weights ~ N(0, 0.1)
    so that layers move the residual and exits happen at different depths."""
    from helpers import tiny_text_model

    return tiny_text_model(
        path, src_dir, hidden=192, inter=384, layers=3, heads=12, kv_heads=6, vocab_delta=1,
        tie=False, init_std=0.1,
    )  # fmt: skip


def test_engine_refuses_a_size_before_starting_ranks(tp_dir):
    with pytest.raises(ConfigError, match="tensor_parallel_size=4 does not divide"):
        Engine(str(tp_dir), tensor_parallel_size=4, **ENGINE)


@pytest.fixture(scope="module")
def tp_dir(tmp_path_factory, default_model_dir):
    return _tiny_tp_model(tmp_path_factory.mktemp("tiny_tp"), default_model_dir)


@pytest.fixture(scope="module")
def one_rank(tp_dir):
    engine = Engine(str(tp_dir), **ENGINE)
    return engine, run_modes(engine, MODES, PROMPTS)


@pytest.fixture(scope="module", params=[2, 3], ids=["tp2", "tp3"])
def sharded(request, tp_dir, one_rank):
    engine = Engine(str(tp_dir), tensor_parallel_size=request.param, **ENGINE)
    engine.runner.record_exits()
    engine.model.trace_residual()
    try:
        yield engine, run_modes(engine, MODES, PROMPTS)
    finally:
        engine.close()


def test_sharded_greedy_output_equals_one_rank(one_rank, sharded):
    """full, w4, river (default and the cosine rule) and lossless: the same tokens and the same
    backbone layers per token as one rank, over 5 prompts x 32 tokens."""
    _, ref = one_rank
    engine, got = sharded
    assert engine.tp.world == engine.tensor_parallel_size
    for mode in MODES:
        assert got[mode][0] == ref[mode][0], mode
        assert got[mode][1] == ref[mode][1], mode
    # the cosine rule really decided per token here (not a fixed split)
    depths = {d for row in ref["cosine"][1] for d in row[1:]}
    assert len(depths) > 1, depths


def test_every_rank_makes_the_same_exit_decisions(sharded):
    """The residual stream the exit rule reads is the same bits on every rank after every
    layer of every decode step, and so is every row's number of backbone layers."""
    engine, _ = sharded
    logs = engine.tp.collect("runner", "exit_log")
    assert len(logs) == engine.tp.world and len(logs[0]) > 0
    assert all(log == logs[0] for log in logs[1:])
    traces = engine.tp.collect("model", "trace")
    assert len(traces[0]) > 0
    for other in traces[1:]:
        assert len(other) == len(traces[0])
        assert all(torch.equal(a, b) for a, b in zip(traces[0], other))


def test_sharded_logits_match_one_rank(one_rank, sharded):
    """Teacher-forced log-probabilities (prefill and decode, backbone and twins) within fp32
    rounding of one rank's: the sharded sums only add in another order."""
    ref, _ = one_rank
    engine, _ = sharded
    for exit_cfg in (MODES["full"], MODES["cosine"], MODES["w4"]):
        a = ref.score([1, 2, 3, 4], [5, 6, 7, 8, 9, 10], exit=exit_cfg)
        b = engine.score([1, 2, 3, 4], [5, 6, 7, 8, 9, 10], exit=exit_cfg)
        torch.testing.assert_close(
            torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=1e-5, atol=1e-4
        )
        assert b.top1_ids == a.top1_ids and b.backbone_layers == a.backbone_layers


def test_sharded_engine_stays_usable_after_bad_input(sharded):
    engine, got = sharded
    with pytest.raises(InvalidRequestError):
        engine.generate([[10**9]], SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequestError):
        engine.generate([""], SamplingParams(max_tokens=4))
    out = run_modes(engine, {"full": MODES["full"]}, PROMPTS[:2])
    assert out["full"][0] == got["full"][0][:2]


@pytest.mark.slow
def test_torchrun_generate(tp_dir):
    """`torchrun --nproc-per-node 2 -m river generate --tp 2` prints rank 0's output once, the
    same as one process."""
    args = ["-m", "river", "generate", "--model", str(tp_dir), "--dtype", "float32",
            "--max-tokens", "12", "--temperature", "0", "--ignore-eos", "hello world"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    two = subprocess.run([*run, *args, "--tp", "2"], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and one.stdout.startswith("hello world")


def test_one_sharded_engine_per_process(tp_dir, sharded):
    engine, _ = sharded
    with pytest.raises(ConfigError, match="already runs a tensor-parallel engine"):
        Engine(str(tp_dir), tensor_parallel_size=2, **ENGINE)
    assert engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0))[0].token_ids


def test_sharded_engine_switches_twin_precision(one_rank, sharded):
    """set_river_precision between requests re-slices the new twins on every rank: w4 twins
    give one rank's w4 tokens (then both engines go back to the default precision)."""
    ref, _ = one_rank
    engine, _ = sharded
    default = engine.config.river_precision
    try:
        for e in (ref, engine):
            e.set_river_precision("w4")
        modes = {"w4": MODES["w4"], "river": MODES["river"]}
        assert run_modes(engine, modes, PROMPTS[:3], 16) == run_modes(ref, modes, PROMPTS[:3], 16)
        assert engine.river_head_bits == 16 and engine.model.river_head is None
    finally:
        for e in (ref, engine):
            e.set_river_precision(default)
