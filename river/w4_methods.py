"""The two 4-bit quantization methods: how the scale and zero of every group are chosen. The
6-bit twins (river.quantize.W6Weight) use the same methods on the grid 0..63 (`bits=6`).

  rtn  round-to-nearest with the per-group min/max range.
  hqq  (default) training-free refinement of scales/zeros, starting from RTN, three stages:
       1. a 6x6 grid search that shrinks the low and the high end of each group's range
          independently (clipping rare outliers buys finer steps for everything else);
       2. Half-Quadratic Quantization zero updates (Badri & Shaji 2023): alternate a
          generalised soft-threshold of the error for an lp-norm (p = 0.5) with the closed-form
          zero update, the scale held fixed, beta growing by kappa every iteration;
       3. a least-squares polish: with q fixed, the MSE-optimal (scale, zero) of a group is the
          linear regression of w on q; alternating it with re-rounding never raises the error.
       Every stage keeps, per group, whichever (scale, zero) has the lowest squared
       reconstruction error so far, so the result is never worse than RTN on any group.

Importance (hqq only). The error that matters is the layer's output error, sum_k e_k x_k, whose
expectation is sum_k e_k^2 E[x_k^2] when input channels are uncorrelated. So `importance`, a
[K] vector of mean squared input activations (river.calibrate measures it without any data),
weights every stage's squared error per column: the (scale, zero) of a group then favours the
columns that carry large activations. On SmolLM2 a handful of MLP channels carry activations
~100x the rest (layer 11's down_proj alone was a sixth of the whole model's 4-bit error);
weighting cut the river's KL to the bf16 model by ~60% at the same bits. q is still the nearest
grid point of each weight: only the grid moves.

Both methods snap scales and zeros to bfloat16-representable values (stored as float32) and
round q for exactly those values, so the cast to bf16 when the twins are placed on the GPU is
lossless and the kernel reads the values the q were chosen for. river.quantize runs
`quantize_rows` over chunks of a weight and packs the result.
"""

from __future__ import annotations

import torch

ALGO_VERSION = 1  # bump whenever a method's output changes, so old caches are rebuilt
METHODS = ("rtn", "hqq")
QMAX = 15  # q lies in 0..QMAX

# A group whose max - min is below this is treated as constant (the RTN scale would be ~0).
_MIN_RANGE = 1e-9

# Stage 1: fractions of the group's min (resp. max) kept as the low (resp. high) clip point;
# 6 x 6 measured as good as 7 x 7 or 9 x 9 (down to 0.6) on SmolLM2 and synthetic weights.
_CLIP_FRACTIONS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
# Stage 2: HQQ's beta and kappa; p = 0.5 rather than HQQ's 0.7 (see _hqq_zero).
_HQQ_BETA, _HQQ_KAPPA = 10.0, 1.01
# Stage 3: the regression converges in a few rounds.
_LSQ_ITERS = 8
# Stages 2 and 3 stop early once a round lowers a chunk's total error by less than this
# fraction; the rounds after that measured below 0.1% of error reduction in all.
_TOL = 1e-4


# All helpers below work on one chunk of rows viewed as groups:
#   w [R, g, G] float32 (g = K // G groups per row), s / z [R, g, 1], errors [R, g, 1].
# An error is a group's sum of squared reconstruction errors. `best` is (err, s, z) per group.
# Op choice is measured, not cosmetic: on CPU a broadcast addcmul is ~6x slower than mul + add_,
# a clamp with tensor bounds ~20x slower than minimum, and pow ~7x slower than rsqrt.


def _qcoord(w, inv_s, z):
    """Unrounded quantized coordinate w / s + z [R, g, G]; q = round of this, clamped."""
    return (w * inv_s).add_(z)


def _round_q(t, qmax=QMAX):
    return t.round().clamp_(0, qmax)


def _wsq(e, c):
    """Per-group weighted sum of squares sum_G c e^2 [R, g, 1]; c None means uniform."""
    return torch.linalg.vecdot(e, e if c is None else e * c).unsqueeze(-1)


