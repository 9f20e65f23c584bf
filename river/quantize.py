"""4-bit group-wise weight quantization for the river twins (W4A16), plus the on-disk cache.

Format (consumed as-is by the Triton W4A16 GEMV kernel; do not change without bumping
`FORMAT_VERSION` and telling the kernel owner). A linear weight W [N, K] (out x in, as
torch.nn.Linear) is cut into groups of G consecutive input columns:

    qweight  uint8 [N, K // 2]  byte j of row n = q[n, 2j] | q[n, 2j + 1] << 4  (q in 0..15)
    scales         [N, K // G]  float32 here and in the cache file; the model's dtype on load
    zeros          [N, K // G]  a float in quantized units (not rounded)
    W[n, k] ~= (q[n, k] - zeros[n, k // G]) * scales[n, k // G]

Methods:
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
lossless and the kernel reads the values the q were chosen for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import sys
import threading
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

FORMAT_VERSION = 1  # layout of the tensors in the cache file
ALGO_VERSION = 1  # bump whenever a method's output changes, so old caches are rebuilt
METHODS = ("rtn", "hqq")
QMAX = 15

# Rows are processed in chunks of about this many weights: the ~10 float32 temporaries of one
# chunk then stay in the CPU caches. Bigger chunks go to DRAM and run several times slower;
# smaller ones pay per-op dispatch overhead.
_CHUNK_ELEMS = 1 << 18

# A group whose max - min is below this is treated as constant (the RTN scale would be ~0).
_MIN_RANGE = 1e-9

# Stage 1: fractions of the group's min (resp. max) kept as the low (resp. high) clip point;
# 6 x 6 measured as good as 7 x 7 or 9 x 9 (down to 0.6) on SmolLM2 and synthetic weights.
_CLIP_FRACTIONS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
# Stage 2: HQQ's beta and kappa; p = 0.5 rather than HQQ's 0.7 (see _hqq_zero).
_HQQ_BETA, _HQQ_KAPPA = 10.0, 1.01
# Stage 3: the regression converges in a few rounds.
_LSQ_ITERS = 8
# Importance below this fraction of the mean counts as this much: a group whose channels are all
# near-silent then still gets a sensible (almost unweighted) fit.
_MIN_IMPORTANCE = 1e-3
# Stages 2 and 3 stop early once a round lowers a chunk's total error by less than this
# fraction; the rounds after that measured below 0.1% of error reduction in all.
_TOL = 1e-4


@dataclass(frozen=True)
class W4Weight:
    """A 4-bit group-quantized linear weight W [N, K]; see the module docstring for the format."""

    qweight: torch.Tensor  # uint8 [N, K // 2], low nibble = even column
    scales: torch.Tensor  # [N, K // G]
    zeros: torch.Tensor  # [N, K // G], quantized units
    group_size: int

    def __post_init__(self):
        n, half_k = self.qweight.shape
        k, g = 2 * half_k, self.group_size
        if self.qweight.dtype != torch.uint8:
            raise ValueError(f"W4Weight.qweight must be uint8, got {self.qweight.dtype}")
        if g <= 0 or k % g:
            raise ValueError(f"W4Weight: K={k} is not a multiple of group_size={g}")
        for name in ("scales", "zeros"):
            t = getattr(self, name)
            if tuple(t.shape) != (n, k // g):
                raise ValueError(
                    f"W4Weight.{name} has shape {tuple(t.shape)}, expected {(n, k // g)} "
                    f"for W [{n}, {k}] with group_size {g}"
                )

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], 2 * self.qweight.shape[1]

    def to(self, device=None, dtype=None) -> W4Weight:
        """Move to `device`; `dtype` applies to scales/zeros only (qweight stays uint8)."""
        return replace(
            self,
            qweight=self.qweight.to(device=device),
            scales=self.scales.to(device=device, dtype=dtype),
            zeros=self.zeros.to(device=device, dtype=dtype),
        )

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """W [N, K] in `dtype`, computed in float32 from the stored (possibly bf16) scales."""
        n, k = self.shape
        q = unpack_int4(self.qweight).float().view(n, k // self.group_size, self.group_size)
        s = self.scales.float().unsqueeze(-1)  # [N, K // G, 1]
        z = self.zeros.float().unsqueeze(-1)
        return ((q - z) * s).view(n, k).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[..., K] integers in 0..15 -> uint8 [..., K // 2]; q[2j] low nibble, q[2j + 1] high."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: last dimension must be even, got {q.shape[-1]}")
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise ValueError(f"pack_int4: expects an integer tensor, got {q.dtype}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > QMAX):
        raise ValueError("pack_int4: values must lie in 0..15")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K // 2] -> uint8 [..., K]; the inverse of pack_int4."""
    if p.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: expects uint8, got {p.dtype}")
    # [..., K // 2, 2] with (low, high) adjacent, flattened back to column order
    return torch.stack((p & 0x0F, p >> 4), dim=-1).flatten(-2)


