"""Twin precision: which river projections are 4-, 6- or 8-bit, under a byte budget.

The river's quality on small models is decided by its twins' error far more than by the exit
rule (RIVER.md: with the first 4 layers in bf16, 4-bit twins keep 0.884 top-1 agreement with
full, 8-bit twins 0.982). 8-bit reads ~0.5x of bf16's bytes, 4-bit g64 ~0.28x, and the byte
count of a decode token is what decides its speed. So precision is a knob, set per projection:

    "w4"        every twin 4-bit (group-wise, river.quantize)
    "w8"        every twin 8-bit (per channel, river.w8)
    "mix:B"     the twins read B x bf16's bytes on average (B between the two, e.g. 0.35): the
                projections whose 8-bit twin buys the most quality per byte are 8-bit
    "w6"        every twin 6-bit (group-wise, river.quantize.W6Weight: 0.41x of bf16's bytes)
    "mix6:B"    as "mix:B" from a 6-bit base: 6-bit twins, the units whose 8-bit twin buys the
                most per byte 8-bit (B between 0.41 and 0.5). At the default's bytes it measured
                far better than the 4/8 mix (BENCHMARKS.md, "6-bit twins"); the Triton kernels
                read the 6-bit twins packed (kernels/tiles.py, HI_PLANE)

A unit of choice is a fused weight (qkv, o, gate_up, down of one layer): its members share one
format because the kernels read them as one matrix.

How "mix" ranks the units, without data: `unit_sensitivity` runs the model over random token
ids (river.calibrate's generator), swaps one unit at a time for its 4-bit twin, and takes the KL
divergence of the final logits from the unswapped model's. That KL is the unit's gain from 8
bits (an 8-bit twin's own KL is ~1/256 of it: every twin at 8 bits costs +0.2% perplexity on
the tuning text, all at 4 bits +7%), its cost the bytes 8-bit adds; `plan` upgrades units by
gain per byte until the budget is spent ("mix6" ranks its units by the same 4-bit KLs: a
6-bit ranking measured no better). One unit at a time is a first-order picture
(errors of several twins add up roughly, not exactly); its measured result is in
benchmarks/results/quality-*.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from river.config import FUSED, ModelConfig
from river.errors import ConfigError

# unit -> the projections (river.config.PROJECTIONS names) fused into its weight
UNITS = FUSED
PRESETS = ("w4", "w8", "mix", "w6", "mix6")
SENSITIVITY_VERSION = 2  # bump when unit_sensitivity's measurement changes (cache identity)


@dataclass(frozen=True)
class TwinPrecision:
    """A point on the bytes/quality front of the twins; see the module docstring."""

    preset: str = "w4"
    budget: float | None = None  # mix: twin bytes / bf16 bytes, averaged over the twins

    @classmethod
    def parse(cls, spec) -> TwinPrecision:
        """ "w4", "w6", "w8", "mix:0.35", "mix6:0.45" (or a TwinPrecision, returned as is)."""
        if isinstance(spec, TwinPrecision):
            return spec
        if not isinstance(spec, str):
            raise ConfigError(
                f"river_precision must be a string like 'w4', 'w8' or 'mix:0.35', got {spec!r}"
            )
        name, _, arg = spec.partition(":")
        if name in ("w4", "w6", "w8") and not arg:
            return cls(name)
        if name in ("mix", "mix6"):
            try:
                budget = float(arg)
            except ValueError:
                budget = None
            if budget is None or not 0.0 < budget < 1.0:
                raise ConfigError(
                    f"river_precision '{name}:B' needs a byte budget B in (0, 1) (twin bytes "
                    f"over bf16 bytes, e.g. {name}:{0.35 if name == 'mix' else 0.45}), got "
                    f"{spec!r}"
                )
            return cls(name, budget)
        raise ConfigError(
            f"river_precision must be 'w4', 'w6', 'w8', 'mix:B' (e.g. mix:0.35) or 'mix6:B' "
            f"(e.g. mix6:0.45), got {spec!r}"
        )

    @property
    def spec(self) -> str:
        return self.preset if self.budget is None else f"{self.preset}:{self.budget:g}"

    @property
    def head_bits(self) -> int:
        """The LM head's twin, which exited tokens take their logits from: 8-bit (+0.2%
        perplexity alone on the tuning text, and half the head's bytes, which at the default
        model's size are a fifth of a token's) except in "w4", which keeps the bf16 head."""
        return 16 if self.preset == "w4" else 8

    @property
    def bits_needed(self) -> tuple[int, ...]:
        """The twin formats this precision builds (the caches): what it reads, and the 4-bit
        twins a mix ranks its units with."""
        return {"w4": (4,), "w6": (6,), "w8": (8,), "mix": (4, 8), "mix6": (4, 6, 8)}[self.preset]

    @property
    def base_bits(self) -> int:
        """The width of a unit the budget does not upgrade to 8 bits."""
        return {"w4": 4, "w6": 6, "w8": 8, "mix": 4, "mix6": 6}[self.preset]


def unit_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """[N, K] of each unit's fused weight."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    return {
        "qkv": ((cfg.num_heads + 2 * cfg.num_kv_heads) * d, h),
        "o": (h, cfg.num_heads * d),
        "gate_up": (2 * i, h),
        "down": (h, i),
    }