def _sq_error(w, s, z, c, qmax=QMAX):
    t = _qcoord(w, s.reciprocal(), z)
    t.sub_(_round_q(t, qmax))  # error in quantized units
    return _wsq(t, c) * s.square()


def _minmax_params(lo, hi, qmax=QMAX):
    """Scale/zero mapping [lo, hi] onto 0..qmax (15 at 4 bits). lo, hi [R, g, 1]."""
    s = (hi - lo) / qmax
    z = -lo / s
    # Constant (or near-constant) groups: the scale would be ~0 and the zero inf/NaN. Put the
    # value itself on a grid end instead (c = 15 * s at q = 15 if c > 0, c = -15 * s at q = 0
    # if c < 0), which represents it exactly and keeps the zero in 0..15; c == 0 needs any s.
    flat = (hi - lo) < _MIN_RANGE
    if bool(flat.any()):
        c = (lo + hi) / 2
        cs = c.abs() / qmax
        cs = torch.where(cs > 1e-20, cs, torch.ones_like(cs))
        s = torch.where(flat, cs, s)
        z = torch.where(flat, torch.where(c < 0, float(qmax), 0.0), z)
    return s, z


def _keep_better(err, s, z, best):
    """Per group, replace best (err, s, z) by the candidate where the candidate is lower."""
    b_err, b_s, b_z = best
    better = err < b_err
    return (
        torch.where(better, err, b_err),
        torch.where(better, s, b_s),
        torch.where(better, z, b_z),
    )


def _settled(before, best) -> bool:
    """True once a round lowered the chunk's total error by under _TOL (relative)."""
    after = float(best[0].sum())
    return before - after <= _TOL * after


def _clip_search(w, lo, hi, c, best, qmax=QMAX):
    """Try every (low, high) pair of clip fractions; (1, 1) is RTN, already in best."""
    for a in _CLIP_FRACTIONS:
        for b in _CLIP_FRACTIONS:
            if a != 1.0 or b != 1.0:
                s, z = _minmax_params(lo * a, hi * b, qmax)
                best = _keep_better(_sq_error(w, s, z, c, qmax), s, z, best)
    return best


def _hqq_zero(w, iters, c, best, qmax=QMAX):
    """HQQ's proximal zero updates with the scale fixed, starting from best's (s, z).

    Per group, minimise |W - (Q - z) s|_p^p (p < 1: robust to the few large errors) by the
    half-quadratic split W_e ~ W - (Q - z) s, alternating W_e = shrink_p(W - (Q - z) s, beta)
    and the closed form z = mean(Q - (W - W_e) / s), beta growing by kappa each round.
    In quantized units e = W / s + z - Q this is z <- z - mean(e - shrink_p(e)), where
    e - shrink_p(e) = sign(e) min(|e|, |e|^(p - 1) / beta) = e * min(1, |e|^(p - 2) / beta).
    We take the error in quantized units (HQQ shrinks raw weights) so beta means the same at
    any weight magnitude, and p = 0.5 instead of HQQ's 0.7: it measured as good or slightly
    better here and |e|^(-1.5) is an rsqrt and two multiplies instead of a pow.
    With importance c the mean is c-weighted (the closed form of the weighted objective).
    """
    _, s, z = best
    inv_s, s2 = s.reciprocal(), s.square()
    beta = _HQQ_BETA
    csum = w.shape[-1] if c is None else c.sum(-1, keepdim=True)
    for i in range(iters + 1):
        e = _qcoord(w, inv_s, z)
        e.sub_(_round_q(e, qmax))  # [R, g, G]
        before = float(best[0].sum())
        best = _keep_better(_wsq(e, c) * s2, s, z, best)
        if i == iters or (i and _settled(before, best)):
            break  # (round 0 only re-measures the starting point)
        u = e.abs().rsqrt_()  # |e| = 0 gives inf, and min(1, inf) keeps e = 0
        shrink = (u * u).mul_(u).mul_(1.0 / beta).clamp_(max=1.0)
        if c is not None:
            shrink.mul_(c)
        z = z - torch.linalg.vecdot(e, shrink).unsqueeze(-1) / csum
        beta *= _HQQ_KAPPA
    return best