# --------------------------------------------------------------------------- the optimisation
# All helpers below work on one chunk of rows viewed as groups:
#   w [R, g, G] float32 (g = K // G groups per row), s / z [R, g, 1], errors [R, g, 1].
# An error is a group's sum of squared reconstruction errors. `best` is (err, s, z) per group.
# Op choice is measured, not cosmetic: on CPU a broadcast addcmul is ~6x slower than mul + add_,
# a clamp with tensor bounds ~20x slower than minimum, and pow ~7x slower than rsqrt.


def _qcoord(w, inv_s, z):
    """Unrounded quantized coordinate w / s + z [R, g, G]; q = round of this, clamped."""
    return (w * inv_s).add_(z)


def _round_q(t):
    return t.round().clamp_(0, QMAX)


def _wsq(e, c):
    """Per-group weighted sum of squares sum_G c e^2 [R, g, 1]; c None means uniform."""
    return torch.linalg.vecdot(e, e if c is None else e * c).unsqueeze(-1)


def _sq_error(w, s, z, c):
    t = _qcoord(w, s.reciprocal(), z)
    t.sub_(_round_q(t))  # error in quantized units
    return _wsq(t, c) * s.square()


def _minmax_params(lo, hi):
    """Scale/zero mapping [lo, hi] onto 0..15. lo, hi [R, g, 1]."""
    s = (hi - lo) / QMAX
    z = -lo / s
    # Constant (or near-constant) groups: the scale would be ~0 and the zero inf/NaN. Put the
    # value itself on a grid end instead (c = 15 * s at q = 15 if c > 0, c = -15 * s at q = 0
    # if c < 0), which represents it exactly and keeps the zero in 0..15; c == 0 needs any s.
    flat = (hi - lo) < _MIN_RANGE
    if bool(flat.any()):
        c = (lo + hi) / 2
        cs = c.abs() / QMAX
        cs = torch.where(cs > 1e-20, cs, torch.ones_like(cs))
        s = torch.where(flat, cs, s)
        z = torch.where(flat, torch.where(c < 0, float(QMAX), 0.0), z)
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


def _clip_search(w, lo, hi, c, best):
    """Try every (low, high) pair of clip fractions; (1, 1) is RTN, already in best."""
    for a in _CLIP_FRACTIONS:
        for b in _CLIP_FRACTIONS:
            if a != 1.0 or b != 1.0:
                s, z = _minmax_params(lo * a, hi * b)
                best = _keep_better(_sq_error(w, s, z, c), s, z, best)
    return best


def _hqq_zero(w, iters, c, best):
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
        e.sub_(_round_q(e))  # [R, g, G]
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


