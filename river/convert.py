"""Convert a llama.cpp GGUF file into a Hugging Face style Llama model directory.

river loads plain HF checkpoints (config.json + float safetensors + tokenizer.json). A GGUF holds
quantized tensors in llama.cpp's naming and layout: every tensor is dequantized to float32
(river.gguf_reader), renamed to the HF Llama names, the config is derived from the metadata and
the tokenizer rebuilt from the GGUF vocabulary (river.gguf_tokenizer). The output is written into
a temporary sibling directory and renamed into place at the end, so a crash never leaves a
half-written model that a later run would load. river.model_cache uses this for the default model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np

from river.errors import ModelLoadError, RiverError, UnsupportedModelError
from river.gguf_reader import check_tensor_bounds, dequantize, open_gguf, read_metadata
from river.gguf_tokenizer import build_tokenizer, generation_config, tokenizer_config

# Written last into a converted directory. It records which GGUF it came from, so a changed source
# file (package upgrade) or a newer converter triggers a fresh conversion instead of a stale reuse.
MARKER_FILE = ".complete"
# Bump when the converter's output changes in a way that old conversions should be redone.
CONVERTER_VERSION = 1

# llama.cpp tensor name -> HF Llama name.
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.weight")
# Llama 3.1-style rope scaling is stored by llama.cpp as a tensor of per-frequency factors.
_ROPE_FREQS = "rope_freqs.weight"


# --------------------------------------------------------------------------- llama.cpp's q/k layout


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k projection rows.

    HF Llama rotates the two halves of each head ([x0..x(d/2-1)] against [x(d/2)..x(d-1)]);
    llama.cpp rotates adjacent pairs, so its converter interleaves the halves of each head's rows.
    Here the interleaved (head, d/2, 2) row order goes back to (head, 2, d/2).
    """
    rows, cols = w.shape
    half = rows // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, half, 2, cols).swapaxes(1, 2).reshape(rows, cols))


# --------------------------------------------------------------------------- config


def _llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict:
    """Recover HF's llama3 rope_scaling parameters from llama.cpp's per-frequency factors.

    llama.cpp stores only the result of the llama3 formula. Its parameters are found by trying
    the values real checkpoints use and keeping the set that reproduces every factor.
    """
    factors = factors.astype(np.float64).reshape(-1)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv_freq.shape:
        raise ModelLoadError(
            f"{_ROPE_FREQS} has {factors.size} entries, expected head_dim/2 = {inv_freq.size}"
        )
    # The factors went through float32 (and sometimes float32 arithmetic): snap the largest, which
    # is the scaling factor itself, back to the short decimal it was written as.
    factor = float(np.round(factors.max(), 4))
    wavelen = 2 * math.pi / inv_freq
    for original in (8192, 4096, 2048, 16384, 32768, 65536, 131072, 1024):
        for low in (1.0, 2.0, 0.5, 4.0):
            for high in (4.0, 2.0, 8.0, 16.0, 32.0):
                if high <= low:
                    continue
                expected = llama3_rope_factors(wavelen, factor, low, high, original)
                if np.allclose(expected, factors, rtol=1e-4, atol=1e-6):
                    return {
                        "rope_type": "llama3",
                        "factor": factor,
                        "low_freq_factor": low,
                        "high_freq_factor": high,
                        "original_max_position_embeddings": original,
                    }
    raise UnsupportedModelError(
        f"{_ROPE_FREQS} holds rope factors that match no llama3 scaling river knows"
    )


def llama3_rope_factors(wavelen, factor, low_freq_factor, high_freq_factor, original_max):
    """Divisor of each rotary frequency under llama3 scaling (what llama.cpp stores)."""
    low_wavelen = original_max / low_freq_factor
    high_wavelen = original_max / high_freq_factor
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, factor, mid))


