"""4-bit group-wise weight quantization for the river twins (W4A16): the format, and the
quantizer that fills it over whole weights and models; river.twin_cache stores the result.

Format (consumed as-is by the Triton W4A16 GEMV kernel; do not change without bumping
`FORMAT_VERSION` and telling the kernel owner). A linear weight W [N, K] (out x in, as
torch.nn.Linear) is cut into groups of G consecutive input columns:

    qweight  uint8 [N, K // 2]  byte j of row n = q[n, 2j] | q[n, 2j + 1] << 4  (q in 0..15)
    scales         [N, K // G]  float32 here and in the cache file; the model's dtype on load
    zeros          [N, K // G]  a float in quantized units (not rounded)
    W[n, k] ~= (q[n, k] - zeros[n, k // G]) * scales[n, k // G]

The methods (rtn, hqq) that choose the scales and zeros, and the role of `importance`, are
described in river.w4_methods.

The 6-bit twins (W6Weight) are the same scheme on a 4x finer grid, q in 0..63, stored as two
planes so that every reader of the 4-bit layout can read the low one unchanged:

    qweight     uint8 [N, K // 2]  q & 15, packed as the 4-bit qweight
    qweight_hi  uint8 [N, K // 4]  q >> 4 (0..3): byte j of row n = the 2-bit values of
                                   columns 4j .. 4j + 3, column 4j in the lowest two bits
    W[n, k] ~= (q[n, k] - zeros[n, k // G]) * scales[n, k // G]

3/4 byte a weight plus the group's scale and zero (0.41x of bf16 at G = 64, against 0.28x for
4-bit and ~0.5x for 8-bit): at equal bytes, 6-bit twins with a few 8-bit ones measured far
better than 4-bit twins with many 8-bit ones (BENCHMARKS.md, "6-bit twins").
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from river.w4_methods import METHODS, QMAX, quantize_rows

FORMAT_VERSION = 1  # layout of the tensors in the cache file

# Rows are processed in chunks of about this many weights: the ~10 float32 temporaries of one
# chunk then stay in the CPU caches. Bigger chunks go to DRAM and run several times slower;
# smaller ones pay per-op dispatch overhead.
_CHUNK_ELEMS = 1 << 18
# Importance below this fraction of the mean counts as this much: a group whose channels are all
# near-silent then still gets a sensible (almost unweighted) fit.
_MIN_IMPORTANCE = 1e-3


class _GroupedTwin:
    """What the 4- and 6-bit twins share: their uint8 code planes (`_PLANES`, moved but never
    cast) beside per-group scales and zeros."""

    _PLANES: tuple[str, ...] = ("qweight",)

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], 2 * self.qweight.shape[1]

    def to(self, device=None, dtype=None):
        """Move to `device`; `dtype` applies to scales/zeros only (the planes stay uint8)."""
        return replace(
            self,
            **{p: getattr(self, p).to(device=device) for p in self._PLANES},
            scales=self.scales.to(device=device, dtype=dtype),
            zeros=self.zeros.to(device=device, dtype=dtype),
        )

    @classmethod
    def cat(cls, ws):
        """Row-wise concatenation (the fused qkv and gate_up weights); one group size."""
        if len({w.group_size for w in ws}) != 1:
            raise ValueError(f"{cls.__name__}.cat: the weights have different group sizes")
        fields = cls._PLANES + ("scales", "zeros")
        return cls(
            **{f: torch.cat([getattr(w, f) for w in ws]) for f in fields},
            group_size=ws[0].group_size,
        )


@dataclass(frozen=True)
class W4Weight(_GroupedTwin):
    """A 4-bit group-quantized linear weight W [N, K]; see the module docstring for the format."""

    qweight: torch.Tensor  # uint8 [N, K // 2], low nibble = even column
    scales: torch.Tensor  # [N, K // G]
    zeros: torch.Tensor  # [N, K // G], quantized units
    group_size: int

    bits = 4

    def __post_init__(self):
        n, half_k = self.qweight.shape
        k = 2 * half_k
        if self.qweight.dtype != torch.uint8:
            raise ValueError(f"W4Weight.qweight must be uint8, got {self.qweight.dtype}")
        _check_groups(self, n, k)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """W [N, K] in `dtype`, computed in float32 from the stored (possibly bf16) scales."""
        return _dequantize_groups(unpack_int4(self.qweight), self, dtype)


def _check_groups(w, n, k):
    """The group size divides K and the scales / zeros hold one value per group (W4/W6)."""
    kind, g = type(w).__name__, w.group_size
    if g <= 0 or k % g:
        raise ValueError(f"{kind}: K={k} is not a multiple of group_size={g}")
    for name in ("scales", "zeros"):
        t = getattr(w, name)
        if tuple(t.shape) != (n, k // g):
            raise ValueError(
                f"{kind}.{name} has shape {tuple(t.shape)}, expected {(n, k // g)} "
                f"for W [{n}, {k}] with group_size {g}"
            )


def _dequantize_groups(q, w, dtype):
    """(q - z) * s per group: q [N, K] integers, w a W4Weight or W6Weight."""
    n, k = q.shape
    q = q.float().view(n, k // w.group_size, w.group_size)
    s = w.scales.float().unsqueeze(-1)  # [N, K // G, 1]
    z = w.zeros.float().unsqueeze(-1)
    return ((q - z) * s).view(n, k).to(dtype)


@dataclass(frozen=True)
class W6Weight(_GroupedTwin):
    """A 6-bit group-quantized linear weight W [N, K]: the 4-bit layout's low plane plus a
    2-bit high plane (see the module docstring)."""

    qweight: torch.Tensor  # uint8 [N, K // 2]: q & 15, as W4Weight.qweight
    qweight_hi: torch.Tensor  # uint8 [N, K // 4]: q >> 4, four columns a byte
    scales: torch.Tensor  # [N, K // G]
    zeros: torch.Tensor  # [N, K // G], quantized units
    group_size: int

    bits = 6
    _PLANES = ("qweight", "qweight_hi")

    def __post_init__(self):
        n, half_k = self.qweight.shape
        k = 2 * half_k
        if self.qweight.dtype != torch.uint8 or self.qweight_hi.dtype != torch.uint8:
            raise ValueError("W6Weight.qweight and qweight_hi must be uint8")
        if k % 4 or tuple(self.qweight_hi.shape) != (n, k // 4):
            raise ValueError(
                f"W6Weight.qweight_hi has shape {tuple(self.qweight_hi.shape)}, expected "
                f"{(n, k // 4)} for W [{n}, {k}] (K a multiple of 4)"
            )
        _check_groups(self, n, k)

    def codes(self) -> torch.Tensor:
        """q uint8 [N, K] in 0..63."""
        return unpack_int4(self.qweight) | (unpack_int2(self.qweight_hi) << 4)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """W [N, K] in `dtype`, computed in float32 from the stored (possibly bf16) scales."""
        return _dequantize_groups(self.codes(), self, dtype)

    @classmethod
    def from_codes(cls, q, scales, zeros, group_size) -> W6Weight:
        """From q [N, K] integers in 0..63 and the groups' scales and zeros."""
        if q.numel() and (int(q.min()) < 0 or int(q.max()) > 63):
            raise ValueError("W6Weight.from_codes: values must lie in 0..63")
        q = q.to(torch.uint8)
        return cls(pack_int4(q & 15), pack_int2(q >> 4), scales, zeros, group_size)


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