def _lsq_polish(w, c, best, qmax=QMAX):
    """Alternate q = round(w / s + z) with the least-squares fit w ~ s q + b of each group.

    For fixed q the fit is the exact (c-weighted) MSE optimum over (s, z), and for fixed (s, z)
    rounding is the optimum over q, so this only descends; it settles in a few rounds.
    """
    _, s, z = best
    g = w.shape[-1]
    if c is None:
        wm = w.mean(-1, keepdim=True)  # [R, g, 1]
        wc = w - wm
    else:
        csum = c.sum(-1, keepdim=True)  # [1, g, 1]
        wm = torch.linalg.vecdot(w, c).unsqueeze(-1) / csum
        wc = (w - wm).mul_(c)  # c-weighted centred weights
    for i in range(_LSQ_ITERS + 1):
        t = _qcoord(w, s.reciprocal(), z)
        q = _round_q(t, qmax)  # [R, g, G]
        if i:  # measure the previous round's fit
            e = t.sub_(q)
            before = float(best[0].sum())
            best = _keep_better(_wsq(e, c) * s.square(), s, z, best)
            if i == _LSQ_ITERS or _settled(before, best):
                break
        if c is None:
            qsum = q.sum(-1, keepdim=True)
            # g * var(q) is exact: 4- and 6-bit q keep the integer sums far below 2^24
            qvar = g * torch.linalg.vecdot(q, q).unsqueeze(-1) - qsum.square()
            cov = g * torch.linalg.vecdot(q, wc).unsqueeze(-1)
            qmean = qsum / g
        else:
            qmean = torch.linalg.vecdot(q, c).unsqueeze(-1) / csum
            qc = q - qmean
            qvar = torch.linalg.vecdot(qc, qc * c).unsqueeze(-1)
            cov = torch.linalg.vecdot(qc, wc).unsqueeze(-1)
        s_new = cov / qvar.clamp_min(1e-12 if c is not None else 1.0)
        # all q equal (qvar = 0) or a degenerate fit: keep the scale, still refit the zero
        s_new = torch.where((qvar > 0) & (s_new > 0), s_new, s)
        s, z = s_new, qmean - wm / s_new
    return best


def _snap(s, z):
    """Round to bf16-representable float32 values: the GPU's cast of the twins is then lossless,
    and q (rounded afterwards, for exactly these values) is right for what the kernel reads."""
    return s.to(torch.bfloat16).float(), z.to(torch.bfloat16).float()


def quantize_rows(w, group_size, method, iters, c=None, bits=4):
    """w [R, K] float32, c [1, K // G, G] column importance or None
    -> (q uint8 [R, K] in 0..2^bits - 1, scales [R, K // G], zeros [R, K // G]).
    bits: 4 (the W4 twins) or 6 (W6: the same methods on a 4x finer grid)."""
    if bits not in (4, 6):
        raise ValueError(f"quantize_rows: bits must be 4 or 6, got {bits}")
    qmax = (1 << bits) - 1
    r, k = w.shape
    wg = w.view(r, k // group_size, group_size)
    lo = wg.amin(-1, keepdim=True)
    hi = wg.amax(-1, keepdim=True)
    s, z = _snap(*_minmax_params(lo, hi, qmax))
    if method == "hqq":
        rtn = (_sq_error(wg, s, z, c, qmax), s, z)
        best = _clip_search(wg, lo, hi, c, rtn, qmax)
        best = _hqq_zero(wg, iters, c, best, qmax)
        _, s_ref, z_ref = _lsq_polish(wg, c, best, qmax)
        # The snap moves every candidate a little (~0.3% of the error); compare again after
        # it so that no stored group is worse than RTN's (also snapped) parameters.
        s_ref, z_ref = _snap(s_ref, z_ref)
        _, s, z = _keep_better(_sq_error(wg, s_ref, z_ref, c, qmax), s_ref, z_ref, rtn)
    q = _round_q(_qcoord(wg, s.reciprocal(), z), qmax).to(torch.uint8).view(r, k)
    return q, s.view(r, -1), z.view(r, -1)
