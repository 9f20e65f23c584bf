"""The models bench_decode.py times: river LlamaModels with random weights at a named shape (and
river twins quantized from those weights), the default model through an Engine, and the HF
transformers twin of either (the same tensors, viewed) that the HF baseline runs."""

from __future__ import annotations

import contextlib
import gc
import time

from shapes import Shape


def model_config(shape: Shape, max_positions: int):
    """river's ModelConfig of `shape`, with room for max_positions tokens."""
    from river.config import ModelConfig

    sizes = shape._replace(max_position_embeddings=max_positions)._asdict()
    return ModelConfig(**sizes, rope_theta=500000.0)


def random_weights(cfg, device, dtype, seed=0, std=0.02) -> dict:
    """The weights dict LlamaModel takes (river.checkpoint.load_weights layout), random normal
    projections and unit norms, generated directly on `device` in `dtype`."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

    def rnd(*shape):
        return torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(std)

    def ones(n):
        return torch.ones(n, device=device, dtype=dtype)

    out = {"embed": rnd(cfg.vocab_size, h), "norm": ones(h)}
    out["lm_head"] = out["embed"] if cfg.tie_word_embeddings else rnd(cfg.vocab_size, h)
    out["layers"] = [
        {
            "input_norm": ones(h),
            "post_norm": ones(h),
            "q": rnd(cfg.num_heads * d, h),
            "k": rnd(cfg.num_kv_heads * d, h),
            "v": rnd(cfg.num_kv_heads * d, h),
            "o": rnd(h, cfg.num_heads * d),
            "gate": rnd(i, h),
            "up": rnd(i, h),
            "down": rnd(h, i),
        }
        for _ in range(cfg.num_layers)
    ]
    return out


def split_projections(model) -> dict:
    """{"layers.N.q": tensor, ...}: views of the model's fused bf16 weights, per projection."""
    cfg = model.cfg
    q, kv, i = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    out = {}
    for n, w in enumerate(model.layers):
        parts = {
            "q": w.qkv[:q],
            "k": w.qkv[q : q + kv],
            "v": w.qkv[q + kv :],
            "o": w.o,
            "gate": w.gate_up[:i],
            "up": w.gate_up[i:],
            "down": w.down,
        }
        out.update({f"layers.{n}.{p}": t for p, t in parts.items()})
    return out


@contextlib.contextmanager
def _gpu_sized_chunks(device):
    """quantize_w4 works in row chunks sized for CPU caches (~256K weights); on a GPU that means
    tens of thousands of tiny launches per model. Bigger chunks there (benchmark only)."""
    import river.quantize as rq

    saved = rq._CHUNK_ELEMS
    if str(device).startswith("cuda"):
        rq._CHUNK_ELEMS = 1 << 24
    try:
        yield
    finally:
        rq._CHUNK_ELEMS = saved


def attach_random_river(model, group_size, method):
    """Quantize the model's own weights (on its device) and attach them as the river twins."""
    from river.quantize import quantize_w4

    t = time.perf_counter()
    with _gpu_sized_chunks(model.device):
        quant = {
            name: quantize_w4(w, group_size=group_size, method=method)
            for name, w in split_projections(model).items()
        }
    model.attach_river(quant)
    print(f"  river twins ({method}, g{group_size}) in {time.perf_counter() - t:.1f}s", flush=True)


def build_random(shape: Shape, device, dtype, max_positions, seed, group_size, method):
    """(model, note): random weights at `shape`, river twins quantized from them by `method`."""
    from river.model import LlamaModel

    cfg = model_config(shape, max_positions)
    model = LlamaModel(cfg, random_weights(cfg, device, dtype, seed), device, dtype, max_positions)
    gc.collect()  # the unfused weights dict is garbage now
    attach_random_river(model, group_size, method)
    return model, f"random, river {method} g{group_size}"


def build_default(model_dir, device, max_positions):
    """(name, model, model dir, note, (twin bits plan, river head bits)): the default model (or
    `model_dir`) through an Engine, its twins at the engine's default precision."""
    from river import Engine, EngineConfig

    # Random-token twins: decode speed depends on the twins' bytes, not on how their error was
    # weighted, and the default self-samples would spend ~30-50 s of a GPU check's time limit
    # writing text on the CPU first (the bit plan may differ from the default's by a unit).
    engine = Engine(
        model_dir,
        EngineConfig(
            device=str(device), num_blocks=1, max_model_len=max_positions,
            river_calibration="random-tokens",
        ),
    )  # fmt: skip
    engine.ensure_river(progress=True)
    name = engine.model_dir.name
    note = f"real weights, river {engine.config.river_method} {engine.config.river_precision}"
    plan = (engine.river_bits, engine.river_head_bits or 16)
    return name, engine.model, engine.model_dir, note, plan


def hf_config_for(model, model_dir):
    from transformers import LlamaConfig

    if model_dir is not None:
        return LlamaConfig.from_pretrained(model_dir)
    c = model.cfg
    return LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings,
    )


def hf_twin(model, model_dir):
    """An HF LlamaForCausalLM whose parameters are views of river's tensors (no second copy):
    built on the meta device, every weight then replaced by a view."""
    import itertools

    import torch
    from transformers import LlamaForCausalLM

    hf_cfg = hf_config_for(model, model_dir)
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)

    def param(t):
        return torch.nn.Parameter(t, requires_grad=False)

    hf.model.embed_tokens.weight = param(model.embed)
    hf.model.norm.weight = param(model.norm)
    tied = model.lm_head is model.embed
    hf.lm_head.weight = hf.model.embed_tokens.weight if tied else param(model.lm_head)
    proj = split_projections(model)
    for n, layer in enumerate(hf.model.layers):
        at, mlp = layer.self_attn, layer.mlp
        for mod, p in (
            (at.q_proj, "q"),
            (at.k_proj, "k"),
            (at.v_proj, "v"),
            (at.o_proj, "o"),
            (mlp.gate_proj, "gate"),
            (mlp.up_proj, "up"),
            (mlp.down_proj, "down"),
        ):
            mod.weight = param(proj[f"layers.{n}.{p}"])
        layer.input_layernorm.weight = param(model.input_norms[n])
        layer.post_attention_layernorm.weight = param(model.post_norms[n])
    # rotary inv_freq is a computed buffer: rebuild the module off the meta device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg).to(model.device)
    meta = [n for n, t in itertools.chain(hf.named_parameters(), hf.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"HF twin: tensors left on the meta device: {meta[:5]}")
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def check_hf_twin(model, hf, kv, device):
    """Same weights, same math: last-token logits of a short prompt, river prefill vs HF. The
    prompt's K/V go to the padding block (whatever the graph runner leaves there is junk)."""
    import torch

    from river.model import ForwardBatch

    n, pad = min(8, kv.block_size), kv.num_blocks - 1
    ids = torch.arange(1, n + 1, device=device)
    logits = model.prefill(
        ForwardBatch(
            ids,
            torch.arange(n, device=device),
            pad * kv.block_size + torch.arange(n, device=device),
            torch.tensor([[pad]], dtype=torch.int32, device=device),
            torch.tensor([n], dtype=torch.int32, device=device),
            torch.tensor([0, n], dtype=torch.int32, device=device),
        ),
        kv,
    )
    with torch.inference_mode():
        ref = hf(ids.view(1, -1)).logits[0, -1].float()
    err = (logits[0] - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    print(f"  HF twin check: max |river - HF| / max |HF| = {err:.2e}", flush=True)
    if err > 0.1:
        raise RuntimeError("the HF baseline does not compute what river computes")
