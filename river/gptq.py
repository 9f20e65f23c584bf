"""GPTQ (Frantar et al. 2022) for the river twins: error-compensating quantization.

A twin's error that matters is its output error ||(W - Q) x||^2 over the inputs x it will see,
whose expectation is tr((W - Q) H (W - Q)^T) with H = E[x x^T]. The plain quantizers
(river.quantize, river.w8) see only H's diagonal, E[x_k^2], and round each weight to its own
nearest grid point. GPTQ rounds the columns of W one at a time. Each column's rounding error is
spread over the columns not yet rounded, in the proportion H says their inputs move together
(through the Cholesky factor of H^-1). The rows stay independent, so the same factor serves
every row and rows can be processed in chunks.

river uses it when the statistics come from real text (EngineConfig.river_calibration="text",
river.calibrate.bundled_text). From the model's own samples or from random ids, the
correlations it fits do not carry over to real text and it measured no better than the
diagonal (BENCHMARKS.md, "GPTQ at 6 bits"). The groups' scales and zeros are fit (by
`river.w4_methods.quantize_rows`, weighted by H's diagonal) on the compensated columns when a
group is reached; the 8-bit twins keep the scales of their clip search.
"""

from __future__ import annotations

import torch

# Damping added to H's diagonal, as a fraction of its mean: keeps the factorisation stable when
# some inputs are (nearly) silent or linearly dependent in the calibration text.
DAMP = 0.01
# Columns updated eagerly before the rest of the matrix gets the block's accumulated error in
# one matmul ("lazy batch" updates); rounded to whole groups.
BLOCK = 128


def check_hessian(h: torch.Tensor, k: int, who: str) -> None:
    """A usable H for a weight with K input columns: finite, [K, K]."""
    if h.dim() != 2 or tuple(h.shape) != (k, k):
        raise ValueError(f"{who}: the Hessian has shape {tuple(h.shape)}, expected {(k, k)}")
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"{who}: the Hessian must be finite")


@torch.no_grad()
def inverse_factor(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """U float32 [K, K], upper triangular with U^T U = (H + damp * mean(diag H) * I)^-1.

    Computed in float64; a column no calibration input ever reached (H_kk = 0) gets
    H_kk = 1, so its error is not spread anywhere (its weights are kept, not zeroed: real text
    may reach it)."""
    h = h.double().clone()
    diag = h.diagonal()
    diag[diag <= 0] = 1.0
    diag.add_(damp * float(diag.mean()))
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True).float()


def _blocks(k: int, group_size: int = 1):
    step = group_size * max(1, BLOCK // group_size)  # a group never straddles two blocks
    for b0 in range(0, k, step):
        yield b0, min(b0 + step, k)


@torch.no_grad()
def gptq_groups(w, u, diag, group_size, method, iters, bits):
    """w [R, K] float32 rows of one weight, u its inverse_factor, diag [K] H's diagonal ->
    (q uint8 [R, K] in 0..2^bits - 1, scales [R, K // G], zeros [R, K // G]) as
    river.w4_methods.quantize_rows returns them."""
    from river.w4_methods import quantize_rows

    w = w.float().clone()
    r, k = w.shape
    qmax = (1 << bits) - 1
    imp = (diag.float() / diag.float().mean().clamp_min(1e-30)).clamp_min(1e-3)
    q = torch.empty(r, k, dtype=torch.uint8)
    scales = torch.empty(r, k // group_size)
    zeros = torch.empty(r, k // group_size)
    for b0, b1 in _blocks(k, group_size):
        err = torch.empty(r, b1 - b0)
        for i in range(b0, b1):
            g = i // group_size
            if i % group_size == 0:  # the group's grid, fit on its compensated columns
                cols = w[:, i : i + group_size].contiguous()
                c = imp[i : i + group_size].view(1, 1, group_size)
                _, s, z = quantize_rows(cols, group_size, method, iters, c, bits)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            s, z = scales[:, g], zeros[:, g]
            qi = (w[:, i] / s + z).round_().clamp_(0, qmax)
            q[:, i] = qi.to(torch.uint8)
            e = (w[:, i] - (qi - z) * s) / u[i, i]
            w[:, i + 1 : b1] -= e[:, None] * u[i, i + 1 : b1][None, :]
            err[:, i - b0] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return q, scales, zeros


@torch.no_grad()
def gptq_channel(w, u, scales, qmax):
    """w [R, K] float32, u its inverse_factor, scales [R] (symmetric, per row) -> q int8 [R, K]
    in -qmax..qmax."""
    w = w.float().clone()
    r, k = w.shape
    s = scales.float()
    q = torch.empty(r, k, dtype=torch.int8)
    for b0, b1 in _blocks(k):
        err = torch.empty(r, b1 - b0)
        for i in range(b0, b1):
            qi = (w[:, i] / s).round_().clamp_(-qmax, qmax)
            q[:, i] = qi.to(torch.int8)
            e = (w[:, i] - qi * s) / u[i, i]
            w[:, i + 1 : b1] -= e[:, None] * u[i, i + 1 : b1][None, :]
            err[:, i - b0] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return q
