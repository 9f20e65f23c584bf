"""The ideal speedups of bench_decode.py: the bytes one decode step reads (weights, and the K/V
of attention) per exit mode, from the model's sizes and the distribution of exit depths. A
decode step at small batch is bound by these reads, so their ratio is the speedup to expect."""

from __future__ import annotations


def exit_distribution(num_layers, exit_layers, hist):
    """P(a token runs k backbone layers), k = 0..num_layers, for the forced exits: drawn from
    `hist` when given, else always `exit_layers`."""
    if hist is not None:
        return list(hist.rescaled(num_layers).probs)
    k = min(max(exit_layers, 0), num_layers)
    return [1.0 if j == k else 0.0 for j in range(num_layers + 1)]


def layer_bytes(cfg, group_size):
    """(bf16 layer, W4 twin layer, qkv weight) bytes of one decoder layer, and the LM head's."""
    from river.precision import UNITS, unit_shapes, weight_bytes

    shapes = unit_shapes(cfg)
    bf16 = sum(weight_bytes(*shapes[u], 16) for u in UNITS) + 2 * 2 * cfg.hidden_size  # + norms
    w4 = sum(weight_bytes(*shapes[u], 4, group_size) for u in UNITS)
    qkv = shapes["qkv"][0] * shapes["qkv"][1]  # parameters
    return bf16, w4, qkv, weight_bytes(cfg.vocab_size, cfg.hidden_size, 16)


def twin_layer_bytes(cfg, bits, group_size):
    """The river twins' bytes at each of cfg's layers: every twin 4-bit when `bits` is None
    (the random models' twins), else the plan {(layer, unit): bits} (Engine.river_bits) of a
    model of L layers mapped onto cfg's layers proportionally."""
    from river.precision import UNITS, unit_shapes, weight_bytes

    shapes = unit_shapes(cfg)
    if bits is None:
        return [sum(weight_bytes(*shapes[u], 4, group_size) for u in UNITS)] * cfg.num_layers
    src = 1 + max(n for n, _ in bits)
    return [
        sum(weight_bytes(*shapes[u], bits[(n * src // cfg.num_layers, u)], group_size)
            for u in UNITS)
        for n in range(cfg.num_layers)
    ]  # fmt: skip


def bytes_per_step(cfg, mode, batch, probs, context, group_size, bits=None, head_bits=16):
    """(weight bytes, KV bytes) read by one decode step of `batch` rows (expected values when
    the rows' exit depths are random: a weight set is read at a layer if any row needs it).
    The twins are planned by `bits` (twin_layer_bytes); a row that left the backbone on the
    river path (modes w4 and river) takes its logits from the `head_bits` river head, the
    others from the bf16 head (river.model.LlamaModel.decode)."""
    from river.precision import weight_bytes

    h, d = cfg.hidden_size, cfg.head_dim
    bf16, _, qkv, lm_head = layer_bytes(cfg, group_size)
    twins = twin_layer_bytes(cfg, bits, group_size)
    kv_row = 2 * 2 * cfg.num_kv_heads * d * (context + 1)  # K and V of one row at one layer
    base = "full" if mode == "full-shared" else mode
    p_left = {"full": 0.0, "w4": 1.0}.get(base, 1.0 - probs[cfg.num_layers])
    if base in ("w4", "river") and head_bits != 16:
        river_head = weight_bytes(cfg.vocab_size, h, head_bits)
        head = (1 - p_left**batch) * lm_head + (1 - (1 - p_left) ** batch) * river_head
    else:
        head = lm_head
    weights, kv = head + 2 * batch * h, 0.0  # + the embedding rows
    for n in range(cfg.num_layers):
        p_out = sum(probs[: n + 1])  # P(row has left the backbone before layer n)
        if base == "full":
            p_out = 0.0
        elif base == "w4":
            p_out = 1.0
        any_bb = 1.0 - p_out**batch
        any_out = 1.0 - (1.0 - p_out) ** batch
        if base in ("full", "w4", "river"):
            weights += any_bb * bf16 + any_out * twins[n]
            kv += batch * kv_row  # every row attends at every layer
        elif base == "propagate":
            # the exited rows' K/V come from the fused bf16 qkv weight: read whenever any row
            # is there at all (every row is in the backbone or propagating)
            weights += any_bb * (bf16 - 2 * qkv) + 2 * qkv
            kv += batch * (1 - p_out) * kv_row
        elif base == "mask":
            weights += any_bb * bf16
            kv += batch * (1 - p_out) * kv_row
    return weights, kv


def token_bytes_ratio(target, bits, layer_counts, group_size=64, head_bits=16):
    """Weight bytes per decode token over full's, at batch 1, on the shapes of `target` (a
    ModelConfig: the model itself, or Llama-3.1-8B's), for tokens that ran `layer_counts`
    bf16 layers each (a prefix of the stack) and the rest in twins planned by `bits`
    ({(layer, unit): 4 | 8} over the measured model's L layers; None: no twins, i.e. full).

    A measured model of L layers is mapped onto the target's L' layers proportionally: its
    layer n stands for L'/L of a target layer, with its units' bits. The LM head is read in
    bf16 by a token that never left the backbone, at `head_bits` by the others (the river
    head, river.precision); the embedding row, negligible, is left out."""
    from river.precision import UNITS, unit_shapes, weight_bytes

    shapes = unit_shapes(target)
    bf16_layer, _, _, head = layer_bytes(target, group_size)
    river_head = weight_bytes(target.vocab_size, target.hidden_size, head_bits)
    full = head + target.num_layers * bf16_layer
    if bits is None:
        return 1.0
    src_layers = 1 + max(n for n, _ in bits)
    per = target.num_layers / src_layers
    twin_layer = [
        sum(weight_bytes(*shapes[u], bits[(n, u)], group_size) for u in UNITS)
        + 2 * 2 * target.hidden_size
        for n in range(src_layers)
    ]
    # suffix[b]: bytes of the twins of layers b.. (a token with b bf16 layers reads these)
    suffix = [0.0] * (src_layers + 1)
    for n in range(src_layers - 1, -1, -1):
        suffix[n] = suffix[n + 1] + twin_layer[n]
    counts = list(layer_counts)
    total = 0.0
    for b in counts:
        b = min(max(int(b), 0), src_layers)
        total += (head if b >= src_layers else river_head) + per * (b * bf16_layer + suffix[b])
    return total / (len(counts) * full)