def _build_config(meta: dict, tensors: dict, path: pathlib.Path) -> dict:
    """HF config.json fields from the GGUF metadata. `tensors` maps names to reader tensors."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(
            f"{path}: general.architecture is {arch!r}; river converts Llama-family GGUFs only"
        )

    def need(key):
        if key not in meta:
            raise ModelLoadError(f"{path}: metadata field {key!r} is missing")
        return meta[key]

    hidden = int(need("llama.embedding_length"))
    heads = int(need("llama.attention.head_count"))
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads if heads else 0))
    if heads <= 0 or kv_heads <= 0 or head_dim <= 0:
        raise ModelLoadError(f"{path}: bad attention shape: {heads=} {kv_heads=} {head_dim=}")
    value_dim = int(meta.get("llama.attention.value_length", head_dim))
    if value_dim != head_dim:
        raise UnsupportedModelError(
            f"{path}: value head size {value_dim} differs from key head size {head_dim}"
        )
    rot_dim = int(meta.get("llama.rope.dimension_count", head_dim))
    if rot_dim != head_dim:
        raise UnsupportedModelError(
            f"{path}: rotary dimension {rot_dim} differs from head_dim {head_dim} "
            "(partial rotary embeddings are not supported)"
        )
    theta = float(meta.get("llama.rope.freq_base", 10000.0))

    rope_scaling = None
    scaling_type = meta.get("llama.rope.scaling.type")
    if scaling_type not in (None, "none"):
        raise UnsupportedModelError(f"{path}: rope scaling type {scaling_type!r} is not supported")
    if _ROPE_FREQS in tensors:
        factors = dequantize(tensors[_ROPE_FREQS], path)
        rope_scaling = _llama3_rope_scaling(factors, head_dim, theta)

    tokens = meta.get("tokenizer.ggml.tokens") or []
    vocab = int(meta.get("llama.vocab_size", len(tokens)))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    pad = meta.get("tokenizer.ggml.padding_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(need("llama.feed_forward_length")),
        "num_hidden_layers": int(need("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "torch_dtype": "float32",
    }


def _map_tensors(raw: dict[str, np.ndarray], config: dict, path: pathlib.Path) -> dict:
    """Rename to HF names, check shapes, and un-permute q/k."""
    hidden, hd = config["hidden_size"], config["head_dim"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    inter, layers = config["intermediate_size"], config["num_hidden_layers"]
    expected = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not config["tie_word_embeddings"]:
        expected["lm_head.weight"] = (config["vocab_size"], hidden)
    per_layer = {
        "self_attn.q_proj": (heads * hd, hidden),
        "self_attn.k_proj": (kv * hd, hidden),
        "self_attn.v_proj": (kv * hd, hidden),
        "self_attn.o_proj": (hidden, heads * hd),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
    }
    for i in range(layers):
        for part, shape in per_layer.items():
            expected[f"model.layers.{i}.{part}.weight"] = shape

    out = {}
    for name, w in raw.items():
        if name == _ROPE_FREQS:
            continue  # folded into config.rope_scaling
        if name in _GLOBAL_TENSORS:
            hf = _GLOBAL_TENSORS[name]
        else:
            m = _BLOCK_RE.fullmatch(name)
            if not m or m.group(2) not in _BLOCK_TENSORS:
                raise UnsupportedModelError(
                    f"{path}: tensor {name!r} has no place in a Llama model (biases, MoE, ...)"
                )
            hf = f"model.layers.{m.group(1)}.{_BLOCK_TENSORS[m.group(2)]}.weight"
        if hf not in expected:
            raise ModelLoadError(f"{path}: unexpected tensor {name!r} for a {layers}-layer model")
        if w.shape != expected[hf]:
            raise ModelLoadError(
                f"{path}: tensor {name!r} has shape {w.shape}, expected {expected[hf]}"
            )
        if hf.endswith("q_proj.weight"):
            w = _unpermute_rows(w, heads)
        elif hf.endswith("k_proj.weight"):
            w = _unpermute_rows(w, kv)
        out[hf] = w
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ModelLoadError(
            f"{path}: missing tensors: {missing[:5]}{'...' if len(missing) > 5 else ''}"
        )
    return out


# --------------------------------------------------------------------------- conversion


def source_stamp(gguf_path: pathlib.Path) -> dict:
    """Which GGUF (and converter) a conversion came from: the content of its MARKER_FILE."""
    st = gguf_path.stat()
    return {
        "source": str(gguf_path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "converter_version": CONVERTER_VERSION,
    }


def write_model(gguf_path: pathlib.Path, out: pathlib.Path, progress: bool) -> None:
    """Convert into `out` (an empty directory), marker last."""
    from safetensors.numpy import save_file

    from river.progress import progress_bar

    reader = open_gguf(gguf_path)
    meta = read_metadata(reader, gguf_path)
    check_tensor_bounds(reader, gguf_path)

    # Config and tokenizer first: an unsupported model fails before the slow part.
    config = _build_config(meta, {t.name: t for t in reader.tensors}, gguf_path)
    tokenizer = build_tokenizer(meta, gguf_path)

    raw = {}
    bar = progress_bar(
        reader.tensors, desc=f"converting {gguf_path.name}", unit="tensors", enabled=progress
    )
    for t in bar:
        raw[t.name] = dequantize(t, gguf_path)
    weights = _map_tensors(raw, config, gguf_path)
    del raw  # the pre-permutation q/k copies

    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out / "tokenizer.json"))
    files = {
        "config.json": config,
        "tokenizer_config.json": tokenizer_config(meta, config["max_position_embeddings"]),
        "generation_config.json": generation_config(meta, config),
    }
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    (out / MARKER_FILE).write_text(json.dumps(source_stamp(gguf_path)) + "\n")
    _make_readable(out)


def _make_readable(directory: pathlib.Path) -> None:
    """mkdtemp makes a private 0700 directory; give the result the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)