def pack_int2(q: torch.Tensor) -> torch.Tensor:
    """[..., K] integers in 0..3 -> uint8 [..., K // 4]; q[4j] in the lowest two bits."""
    if q.shape[-1] % 4:
        raise ValueError(f"pack_int2: last dimension must be a multiple of 4, got {q.shape[-1]}")
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise ValueError(f"pack_int2: expects an integer tensor, got {q.dtype}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 3):
        raise ValueError("pack_int2: values must lie in 0..3")
    q = q.to(torch.uint8)
    return q[..., 0::4] | (q[..., 1::4] << 2) | (q[..., 2::4] << 4) | (q[..., 3::4] << 6)


def unpack_int2(p: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K // 4] -> uint8 [..., K]; the inverse of pack_int2."""
    if p.dtype != torch.uint8:
        raise ValueError(f"unpack_int2: expects uint8, got {p.dtype}")
    return torch.stack([(p >> s) & 3 for s in (0, 2, 4, 6)], dim=-1).flatten(-2)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K // 2] -> uint8 [..., K]; the inverse of pack_int4."""
    if p.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: expects uint8, got {p.dtype}")
    # [..., K // 2, 2] with (low, high) adjacent, flattened back to column order
    return torch.stack((p & 0x0F, p >> 4), dim=-1).flatten(-2)


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
def _quantize_w4(w, group_size, method, iters, workers, importance=None, bits=4):
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
    if bits == 6 and k % 4:
        raise ValueError(f"quantize_w6: in_features K={k} must be a multiple of 4 (2-bit plane)")
    w = w.detach().float().contiguous()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_w4: weight contains NaN or inf")
    rows = max(1, _CHUNK_ELEMS // k)
    if importance is not None and torch.as_tensor(importance).dim() == 2:
        # a Hessian E[x x^T] [K, K] (real-text statistics): GPTQ, error-compensating
        from river.gptq import check_hessian, gptq_groups, inverse_factor

        h = torch.as_tensor(importance).detach().to(w.device)
        check_hessian(h, k, f"quantize_w{bits}")
        u, diag = inverse_factor(h), h.diagonal().float().clamp_min(0)

        def chunk(start):
            return gptq_groups(w[start : start + rows], u, diag, group_size, method, iters, bits)

    else:
        c = _column_weights(importance, k, group_size, w.device) if method == "hqq" else None

        def chunk(start):
            return quantize_rows(w[start : start + rows], group_size, method, iters, c, bits)

    qs, ss, zs = zip(*_parallel_map(chunk, range(0, n, rows), workers), strict=True)
    q, s, z = torch.cat(qs), torch.cat(ss), torch.cat(zs)
    if bits == 6:
        return W6Weight.from_codes(q, s, z, group_size)
    return W4Weight(pack_int4(q), s, z, group_size)


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
    column, weights the error that hqq minimises (rtn ignores it). `importance` [K, K], the
    inputs' second moment E[x x^T], quantizes by GPTQ (river.gptq) instead, each group's grid
    fit by `method` on the compensated columns. Scales and zeros come back float32 on w's
    device.
    """
    with _single_threaded_ops() as threads:
        return _quantize_w4(w, group_size, method, iters, threads, importance)


def quantize_w6(
    w: torch.Tensor,
    group_size: int = 64,
    method: str = "hqq",
    iters: int = 20,
    importance: torch.Tensor | None = None,
) -> W6Weight:
    """quantize_w4 at 6 bits (q in 0..63; K a multiple of 4 and of group_size)."""
    with _single_threaded_ops() as threads:
        return _quantize_w4(w, group_size, method, iters, threads, importance, bits=6)


def quantize_model(
    named_weights: dict[str, torch.Tensor],
    group_size: int = 64,
    method: str = "hqq",
    progress: bool = True,
    importance: dict[str, torch.Tensor] | None = None,
    bits: int = 4,
) -> dict:
    """Quantize every weight in `named_weights` (any names) to `bits` (4: W4Weight, 6:
    W6Weight); same keys, same order. `importance` maps some or all names to their [K] column
    importance (see quantize_w4).

    Uses as many threads as torch is configured for (one tensor each), restoring torch's
    thread count afterwards.
    """
    from river.progress import progress_bar

    names = list(named_weights)
    with (
        progress_bar(
            total=len(names),
            desc=f"river W{bits} g{group_size} {method}",
            unit="weights",
            enabled=progress,
        ) as bar,
        _single_threaded_ops() as threads,
    ):

        def one(name):
            imp = importance.get(name) if importance else None
            out = _quantize_w4(named_weights[name], group_size, method, 20, 1, imp, bits)
            bar.update()  # tqdm's update is thread-safe
            return out

        return dict(zip(names, _parallel_map(one, names, threads), strict=True))
