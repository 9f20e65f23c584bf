"""The kernel launches of the engine's forward passes that compile_sm90.py compiles: every op
river launches on CUDA (river/model.py through river/ops.py), through its real host launcher,
with storage-less CUDA-like tensors at the decode batches and prefill size of each model shape."""

from __future__ import annotations

import dataclasses

from shapes import LLAMA_3_1_8B, SMOLLM2_135M, Shape
from sm90_driver import cuda_like_empty

MODELS = {"smollm2-135m": SMOLLM2_135M, "llama-3.1-8b": LLAMA_3_1_8B}
BATCHES = (1, 8, 32, 64)
BLOCK_SIZE = 16  # EngineConfig.block_size
GROUP = 64  # EngineConfig.river_group_size
OTHER_GROUPS = (32, 128)  # also compiled, at the 8B shapes and the first two batches
EAGER_CONTEXT = 256  # a short eager decode: the block table only as wide as the longest row
PREFILL_TOKENS = 512


@dataclasses.dataclass
class Launch:
    op: str
    model: str
    batch: int
    what: str  # the engine call this stands for
    fn: object


def engine_launches(models, batches):
    """The kernel launches of the engine's forward passes, per model and decode batch."""
    return [lc for name in models for lc in _model_launches(name, MODELS[name], batches)]


