"""Data-free activation statistics for the river quantizer (river.calibrate)."""

import pytest
import torch

from river.calibrate import (
    RANDOM_TOKENS,
    SELF_SAMPLES,
    TEXT,
    Calibration,
    activation_hessians,
    activation_importance,
    bundled_text,
    own_samples,
    random_tokens,
    text_tag,
)
from river.config import PROJECTIONS
from river.engine import Engine


def test_random_tokens_are_seeded_in_range_and_start_with_bos():
    c = Calibration(num_seqs=3, seq_len=17, seed=5)
    a = random_tokens(100, 7, c)
    assert a.shape == (3, 17) and a.dtype == torch.int64
    assert torch.equal(a, random_tokens(100, 7, c))
    assert bool((a[:, 0] == 7).all()) and int(a.min()) >= 0 and int(a.max()) < 100
    assert not torch.equal(a, random_tokens(100, 7, Calibration(3, 17, seed=6)))
    no_bos = random_tokens(100, None, c)
    assert torch.equal(no_bos[:, 1:], a[:, 1:])
    assert "3x17" in c.tag and "seed5" in c.tag and c.tag != Calibration().tag


def test_calibration_rejects_empty_shapes_and_unknown_sources():
    with pytest.raises(ValueError, match="num_seqs"):
        Calibration(num_seqs=0)
    with pytest.raises(ValueError, match="seq_len"):
        Calibration(seq_len=1)
    with pytest.raises(ValueError, match="source"):
        Calibration(source="wikitext")
    with pytest.raises(ValueError, match="temperature"):
        Calibration(source="self-samples", temperature=0.0)


def test_the_sources_name_different_caches():
    assert SELF_SAMPLES.tag != RANDOM_TOKENS.tag and "self-samples" in SELF_SAMPLES.tag
    assert TEXT.tag not in (SELF_SAMPLES.tag, RANDOM_TOKENS.tag)
    assert SELF_SAMPLES.tag != Calibration(16, 256, seed=1, source="self-samples").tag
    assert "t0.5" in Calibration(source="self-samples", temperature=0.5).tag


def test_own_samples_are_the_models_decoding(tiny_dir, monkeypatch):
    """Every decode step of the sampling loop gives the logits a whole-sequence prefill of the
    sampled tokens gives at that position (positions, cache slots, one step for all rows), at a
    vanishing temperature the samples are the model's greedy continuations of BOS, and at
    temperature 1 they are seeded, reproducible and in the vocabulary."""
    from river.kv_cache import KVCache, blocks_needed
    from river.sampling import SamplingParams
    from river.scheduler import prefill_forward_batch

    engine = Engine(tiny_dir, device="cpu", kv_cache_tokens=512, dtype=torch.float32)
    model = engine.model
    steps = []
    decode = model.decode

    def spy(*args, **kw):
        out = decode(*args, **kw)
        steps.append(out[0].clone())
        return out

    monkeypatch.setattr(model, "decode", spy)
    calib = Calibration(num_seqs=3, seq_len=21, source="self-samples", seed=2)
    ids = own_samples(model, calib)
    monkeypatch.undo()
    assert len(steps) == 19  # the first token from BOS's prefill, the last one not fed back
    s, n = ids.shape
    per = blocks_needed(n, 16)
    kv = KVCache(2, s * per, 16, model.cfg.num_kv_heads, model.cfg.head_dim, torch.float32, "cpu")
    tables = [list(range(i * per, (i + 1) * per)) for i in range(s)]
    batch = prefill_forward_batch(ids.tolist(), tables, 16, "cpu")
    whole = model.prefill(batch, kv, all_logits=True).view(s, n, -1)
    for step, logits in enumerate(steps):
        torch.testing.assert_close(logits, whole[:, step + 1], atol=1e-4, rtol=1e-4)

    cfg = engine.model_config
    bos = cfg.bos_token_id
    cold = Calibration(num_seqs=2, seq_len=20, source="self-samples", temperature=1e-6)
    ids = own_samples(model, cold)
    assert ids.shape == (2, 20) and ids.dtype == torch.int64
    assert bool((ids[:, 0] == bos).all())
    greedy = engine.generate([[bos]], SamplingParams(max_tokens=19, temperature=0.0,
                                                     ignore_eos=True))[0].token_ids  # fmt: skip
    assert ids[0, 1:].tolist() == greedy and ids[1, 1:].tolist() == greedy

    warm = Calibration(num_seqs=3, seq_len=24, source="self-samples", seed=3)
    a = own_samples(model, warm)
    assert torch.equal(a, own_samples(model, warm))
    assert int(a.min()) >= 0 and int(a.max()) < cfg.vocab_size
    assert not torch.equal(a[0], a[1])  # each row draws its own tokens
    other = own_samples(model, Calibration(3, 24, source="self-samples", seed=4))
    assert not torch.equal(a, other)
    # the statistics read exactly the ids they are given
    imp = activation_importance(model, warm, ids=a)
    again = activation_importance(model, warm)  # draws the same samples itself
    assert torch.equal(imp["layers.1.down"], again["layers.1.down"])
    rand = activation_importance(model, Calibration(3, 24, seed=3))
    assert not torch.equal(imp["layers.1.down"], rand["layers.1.down"])