def weight_bytes(n: int, k: int, bits: int, group_size: int = 64) -> float:
    """Bytes one decode token reads from a [N, K] weight: bf16 (16), 4- or 6-bit with a bf16
    scale and zero per group, or 8-bit with a bf16 scale per row."""
    if bits == 16:
        return 2.0 * n * k
    if bits == 8:
        return n * k + 2.0 * n
    if bits not in (4, 6):
        raise ValueError(f"twins are 4-, 6- or 8-bit, got bits={bits}")
    return n * k * bits / 8 + 4.0 * n * k / group_size


def plan(
    precision: TwinPrecision,
    cfg: ModelConfig,
    sensitivity: dict[tuple[int, str], float] | None = None,
    group_size: int = 64,
) -> dict[tuple[int, str], int]:
    """{(layer, unit): bits} for every unit of the model. "mix" needs `sensitivity`
    ({(layer, unit): quality gain of its 8-bit twin over its 4-bit one}, higher = more)."""
    units = [(n, u) for n in range(cfg.num_layers) for u in UNITS]
    base = precision.base_bits
    if precision.budget is None:
        return {key: base for key in units}
    if sensitivity is None:
        raise ValueError(f"river_precision '{precision.preset}' needs the units' sensitivities")
    shapes = unit_shapes(cfg)
    bf16 = sum(weight_bytes(*shapes[u], 16) for _, u in units)
    spent = sum(weight_bytes(*shapes[u], base, group_size) for _, u in units)
    budget = precision.budget * bf16
    out = {key: base for key in units}

    def extra(u):
        return weight_bytes(*shapes[u], 8) - weight_bytes(*shapes[u], base, group_size)

    # best gain per extra byte first; ties (and zero gains) broken by layer depth, deeper first
    order = sorted(units, key=lambda key: (-sensitivity.get(key, 0.0) / extra(key[1]), -key[0]))
    for key in order:
        if spent + extra(key[1]) > budget:
            continue  # a smaller unit further down may still fit
        out[key] = 8
        spent += extra(key[1])
    return out


def twin_fraction(bits: dict[tuple[int, str], int], cfg: ModelConfig, group_size=64) -> float:
    """Bytes of the planned twins over the same weights' bf16 bytes."""
    shapes = unit_shapes(cfg)
    twin = sum(weight_bytes(*shapes[u], b, group_size) for (_, u), b in bits.items())
    return twin / sum(weight_bytes(*shapes[u], 16) for _, u in bits)


def select(bits: dict[tuple[int, str], int], twins: dict[int, dict]) -> dict:
    """{"layers.N.proj": twin} for river.model.LlamaModel.attach_river from the per-format
    twins ({4: {...}, 8: {...}}) and a plan."""
    return {
        f"layers.{n}.{p}": twins[b][f"layers.{n}.{p}"]
        for (n, u), b in bits.items()
        for p in UNITS[u]
    }


@torch.inference_mode()
def unit_sensitivity(model, twins: dict[int, dict], calib, progress=None) -> dict:
    """{(layer, unit): KL}: the mean over the calibration tokens of KL(full || full with only
    this unit swapped for its 4-bit twin), on river.calibrate's random token ids: what the
    unit's 8-bit twin buys back. `model` is a LlamaModel (bf16 or fp32) with no twins
    attached; `twins` {4: {"layers.N.proj": W4Weight}}; `progress`: optional callable(done,
    total)."""
    from river.calibrate import SCRATCH_BLOCK, random_tokens, scratch_cache
    from river.model import LayerWeights
    from river.scheduler import prefill_forward_batch

    cfg = model.cfg
    seq_len = min(calib.seq_len, model.cos.shape[0])
    ids = random_tokens(cfg.vocab_size, cfg.bos_token_id, calib)[:, :seq_len]
    kv, tables = scratch_cache(model, ids.shape[0], seq_len)
    batch = prefill_forward_batch(ids.tolist(), tables, SCRATCH_BLOCK, model.device)
    ref = torch.log_softmax(model.prefill(batch, kv, all_logits=True), -1)
    p_ref = ref.exp()

    def dense(t):
        return (
            t.dequantize(model.dtype).to(model.device)
            if model.device.type != "cuda"
            else (t.to(device=model.device, dtype=model.dtype))
        )

    def fused(n, u):
        ws = [twins[4][f"layers.{n}.{p}"] for p in UNITS[u]]
        w = ws[0] if len(ws) == 1 else type(ws[0]).cat(ws)
        return dense(w)

    out = {}
    total, done = cfg.num_layers * len(UNITS), 0
    for n in range(cfg.num_layers):
        orig = model.layers[n]
        for u in UNITS:
            swapped = LayerWeights(**{f: getattr(orig, f) for f in UNITS})
            setattr(swapped, u, fused(n, u))
            model.layers[n] = swapped
            try:
                lp = torch.log_softmax(model.prefill(batch, kv, all_logits=True), -1)
            finally:
                model.layers[n] = orig
            out[(n, u)] = float((p_ref * (ref - lp)).sum(-1).mean())
            done += 1
            if progress is not None:
                progress(done, total)
    return out
