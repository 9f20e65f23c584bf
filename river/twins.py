"""Building an engine's river twins: the 4- and 8-bit twins of every projection (quantized once
and cached beside the model, river.twin_cache), and the per-projection choice between them that
EngineConfig.river_precision asks for (river.precision)."""

from __future__ import annotations

import sys
import warnings

import torch

from river.checkpoint import load_weights
from river.config import PROJECTIONS
from river.model import LlamaModel
from river.precision import SENSITIVITY_VERSION, TwinPrecision, plan, select, unit_sensitivity

# The random ids the sensitivities are measured on: fewer than the importance statistics
# (river.calibrate's 8 x 256), since this takes a forward pass per unit (120 for the default
# model, ~100 s in fp32 on 2 CPU cores, once); the ranking is what matters, not the KLs.
SENSITIVITY_CALIBRATION = (4, 128)


def build_twins(engine, progress: bool = True):
    """(quantized {"layers.N.proj": W4Weight | W8Weight}, bits {(layer, unit): 4 | 8}, head
    W8Weight or None) for `engine` (a river.Engine: its model, config and model directory).
    The head's twin is quantized here (under a second for the default model; not cached)."""
    from river.twin_cache import (
        fingerprint,
        importance_suffix,
        load_or_measure_json,
        load_or_quantize,
    )

    cfg = engine.config
    precision = TwinPrecision.parse(cfg.river_precision)
    weights = load_weights(engine.model_dir, engine.model_config, dtype=torch.float32)
    named = {
        f"layers.{n}.{p}": layer[p]
        for n, layer in enumerate(weights["layers"])
        for p in PROJECTIONS
    }
    said = []

    def announce(msg):
        # One line for the whole first build (4-bit, 8-bit, sensitivities): where it goes.
        if not said:
            where = msg.rpartition("cache: ")[2]
            print(
                f"river: building the river twins once (river_precision {precision.spec}); "
                f"cache: {where}",
                file=sys.stderr,
            )
        said.append(msg)

    announce = announce if progress else None
    fp32_models = {}

    def fp32_cpu(ops):
        if ops not in fp32_models:
            fp32_models[ops] = LlamaModel(
                engine.model_config, weights, "cpu", torch.float32, engine.max_model_len,
                ops=ops,
            )  # fmt: skip
        return fp32_models[ops]

    def reference_model(ops):
        # Measurements that name a cache must not depend on the CPU path's dtype: a bf16 CPU
        # engine measures them with an fp32 model (`ops`: "reference" for the importance
        # statistics, as they were always measured; "cpu", dense fp32 matmuls and ~3x faster,
        # for the 120 passes of the sensitivities).
        # (a tensor-parallel engine's model is one rank's shard: measure on a whole model)
        if engine.tp is None and (engine.device.type != "cpu" or engine.dtype == torch.float32):
            return engine.model
        return fp32_cpu(ops)

    def sampling_model():
        # The model that writes the self-samples: float32 on the CPU whatever the engine's
        # device, so that every machine draws the same tokens and builds the same twins.
        if engine.tp is None and engine.device.type == "cpu" and engine.dtype == torch.float32:
            return engine.model
        return fp32_cpu("cpu")

    importance, tag = None, ""
    calibration = cfg.river_calibration
    if calibration == "text":
        from river.calibrate import TEXT, activation_hessians, bundled_text, text_tag

        # GPTQ's Hessians from text that ships with Python (river.calibrate.bundled_text)
        try:
            ids = bundled_text(TEXT, lambda t: engine.tokenizer.encode(t, add_special_tokens=True))
        except (ImportError, RuntimeError) as e:  # a Python without its docs (pydoc_data)
            warnings.warn(
                f"river_calibration='text' needs the text Python ships ({e}); building the "
                "self-sample twins instead",
                stacklevel=2,
            )
            calibration = "self-samples"
    if calibration == "text":
        tag = text_tag(TEXT, ids)
        measured = {}

        def importance():
            if "h" not in measured:  # once for every format
                measured["h"] = activation_hessians(reference_model("cpu"), ids)
            return measured["h"]

    elif calibration != "none":
        from river.calibrate import RANDOM_TOKENS, SELF_SAMPLES, activation_importance, own_samples

        calib = SELF_SAMPLES if calibration == "self-samples" else RANDOM_TOKENS
        measured = {}

        def importance():
            if "imp" not in measured:  # once for both formats
                ids = None
                if calib.source == "self-samples":
                    from river.progress import progress_bar

                    # ~30-50 s for the default model on 2 CPU cores, minutes for an 8B one
                    with progress_bar(total=calib.seq_len - 1, desc="river samples", unit="tok",
                                      enabled=progress and sys.stderr.isatty()) as bar:  # fmt: skip
                        ids = own_samples(sampling_model(), calib, bar.update)
                measured["imp"] = activation_importance(
                    reference_model("reference"), calib, ids=ids
                )
            return measured["imp"]

        tag = calib.tag
    twins = {
        bits: load_or_quantize(
            engine.model_dir,
            named,
            group_size=cfg.river_group_size,
            method=cfg.river_method,
            progress=progress,
            importance=importance,
            importance_tag=tag,
            announce=announce,
            bits=bits,
        )  # fmt: skip
        for bits in precision.bits_needed
    }
    sensitivity = None
    if precision.budget is not None:  # a mix: rank the units
        from river.calibrate import Calibration

        sens_calib = Calibration(*SENSITIVITY_CALIBRATION)
        model = reference_model("cpu")
        identity = {
            "fingerprint": fingerprint(named),
            "twins": f"w4-g{cfg.river_group_size}-{cfg.river_method}+w8-channel|{tag}",
            "measure": f"kl-swap:random-tokens:{sens_calib.num_seqs}x{sens_calib.seq_len}:"
            f"seed{sens_calib.seed}:v{SENSITIVITY_VERSION}",
            "dtype": str(model.dtype),
            "ops": model.ops.kind,
        }

        # one file per twin weighting, as the twins' own caches (their identity is in it)
        sens_file = f"river-sensitivity{importance_suffix(tag)}.json"

        def measure():
            if announce is not None:
                announce(
                    "measuring which twins need 8 bits (a short forward pass per projection, "
                    f"random tokens); cache: {engine.model_dir / sens_file}"
                )
            from river.progress import progress_bar

            total = engine.model_config.num_layers * 4
            with progress_bar(total=total, desc="river sensitivity", unit="proj",
                              enabled=progress and sys.stderr.isatty()) as bar:  # fmt: skip
                sens = unit_sensitivity(model, twins, sens_calib, lambda d, t: bar.update())
            return [[n, u, v] for (n, u), v in sens.items()]

        rows = load_or_measure_json(engine.model_dir, sens_file, identity, measure)
        sensitivity = {(n, u): v for n, u, v in rows}
    bits = plan(precision, engine.model_config, sensitivity, cfg.river_group_size)
    head = None
    if precision.head_bits == 8:
        from river.w8 import quantize_w8

        # the head as the engine holds it (its dtype), whole even when the engine is sharded
        head = quantize_w8(weights["lm_head"].to(engine.dtype).float())
    return select(bits, twins), bits, head