def test_activation_importance_equals_hf_forward_hooks(tiny_dir):
    """The statistics are the mean squares of each projection's real input: checked against
    forward hooks on every projection of transformers' own Llama reading the same ids."""
    from transformers import LlamaForCausalLM

    engine = Engine(tiny_dir, device="cpu", kv_cache_tokens=256, dtype=torch.float32)
    cfg = engine.model_config
    calib = Calibration(num_seqs=2, seq_len=300, seed=1)  # past the 256-position table: clamped
    imp = activation_importance(engine.model, calib)
    assert set(imp) == {f"layers.{n}.{p}" for n in range(cfg.num_layers) for p in PROJECTIONS}
    assert imp["layers.0.q"] is imp["layers.0.v"]  # one input, measured once

    hf = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    names = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
    expected, hooks = {}, []
    for n, layer in enumerate(hf.model.layers):
        for p, path in names.items():

            def hook(mod, inp, out, key=f"layers.{n}.{p}"):
                x = inp[0].reshape(-1, inp[0].shape[-1])
                expected[key] = x.square().mean(0)

            hooks.append(layer.get_submodule(path).register_forward_hook(hook))
    ids = random_tokens(cfg.vocab_size, cfg.bos_token_id, calib)[:, :256]
    with torch.no_grad():
        hf(input_ids=ids)
    for h in hooks:
        h.remove()
    for key, t in imp.items():
        assert t.dtype == torch.float32 and t.device.type == "cpu"
        assert t.shape == expected[key].shape
        torch.testing.assert_close(t, expected[key], rtol=2e-4, atol=1e-7, msg=key)


def test_engine_uses_weighted_twins_and_rejects_bad_calibration(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RIVER_HOME", str(tmp_path / "home"))
    with pytest.raises(ValueError, match="river_calibration"):
        Engine(tiny_dir, device="cpu", kv_cache_tokens=256, river_calibration="wikitext")
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_dir, model_dir)
    # (the 4-bit twins: a w8 or mix twin of layer 0's down may be 8-bit either way)
    kw = {"device": "cpu", "kv_cache_tokens": 256, "dtype": torch.float32, "river_precision": "w4"}
    plain = Engine(model_dir, river_calibration="none", **kw)
    plain.ensure_river(progress=False)
    weighted = Engine(model_dir, river_calibration="self-samples", **kw)
    weighted.ensure_river(progress=False)
    rand = Engine(model_dir, river_calibration="random-tokens", **kw)
    rand.ensure_river(progress=False)
    assert (model_dir / "river-w4-g64-hqq.safetensors").is_file()
    assert (model_dir / "river-w4-g64-hqq-act-self.safetensors").is_file()
    assert (model_dir / "river-w4-g64-hqq-act.safetensors").is_file()
    down = [e.model.river[0].down for e in (plain, weighted, rand)]
    assert not torch.equal(down[1], down[0]) and not torch.equal(down[1], down[2])
    # each source keeps its own cache: the self-sample twins load again, not rebuilt
    cache = model_dir / "river-w4-g64-hqq-act-self.safetensors"
    stamp = cache.stat().st_mtime_ns
    again = Engine(model_dir, river_calibration="self-samples", **kw)
    again.ensure_river(progress=False)
    assert torch.equal(again.model.river[0].down, down[1])
    assert cache.stat().st_mtime_ns == stamp


def test_the_samples_come_from_a_float32_cpu_model_whatever_the_engine(
    tiny_dir, tmp_path, monkeypatch
):
    """A bf16 engine draws its self-samples from a float32 CPU copy, so it draws the tokens an
    float32 engine draws (and on CUDA the same, which this machine cannot run)."""
    import shutil

    import river.calibrate

    monkeypatch.setenv("RIVER_HOME", str(tmp_path / "home"))
    real, seen = river.calibrate.own_samples, []

    def spy(model, calib, progress=None):
        ids = real(model, calib, progress)
        seen.append((model.dtype, model.device.type, ids))
        return ids

    monkeypatch.setattr(river.calibrate, "own_samples", spy)
    for dtype in (torch.float32, torch.bfloat16):
        model_dir = tmp_path / str(dtype)
        shutil.copytree(tiny_dir, model_dir)
        engine = Engine(model_dir, device="cpu", kv_cache_tokens=256, dtype=dtype,
                        river_precision="w4", river_calibration="self-samples")  # fmt: skip
        engine.ensure_river(progress=False)
    assert [s[:2] for s in seen] == [(torch.float32, "cpu")] * 2
    assert seen[0][2].shape == (SELF_SAMPLES.num_seqs, SELF_SAMPLES.seq_len)
    assert torch.equal(seen[0][2], seen[1][2])


