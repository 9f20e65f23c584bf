"""The on-disk cache of the river twins: one safetensors file per model directory, precision
(4-bit: group size and method; 8-bit: per channel) and (un)weighted error, its metadata keyed
by a fingerprint of the source weights, the importance measurement and the quantizer's
versions, so that a changed model or quantizer rebuilds it instead of loading stale twins.

File layout: for every weight NAME the tensors NAME.qweight, NAME.scales, (4- and 6-bit)
NAME.zeros and (6-bit) NAME.qweight_hi (see river.quantize and river.w8 for the formats), scales
and zeros stored float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import uuid
import warnings

import torch

from river.model_cache import river_home
from river.quantize import FORMAT_VERSION, W4Weight, W6Weight, quantize_model
from river.w4_methods import ALGO_VERSION, METHODS
from river.w8 import W8_FORMAT_VERSION, W8Weight, quantize_w8


def importance_suffix(importance_tag: str) -> str:
    """The cache files' name part for how the twins' error was weighted: one set of files per
    statistics source, so that switching river_calibration back and forth does not rebuild
    them every time ("": unweighted, "-act": random tokens, the first source, "-act-self":
    the model's own samples, "-gptq-text": GPTQ with Hessians from bundled text)."""
    if not importance_tag:
        return ""
    if importance_tag.startswith("hessian:text"):
        return "-gptq-text"
    return "-act-self" if importance_tag.startswith("act-msq:self-samples") else "-act"


def cache_file_name(group_size: int, method: str, bits: int = 4, importance_tag: str = "") -> str:
    # The "river-" prefix matters: river.checkpoint skips such files when globbing for shards.
    act = importance_suffix(importance_tag)
    if bits == 8:
        return f"river-w8-channel{act}.safetensors"
    return f"river-w{bits}-g{group_size}-{method}{act}.safetensors"


def _fallback_dir(model_dir: pathlib.Path, cache_dir) -> pathlib.Path:
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    key = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:16]
    return river_home() / "quant" / key


def fingerprint(named_weights: dict[str, torch.Tensor]) -> str:
    """Cheap identity of the source weights: names, shapes, an exact checksum of every
    element's float32 bits, and 257 strided samples per tensor.

    Taken on the float32 values that quantize_w4 sees, so the same weights passed as bf16 or
    float32 match. The checksum sums the raw bits as integers: exact and independent of the
    reduction order (and so of the thread count), unlike a float sum, for one pass over the data.
    """
    h = hashlib.sha256()
    for name in sorted(named_weights):
        w = named_weights[name]
        h.update(f"{name}|{tuple(w.shape)}|".encode())
        bits = w.detach().cpu().float().contiguous().view(-1).view(torch.int32)
        if bits.numel() == 0:
            continue
        h.update(str(int(bits.sum(dtype=torch.int64))).encode())
        idx = torch.linspace(0, bits.numel() - 1, 257).long()
        h.update(bits[idx].numpy().tobytes())
    return h.hexdigest()


def _metadata(group_size, method, fp, names, importance_tag="", bits=4) -> dict[str, str]:
    if bits == 8:
        return {
            "importance": importance_tag,
            "format": "river-w8",
            "format_version": str(W8_FORMAT_VERSION),
            "fingerprint": fp,
            "names": json.dumps(sorted(names)),
        }
    return {
        "importance": importance_tag,
        "format": f"river-w{bits}",
        "format_version": str(FORMAT_VERSION),
        "algo_version": str(ALGO_VERSION),
        "group_size": str(group_size),
        "method": method,
        "fingerprint": fp,
        "names": json.dumps(sorted(names)),
    }


