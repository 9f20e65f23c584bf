"""The op layer: every computation of the forward pass goes through one of these names.

Three implementations take the same arguments:
- "reference" (`river.kernels.reference`): plain PyTorch, sync-free, the exact oracle of the
  other two and of the tests; any device.
- "cpu" (`river.kernels.cpu`): the CPU fast path (row masks read on the host so each weight set
  runs only over its own rows, bf16 GEMV, packed int4 twins).
- "triton" (`river.kernels`): the CUDA kernels.
"""

from __future__ import annotations

import importlib
import types

OP_NAMES = (
    "rms_norm",
    "linear",
    "gate_up_silu",
    "qkv_rope_store",
    "paged_decode_attention",
    "prefill_attention",
    "sample",
)
# Not ops of the forward, but part of every op set: the decode scratch a CUDA-graph runner
# allocates once, outside capture, and passes to model.decode (None where an op set needs none).
HELPER_NAMES = ("alloc_decode_scratch",)
OP_SETS = {
    "reference": "river.kernels.reference",
    "cpu": "river.kernels.cpu",
    "triton": "river.kernels",
}


def default_op_set(device) -> str:
    return "triton" if str(device).startswith("cuda") else "cpu"


def get_ops(device, kind: str | None = None) -> types.SimpleNamespace:
    """The op implementations `kind` (None: the device's default, "cpu" or "triton")."""
    kind = kind or default_op_set(device)
    if kind not in OP_SETS:
        raise ValueError(f"op set must be one of {sorted(OP_SETS)}, got {kind!r}")
    if kind == "triton" and not str(device).startswith("cuda"):
        raise ValueError(f"the Triton ops need a CUDA device, not {device}")
    impl = importlib.import_module(OP_SETS[kind])
    ops = types.SimpleNamespace(**{name: getattr(impl, name) for name in OP_NAMES + HELPER_NAMES})
    ops.kind = kind
    return ops