def test_each_calibration_keeps_its_own_sensitivities(tiny_dir, tmp_path, monkeypatch):
    """mix's unit sensitivities are measured on the twins, so each weighting has its own cached
    file: switching river_calibration back does not measure them again."""
    import shutil

    monkeypatch.setenv("RIVER_HOME", str(tmp_path / "home"))
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_dir, model_dir)
    kw = {"device": "cpu", "kv_cache_tokens": 256, "dtype": torch.float32,
          "river_precision": "mix:0.4"}  # fmt: skip
    for calibration in ("self-samples", "random-tokens"):
        Engine(model_dir, river_calibration=calibration, **kw).ensure_river(progress=False)
    files = {p: (model_dir / p) for p in ("river-sensitivity-act-self.json",
                                          "river-sensitivity-act.json")}  # fmt: skip
    assert all(f.is_file() for f in files.values())
    stamps = {p: f.stat().st_mtime_ns for p, f in files.items()}
    again = Engine(model_dir, river_calibration="self-samples", **kw)
    again.ensure_river(progress=False)
    assert {p: f.stat().st_mtime_ns for p, f in files.items()} == stamps
    assert set(again.river_bits.values()) <= {4, 8}


def _byte_ids(text):
    return [0] + list(text.encode("utf-8"))  # BOS, then one id a byte: decodable


def test_bundled_text_is_half_docs_half_package_code_and_seeded():
    from pydoc_data.topics import topics

    calib = Calibration(num_seqs=6, seq_len=64, source="text")
    ids = bundled_text(calib, _byte_ids)
    assert ids.shape == (6, 64) and ids.dtype == torch.long and bool((ids[:, 0] == 0).all())
    assert torch.equal(ids, bundled_text(calib, _byte_ids))  # no hidden randomness
    other = bundled_text(Calibration(num_seqs=6, seq_len=64, source="text", seed=1), _byte_ids)
    assert not torch.equal(ids, other)
    texts = [bytes(row[1:].tolist()).decode("utf-8", errors="ignore") for row in ids]
    # the docs half never reads a topic's first 1,200 characters (the tuning text's)
    for t in texts[:3]:
        hits = [v.find(t[:40]) for v in topics.values() if t[:40] in v]
        assert hits and min(hits) >= 1200
    for t in texts[3:]:  # code: not from any topic
        assert not any(t[:40] in v for v in topics.values())
    # the cache identity follows the ids (Python versions ship different text)
    assert text_tag(calib, ids) != text_tag(calib, other)
    assert text_tag(calib, ids).startswith(calib.tag) and calib.tag.startswith("hessian:text")


def test_activation_hessians_diagonal_is_the_importance(tiny_dir):
    """Both statistics read the same inputs: E[x x^T]'s diagonal is E[x^2]."""
    engine = Engine(tiny_dir, device="cpu", kv_cache_tokens=256, dtype=torch.float32)
    ids = random_tokens(engine.model_config.vocab_size, 1, Calibration(3, 40, seed=2))
    hess = activation_hessians(engine.model, ids)
    imp = activation_importance(engine.model, ids=ids)
    assert hess.keys() == imp.keys()
    for key, h in hess.items():
        k = imp[key].numel()
        assert h.shape == (k, k) and torch.allclose(h, h.T, atol=1e-6)
        torch.testing.assert_close(h.diagonal(), imp[key], rtol=1e-4, atol=1e-7, msg=key)
    assert hess["layers.0.q"] is hess["layers.0.k"]  # one input, one tensor


def test_text_calibration_builds_gptq_twins_with_their_own_cache(tiny_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("RIVER_HOME", str(tmp_path / "home"))
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_dir, model_dir)
    kw = {"device": "cpu", "kv_cache_tokens": 256, "dtype": torch.float32, "river_precision": "w6"}
    text = Engine(model_dir, river_calibration="text", **kw)
    text.ensure_river(progress=False)
    assert (model_dir / "river-w6-g64-hqq-gptq-text.safetensors").is_file()
    own = Engine(model_dir, river_calibration="self-samples", **kw)
    own.ensure_river(progress=False)
    assert not torch.equal(text.model.river[0].down, own.model.river[0].down)
    from river.exits import ExitConfig
    from river.sampling import SamplingParams

    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, exit=ExitConfig("river"))
    assert len(text.generate("def f(x):", sp)[0].token_ids) == 4
    assert TEXT.source == "text" and TEXT.num_seqs == 16


def test_text_calibration_falls_back_to_self_samples_without_python_docs(
    tiny_dir, tmp_path, monkeypatch
):
    """A Python installed without pydoc_data still gets twins (the self-sample ones), with a
    warning that says why."""
    import shutil

    import river.calibrate

    monkeypatch.setenv("RIVER_HOME", str(tmp_path / "home"))

    def missing(calib, encode):
        raise ImportError("No module named 'pydoc_data'")

    monkeypatch.setattr(river.calibrate, "bundled_text", missing)
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_dir, model_dir)
    engine = Engine(model_dir, device="cpu", kv_cache_tokens=256, dtype=torch.float32,
                    river_precision="w4", river_calibration="text")  # fmt: skip
    with pytest.warns(UserWarning, match="pydoc_data"):
        engine.ensure_river(progress=False)
    assert (model_dir / "river-w4-g64-hqq-act-self.safetensors").is_file()