def _try_load(path: pathlib.Path, expected: dict[str, str], shapes: dict) -> dict | None:
    """The cached twins at `path`, or None if absent, stale or unreadable."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if any(meta.get(k) != v for k, v in expected.items()):
                return None  # other weights, parameters or code version: rebuild
            out = {}
            for name, (n, k) in shapes.items():
                if meta.get("format") == "river-w8":
                    out[name] = W8Weight(
                        qweight=f.get_tensor(f"{name}.qweight"),
                        scales=f.get_tensor(f"{name}.scales"),
                    )
                    if out[name].shape != (n, k):
                        return None
                    continue
                group_size = int(meta["group_size"])
                planes = {"qweight": f.get_tensor(f"{name}.qweight")}
                if meta.get("format") == "river-w6":
                    planes["qweight_hi"] = f.get_tensor(f"{name}.qweight_hi")
                out[name] = (W6Weight if "qweight_hi" in planes else W4Weight)(
                    **planes,
                    scales=f.get_tensor(f"{name}.scales"),
                    zeros=f.get_tensor(f"{name}.zeros"),
                    group_size=group_size,
                )
                if out[name].shape != (n, k):
                    return None
            return out
    except Exception as e:  # a truncated or corrupt cache is rebuilt, never fatal
        warnings.warn(f"ignoring unreadable twin cache {path}: {e}", stacklevel=3)
        return None


def _try_save(path: pathlib.Path, quantized: dict, meta: dict[str, str]) -> bool:
    """Write the cache atomically; False (nothing left behind) if the directory refuses it."""
    from safetensors.torch import save

    tensors = {}
    for name, q in quantized.items():
        tensors[f"{name}.qweight"] = q.qweight.cpu().contiguous()
        tensors[f"{name}.scales"] = q.scales.float().cpu().contiguous()
        if q.bits in (4, 6):
            tensors[f"{name}.zeros"] = q.zeros.float().cpu().contiguous()
        if q.bits == 6:
            tensors[f"{name}.qweight_hi"] = q.qweight_hi.cpu().contiguous()
    data = save(tensors, metadata=meta)  # bytes, ~0.6 bytes per weight
    # Unique per writer, and ending in .tmp rather than .safetensors so the checkpoint loader's
    # shard glob never picks up a half-written file.
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
        return True
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return False


def load_or_quantize(
    model_dir,
    named_weights: dict[str, torch.Tensor],
    group_size: int = 64,
    method: str = "hqq",
    cache_dir=None,
    progress: bool = True,
    importance=None,
    importance_tag: str = "",
    announce=None,
    bits: int = 4,
) -> dict:
    """The twins of `named_weights` (bits=4: W4Weight, bits=6: W6Weight, group_size and method
    apply; bits=8: W8Weight, per channel), from the cache if it matches, else quantized and
    cached.

    announce: optional callable(str) told, once, when the twins are built rather than loaded
    (the CLI prints it: a first run of the river pauses for this).

    importance: None, or a zero-argument callable returning {name: [K] importance} (see
    river.quantize.quantize_w4); it is called only when the cache misses, and never for
    method="rtn".
    importance_tag names how it was measured and is part of the cache identity (a different
    measurement rebuilds the cache).

    The cache is `model_dir/river-w{4,6}-g{G}-{method}[-act|-act-self].safetensors`; when model_dir
    is not writable it goes to `cache_dir`, or to `$RIVER_HOME/quant/<hash of model_dir>`
    (RIVER_HOME defaults to ~/.cache/river). A cache whose metadata (format/algorithm version,
    group size, method, fingerprint of the source weights) does not match is ignored and
    rebuilt.
    Scales/zeros come back float32 on CPU; the caller casts them to its compute dtype.
    """
    if bits not in (4, 6, 8):
        raise ValueError(f"twins are 4-, 6- or 8-bit, got bits={bits}")
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; expected one of {METHODS}")
    if method == "rtn" and bits != 8:
        importance = None  # rtn has no objective to weight: one cache, no statistics pass
    if importance is not None and not importance_tag:
        raise ValueError("load_or_quantize: importance needs an importance_tag for the cache")
    model_dir = pathlib.Path(model_dir)
    tag = importance_tag if importance is not None else ""
    name = cache_file_name(group_size, method, bits=bits, importance_tag=tag)
    candidates = [model_dir / name, _fallback_dir(model_dir, cache_dir) / name]
    meta = _metadata(group_size, method, fingerprint(named_weights), named_weights, tag, bits)
    shapes = {k: tuple(v.shape) for k, v in named_weights.items()}
    for path in candidates:
        cached = _try_load(path, meta, shapes)
        if cached is not None:
            return cached
    if announce is not None:
        where = candidates[0] if os.access(candidates[0].parent, os.W_OK) else candidates[1]
        what = (
            "8-bit river twins once (per channel)"
            if bits == 8
            else (f"{bits}-bit river twins once ({method}, group {group_size})")
        )
        announce(f"building the {what}; cache: {where}")
        progress = progress and sys.stderr.isatty()  # that line says it; a bar only on a terminal
    imp = importance() if importance is not None else None
    if bits == 8:
        quantized = {
            k: quantize_w8(w, imp.get(k) if imp else None) for k, w in named_weights.items()
        }
    else:
        quantized = quantize_model(named_weights, group_size, method, progress, imp, bits)
    quantized = {k: v.to(device="cpu") for k, v in quantized.items()}
    if not any(_try_save(path, quantized, meta) for path in candidates):
        warnings.warn(
            f"could not write the twin cache to {candidates[0].parent} or {candidates[1].parent}; "
            "it will be rebuilt next time",
            stacklevel=2,
        )
    return quantized


def load_or_measure_json(model_dir, name: str, identity: dict, measure, cache_dir=None) -> dict:
    """A small JSON result (river.precision's unit sensitivities) cached beside the twins:
    `name` in model_dir (or the fallback directory), reused while its `identity` (the source
    weights' fingerprint, how it was measured) matches, else `measure()` is called and the
    result written. The result must be JSON-serialisable."""
    model_dir = pathlib.Path(model_dir)
    candidates = [model_dir / name, _fallback_dir(model_dir, cache_dir) / name]
    for path in candidates:
        try:
            data = json.loads(path.read_text())
            if data.get("identity") == identity:
                return data["result"]
        except (OSError, ValueError, KeyError, AttributeError):
            continue
    result = measure()
    blob = json.dumps({"identity": identity, "result": result}, indent=1)
    for path in candidates:
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(blob)
            os.replace(tmp, path)
            break
        except OSError:
            tmp.unlink(missing_ok=True) if tmp.parent.exists() else None
    return result
