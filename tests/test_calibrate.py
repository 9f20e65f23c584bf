"""Data-free activation statistics for the river quantizer (river.calibrate)."""

import pytest
import torch

from river.calibrate import Calibration, activation_importance, random_tokens
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


def test_calibration_rejects_empty_shapes():
    with pytest.raises(ValueError, match="num_seqs"):
        Calibration(num_seqs=0)
    with pytest.raises(ValueError, match="seq_len"):
        Calibration(seq_len=1)


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
        Engine(tiny_dir, device="cpu", kv_cache_tokens=256, river_calibration="text")
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_dir, model_dir)
    # (the 4-bit twins: a w8 or mix twin of layer 0's down may be 8-bit either way)
    kw = {"device": "cpu", "kv_cache_tokens": 256, "dtype": torch.float32, "river_precision": "w4"}
    plain = Engine(model_dir, river_calibration="none", **kw)
    plain.ensure_river(progress=False)
    weighted = Engine(model_dir, **kw)
    weighted.ensure_river(progress=False)
    assert (model_dir / "river-w4-g64-hqq.safetensors").is_file()
    assert (model_dir / "river-w4-g64-hqq-act.safetensors").is_file()
    assert not torch.equal(weighted.model.river[0].down, plain.model.river[0].down)
