"""Triton kernels of river (imported as `river.kernels`); `reference` holds their PyTorch twins.

The ops are exported lazily (PEP 562): `import river.kernels` and `river.kernels.reference`
import neither triton nor any kernel module. That keeps the CPU engine free of triton, and it
matters for the tests: triton decides at decoration (import) time whether a kernel runs in the
interpreter (TRITON_INTERPRET=1), so the kernel modules must not be imported before the
interpreter is chosen. Nothing here launches anything; importing works without a GPU.
"""

from __future__ import annotations

import importlib

# op -> module. No module is named like an op: importing a module sets the package attribute
# of its name, which would otherwise shadow the op.
_EXPORTS = {
    "rms_norm": "norm",
    "linear": "matmul",
    "gate_up_silu": "matmul",
    "qkv_rope_store": "qkv_rope",
    "paged_decode_attention": "decode_attention",
    "DecodeAttentionScratch": "decode_attention",
    "alloc_decode_scratch": "decode_attention",
    "prefill_attention": "prefill",
    "sample": "sampling",
    "workspace_tensors": "splitk",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