def _is_nonempty_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def convert_gguf(
    gguf_path, out_dir, progress: bool = True, overwrite: bool = False
) -> pathlib.Path:
    """Convert a Llama-family GGUF into an HF model directory at `out_dir`; returns `out_dir`.

    Writes config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json and
    generation_config.json. An existing non-empty `out_dir` is an error unless `overwrite`.
    Raises ModelLoadError (or a subclass) for a missing, corrupt or unsupported GGUF, and
    RiverError when the output cannot be written.
    """
    gguf_path = pathlib.Path(gguf_path).expanduser()
    out_dir = pathlib.Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise RiverError(f"output path exists and is not a directory: {out_dir}")
    if _is_nonempty_dir(out_dir) and not overwrite:
        raise RiverError(
            f"output directory is not empty: {out_dir} "
            "(pass overwrite=True; on the command line --overwrite)"
        )
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as e:
        raise RiverError(f"cannot create the output directory {out_dir}: {e}") from e
    try:
        write_model(gguf_path, tmp, progress)
        publish(tmp, out_dir, overwrite)
    except OSError as e:  # disk full, permissions...
        raise RiverError(f"cannot write the converted model to {out_dir}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def publish(tmp: pathlib.Path, out_dir: pathlib.Path, replace: bool) -> None:
    """Rename the finished `tmp` to `out_dir`, atomically when `out_dir` is absent or empty.

    With `replace`, an existing model is moved aside first and deleted only once the new one is
    in place; if that fails it is moved back.
    """
    old = None
    if replace and _is_nonempty_dir(out_dir):
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "model")
    try:
        os.replace(tmp, out_dir)  # POSIX: fails if out_dir became a non-empty directory meanwhile
    except OSError as e:
        if old is not None:
            with contextlib.suppress(OSError):
                os.replace(old / "model", out_dir)
        raise RiverError(f"cannot move the converted model into {out_dir}: {e}") from e
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