def _lsq_polish(w, c, best):
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
        q = _round_q(t)  # [R, g, G]
        if i:  # measure the previous round's fit
            e = t.sub_(q)
            before = float(best[0].sum())
            best = _keep_better(_wsq(e, c) * s.square(), s, z, best)
            if i == _LSQ_ITERS or _settled(before, best):
                break
        if c is None:
            qsum = q.sum(-1, keepdim=True)
            # g * var(q) is exact: 4-bit q keeps the integer sums far below 2^24
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


def _quantize_rows(w, group_size, method, iters, c=None):
    """w [R, K] float32, c [1, K // G, G] column importance or None
    -> (q uint8 [R, K], scales [R, K // G], zeros [R, K // G])."""
    r, k = w.shape
    wg = w.view(r, k // group_size, group_size)
    lo = wg.amin(-1, keepdim=True)
    hi = wg.amax(-1, keepdim=True)
    s, z = _snap(*_minmax_params(lo, hi))
    if method == "hqq":
        rtn = (_sq_error(wg, s, z, c), s, z)
        best = _clip_search(wg, lo, hi, c, rtn)
        best = _hqq_zero(wg, iters, c, best)
        _, s_ref, z_ref = _lsq_polish(wg, c, best)
        # The snap moves every candidate a little (~0.3% of the error); compare again after
        # it so that no stored group is worse than RTN's (also snapped) parameters.
        s_ref, z_ref = _snap(s_ref, z_ref)
        _, s, z = _keep_better(_sq_error(wg, s_ref, z_ref, c), s_ref, z_ref, rtn)
    q = _round_q(_qcoord(wg, s.reciprocal(), z)).to(torch.uint8).view(r, k)
    return q, s.view(r, -1), z.view(r, -1)


# Quantization runs its torch ops single-threaded and parallelises over row chunks (one
# tensor) or over tensors (a model) with Python threads instead; torch releases the GIL inside
# each op. The ops are small (cache-sized) and many, and with intra-op threads each one ends
# in an OpenMP barrier: on an idle 2-core box both ways take ~4.4 s for SmolLM2-135M's 210
# projections, but with one other busy process on the box intra-op threading took 21 s against
# 6.6 s here, since a descheduled thread stalls its partner at every barrier.
_MAX_WORKERS = 8  # past a few threads the Python dispatch of the ops (under the GIL) limits
_threads_lock = threading.Lock()
_threads_depth = 0
_threads_saved = 1


@contextlib.contextmanager
def _single_threaded_ops():
    """torch.set_num_threads(1) for the duration, re-entrant and safe across threads; yields
    the thread count that was configured before (the parallelism to use instead)."""
    global _threads_depth, _threads_saved
    with _threads_lock:
        if _threads_depth == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_depth += 1
        saved = _threads_saved
    try:
        yield saved
    finally:
        with _threads_lock:
            _threads_depth -= 1
            if _threads_depth == 0:
                torch.set_num_threads(_threads_saved)


def _parallel_map(fn, items, workers):
    """[fn(x) for x in items], run on up to `workers` threads; results in input order."""
    items = list(items)
    workers = min(workers, len(items), _MAX_WORKERS)
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers, thread_name_prefix="river-quant") as pool:
        return list(pool.map(fn, items))


