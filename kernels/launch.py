"""Host-side helpers every launcher shares: device facts, dot precision, argument checks.

The launchers check shapes, dtypes, strides and devices before a launch because a Triton
kernel has no bounds checks: a wrong shape reads or writes someone else's memory instead of
raising. The checks read only tensor metadata (never a device value), so they cost no sync.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = [
    "interpreting",
    "num_sms",
    "dot_precision",
    "weight_operands",
    "check_rows",
    "check_device",
    "check_index",
    "check_paged_cache",
    "check_row_mask",
]


def interpreting() -> bool:
    """Kernels run in the Triton interpreter (CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _sm_count(device_index: int | None) -> int:
    if torch.cuda.is_available() and device_index is not None:
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return 132  # H100 SXM; only sizes the split heuristics on CPU (interpreter)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (132 off CUDA, for the interpreter)."""
    if device.type != "cuda":
        return _sm_count(None)
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def dot_precision(dtype: torch.dtype) -> str:
    # float32 operands (tests) must not silently become TF32 on the GPU
    return "ieee" if dtype == torch.float32 else "tf32"


def weight_bits(weight) -> int:
    """16 for a dense tensor, else the twin's bits (river.quantize.W4Weight: 4,
    river.quantize.W6Weight: 6, river.w8.W8Weight: 8)."""
    return 16 if isinstance(weight, torch.Tensor) else int(getattr(weight, "bits", 4))


def _w4_words(q: torch.Tensor, k: int, g: int, what: str) -> torch.Tensor:
    """The packed nibbles uint8 [N, K // 2] as int32 words [N, K // 8] (no copy)."""
    if q.dtype != torch.uint8:
        raise ValueError(f"{what} qweight must be uint8, got {q.dtype}")
    if g % 8 or g & (g - 1):
        raise ValueError(f"{what} kernels need a power-of-two group size >= 8, got {g}")
    if k % g:
        raise ValueError(f"{what} weight K={k} is not a multiple of group_size={g}")
    if q.stride(1) != 1 or q.stride(0) % 4 or q.storage_offset() % 4:
        raise ValueError(f"{what} qweight rows must be contiguous and 4-byte aligned")
    return q.view(torch.int32)


def weight_operands(weight, x: torch.Tensor):
    """(w, hi, scales, zeros, N, K, group, bits) as the projection kernels take them:
    - W4: qweight viewed as int32 [N, K // 8], scales/zeros [N, K // G];
    - W6: the same low plane, and qweight_hi (uint8 [N, K // 4]) viewed as int16 [N, K // 8]:
      word j holds the 2-bit fields of columns 8j .. 8j + 7, the nibble words' index;
    - W8: qweight int8 [N, K] with its row scales [N] (also passed as the unused zeros);
    - dense: the weight itself in every place.
    Unused operands are the weight again (a valid pointer the kernel never reads)."""
    bits = weight_bits(weight)
    if bits == 8:
        q, s = weight.qweight, weight.scales
        if q.dtype != torch.int8 or q.dim() != 2 or q.stride(1) != 1:
            raise ValueError("W8 qweight must be int8 [N, K] with unit stride along K")
        n, k = q.shape
        if tuple(s.shape) != (n,):
            raise ValueError(f"W8 scales must be [N] = [{n}], got {tuple(s.shape)}")
        check_device(x, "activations", qweight=q, scales=s)
        return q, q, s, s, n, k, 64, 8
    if bits in (4, 6):
        what = f"W{bits}"
        q = weight.qweight
        n, half_k = q.shape
        k, g = 2 * half_k, int(weight.group_size)
        words = _w4_words(q, k, g, what)
        hi = words
        if bits == 6:
            h = weight.qweight_hi
            if h.dtype != torch.uint8 or tuple(h.shape) != (n, k // 4):
                raise ValueError(f"W6 qweight_hi must be uint8 [N, K // 4] = [{n}, {k // 4}]")
            if h.stride(1) != 1 or h.stride(0) % 2 or h.storage_offset() % 2:
                raise ValueError("W6 qweight_hi rows must be contiguous and 2-byte aligned")
            check_device(x, "activations", qweight_hi=h)
            hi = h.view(torch.int16)  # [N, K // 8], no copy
        s, z = weight.scales, weight.zeros
        for name, t in (("scales", s), ("zeros", z)):
            if tuple(t.shape) != (n, k // g) or t.stride(1) != 1:
                raise ValueError(f"{what} {name} must be [N, K // G] with unit column stride")
        check_device(x, "activations", qweight=q, scales=s, zeros=z)
        return words, hi, s, z, n, k, g, bits
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D tensor [N, K], a W4Weight, a W6Weight or a W8Weight")
    if weight.stride(1) != 1:
        raise ValueError("dense weight must have unit stride along K")
    check_device(x, "activations", weight=weight)
    n, k = weight.shape
    return weight, weight, weight, weight, n, k, 64, 16


def check_device(ref: torch.Tensor, ref_name: str, **tensors) -> None:
    """Every tensor in `tensors` (None skipped) lives on ref's device."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} on {t.device}, {ref_name} on {ref.device}")


def check_index(name: str, t: torch.Tensor, shape: tuple, dtype=torch.int32) -> torch.Tensor:
    """An index tensor of exactly `dtype` and `shape` (None entries: any size), made
    contiguous along its last dimension."""
    if t.dtype != dtype or t.dim() != len(shape):
        raise ValueError(f"{name} must be {dtype} with {len(shape)} dimensions")
    if any(want is not None and got != want for got, want in zip(t.shape, shape)):
        dims = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must be [{dims}], got {tuple(t.shape)}")
    return t if t.dim() == 0 or t.stride(-1) == 1 else t.contiguous()


def check_row_mask(row_mask, m: int, device: torch.device):
    """None, or a contiguous bool [m] on `device`."""
    if row_mask is None:
        return None
    if row_mask.dtype != torch.bool or tuple(row_mask.shape) != (m,):
        raise ValueError(f"row_mask must be bool [{m}]")
    if row_mask.device != device:
        raise ValueError("row_mask must be on the activations' device")
    return row_mask if row_mask.stride(0) == 1 else row_mask.contiguous()


def check_rows(x: torch.Tensor, row_mask):
    """(x, row_mask) of a projection: x a floating [M, K], unit stride along K."""
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    row_mask = check_row_mask(row_mask, x.shape[0], x.device)
    return (x if x.stride(1) == 1 else x.contiguous()), row_mask


def check_paged_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
    """(num_blocks, page, Hkv, D) of paged caches that q [*, Hq, D] attends to."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError("q must be [tokens, Hq, D] and the caches [num_blocks, page, Hkv, D]")
    num_blocks, page, hkv, d = k_cache.shape
    if v_cache.shape != k_cache.shape or q.shape[2] != d or q.shape[1] % hkv:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, caches {tuple(k_cache.shape)}")
    if page & (page - 1):
        raise ValueError(f"block_size must be a power of two, got {page}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError("q and the caches must have unit stride along head_dim")
    if v_cache.stride() != k_cache.stride():  # the kernels address both with one set
        raise ValueError("the k and v caches must have the same strides")
    check_device(q, "q", k_cache=k_cache, v_cache=v_cache)
    return num_blocks, page, hkv, d
