"""The op layer: every computation of the forward pass goes through one of these names.

On CPU (and as test oracles) they are the plain-PyTorch references in `river.kernels.reference`;
on CUDA they are the Triton kernels of `river.kernels`, which take the same arguments.
"""

from __future__ import annotations

import types

from river.kernels import reference

OP_NAMES = (
    "rms_norm",
    "linear",
    "gate_up_silu",
    "qkv_rope_store",
    "paged_decode_attention",
    "prefill_attention",
    "sample",
)


def get_ops(device) -> types.SimpleNamespace:
    """The op implementations for tensors on `device` ("cpu" -> reference, "cuda" -> Triton)."""
    impl = reference
    if str(device).startswith("cuda"):
        import river.kernels as triton_ops

        impl = triton_ops
    return types.SimpleNamespace(**{name: getattr(impl, name) for name in OP_NAMES})