def _column_weights(importance, k, group_size, device) -> torch.Tensor | None:
    """importance [K] (mean squared activation per input channel) -> c [1, K // G, G], scaled
    to mean 1 with a floor, so a group of near-silent channels still gets a sensible fit."""
    if importance is None:
        return None
    c = torch.as_tensor(importance).detach().to(device=device, dtype=torch.float32).flatten()
    if c.numel() != k:
        raise ValueError(f"quantize_w4: importance has {c.numel()} entries, expected K={k}")
    if not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
        raise ValueError("quantize_w4: importance must be finite and non-negative")
    mean = float(c.mean())
    if mean <= 0:
        return None  # no information: uniform
    return (c / mean).clamp_min_(_MIN_IMPORTANCE).view(1, k // group_size, group_size)


@torch.no_grad()
def _quantize_w4(w, group_size, method, iters, workers, importance=None) -> W4Weight:
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; expected one of {METHODS}")
    if w.dim() != 2:
        raise ValueError(f"quantize_w4 expects a 2-D weight [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(
            f"quantize_w4: in_features K={k} is not divisible by group_size={group_size}; "
            f"pick a group size that divides {k}"
        )
    if k % 2:
        raise ValueError(f"quantize_w4: in_features K={k} must be even to pack two 4-bit values")
    w = w.detach().float().contiguous()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_w4: weight contains NaN or inf")
    c = _column_weights(importance, k, group_size, w.device) if method == "hqq" else None
    rows = max(1, _CHUNK_ELEMS // k)

    def chunk(start):
        q, s, z = _quantize_rows(w[start : start + rows], group_size, method, iters, c)
        return pack_int4(q), s, z

    qs, ss, zs = zip(*_parallel_map(chunk, range(0, n, rows), workers), strict=True)
    return W4Weight(torch.cat(qs), torch.cat(ss), torch.cat(zs), group_size)


def quantize_w4(
    w: torch.Tensor,
    group_size: int = 64,
    method: str = "hqq",
    iters: int = 20,
    importance: torch.Tensor | None = None,
) -> W4Weight:
    """Quantize W [N, K] to 4 bits in groups of `group_size` along K.

    `iters` bounds the HQQ zero iterations (method="hqq"); they also stop early once an
    iteration no longer helps. `importance` [K], the mean squared input activation of each
    column, weights the error that hqq minimises (rtn ignores it). Scales and zeros come back
    float32 on w's device.
    """
    with _single_threaded_ops() as threads:
        return _quantize_w4(w, group_size, method, iters, threads, importance)


def quantize_model(
    named_weights: dict[str, torch.Tensor],
    group_size: int = 64,
    method: str = "hqq",
    progress: bool = True,
    importance: dict[str, torch.Tensor] | None = None,
) -> dict[str, W4Weight]:
    """Quantize every weight in `named_weights` (any names); same keys, same order.
    `importance` maps some or all names to their [K] column importance (see quantize_w4).

    Uses as many threads as torch is configured for (one tensor each), restoring torch's
    thread count afterwards.
    """
    from river.progress import progress_bar

    names = list(named_weights)
    with (
        progress_bar(
            total=len(names),
            desc=f"river W4 g{group_size} {method}",
            unit="weights",
            enabled=progress,
        ) as bar,
        _single_threaded_ops() as threads,
    ):

        def one(name):
            imp = importance.get(name) if importance else None
            out = _quantize_w4(named_weights[name], group_size, method, 20, 1, imp)
            bar.update()  # tqdm's update is thread-safe
            return out

        return dict(zip(names, _parallel_map(one, names, threads), strict=True))


# --------------------------------------------------------------------------- the cache
def cache_file_name(group_size: int, method: str, weighted: bool = False) -> str:
    # The "river-" prefix matters: river.checkpoint skips such files when globbing for shards.
    return f"river-w4-g{group_size}-{method}{'-act' if weighted else ''}.safetensors"


def _river_home() -> pathlib.Path:
    home = os.environ.get("RIVER_HOME")
    return pathlib.Path(home).expanduser() if home else pathlib.Path.home() / ".cache" / "river"


def _fallback_dir(model_dir: pathlib.Path, cache_dir) -> pathlib.Path:
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    key = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:16]
    return _river_home() / "quant" / key


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


def _metadata(group_size, method, fp, names, importance_tag="") -> dict[str, str]:
    return {
        "importance": importance_tag,
        "format": "river-w4",
        "format_version": str(FORMAT_VERSION),
        "algo_version": str(ALGO_VERSION),
        "group_size": str(group_size),
        "method": method,
        "fingerprint": fp,
        "names": json.dumps(sorted(names)),
    }


def _try_load(path: pathlib.Path, expected: dict[str, str], shapes: dict) -> dict | None:
    """The cached W4 weights at `path`, or None if absent, stale or unreadable."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if any(meta.get(k) != v for k, v in expected.items()):
                return None  # other weights, parameters or code version: rebuild
            group_size = int(meta["group_size"])
            out = {}
            for name, (n, k) in shapes.items():
                out[name] = W4Weight(
                    qweight=f.get_tensor(f"{name}.qweight"),
                    scales=f.get_tensor(f"{name}.scales"),
                    zeros=f.get_tensor(f"{name}.zeros"),
                    group_size=group_size,
                )
                if out[name].shape != (n, k):
                    return None
            return out
    except Exception as e:  # a truncated or corrupt cache is rebuilt, never fatal
        warnings.warn(f"ignoring unreadable W4 cache {path}: {e}", stacklevel=3)
        return None


def _try_save(path: pathlib.Path, quantized: dict[str, W4Weight], meta: dict[str, str]) -> bool:
    """Write the cache atomically; False (nothing left behind) if the directory refuses it."""
    from safetensors.torch import save

    tensors = {}
    for name, q in quantized.items():
        tensors[f"{name}.qweight"] = q.qweight.cpu().contiguous()
        tensors[f"{name}.scales"] = q.scales.float().cpu().contiguous()
        tensors[f"{name}.zeros"] = q.zeros.float().cpu().contiguous()
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
) -> dict[str, W4Weight]:
    """The W4 twins of `named_weights`, from the cache if it matches, else quantized and cached.

    announce: optional callable(str) told, once, when the twins are built rather than loaded
    (the CLI prints it: a first run of the river pauses for this).

    importance: None, or a zero-argument callable returning {name: [K] importance} (see
    quantize_w4); it is called only when the cache misses, and never for method="rtn".
    importance_tag names how it was measured and is part of the cache identity (a different
    measurement rebuilds the cache).

    The cache is `model_dir/river-w4-g{G}-{method}[-act].safetensors`; when model_dir is not
    writable it goes to `cache_dir`, or to `$RIVER_HOME/quant/<hash of model_dir>` (RIVER_HOME
    defaults to ~/.cache/river). A cache whose metadata (format/algorithm version, group size,
    method, fingerprint of the source weights) does not match is ignored and rebuilt.
    Scales/zeros come back float32 on CPU; the caller casts them to its compute dtype.
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; expected one of {METHODS}")
    if method == "rtn":
        importance = None  # rtn has no objective to weight: one cache, no statistics pass
    if importance is not None and not importance_tag:
        raise ValueError("load_or_quantize: importance needs an importance_tag for the cache")
    model_dir = pathlib.Path(model_dir)
    name = cache_file_name(group_size, method, weighted=importance is not None)
    candidates = [model_dir / name, _fallback_dir(model_dir, cache_dir) / name]
    tag = importance_tag if importance is not None else ""
    meta = _metadata(group_size, method, fingerprint(named_weights), named_weights, tag)
    shapes = {k: tuple(v.shape) for k, v in named_weights.items()}
    for path in candidates:
        cached = _try_load(path, meta, shapes)
        if cached is not None:
            return cached
    if announce is not None:
        where = candidates[0] if os.access(candidates[0].parent, os.W_OK) else candidates[1]
        announce(
            f"building the 4-bit river twins once ({method}, group {group_size}); cache: {where}"
        )
        progress = progress and sys.stderr.isatty()  # that line says it; a bar only on a terminal
    imp = importance() if importance is not None else None
    quantized = quantize_model(named_weights, group_size, method, progress, imp)
    quantized = {k: v.to(device="cpu") for k, v in quantized.items()}
    if not any(_try_save(path, quantized, meta) for path in candidates):
        warnings.warn(
            f"could not write the W4 cache to {candidates[0].parent} or {candidates[1].parent}; "
            "it will be rebuilt next time",
            stacklevel=2,
        )
    return quantized
