"""GGUF -> HF conversion: weights and config against transformers' own GGUF loader, broken
files, and a tiny synthetic GGUF for the paths SmolLM2 does not use. The default model's cache
is tests/test_model_cache.py."""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from river import convert
from river.convert import convert_gguf
from river.errors import ModelLoadError, RiverError, UnsupportedModelError
from river.gguf_tokenizer import byte_alphabet
from river.tokenizer import Tokenizer

MIB = 1 << 20


@pytest.fixture(scope="module")
def hf_model(default_gguf):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32
    )
    return model.config, model.state_dict()


@pytest.mark.slow
def test_weights_match_transformers(default_model_dir, hf_model):
    hf_config, hf_sd = hf_model
    ours = load_file(default_model_dir / "model.safetensors")
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in ours
    assert set(ours) | {"lm_head.weight"} == set(hf_sd)
    for name, w in ours.items():
        ref = hf_sd[name]
        assert w.dtype == torch.float32 and w.shape == ref.shape, name
        assert (w - ref).abs().max().item() <= 1e-6, name
    assert torch.equal(hf_sd["lm_head.weight"], ours["model.embed_tokens.weight"])


@pytest.mark.slow
def test_config_matches_transformers(default_model_dir, hf_model):
    hf_config, _ = hf_model
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert cfg[key] == getattr(hf_config, key), key
    assert math.isclose(cfg["rms_norm_eps"], hf_config.rms_norm_eps, rel_tol=1e-6)
    assert cfg["rms_norm_eps"] == 1e-5  # float32 metadata written as its shortest decimal
    hf_theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta")
    assert cfg["rope_theta"] == (hf_theta or hf_config.rope_theta) == 100000.0
    assert cfg["rope_scaling"] is None and cfg["torch_dtype"] == "float32"

    tcfg = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    assert tcfg["add_bos_token"] is False
    assert (tcfg["bos_token"], tcfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>" in tcfg["chat_template"]


def test_river_config_accepts_output(default_model_dir):
    from river.config import ModelConfig

    cfg = ModelConfig.from_hf(json.loads((default_model_dir / "config.json").read_text()))
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (written from its description)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.randn(3 * 64, 40).astype(np.float32)
    permuted = _llama_cpp_permute(w, 3)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(convert._unpermute_rows(permuted, 3), w)


# --------------------------------------------------------------------------- broken inputs


def _assert_clean(tmp_path, out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("kind", ["head", "tail", "garbage", "empty"])
def test_broken_gguf_raises_model_load_error(default_gguf, tmp_path, kind):
    data = default_gguf.read_bytes()
    bad = tmp_path / f"{kind}.gguf"
    if kind == "head":
        bad.write_bytes(data[:MIB])
    elif kind == "tail":
        bad.write_bytes(data[:-MIB])
    elif kind == "garbage":
        bad.write_bytes(np.random.default_rng(0).bytes(2 * MIB))
    else:
        bad.write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(ModelLoadError, match=str(bad)):
        convert_gguf(bad, out, progress=False)
    _assert_clean(tmp_path, out)


def test_bad_magic(default_gguf, tmp_path):
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGUX" + default_gguf.read_bytes()[4 : 4 * MIB])
    with pytest.raises(ModelLoadError, match="magic"):
        convert_gguf(bad, tmp_path / "out", progress=False)


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out", progress=False)
    with pytest.raises(ModelLoadError, match="not a file"):
        convert_gguf(tmp_path, tmp_path / "out", progress=False)


def test_refuses_non_empty_output(default_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(RiverError, match="not empty"):
        convert_gguf(default_gguf, out, progress=False)
    assert (out / "keep.txt").read_text() == "precious"


# --------------------------------------------------------------------------- synthetic GGUF


def _hf_llama3_inv_freq(theta, head_dim, params):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling={**params, "rope_theta": theta},
    )
    return ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")[0].double().numpy()


LLAMA31 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_rope_factors_round_trip(factor):
    """llama.cpp stores llama3 scaling as per-frequency divisors; recover the HF parameters."""
    theta, head_dim = 500000.0, 128
    params = {**LLAMA31, "factor": factor}
    base = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factors = (base / _hf_llama3_inv_freq(theta, head_dim, params)).astype(np.float32)
    assert convert._llama3_rope_scaling(factors, head_dim, theta) == params
    with pytest.raises(UnsupportedModelError):
        convert._llama3_rope_scaling(factors * 1.5, head_dim, theta)


TINY = {"hidden": 32, "heads": 4, "kv": 2, "head_dim": 16, "inter": 48, "layers": 2}


def _write_tiny_gguf(path, *, arch="llama", theta=500000.0):
    """A 2-layer llama GGUF in llama.cpp's layout: untied output, permuted q/k, rope_freqs."""
    rng = np.random.default_rng(0)
    h, hd, inter = TINY["hidden"], TINY["head_dim"], TINY["inter"]
    alphabet = list(byte_alphabet().values())
    tokens = ["<|endoftext|>", *alphabet, "Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    hf = {"model.embed_tokens.weight": rng.standard_normal((len(tokens), h))}
    hf["lm_head.weight"] = rng.standard_normal((len(tokens), h))
    hf["model.norm.weight"] = rng.standard_normal(h)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(1024)
    w.add_embedding_length(h)
    w.add_feed_forward_length(inter)
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv"])
    w.add_key_length(hd)  # heads * head_dim != hidden: the file must say head_dim
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(theta)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(True)

    base = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    rope_factors = base / _hf_llama3_inv_freq(theta, hd, LLAMA31)
    w.add_tensor("rope_freqs.weight", rope_factors.astype(np.float32))
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"].astype(np.float32))
    w.add_tensor("output.weight", hf["lm_head.weight"].astype(np.float32))
    w.add_tensor("output_norm.weight", hf["model.norm.weight"].astype(np.float32))
    shapes = {
        "attn_q": ("self_attn.q_proj", (TINY["heads"] * hd, h)),
        "attn_k": ("self_attn.k_proj", (TINY["kv"] * hd, h)),
        "attn_v": ("self_attn.v_proj", (TINY["kv"] * hd, h)),
        "attn_output": ("self_attn.o_proj", (h, TINY["heads"] * hd)),
        "ffn_gate": ("mlp.gate_proj", (inter, h)),
        "ffn_up": ("mlp.up_proj", (inter, h)),
        "ffn_down": ("mlp.down_proj", (h, inter)),
        "attn_norm": ("input_layernorm", (h,)),
        "ffn_norm": ("post_attention_layernorm", (h,)),
    }
    for i in range(TINY["layers"]):
        for gname, (hname, shape) in shapes.items():
            value = rng.standard_normal(shape).astype(np.float32)
            hf[f"model.layers.{i}.{hname}.weight"] = value
            stored = value
            if gname == "attn_q":
                stored = _llama_cpp_permute(value, TINY["heads"])
            elif gname == "attn_k":
                stored = _llama_cpp_permute(value, TINY["kv"])
            # Half the matrices quantized to F16 to cover a second dequantization path.
            if stored.ndim == 2 and i == 1:
                stored = stored.astype(np.float16)
                hf[f"model.layers.{i}.{hname}.weight"] = value.astype(np.float16)
            w.add_tensor(f"blk.{i}.{gname}.weight", stored)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: np.asarray(v, dtype=np.float32) for k, v in hf.items()}


def test_tiny_gguf_untied_rope_scaled(tmp_path):
    expected = _write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert cfg["rope_scaling"] == LLAMA31
    assert (cfg["head_dim"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]) == (16, 2, 1e-6)
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(ours[name].numpy(), value, err_msg=name)

    tok = Tokenizer.from_dir(out)
    ids = tok.encode("the the")
    assert ids == [0, *(tok.token_to_id(t) for t in ("t", "he", "Ġthe"))]  # add_bos_token
    assert tok.decode(ids) == "<|endoftext|>the the"
    assert tok.decode(ids, skip_special_tokens=True) == "the the"


def test_non_llama_gguf_is_unsupported(tmp_path):
    _write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        convert_gguf(tmp_path / "gpt2.gguf", tmp_path / "out", progress=False)


def test_failed_replace_keeps_previous_model(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(RiverError, match="cannot move"):
        convert.publish(tmp_path / "vanished", out, replace=True)
    assert (out / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
