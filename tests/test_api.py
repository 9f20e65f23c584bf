"""What a new user of the Python API meets first: errors that name the argument, model-given
sampling defaults, streams that never decode behind the caller's back, sane CPU threads and
progress output."""

import gc
import json
import shutil

import pytest
import torch
from helpers import assert_pool_full

import river.cpu
from river import (
    ConfigError,
    Engine,
    ExitConfig,
    InvalidRequestError,
    RiverError,
    SamplingParams,
)
from river.progress import progress_bar

GREEDY = {"temperature": 0.0}


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"mode": "bogus"}, ("mode", "'bogus'", "full")),
        ({"mode": "river", "threshold": 5.0}, ("threshold", "5.0", "[-1, 1]")),
        ({"mode": "river", "threshold": "high"}, ("threshold", "'high'", "[-1, 1]")),
        ({"mode": "river", "min_layer": -1}, ("min_layer", "-1", ">= 0")),
        ({"mode": "river", "min_layer": 2.5}, ("min_layer", "2.5", "integer")),
        ({"mode": "river", "policy": "max"}, ("policy", "'max'", "per_row")),
    ],
)
def test_exit_config_errors_name_argument_value_and_range(kwargs, words):
    with pytest.raises(InvalidRequestError) as e:
        ExitConfig(**kwargs)
    assert isinstance(e.value, RiverError) and isinstance(e.value, ValueError)
    for w in words:
        assert w in str(e.value)


def test_min_layer_beyond_depth_is_refused_then_usable(tiny):
    sp = SamplingParams(max_tokens=2, exit=ExitConfig("river", min_layer=999), **GREEDY)
    with pytest.raises(InvalidRequestError, match=r"min_layer must be in \[0, 1\].*got 999"):
        tiny.generate("hi", sp)
    assert_pool_full(tiny)
    assert len(tiny.generate("hi", SamplingParams(max_tokens=2, **GREEDY))[0].token_ids) == 2


@pytest.mark.parametrize("prompts", [None, [], 123, [None], [1.5]])
def test_bad_prompts(tiny, prompts):
    with pytest.raises(InvalidRequestError, match="prompt"):
        tiny.generate(prompts, SamplingParams(max_tokens=2))
    assert_pool_full(tiny)


def test_numpy_token_ids_are_token_ids(tiny):
    np = pytest.importorskip("numpy")
    ids = [int(t) for t in tiny.tokenizer.encode("Hello there")]
    sp = SamplingParams(max_tokens=3, **GREEDY)
    want = tiny.generate([ids], sp)[0].token_ids
    assert tiny.generate([list(np.array(ids, dtype=np.int64))], sp)[0].token_ids == want
    assert tiny.generate([[torch.tensor(t) for t in ids]], sp)[0].token_ids == want
    assert tiny.generate(list(np.array(ids)), sp)[0].token_ids == want  # one prompt, not many
    with pytest.raises(InvalidRequestError, match="integers"):
        tiny.generate([[True, 2]], sp)


@pytest.mark.parametrize(
    "args, kwargs, word",
    [
        (("a", "b"), {"exit": "river"}, "ExitConfig"),
        ((None, "b"), {}, "score"),
        (("a", None), {}, "continuation"),
        ((["a", "b"], ["c"]), {}, "continuations"),
        ((["a", [1.5]], ["c", "d"]), {}, "integers"),
    ],
)
def test_bad_score_arguments_then_usable(tiny, args, kwargs, word):
    with pytest.raises(InvalidRequestError, match=word):
        tiny.score(*args, **kwargs)
    assert len(tiny.score("a", "b").logprobs) >= 1


def test_bad_params_type(tiny):
    with pytest.raises(InvalidRequestError, match="SamplingParams"):
        tiny.generate("hi", {"max_tokens": 3})


@pytest.mark.parametrize(
    "messages", [[], None, [{"role": "user"}], ["hello"], [{"role": "user", "content": 3}]]
)
def test_bad_conversations(tiny, messages):
    with pytest.raises(InvalidRequestError, match="messages"):
        tiny.chat(messages, SamplingParams(max_tokens=2))
    assert_pool_full(tiny)


def test_chat_runs(tiny):
    out = tiny.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=3, **GREEDY))
    assert out.prompt.startswith("<|im_start|>") and len(out.token_ids) >= 1


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"bogus_setting": 1}, "bogus_setting"),
        ({"device": "tpu"}, "device"),
        ({"num_threads": 0}, "num_threads"),
        ({"kv_cache_tokens": 0}, "kv_cache_tokens"),
        ({"dtype": torch.int8}, "dtype"),
        ({"river_method": "gptq"}, "river_method"),
    ],
)
def test_bad_engine_settings(tiny_dir, kwargs, word):
    with pytest.raises(ConfigError, match=word):
        Engine(str(tiny_dir), **kwargs)


