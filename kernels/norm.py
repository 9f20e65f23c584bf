"""RMSNorm with the residual add fused in (vLLM's fused-add form): one read of x and the
residual, one write of the new residual stream and of the normalised output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import check_device

__all__ = ["rms_norm"]


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [M, H]
    res_ptr,  # [M, H] residual (HAS_RESIDUAL)
    w_ptr,  # [H]
    y_ptr,  # [M, H] output
    res_out_ptr,  # [M, H] x + residual (HAS_RESIDUAL)
    H,
    eps,
    stride_x_m,
    stride_res_m,
    stride_y_m,
    stride_res_out_m,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """s = x + residual (rounded to the residual stream's dtype, as torch does);
    y = (s / sqrt(mean(s^2) + eps)) rounded to that dtype, times weight (rounded again).

    One program per row; the whole row lives in registers (H <= 16k), so the sum of squares
    and the scaling need a single pass over memory."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    ok = offs < H
    x = tl.load(x_ptr + row * stride_x_m + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res_m + offs, mask=ok, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out_m + offs, s, mask=ok)
    else:
        s = x
    sf = s.to(tl.float32)
    mean_sq = tl.sum(sf * sf, axis=0) / H
    normed = (sf * tl.rsqrt(mean_sq + eps)).to(s.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y_m + offs, (normed * w).to(y_ptr.dtype.element_ty), mask=ok)


def rms_norm(x, weight, eps, residual=None):
    """(y, x + residual): y = x / sqrt(mean(x^2) + eps) * weight after the residual add.

    x, residual [M, H]; weight [H]. Same semantics as reference.rms_norm (without a residual
    the second element is x itself)."""
    if x.dim() != 2:
        raise ValueError(f"rms_norm expects x [M, H], got shape {tuple(x.shape)}")
    m, h = x.shape
    if tuple(weight.shape) != (h,):
        raise ValueError(f"rms_norm weight must be [{h}], got {tuple(weight.shape)}")
    check_device(x, "x", weight=weight)
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(0) != 1:
        weight = weight.contiguous()
    if residual is not None:
        if tuple(residual.shape) != (m, h) or residual.device != x.device:
            raise ValueError(f"residual must be [{m}, {h}] on {x.device}")
        if residual.stride(1) != 1:
            residual = residual.contiguous()
        res_dtype = torch.result_type(x, residual)
        res_out = torch.empty((m, h), dtype=res_dtype, device=x.device)
    else:
        res_dtype = x.dtype
        res_out = x
    y = torch.empty((m, h), dtype=torch.promote_types(res_dtype, weight.dtype), device=x.device)
    if m == 0:
        return y, res_out
    block_h = triton.next_power_of_2(h)
    # ~8 row elements per thread: enough loads in flight, no register spills up to 16k
    num_warps = max(1, min(16, block_h // 256))
    _rms_norm_kernel[(m,)](
        x_ptr=x, res_ptr=residual if residual is not None else x, w_ptr=weight, y_ptr=y,
        res_out_ptr=res_out, H=h, eps=float(eps), stride_x_m=x.stride(0),
        stride_res_m=residual.stride(0) if residual is not None else 0, stride_y_m=y.stride(0),
        stride_res_out_m=res_out.stride(0), HAS_RESIDUAL=residual is not None, BLOCK_H=block_h,
        num_warps=num_warps,
    )  # fmt: skip
    return y, res_out
