"""Engine API, scheduling and bad input, on a tiny random Llama that uses the default model's
tokenizer (fast), plus the real default model where it matters."""

import json
import shutil

import pytest
import torch
from helpers import assert_pool_full

from river import (
    Engine,
    InvalidRequestError,
    ModelLoadError,
    OutOfBlocksError,
    SamplingParams,
    TokenizerError,
    UnsupportedModelError,
)


def test_generate_shapes_and_order(tiny):
    prompts = ["def fib(n):", "Hello", "a b c d e f g h i j k l m n o p"]
    outs = tiny.generate(prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert [o.prompt for o in outs] == prompts
    for o in outs:
        assert len(o.token_ids) == 5 and o.finish_reason == "length"
        assert o.text == tiny.tokenizer.decode(o.token_ids, skip_special_tokens=True)
        assert o.backbone_layers == [2] * 5
    assert_pool_full(tiny)


def test_batch_equals_single_greedy(tiny):
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = ["x = 1", "The quick brown fox jumps over", "¿Qué?"]
    batched = [o.token_ids for o in tiny.generate(prompts, sp)]
    single = [tiny.generate(p, sp)[0].token_ids for p in prompts]
    assert batched == single


def test_seeded_sampling_reproducible(tiny):
    sp = SamplingParams(
        max_tokens=8, temperature=0.9, top_p=0.9, top_k=50, seed=123, ignore_eos=True
    )
    a = tiny.generate(["Once upon a time"], sp)[0].token_ids
    b = tiny.generate(["Once upon a time", "other prompt"], [sp, SamplingParams(max_tokens=3)])
    assert a == b[0].token_ids
    c = tiny.generate(["Once upon a time"], SamplingParams(**{**sp.__dict__, "seed": 7}))[0]
    assert c.token_ids != a  # 8 tokens from a near-uniform tiny model: a collision is ~impossible


def test_stream_matches_generate(tiny):
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    pieces = list(tiny.stream("print(", sp))
    assert "".join(pieces) == tiny.generate("print(", sp)[0].text
    assert_pool_full(tiny)


def test_stop_string(tiny):
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    full = tiny.generate("Hi", sp)[0].text
    assert len(full) > 4
    stop = full[2:4]
    out = tiny.generate("Hi", SamplingParams(**{**sp.__dict__, "stop": [stop]}))[0]
    assert out.finish_reason == "stop" and out.text == full[: full.find(stop)]
    streamed = "".join(tiny.stream("Hi", SamplingParams(**{**sp.__dict__, "stop": [stop]})))
    assert streamed == out.text


def test_eos_stops(tiny):
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ref = tiny.generate("Hi there", sp)[0].token_ids
    saved = tiny.eos_ids
    try:
        tiny.eos_ids = frozenset({ref[2]})  # make the third greedy token the EOS
        out = tiny.generate("Hi there", SamplingParams(max_tokens=6, temperature=0))[0]
        kept = tiny.generate("Hi there", sp)[0]
    finally:
        tiny.eos_ids = saved
    assert out.finish_reason == "stop" and out.token_ids == ref[: ref.index(ref[2]) + 1]
    assert kept.token_ids == ref and kept.finish_reason == "length"
    assert_pool_full(tiny)


def test_thousand_requests_leave_pool_full(tiny):
    """1000 requests through a pool far too small for all at once: they queue, finish, and
    return every block."""
    start_free = tiny.allocator.num_free
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(100, 40000, (int(n),), generator=g).tolist()
        for n in torch.randint(1, 30, (1000,), generator=g)
    ]
    params = [
        SamplingParams(max_tokens=int(m), temperature=0.0, ignore_eos=True)
        for m in torch.randint(1, 6, (1000,), generator=g)
    ]
    outs = tiny.generate(prompts, params)
    assert [len(o.token_ids) for o in outs] == [p.max_tokens for p in params]
    assert tiny.allocator.num_free == start_free
    assert_pool_full(tiny)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),  # past int64: the sampler's seed tensor
        ({"top_k": 2**31}, "top_k"),  # past int32
        ({"stop": [""]}, "stop"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        SamplingParams(**kwargs)


def test_extreme_valid_seed_and_top_k_sample(tiny):
    """The largest seed and top_k SamplingParams accepts reach the sampler's int64 / int32
    tensors intact (a larger seed used to pass validation and fail inside the engine step,
    leaving the request queued and every later step failing)."""
    sp = SamplingParams(max_tokens=3, temperature=0.8, seed=2**63 - 1, top_k=2**31 - 1)
    tiny.add_request("Once", sp)
    while tiny.has_unfinished():
        tiny.step()
    assert_pool_full(tiny)
    assert len(tiny.generate("Once", sp)[0].token_ids) == 3


def test_prompt_too_long_then_usable(tiny):
    with pytest.raises(InvalidRequestError, match="context window"):
        tiny.generate([list(range(5, 5 + 300))], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="empty"):
        tiny.generate([""], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="token ids"):
        tiny.generate([[10**9]], SamplingParams(max_tokens=2))
    assert_pool_full(tiny)
    assert len(tiny.generate("ok", SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3


def test_max_tokens_capped_by_context(tiny):
    out = tiny.generate([list(range(5, 5 + 250))], SamplingParams(max_tokens=100, ignore_eos=True))[
        0
    ]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_request_larger_than_pool(tiny_dir):
    eng = Engine(str(tiny_dir), device="cpu", block_size=8, num_blocks=4)
    with pytest.raises(OutOfBlocksError, match="pool has only 4"):
        eng.generate(["hello"], SamplingParams(max_tokens=100))
    assert_pool_full(eng)
    assert (
        len(eng.generate("hello", SamplingParams(max_tokens=20, ignore_eos=True))[0].token_ids)
        == 20
    )


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Engine(str(tmp_path / "nope"), device="cpu")


def test_not_llama(tiny_dir, tmp_path):
    bad = tmp_path / "gpt2"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="Llama-family"):
        Engine(str(bad), device="cpu")


def test_corrupt_safetensors(tiny_dir, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(tiny_dir, bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        Engine(str(bad), device="cpu")
    f.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        Engine(str(bad), device="cpu")


def test_missing_tokenizer(tiny_dir, tmp_path):
    bad = tmp_path / "notok"
    shutil.copytree(tiny_dir, bad)
    (bad / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError):
        Engine(str(bad), device="cpu")


def test_engine_usable_after_load_errors(tiny, tmp_path):
    with pytest.raises(ModelLoadError):
        Engine(str(tmp_path / "missing"), device="cpu")
    assert tiny.generate("a", SamplingParams(max_tokens=2, ignore_eos=True))[0].token_ids


@pytest.mark.parametrize("where", ["prefill", "decode_step"])
def test_a_failed_step_ends_its_requests_and_the_engine_goes_on(tiny, monkeypatch, where):
    """A step whose prefill or decode launch raises ends the requests it carried with
    finish_reason "error" and frees their blocks (before, they stayed queued and every later
    step failed again); later requests then run normally."""
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    want = tiny.generate("Once upon", sp)[0].token_ids
    first = tiny.add_request("Hello", sp)
    if where == "decode_step":
        tiny.step()  # its prefill: the failure comes with its first decode step
    real = getattr(tiny.runner, where)

    def fail_once(*a, **k):
        monkeypatch.setattr(tiny.runner, where, real)
        raise RuntimeError("injected")

    monkeypatch.setattr(tiny.runner, where, fail_once)
    with pytest.raises(RuntimeError, match="injected"):
        tiny.step()
    assert first.finish_reason == "error"
    while tiny.has_unfinished():
        tiny.step()
    assert_pool_full(tiny)
    assert tiny.generate("Once upon", sp)[0].token_ids == want