# --------------------------------------------------------------------------- defaults
def test_sampling_defaults_come_from_generation_config(tiny_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model, ignore=shutil.ignore_patterns("river-*"))
    gen = model / "generation_config.json"
    cfg = json.loads(gen.read_text()) if gen.exists() else {}
    gen.write_text(json.dumps({**cfg, "temperature": 0.0, "top_k": 5}))
    engine = Engine(str(model), device="cpu", num_blocks=32, block_size=8)
    d = engine.default_sampling_params()
    assert (d.temperature, d.top_k, d.top_p) == (0.0, 5, 1.0)
    # SamplingParams() now means greedy for this model: equal to an explicit temperature 0.
    plain = engine.generate("def f(x):", SamplingParams(max_tokens=8))[0]
    greedy = engine.generate("def f(x):", SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert plain.token_ids == greedy.token_ids
    # An explicit setting wins over the model's.
    assert SamplingParams(temperature=1.0).with_defaults({"temperature": 0.0}).temperature == 1.0


def test_library_defaults_without_generation_config(tiny):
    d = tiny.default_sampling_params()
    assert (d.temperature, d.top_k, d.top_p) == (1.0, 0, 1.0)


# --------------------------------------------------------------------------- streams
def _stream_request(engine):
    (req,) = [r for r in engine.scheduler.running]
    return req


def test_held_stream_is_paused_and_gives_its_blocks_back(tiny):
    sp = SamplingParams(max_tokens=24, ignore_eos=True, **GREEDY)
    expected = tiny.generate("Once upon a time", sp)[0].text
    stream = tiny.stream("Once upon a time", sp)
    got = next(stream)
    req = _stream_request(tiny)
    launched = req.scheduled  # decode steps launched for it (read back or not)
    assert req.blocks and tiny.allocator.num_free < tiny.allocator.num_blocks

    # Another call runs while the stream is held but not read: it never decodes the stream's
    # request, and the stream's KV blocks go back to the pool.
    other = tiny.generate(["def f(x):", "Hello"], SamplingParams(max_tokens=6, **GREEDY))
    assert all(len(o.token_ids) == 6 for o in other)
    assert req.scheduled == launched  # no step of the other call decoded it
    # (The token its own last step computed may be read back meanwhile: tokens come back one
    # step behind.)
    assert len(req.output_ids) == launched
    assert_pool_full(tiny)

    # Reading again recomputes the cache and finishes with the uninterrupted text.
    got += "".join(stream)
    assert got == expected
    assert_pool_full(tiny)


@pytest.mark.parametrize("how", ["close", "drop"])
def test_closing_or_dropping_a_stream_frees_its_blocks_at_once(tiny, how):
    stream = tiny.stream("Hello", SamplingParams(max_tokens=40, ignore_eos=True, **GREEDY))
    next(stream)
    req = _stream_request(tiny)
    assert tiny.allocator.num_free < tiny.allocator.num_blocks
    if how == "close":
        stream.close()
    else:
        del stream
        gc.collect()  # CPython frees at once; this only makes the test robust elsewhere
    assert req.finish_reason == "abort"
    assert_pool_full(tiny)


def test_stream_outputs_end_with_the_finished_result(tiny):
    sp = SamplingParams(max_tokens=5, ignore_eos=True, **GREEDY)
    outs = list(tiny.stream_outputs("Hello", sp))
    final = outs[-1][1]
    assert final.finished and len(final.token_ids) == 5
    assert "".join(p for p, _ in outs) == final.text
    assert final.first_token_s > 0 and final.decode_tokens_per_s > 0


def test_decode_rate_excludes_time_before_queueing(tiny):
    out = tiny.generate("Hello", SamplingParams(max_tokens=4, ignore_eos=True, **GREEDY))[0]
    assert 0 < out.first_token_s <= out.elapsed_s


def test_tokens_are_timed_when_made_not_when_collected(tiny, monkeypatch):
    """The engine reads a step's tokens after launching the next step. On the CPU that next
    step has already run by then, so a token stamped at collection is one step late: a
    2-token output then reported almost no decode time and a rate in the thousands. Each
    decode step below is slowed by 50 ms. The second token's decode step must then fall
    between the first token and the end. Only the order of events is checked, so a slow
    machine cannot fail it."""
    import time

    step = tiny.runner.decode_step

    def slow_step(*a, **k):
        time.sleep(0.05)
        return step(*a, **k)

    monkeypatch.setattr(tiny.runner, "decode_step", slow_step)
    out = tiny.generate("Hello", SamplingParams(max_tokens=2, ignore_eos=True, **GREEDY))[0]
    assert len(out.token_ids) == 2
    assert out.elapsed_s - out.first_token_s >= 0.05


# --------------------------------------------------------------------------- CPU threads
def test_num_threads_setting(tiny_dir):
    before = torch.get_num_threads()
    try:
        engine = Engine(str(tiny_dir), device="cpu", num_blocks=8, num_threads=1)
        assert engine.num_threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_default_threads_follow_env_then_idle_cores(monkeypatch):
    monkeypatch.setenv("RIVER_NUM_THREADS", "3")
    assert river.cpu.default_num_threads() == 3
    monkeypatch.setenv("RIVER_NUM_THREADS", "zero")
    with pytest.raises(ValueError, match="RIVER_NUM_THREADS"):
        river.cpu.default_num_threads()
    monkeypatch.delenv("RIVER_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(river.cpu, "_available_cores", lambda: 4)
    monkeypatch.setattr(river.cpu, "idle_cores", lambda: 1.2)  # another process holds ~3
    assert river.cpu.default_num_threads() == 1
    monkeypatch.setattr(river.cpu, "idle_cores", lambda: 0.1)  # never below one
    assert river.cpu.default_num_threads() == 1
    monkeypatch.setattr(river.cpu, "idle_cores", lambda: 3.8)
    assert river.cpu.default_num_threads() == 4


def test_idle_cores_is_a_core_count():
    idle = river.cpu.idle_cores(0.02)
    assert idle is None or 0.0 <= idle <= river.cpu._available_cores()


# --------------------------------------------------------------------------- progress
def test_progress_is_one_line_off_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("RIVER_PROGRESS", raising=False)
    for _ in progress_bar(range(50), desc="converting x", unit="tensors"):
        pass
    err = capsys.readouterr().err
    assert err == "river: converting x (50 tensors) ...\n"
    monkeypatch.setenv("RIVER_PROGRESS", "0")
    for _ in progress_bar(range(50), desc="converting x", unit="tensors"):
        pass
    assert capsys.readouterr().err == ""
    for _ in progress_bar(range(5), desc="off", unit="x", enabled=False):
        pass
    assert capsys.readouterr().err == ""