def _model_launches(name, s: Shape, batches):
    import river.kernels as K
    import torch

    from river.quantize import W4Weight, W6Weight
    from river.w8 import W8Weight

    empty = cuda_like_empty()
    bf16, i32, i64 = torch.bfloat16, torch.int32, torch.int64
    q_dim = s.num_heads * s.head_dim
    qkv_rows = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim

    def w4(n, k, g=GROUP):
        q = empty(n, k // 2, dtype=torch.uint8)
        return W4Weight(q, empty(n, k // g, dtype=bf16), empty(n, k // g, dtype=bf16), g)

    def w6(n, k, g=GROUP):
        q, hi = empty(n, k // 2, dtype=torch.uint8), empty(n, k // 4, dtype=torch.uint8)
        return W6Weight(q, hi, empty(n, k // g, dtype=bf16), empty(n, k // g, dtype=bf16), g)

    h, i = s.hidden_size, s.intermediate_size
    shapes = {"qkv": (qkv_rows, h), "o": (h, q_dim), "gate_up": (2 * i, h), "down": (h, i)}
    weights = {
        "bf16": {p: empty(n, k, dtype=bf16) for p, (n, k) in shapes.items()},
        "w4": {p: w4(n, k) for p, (n, k) in shapes.items()},
        "w6": {p: w6(n, k) for p, (n, k) in shapes.items()},
        "w8": {
            p: W8Weight(empty(n, k, dtype=torch.int8), empty(n, dtype=bf16))
            for p, (n, k) in shapes.items()
        },
    }
    lm_head = empty(s.vocab_size, h, dtype=bf16)
    norm_w = empty(h, dtype=bf16)
    window = s.max_position_embeddings
    cos = empty(window, s.head_dim // 2, dtype=torch.float32)
    sin = empty(window, s.head_dim // 2, dtype=torch.float32)
    num_blocks = 4096
    k_cache = empty(num_blocks, BLOCK_SIZE, s.num_kv_heads, s.head_dim, dtype=bf16)
    v_cache = empty(num_blocks, BLOCK_SIZE, s.num_kv_heads, s.head_dim, dtype=bf16)
    kv_valid = empty(num_blocks, BLOCK_SIZE, dtype=torch.bool)
    scale = s.head_dim**-0.5
    out = []

    def add(op, batch, what, fn):
        out.append(Launch(op, name, batch, what, fn))

    def qkv(x, weight, mask, q_out):
        m = x.shape[0]
        return lambda: K.qkv_rope_store(
            x, weight, cos, sin, empty(m, dtype=i64), k_cache, v_cache, empty(m, dtype=i64),
            s.num_heads, s.num_kv_heads, row_mask=mask, q_out=q_out,
        )  # fmt: skip

    def proj(op, x, weight, mask, y):
        return lambda: op(x, weight, row_mask=mask, out=y)

    def decode_attention(q, tables, lens, mask, valid):
        return lambda: K.paged_decode_attention(
            q, k_cache, v_cache, tables, lens, scale, row_mask=mask, kv_valid=valid
        )

    for b in batches:
        x = empty(b, h, dtype=bf16)
        mask = empty(b, dtype=torch.bool)
        q = empty(b, s.num_heads, s.head_dim, dtype=bf16)
        attn = empty(b, q_dim, dtype=bf16)
        h_out = empty(b, h, dtype=bf16)
        act = empty(b, i, dtype=bf16)
        add("rms_norm", b, "decode", lambda x=x: K.rms_norm(x, norm_w, 1e-5))
        add("rms_norm+residual", b, "prefill", lambda x=x: K.rms_norm(x, norm_w, 1e-5, x))
        for fmt, w in weights.items():
            add(f"qkv_rope_store {fmt}", b, "decode two-path", qkv(x, w["qkv"], mask, q))
            add(f"qkv_rope_store {fmt}", b, "no row mask", qkv(x, w["qkv"], None, q))
            add(f"linear {fmt}", b, "o_proj", proj(K.linear, attn, w["o"], mask, h_out))
            add(f"linear {fmt}", b, "down_proj", proj(K.linear, act, w["down"], mask, h_out))
            add(
                f"gate_up_silu {fmt}",
                b,
                "gate_up",
                proj(K.gate_up_silu, x, w["gate_up"], mask, act),
            )
        add("linear bf16", b, "lm_head", lambda x=x: K.linear(x, lm_head))
        for capacity, what in ((window, "graph capacity"), (EAGER_CONTEXT, "short eager")):
            tables = empty(b, capacity // BLOCK_SIZE, dtype=i32)
            lens = empty(b, dtype=i32)
            for valid in (None, kv_valid):
                label = f"{what} ctx {capacity}" + (" kv_valid" if valid is not None else "")
                add(
                    "paged_decode_attention",
                    b,
                    label,
                    decode_attention(q, tables, lens, mask, valid),
                )
        logits = empty(b, s.vocab_size, dtype=torch.float32)
        temp = empty(b, dtype=torch.float32)
        add(
            "sample", b, "sampled decode",
            lambda lg=logits, t=temp, b=b: K.sample(
                lg, t, empty(b, dtype=i32), t, empty(b, dtype=i64), empty(b, dtype=i64)
            ),
        )  # fmt: skip
        # a prefill of b sequences sharing PREFILL_TOKENS new tokens
        qp = empty(PREFILL_TOKENS, s.num_heads, s.head_dim, dtype=bf16)
        add(
            "prefill_attention", b, f"prefill {PREFILL_TOKENS} tokens",
            lambda qp=qp, b=b: K.prefill_attention(
                qp, k_cache, v_cache, empty(b + 1, dtype=i32),
                empty(b, PREFILL_TOKENS // BLOCK_SIZE, dtype=i32), empty(b, dtype=i32), scale,
            ),
        )  # fmt: skip
    xp = empty(PREFILL_TOKENS, h, dtype=bf16)
    qp = empty(PREFILL_TOKENS, s.num_heads, s.head_dim, dtype=bf16)
    add("qkv_rope_store bf16", PREFILL_TOKENS, "prefill", qkv(xp, weights["bf16"]["qkv"], None, qp))
    # the other river_group_size values a user may set (the GEMV's K step follows the group)
    for g in OTHER_GROUPS if name == "llama-3.1-8b" else ():
        for b in batches[:2]:
            x, mask = empty(b, h, dtype=bf16), empty(b, dtype=torch.bool)
            q = empty(b, s.num_heads, s.head_dim, dtype=bf16)
            for fmt, make in (("w4", w4), ("w6", w6)):
                what = f"group {g}"
                add(f"qkv_rope_store {fmt}", b, what, qkv(x, make(*shapes["qkv"], g), mask, q))
                act, h_out = empty(b, i, dtype=bf16), empty(b, h, dtype=bf16)
                down = make(*shapes["down"], g)
                add(f"linear {fmt}", b, what, proj(K.linear, act, down, mask, h_out))
                gate_up = make(*shapes["gate_up"], g)
                add(f"gate_up_silu {fmt}", b, what, proj(K.gate_up_silu, x, gate_up, mask, act))
    return out
