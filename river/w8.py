"""8-bit per-output-channel weights for the river twins (W8A16), beside the 4-bit ones.

Format. A linear weight W [N, K] (out x in) is stored as

    qweight  int8    [N, K]  q in -127..127 (symmetric: -128 is never used)
    scales   float32 [N]     one scale per output channel, bf16-representable
    W[n, k] ~= q[n, k] * scales[n]

Why per channel and symmetric: it is the layout of torch's CPU int8 weight-only matmul
(`aten._weight_int8pack_mm`, int8 [N, K] with one scale per row) and needs no zero point, and
at 8 bits the error of one scale per 576-1536 weights is already ~1/256 of the 4-bit error
(measured on SmolLM2: +0.1% perplexity with every twin at 8 bits, RIVER.md). The Triton
kernels read it as a dense int8 weight and apply the row scale once after the K loop. Bytes:
~1 per weight, 0.5x of bf16 (4-bit g64 reads ~0.28x).

The scale of each row is chosen from a short grid of clip fractions of max|w| by the
importance-weighted squared error (river.calibrate's E[x_k^2] per input column, as for the
4-bit twins), then snapped to bf16 so that the GPU's cast is lossless and q is rounded for the
value the kernel reads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

W8_FORMAT_VERSION = 1
QMAX8 = 127
# Fractions of max|w| tried as the clip point of a row; at 8 bits clipping pays only for rows
# with a lone outlier, so the grid is short and fine.
_CLIPS = (1.0, 0.97, 0.94, 0.9, 0.85, 0.8)
_ROWS_PER_CHUNK = 256  # keeps a chunk's float32 temporaries cache-sized (cf. river.quantize)


@dataclass(frozen=True)
class W8Weight:
    """An 8-bit per-channel linear weight W [N, K]; see the module docstring for the format."""

    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # [N]

    def __post_init__(self):
        if self.qweight.dtype != torch.int8 or self.qweight.dim() != 2:
            raise ValueError(
                f"W8Weight.qweight must be a 2-D int8 tensor, got {self.qweight.dtype} "
                f"{tuple(self.qweight.shape)}"
            )
        if tuple(self.scales.shape) != (self.qweight.shape[0],):
            raise ValueError(
                f"W8Weight.scales has shape {tuple(self.scales.shape)}, expected "
                f"({self.qweight.shape[0]},)"
            )

    bits = 8

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    def to(self, device=None, dtype=None) -> W8Weight:
        """Move to `device`; `dtype` applies to the scales only (qweight stays int8)."""
        return replace(
            self,
            qweight=self.qweight.to(device=device),
            scales=self.scales.to(device=device, dtype=dtype),
        )

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """W [N, K] in `dtype`, computed in float32 from the stored scales."""
        return (self.qweight.float() * self.scales.float().unsqueeze(1)).to(dtype)

    @staticmethod
    def cat(ws) -> W8Weight:
        """Row-wise concatenation (the fused qkv and gate_up weights)."""
        return W8Weight(torch.cat([w.qweight for w in ws]), torch.cat([w.scales for w in ws]))


@torch.no_grad()
def quantize_w8(w: torch.Tensor, importance: torch.Tensor | None = None) -> W8Weight:
    """Quantize W [N, K] to 8 bits with one symmetric scale per row.

    importance [K] (mean squared input of each column, river.calibrate) weights the error the
    clip search minimises; None weighs every column alike. importance [K, K] (the inputs'
    second moment E[x x^T]): the clip search weighs by its diagonal and GPTQ rounds
    (river.gptq). Scales come back float32 on w's device, bf16-representable.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_w8 expects a 2-D weight [N, K], got shape {tuple(w.shape)}")
    w = w.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_w8: weight contains NaN or inf")
    n, k = w.shape
    c, u = None, None
    if importance is not None and torch.as_tensor(importance).dim() == 2:
        # a Hessian E[x x^T] [K, K]: the clip search weighs by its diagonal, then GPTQ rounds
        from river.gptq import check_hessian, inverse_factor

        h = torch.as_tensor(importance).detach().to(device=w.device)
        check_hessian(h, k, "quantize_w8")
        u, importance = inverse_factor(h), h.diagonal().float().clamp_min(0)
    if importance is not None:
        c = torch.as_tensor(importance).detach().to(device=w.device, dtype=torch.float32).flatten()
        if c.numel() != k:
            raise ValueError(f"quantize_w8: importance has {c.numel()} entries, expected K={k}")
        if not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
            raise ValueError("quantize_w8: importance must be finite and non-negative")
        c = c / c.mean() if float(c.mean()) > 0 else None
    qs, ss = [], []
    for r0 in range(0, n, _ROWS_PER_CHUNK):
        rows = w[r0 : r0 + _ROWS_PER_CHUNK]  # [R, K]
        amax = rows.abs().amax(1, keepdim=True).clamp_min(1e-12)  # [R, 1]
        best_err, best_s = None, None
        for clip in _CLIPS:
            s = (amax * (clip / QMAX8)).to(torch.bfloat16).float()
            e = rows - (rows / s).round().clamp(-QMAX8, QMAX8) * s
            e = e.square()
            err = (e if c is None else e * c).sum(1, keepdim=True)  # [R, 1]
            if best_err is None:
                best_err, best_s = err, s
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_s = torch.where(better, s, best_s)
        if u is None:
            qs.append((rows / best_s).round().clamp(-QMAX8, QMAX8).to(torch.int8))
        else:
            from river.gptq import gptq_channel

            qs.append(gptq_channel(rows, u, best_s.squeeze(1), QMAX8))
        ss.append(best_s.squeeze(1))
    return W8Weight(torch.cat(qs), torch.cat(ss))
