"""The compiled CPU decode step (Engine(torch_compile=True), river.graphs.CompiledStep): which
batches it takes, and that it gives the eager step's tokens.

Compiling costs seconds per variant even on the tiny model, so the engine tests are in the slow
suite; the host facts that decide which batches compile are checked in the quick one.
"""

import pytest
import torch

from river import Engine, EngineConfig, ExitConfig, SamplingParams
from river.errors import ConfigError
from river.exits import ExitParams
from river.graphs import compilable, cpp_compiler, step_flags

# inductor's CPU code is C++: without a compiler the engine refuses torch_compile (tested below)
needs_cxx = pytest.mark.skipif(cpp_compiler() is None, reason="no C++ compiler for inductor")


def flags(*configs):
    return step_flags(ExitParams.build(list(configs), "cpu"))


def test_host_layer_facts():
    """backbone_until / river_from bound the layers each weight set can run in."""
    full, w4 = ExitConfig("full"), ExitConfig("w4")
    static3 = ExitConfig("river", -1.0, 3)
    cosine = ExitConfig("river", 0.9, 2)
    f = flags(static3)
    assert (f["backbone_until"], f["river_from"]) == (3, 3)
    f = flags(static3, w4)
    assert (f["backbone_until"], f["river_from"]) == (3, 0)
    f = flags(cosine)
    assert (f["backbone_until"], f["river_from"]) == (None, 2)
    f = flags(ExitConfig("river", -1.0, 0))  # min_layer 0 still runs layer 0 in the backbone
    assert (f["backbone_until"], f["river_from"]) == (1, 1)
    f = flags(full, ExitConfig("propagate"))
    assert f["river_from"] is None and f["backbone_until"] is None
    # the compiled step takes the batches whose host facts fix each layer's weight sets
    assert compilable(flags(full)) and compilable(flags(w4)) and compilable(flags(full, w4))
    assert compilable(flags(static3)) and compilable(flags(static3, w4))
    assert not compilable(flags(cosine)) and not compilable(flags(ExitConfig("mask")))
    assert not compilable(flags(full, static3))  # a full row never exits: no fixed split


def test_config_errors(tiny_dir):
    with pytest.raises(ConfigError, match="tensor parallelism"):
        EngineConfig(torch_compile=True, tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="'cpu' op set"):
        EngineConfig(torch_compile=True, ops="reference")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            Engine(str(tiny_dir), device="cuda", torch_compile=True)


def test_no_cpp_compiler_is_a_config_error(tiny_dir, monkeypatch):
    import river.graphs

    monkeypatch.setattr(river.graphs, "cpp_compiler", lambda: None)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        Engine(str(tiny_dir), device="cpu", torch_compile=True)


PROMPTS = ["def fibonacci(n):", "The capital of France is", "import numpy as np"]


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory, default_model_dir):
    """The tiny model's shapes with weights ~ N(0, 0.1): logits far from flat, so tokens
    depend on every weight (transformers' init gives near-uniform logits at this size)."""
    from helpers import tiny_text_model

    return tiny_text_model(
        tmp_path_factory.mktemp("sharp"), default_model_dir,
        hidden=64, inter=128, layers=2, heads=4, kv_heads=2, init_std=0.1,
    )  # fmt: skip


def compiled_engine(model_dir, dtype=torch.float32) -> Engine:
    """A small torch_compile engine on the sharp model (4 rows: buckets 1, 2, 4)."""
    return Engine(
        str(model_dir),
        EngineConfig(
            device="cpu", dtype=dtype, block_size=8, num_blocks=64, max_num_seqs=4,
            torch_compile=True,
        ),
    )  # fmt: skip


@pytest.fixture(scope="module")
def compiled32(sharp_dir):
    return compiled_engine(sharp_dir)


def _both(engine, prompts, params):
    """(compiled outputs, eager outputs) of the same requests on one engine."""
    step = engine.runner.decode.compiled
    try:
        step.enabled = True
        compiled = engine.generate(prompts, params)
        step.enabled = False
        eager = engine.generate(prompts, params)
    finally:
        step.enabled = True
    return compiled, eager


@pytest.mark.slow
@needs_cxx
@pytest.mark.parametrize(
    "exit_cfg",
    [ExitConfig("full"), ExitConfig("w4"), ExitConfig("river")],
    ids=["full", "w4", "river-default"],
)
def test_compiled_step_gives_eager_tokens_fp32(compiled32, exit_cfg):
    """fp32: the compiled step's tokens and backbone layers are the eager step's, at a
    batch of 1 and of 3 (bucket 4: a padding row), and the compiled step really ran."""
    step = compiled32.runner.decode.compiled
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, exit=exit_cfg)
    want = step_flags(ExitParams.build([exit_cfg], "cpu"))
    for prompts, bucket in ((PROMPTS[:1], 1), (PROMPTS, 4)):
        step.variants.clear()
        compiled, eager = _both(compiled32, prompts, sp)
        assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
        assert [o.backbone_layers for o in compiled] == [o.backbone_layers for o in eager]
        ran = {(b, tuple(sorted(f))) for b, f, _ in step.variants}
        assert (bucket, tuple(sorted(want.items()))) in ran  # rows finishing: smaller buckets


