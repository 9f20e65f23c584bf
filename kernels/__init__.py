"""Triton kernels of river (imported as `river.kernels`); `reference` holds their PyTorch twins.

The ops are exported lazily (PEP 562): `import river.kernels` and `river.kernels.reference`
import neither triton nor any kernel module. That keeps the CPU engine free of triton, and it
matters for the tests: triton decides at decoration (import) time whether a kernel runs in the
interpreter (TRITON_INTERPRET=1), so the kernel modules must not be imported before the
interpreter is chosen. Nothing here launches anything; importing works without a GPU.
"""

from __future__ import annotations

import importlib
import sys
import types

_EXPORTS = {
    "rms_norm": "rms_norm",
    "linear": "linear",
    "gate_up_silu": "linear",
    "qkv_rope_store": "qkv_rope",
    "paged_decode_attention": "decode_attention",
    "DecodeAttentionScratch": "decode_attention",
    "alloc_decode_scratch": "decode_attention",
    "prefill_attention": "prefill_attention",
    "sample": "sampling",
}

__all__ = list(_EXPORTS)


class _KernelsPackage(types.ModuleType):
    """`linear` and `rms_norm` are both an op and the module that defines it. Importing the
    module `river.kernels.linear` makes Python set the package attribute `linear` to that
    module, which would shadow the op; this keeps package attributes pointing at the ops
    (the modules stay reachable through importlib.import_module / sys.modules)."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _KernelsPackage


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