@pytest.mark.slow
@needs_cxx
def test_mixed_batch_and_per_token_rule(compiled32):
    """A batch of full and w4 rows compiles (each layer runs both weight sets, each on its
    own rows); a per-token cosine rule stays eager (a compiled step would read both weight
    sets for every row)."""
    step = compiled32.runner.decode.compiled
    mixed = [
        SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, exit=ExitConfig(m))
        for m in ("full", "w4", "full")
    ]
    before = set(step.variants)
    compiled, eager = _both(compiled32, PROMPTS, mixed)
    assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
    assert [o.backbone_layers[1:] for o in compiled] == [[2] * 9, [0] * 9, [2] * 9]
    new = set(step.variants) - before
    assert any(dict(v[1])["uses_backbone"] and dict(v[1])["uses_river"] for v in new)

    before = set(step.variants)
    rule = SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True, exit=ExitConfig("river", 0.5, 1)
    )
    compiled, eager = _both(compiled32, PROMPTS[:2], rule)
    assert set(step.variants) == before  # never compiled
    assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]


@pytest.mark.slow
@needs_cxx
def test_compiled_step_bf16_packed_twins(sharp_dir):
    """bf16 with the packed int4/int8 twins and sampling: the compiled step matches the
    eager one (its fused norms round to bf16 where the eager ops do)."""
    engine = compiled_engine(sharp_dir, torch.bfloat16)
    for exit_cfg in (ExitConfig("river"), ExitConfig("full")):
        sp = SamplingParams(max_tokens=8, temperature=0.8, top_k=50, seed=3, exit=exit_cfg)
        compiled, eager = _both(engine, PROMPTS[:2], sp)
        assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
    assert engine.runner.decode.compiled.variants
    engine.generate(["ok"], SamplingParams(max_tokens=2))  # still usable


@pytest.mark.slow
@needs_cxx
def test_compiled_step_follows_a_precision_switch(compiled32):
    """New twins (another precision) reach the compiled step: its tokens stay the eager step's
    after set_river_precision, and differ from the old twins' (so the switch was seen)."""
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, exit=ExitConfig("w4"))
    before, _ = _both(compiled32, PROMPTS, sp)
    old = compiled32.config.river_precision
    try:
        compiled32.set_river_precision("w8" if old != "w8" else "w4")
        compiled, eager = _both(compiled32, PROMPTS, sp)
        assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
        assert [o.token_ids for o in compiled] != [o.token_ids for o in before]
    finally:
        compiled32.set_river_precision(old)


@pytest.mark.slow
@needs_cxx
def test_shrinking_batch_reuses_a_larger_compiled_bucket(compiled32):
    """Requests of different lengths: the batch shrinks from 3 rows (bucket 4) to 1, and the
    smaller batches run padded in bucket 4 instead of compiling buckets 2 and 1, for up to
    REUSE_STEPS steps; tokens stay the eager step's."""
    step = compiled32.runner.decode.compiled
    step.variants.clear()
    step._asked.clear()
    exit_cfg = ExitConfig("river")
    params = [
        SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, exit=exit_cfg)
        for m in (4, 8, 14)
    ]
    compiled, eager = _both(compiled32, PROMPTS, params)
    assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
    assert {b for b, _, _ in step.variants} == {4}
    # past REUSE_STEPS steps a smaller batch compiles its own bucket
    step.REUSE_STEPS = 3
    try:
        one = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, exit=exit_cfg)
        compiled, eager = _both(compiled32, PROMPTS[:1], one)
        assert compiled[0].token_ids == eager[0].token_ids
        assert {b for b, _, _ in step.variants} == {1, 4}
    finally:
        del step.REUSE_STEPS  # back to the class default


@pytest.mark.slow
@needs_cxx
def test_warmup_compiles_every_bucket_before_the_first_request(sharp_dir):
    """Engine.warmup compiles buckets 1, 2 (and 4 = max_num_seqs when asked) greedy and sampled
    for the given exit, leaves the exit histogram as it was, and compiles nothing twice or for
    a rule that stays eager; the requests that follow need no new variant."""
    engine = compiled_engine(sharp_dir)
    step = engine.runner.decode.compiled
    river = ExitConfig("river")
    hist = engine.exit_histogram()
    assert engine.warmup(river, max_batch=2, progress=False) == 4
    assert {(b, g) for b, _, g in step.variants} == {(1, True), (1, False), (2, True), (2, False)}
    assert engine.exit_histogram() == hist
    assert engine.warmup(river, max_batch=2, progress=False) == 0  # already compiled
    assert engine.warmup(ExitConfig("river", 0.5, 1), progress=False) == 0  # per-token: eager
    assert engine.warmup(ExitConfig("lossless", 0.5, 1), progress=False) == 0  # own step
    before = set(step.variants)
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, exit=river)
    engine.generate(PROMPTS[:2], sp)
    assert set(step.variants) == before
    eager = Engine(str(sharp_dir), EngineConfig(device="cpu", dtype=torch.float32))
    assert eager.warmup(river) == 0  # nothing to compile without torch_compile


@pytest.mark.slow
@needs_cxx
def test_server_warms_up_its_default_exit(sharp_dir):
    """`river serve --torch-compile`: the default exit's steps are compiled before /health
    reports ready, and a request is then served from them."""
    import httpx

    from river.server import ServerConfig, ServerHandle

    engines = []

    def factory():
        engines.append(compiled_engine(sharp_dir))
        return engines[-1]

    cfg = ServerConfig(model=str(sharp_dir), default_exit=ExitConfig("w4"), warmup_max_batch=1)
    with ServerHandle(cfg, engine_factory=factory) as h:
        step = engines[0].runner.decode.compiled
        assert {(b, g) for b, _, g in step.variants} == {(1, True), (1, False)}
        r = httpx.post(
            h.url + "/v1/completions",
            json={
                "model": sharp_dir.name,
                "prompt": "def f(x):",
                "max_tokens": 4,
                "temperature": 0,
            },
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert {(b, g) for b, _, g in step.variants} == {(1, True), (1, False)}
