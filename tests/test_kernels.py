# Over 400 lines, one concept: every Triton kernel against its reference, one shared setup.
"""Triton kernels against their plain-PyTorch twins in kernels/reference.py.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1) on small shapes in
float32 / float16 (the interpreter's tl.dot mishandles bfloat16). With CUDA the same tests run
compiled in bfloat16 / float16, and the `gpu`-only tests add the real Llama-3-8B shapes and
CUDA-graph capture. Triton reads TRITON_INTERPRET when a kernel is *decorated*, i.e. when its
module is imported, so it is set here before any kernel module is imported (river.kernels
exports lazily, so importing the package or its reference does not count).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pathlib
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if CUDA and not INTERPRET else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from river.quantize import W4Weight, W6Weight  # noqa: E402
from river.w8 import W8Weight  # noqa: E402


def _kernel_modules():
    try:
        import river.kernels as pkg
    except ImportError:  # not installed: the repository root has `kernels/`
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
        import kernels as pkg
    # dependencies first: a reload re-decorates the shared device helpers before their users
    names = (
        "tiles",
        "splitk",
        "matmul",
        "qkv_rope",
        "norm",
        "decode_attention",
        "prefill",
        "sampling",
    )
    mods = {n: importlib.import_module(f"{pkg.__name__}.{n}") for n in names}
    if INTERPRET:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(mods["tiles"].matmul_tile, InterpretedFunction):
            # imported before TRITON_INTERPRET was set: decorate again
            mods = {n: importlib.reload(mods[n]) for n in names}
    return pkg, mods


PKG, MODS = _kernel_modules()
REF = importlib.import_module(f"{PKG.__name__}.reference")
LIN = MODS["matmul"]
SETTINGS = importlib.import_module(f"{PKG.__name__}.matmul_settings")
SPLITK = MODS["splitk"]
QKV = MODS["qkv_rope"]
NORM = MODS["norm"]
DEC = MODS["decode_attention"]
PRE = MODS["prefill"]
SAMP = MODS["sampling"]

DTYPES = [torch.float32, torch.float16] if INTERPRET else [torch.bfloat16, torch.float16]
# relative tolerance of one output element, scaled by the output's magnitude
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}

gpu = pytest.mark.skipif(DEVICE != "cuda", reason="real shapes and CUDA graphs need a GPU")


def assert_close(actual, expected, dtype, scale=1.0):
    tol = TOL[dtype] * scale
    exp = expected.float()
    if exp.numel() == 0:
        assert actual.numel() == 0
        return
    atol = tol * max(1.0, exp.abs().max().item())
    torch.testing.assert_close(actual.float(), exp, rtol=tol, atol=atol)


def make_w4(n, k, group, dtype, device=DEVICE):
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    scales = (torch.rand(n, k // group, device=device) * 0.02 + 0.005).to(dtype)
    zeros = (torch.rand(n, k // group, device=device) * 15).to(dtype)
    return W4Weight(q, scales, zeros, group)


def make_w6(n, k, group, dtype, device=DEVICE):
    q = torch.randint(0, 64, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // group) * 0.005 + 0.001).to(dtype)
    zeros = (torch.rand(n, k // group) * 63).to(dtype)
    return W6Weight.from_codes(q, scales, zeros, group).to(device)


def make_w8(n, k, dtype, device=DEVICE):
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    scales = (torch.rand(n, device=device) * 0.002 + 0.0005).to(dtype)
    return W8Weight(q, scales)


def make_weight(fmt, n, k, dtype):
    if fmt == "dense":
        return (torch.randn(n, k, device=DEVICE) * k**-0.5).to(dtype)
    if fmt == "w8":
        return make_w8(n, k, dtype)
    if fmt.startswith("w6"):
        return make_w6(n, k, int(fmt[3:]), dtype)
    return make_w4(n, k, int(fmt[3:]), dtype)


def dense32(weight):
    return weight.float() if isinstance(weight, torch.Tensor) else weight.dequantize(torch.float32)


def make_mask(kind, m):
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(m, dtype=torch.bool, device=DEVICE)
    if kind == "empty":
        return torch.zeros(m, dtype=torch.bool, device=DEVICE)
    mask = torch.rand(m, device=DEVICE) < 0.5
    mask[0] = True  # "some": at least one row in and (for m > 1) one out
    if m > 1:
        mask[-1] = False
    return mask


# ----------------------------------------------------------------------------- linear


LINEAR_CASES = [
    # (format, M, N, K, mask): M = 1 is the GEMV path, M > 1 tl.dot, M > 64 the "big" bucket
    ("w4g64", 1, 40, 256, "none"),
    ("w4g64", 1, 40, 320, "some"),  # K not a multiple of BLOCK_K
    ("w4g32", 1, 24, 192, "all"),
    ("w4g128", 1, 50, 384, "empty"),
    ("dense", 1, 40, 320, "none"),
    ("dense", 1, 33, 256, "some"),
    ("w4g64", 2, 40, 256, "some"),
    ("w4g32", 7, 24, 320, "none"),
    ("w4g128", 16, 40, 256, "all"),
    ("w4g64", 17, 20, 576, "some"),
    ("w4g64", 33, 24, 256, "empty"),
    ("w4g64", 64, 24, 128, "some"),
    ("dense", 5, 40, 192, "some"),
    ("dense", 17, 24, 320, "none"),
    ("dense", 64, 16, 128, "all"),
    ("dense", 70, 16, 64, "none"),  # cuBLAS path
    ("dense", 70, 16, 64, "some"),  # masked: the kernel, big bucket
    ("w4g64", 70, 16, 128, "none"),
    ("w8", 1, 40, 320, "some"),  # W8: the dense GEMV on int8, then the row scale
    ("w8", 1, 24, 256, "none"),
    ("w8", 5, 40, 192, "all"),  # W8 tl.dot
    ("w8", 70, 16, 128, "some"),  # W8 never goes to cuBLAS
    ("w6g64", 1, 40, 256, "none"),  # W6: the W4 GEMV plus the 2-bit plane
    ("w6g64", 1, 40, 320, "some"),  # K not a multiple of BLOCK_K
    ("w6g32", 1, 24, 192, "all"),
    ("w6g128", 1, 50, 384, "empty"),
    ("w6g64", 5, 40, 256, "some"),  # W6 tl.dot
    ("w6g32", 17, 20, 320, "none"),  # tl.dot, K not a multiple of BLOCK_K
    ("w6g64", 70, 16, 128, "some"),  # big bucket; W6 never goes to cuBLAS
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt,m,n,k,mask_kind", LINEAR_CASES)
def test_linear(fmt, m, n, k, mask_kind, dtype):
    weight = make_weight(fmt, n, k, dtype)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    mask = make_mask(mask_kind, m)
    expected = REF.linear(x.float(), dense32(weight))
    # out=None: masked-out rows are zeros
    y = LIN.linear(x, weight, row_mask=mask)
    keep = torch.ones(m, dtype=torch.bool, device=DEVICE) if mask is None else mask
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close(y[keep], expected[keep], dtype)
    assert not y[~keep].any()
    # out given: masked-out rows keep their content bit for bit
    out = torch.randn(m, n, device=DEVICE).to(dtype)
    before = out.clone()
    res = LIN.linear(x, weight, row_mask=mask, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert torch.equal(out[~keep], before[~keep])
    assert_close(out[keep], expected[keep], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["w4g32", "w4g64", "w4g128", "w6g64", "w8", "dense"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 12, 16, 24, 31, 32, 40, 48, 63, 64])
def test_linear_m_sweep(m, fmt, dtype):
    """Every decode batch size 1..64 (each M bucket and its edges), every group size."""
    n, k = 24, 256
    weight = make_weight(fmt, n, k, dtype)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    mask = make_mask("some", m)
    out = LIN.linear(x, weight, row_mask=mask)
    expected = REF.linear(x.float(), dense32(weight))
    assert_close(out[mask], expected[mask], dtype)
    assert not out[~mask].any()


GATE_UP_CASES = [
    ("w4g64", 1, 24, 256, "none"),
    ("w4g32", 1, 40, 320, "some"),
    ("dense", 1, 24, 192, "some"),
    ("w4g128", 5, 24, 256, "all"),
    ("w4g64", 40, 16, 128, "some"),
    ("dense", 17, 24, 128, "empty"),
    ("dense", 70, 16, 64, "none"),
    ("w8", 1, 24, 192, "some"),
    ("w8", 9, 16, 128, "none"),
    ("w6g64", 1, 24, 320, "some"),
    ("w6g32", 9, 16, 128, "all"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt,m,inter,k,mask_kind", GATE_UP_CASES)
def test_gate_up_silu(fmt, m, inter, k, mask_kind, dtype):
    weight = make_weight(fmt, 2 * inter, k, dtype)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    mask = make_mask(mask_kind, m)
    expected = REF.gate_up_silu(x.float(), dense32(weight))
    out = torch.randn(m, inter, device=DEVICE).to(dtype)
    before = out.clone()
    LIN.gate_up_silu(x, weight, row_mask=mask, out=out)
    keep = torch.ones(m, dtype=torch.bool, device=DEVICE) if mask is None else mask
    assert torch.equal(out[~keep], before[~keep])
    # SiLU(g) * u rounds twice in the output dtype
    assert_close(out[keep], expected[keep], dtype, scale=2.0)


@pytest.mark.parametrize(
    "fmt,m,block",
    [
        ("w4g64", 1, (1, 32, 256)),  # W4 GEMV
        ("w4g32", 3, (16, 32, 64)),  # W4 tl.dot
        ("dense", 1, (1, 16, 64)),  # dense GEMV
        ("dense", 20, (32, 16, 32)),  # dense tl.dot
        ("w8", 1, (1, 16, 64)),  # W8 GEMV: split partials scaled before the sum
        ("w8", 20, (32, 16, 32)),  # W8 tl.dot
        ("w6g64", 1, (1, 32, 256)),  # W6 GEMV: the prefetched high plane across splits
        ("w6g32", 3, (16, 32, 64)),  # W6 tl.dot
    ],
)
@pytest.mark.parametrize("gate_up", [False, True])
def test_linear_split_k(fmt, m, block, gate_up, monkeypatch):
    """Forced split-K: partials + last-arriving-program reduction, deterministic, tickets reset."""
    dtype = DTYPES[0]
    n, k = 48, 1024
    weight = make_weight(fmt, n, k, dtype)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    mask = make_mask("some", m)
    settings = SETTINGS.LaunchSettings(*block, split_k=4)
    op, ref = (LIN.gate_up_silu, REF.gate_up_silu) if gate_up else (LIN.linear, REF.linear)
    expected = ref(x.float(), dense32(weight))
    first = op(x, weight, row_mask=mask, settings=settings)
    second = op(x, weight, row_mask=mask, settings=settings)
    assert torch.equal(first, second)  # split order is fixed: bitwise deterministic
    assert_close(first[mask], expected[mask], dtype, scale=2.0)
    assert not first[~mask].any()
    _, counters = SPLITK.workspace(torch.device(DEVICE), 0, 0)
    assert not counters.any()  # every ticket was handed back


def test_linear_strided_input_and_errors():
    dtype = DTYPES[0]
    weight = make_w4(32, 128, 64, dtype)
    x = torch.randn(3, 256, device=DEVICE).to(dtype)[:, ::2]  # non-unit stride along K
    assert_close(LIN.linear(x, weight), REF.linear(x.float(), dense32(weight)), dtype)
    with pytest.raises(ValueError):
        LIN.linear(torch.randn(3, 64, device=DEVICE).to(dtype), weight)  # K mismatch
    with pytest.raises(ValueError):
        LIN.linear(x, weight, row_mask=torch.ones(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError):
        LIN.linear(x, weight, out=torch.empty(3, 31, device=DEVICE, dtype=dtype))


def test_w6_high_plane_alignment():
    """The kernels read the 2-bit plane as int16 words: a plane whose rows are not 2-byte
    aligned is refused with a clear error (never read misaligned)."""
    dtype = DTYPES[0]
    w = make_w6(8, 128, 64, dtype)
    x = torch.randn(2, 128, device=DEVICE).to(dtype)
    odd = torch.zeros(8, 33, dtype=torch.uint8, device=DEVICE)[:, 1:]  # row stride 33
    odd.copy_(w.qweight_hi)
    bad = dataclasses.replace(w, qweight_hi=odd)
    assert torch.equal(bad.dequantize(), w.dequantize())  # the same weight, only misaligned
    with pytest.raises(ValueError, match="2-byte aligned"):
        LIN.linear(x, bad)
    assert_close(LIN.linear(x, w), REF.linear(x.float(), dense32(w)), dtype)  # still usable


def test_linear_settings_table():
    """The heuristic gives >= ~4 programs per SM on the 8B decode shapes and valid blocks."""
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (14336, 4096)):
        for m in (1, 8, 32, 64):
            for w4, hi in ((True, False), (True, True), (False, False)):  # W4, W6, bf16
                cfg = SETTINGS.linear_settings(n, k, m, w4, 64, 132, hi)
                assert k % cfg.block_k == 0
                if w4 and cfg.block_m == 1:
                    assert cfg.block_k % 64 == 0
                    # the W6 GEMV's K step stays at 128 (its plane words spill at 256, sm_90)
                    assert not hi or cfg.block_k == 128
                programs = cfg.split_k * -(-n // cfg.block_n) * -(-m // cfg.block_m)
                assert programs >= 2 * 132 or cfg.split_k == SPLITK.MAX_SPLIT_K


@pytest.mark.parametrize("bits,group", [(16, 64), (4, 32), (4, 64), (6, 64), (6, 128)])
def test_launch_cost_model_counts_the_bytes_the_quality_front_counts(bits, group):
    """The launch heuristics' bytes per weight (kernels.splitk.weight_byte_rate) are the ones
    river.precision.weight_bytes charges a decode token for, 6-bit twins included."""
    from river.precision import weight_bytes

    n, k = 96, 512
    rate = SPLITK.weight_byte_rate(bits != 16, group, bits == 6)
    assert rate * n * k == weight_bytes(n, k, bits, group)


# ----------------------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "m,h,residual,w_dtype", [(1, 64, False, None), (3, 123, True, None), (5, 576, True, "f32")]
)
def test_rms_norm(m, h, residual, w_dtype, dtype):
    x = torch.randn(m, h, device=DEVICE).to(dtype)
    res = torch.randn(m, h, device=DEVICE).to(dtype) if residual else None
    w = (torch.rand(h, device=DEVICE) + 0.5).to(torch.float32 if w_dtype else dtype)
    y, new_res = NORM.rms_norm(x, w, 1e-5, residual=res)
    y_ref, res_ref = REF.rms_norm(x, w, 1e-5, residual=res)
    assert y.dtype == y_ref.dtype and new_res.dtype == res_ref.dtype
    assert torch.equal(new_res, res_ref)  # the add rounds exactly like torch
    assert_close(y, y_ref, dtype, scale=2.0)
    if not residual:
        assert new_res is x


# ----------------------------------------------------------------------------- qkv_rope_store


def rope_tables(max_pos, head_dim):
    half = head_dim // 2
    inv = 1.0 / (500000.0 ** (torch.arange(0, half, device=DEVICE).float() / half))
    ang = torch.arange(max_pos, device=DEVICE).float()[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


QKV_CASES = [
    # (M, Hq, Hkv, D, K, page, num_blocks, format, mask)
    (1, 4, 4, 16, 128, 8, 5, "w4g64", "none"),  # MHA, GEMV
    (3, 6, 2, 80, 192, 16, 3, "w4g64", "some"),  # GQA 3, head_dim 80 (half = 40)
    (5, 8, 2, 32, 256, 32, 2, "dense", "some"),  # GQA 4
    (2, 8, 1, 64, 128, 8, 4, "w4g32", "all"),  # GQA 8
    (1, 4, 1, 32, 320, 16, 2, "w4g32", "some"),  # K not a multiple of BLOCK_K
    (17, 4, 1, 16, 64, 16, 4, "dense", "some"),  # tl.dot path
    (6, 3, 3, 16, 128, 8, 3, "w4g128", "empty"),
    (1, 4, 2, 16, 128, 8, 4, "w8", "some"),  # W8 GEMV
    (18, 6, 2, 32, 64, 16, 4, "w8", "none"),  # W8 tl.dot
    (1, 4, 2, 16, 320, 8, 4, "w6g64", "some"),  # W6 GEMV, K not a multiple of BLOCK_K
    (9, 6, 2, 32, 128, 16, 4, "w6g32", "none"),  # W6 tl.dot
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,hq,hkv,d,k,page,num_blocks,fmt,mask_kind", QKV_CASES)
def test_qkv_rope_store(m, hq, hkv, d, k, page, num_blocks, fmt, mask_kind, dtype):
    weight = make_weight(fmt, (hq + 2 * hkv) * d, k, dtype)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    cos, sin = rope_tables(64, d)
    positions = torch.randint(0, 64, (m,), device=DEVICE)
    # distinct slots, the first one the very last slot of the pool (index math at the edge)
    slots = torch.randperm(num_blocks * page - 1, device=DEVICE)[:m]
    slots[0] = num_blocks * page - 1
    mask = make_mask(mask_kind, m)
    k_cache = torch.randn(num_blocks, page, hkv, d, device=DEVICE).to(dtype)
    v_cache = torch.randn_like(k_cache)
    q_out = torch.randn(m, hq, d, device=DEVICE).to(dtype)
    kc, vc, qo = k_cache.clone(), v_cache.clone(), q_out.clone()
    q = QKV.qkv_rope_store(
        x, weight, cos, sin, positions, kc, vc, slots, hq, hkv, row_mask=mask, q_out=qo
    )
    assert q.data_ptr() == qo.data_ptr()
    kr, vr = k_cache.float(), v_cache.float()
    qr = REF.qkv_rope_store(
        x.float(), dense32(weight), cos, sin, positions, kr, vr, slots, hq, hkv,
        row_mask=mask, q_out=q_out.float(),
    )  # fmt: skip
    keep = torch.ones(m, dtype=torch.bool, device=DEVICE) if mask is None else mask
    assert torch.equal(q[~keep], q_out[~keep])
    assert_close(q[keep], qr[keep], dtype, scale=2.0)
    # K/V: the active rows' slots get the new values, every other slot is untouched
    touched = torch.zeros(num_blocks * page, dtype=torch.bool, device=DEVICE)
    touched[slots[keep]] = True
    for got, want, orig in ((kc, kr, k_cache), (vc, vr, v_cache)):
        got, want, orig = (t.reshape(-1, hkv, d) for t in (got, want, orig))
        assert torch.equal(got[~touched], orig[~touched])
        assert_close(got[touched], want[touched], dtype, scale=2.0)


def test_qkv_rope_store_w4_gemv_split(monkeypatch):
    """Batch-1 W4 KV projection with the split-K reduction forced (the decode shape)."""
    dtype = DTYPES[0]
    hq, hkv, d, k, page = 4, 2, 32, 1024, 16
    weight = make_w4((hq + 2 * hkv) * d, k, 64, dtype)
    x = torch.randn(1, k, device=DEVICE).to(dtype)
    cos, sin = rope_tables(32, d)
    pos = torch.tensor([17], device=DEVICE)
    slots = torch.tensor([2 * page - 1], device=DEVICE)
    monkeypatch.setattr(QKV, "pick_split", lambda *a: 4)
    kc = torch.zeros(2, page, hkv, d, device=DEVICE, dtype=dtype)
    vc = torch.zeros_like(kc)
    q = QKV.qkv_rope_store(x, weight, cos, sin, pos, kc, vc, slots, hq, hkv)
    kr, vr = kc.float().zero_(), vc.float().zero_()
    qr = REF.qkv_rope_store(x.float(), dense32(weight), cos, sin, pos, kr, vr, slots, hq, hkv)
    assert_close(q, qr, dtype, scale=2.0)
    assert_close(kc, kr, dtype, scale=2.0)
    assert_close(vc, vr, dtype, scale=2.0)


# ----------------------------------------------------------------------------- decode attention


def paged_setup(lens, hkv, d, page, num_blocks, max_blocks, dtype):
    """Caches, and block tables with distinct random blocks per row; row 0's last used block
    is the last block of the pool."""
    b = len(lens)
    k_cache = torch.randn(num_blocks, page, hkv, d, device=DEVICE).to(dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.full((b, max_blocks), -1, dtype=torch.int32, device=DEVICE)
    for i, n in enumerate(lens):
        used = -(-n // page)
        tables[i, :used] = torch.randperm(num_blocks - 1, device=DEVICE)[:used].int()
        if i == 0 and used:
            tables[i, used - 1] = num_blocks - 1
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, tables, ctx


DECODE_CASES = [
    # (lens, Hq, Hkv, D, page, num_blocks, max_blocks, splits, mask, kv_valid)
    ([7, 40, 0], 4, 4, 32, 8, 16, 5, 1, "none", False),  # MHA, an empty row
    ([9, 64, 2], 6, 2, 80, 16, 12, 4, 4, "some", False),  # GQA 3, head_dim 80, full row
    ([13, 93], 8, 2, 64, 32, 8, 3, 2, "none", True),  # GQA 4, kv_valid
    ([39, 68, 128, 1], 16, 2, 16, 8, 40, 16, 16, "all", False),  # GQA 8, 16 splits
    ([5, 30, 58], 8, 8, 16, 8, 24, 8, 4, "empty", True),
    ([20, 0, 33], 4, 1, 32, 16, 8, 3, 1, "some", False),  # one split with a partial mask
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lens,hq,hkv,d,page,nb,maxb,splits,mask_kind,kvv", DECODE_CASES)
def test_paged_decode_attention(
    lens, hq, hkv, d, page, nb, maxb, splits, mask_kind, kvv, dtype, monkeypatch
):
    b = len(lens)
    k_cache, v_cache, tables, ctx = paged_setup(lens, hkv, d, page, nb, maxb, dtype)
    q = torch.randn(b, hq, d, device=DEVICE).to(dtype)
    mask = make_mask(mask_kind, b)
    kv_valid = (torch.rand(nb, page, device=DEVICE) < 0.8) if kvv else None
    out = DEC.paged_decode_attention(
        q, k_cache, v_cache, tables, ctx, d**-0.5, row_mask=mask, kv_valid=kv_valid,
        num_splits=splits,
    )  # fmt: skip
    ref = REF.paged_decode_attention(
        q.float(), k_cache.float(), v_cache.float(), tables, ctx, d**-0.5, mask, kv_valid
    )
    assert_close(out, ref, dtype, scale=2.0)


def test_decode_scratch_reuse_and_capacity():
    dtype = DTYPES[0]
    lens = [50, 3, 64]
    k_cache, v_cache, tables, ctx = paged_setup(lens, 2, 32, 16, 16, 4, dtype)
    q = torch.randn(3, 8, 32, device=DEVICE).to(dtype)
    scratch = DEC.alloc_decode_scratch(4, 8, 32, max_splits=8, device=DEVICE)
    ref = REF.paged_decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, ctx, 0.2)
    args = (q, k_cache, v_cache, tables, ctx, 0.2)
    for _ in range(2):  # the tickets must be back at zero for the second launch
        out = DEC.paged_decode_attention(*args, scratch=scratch, num_splits=4)
        assert_close(out, ref, dtype, scale=2.0)
        assert not scratch.counters.any()
    small = DEC.alloc_decode_scratch(2, 8, 32, max_splits=8, device=DEVICE)
    with pytest.raises(ValueError):
        DEC.paged_decode_attention(*args, scratch=small, num_splits=4)


def test_decode_num_splits_static():
    """The split count depends on shapes only (CUDA-graph safe) and stays in bounds."""
    assert DEC.decode_num_splits(1, 8, 4096) == 16
    assert DEC.decode_num_splits(32, 8, 4096) == 2
    assert DEC.decode_num_splits(64, 8, 128) == 1
    for b in (1, 3, 32, 64):
        for cap in (16, 256, 4096, 131072):
            s = DEC.decode_num_splits(b, 8, cap)
            assert 1 <= s <= DEC.MAX_SPLITS and s & (s - 1) == 0


# ----------------------------------------------------------------------------- prefill attention


PREFILL_CASES = [
    # (new tokens per sequence, cached prefixes, Hq, Hkv, D, page, num_blocks, max_seqlen)
    ([5, 130, 0, 17], [0, 7, 3, 64], 4, 2, 32, 8, 60, None),  # ragged, an empty sequence
    ([33], [100], 3, 1, 80, 16, 20, 33),  # GQA 3, head_dim 80
    ([1, 2], [0, 200], 8, 1, 16, 32, 12, None),  # GQA 8, decode-like rows
    ([70, 9], [0, 0], 4, 4, 64, 16, 12, 70),  # MHA, no prefix
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("news,prefixes,hq,hkv,d,page,nb,max_seqlen", PREFILL_CASES)
def test_prefill_attention(news, prefixes, hq, hkv, d, page, nb, max_seqlen, dtype):
    lens = [a + b for a, b in zip(news, prefixes, strict=True)]
    maxb = max(-(-n // page) for n in lens) + 1
    k_cache, v_cache, tables, ctx = paged_setup(lens, hkv, d, page, nb, maxb, dtype)
    cu = torch.tensor([0] + torch.tensor(news).cumsum(0).tolist(), dtype=torch.int32)
    cu = cu.to(DEVICE)
    q = torch.randn(sum(news), hq, d, device=DEVICE).to(dtype)
    out = PRE.prefill_attention(q, k_cache, v_cache, cu, tables, ctx, d**-0.5, max_seqlen)
    ref = REF.prefill_attention(
        q.float(), k_cache.float(), v_cache.float(), cu, tables, ctx, d**-0.5
    )
    assert_close(out, ref, dtype, scale=2.0)


# ----------------------------------------------------------------------------- sampling


def _sampling_params(b, device=DEVICE):
    g = torch.Generator().manual_seed(b)
    temperature = torch.rand(b, generator=g) * 1.5 + 0.1
    temperature[::5] = 0.0  # greedy rows
    top_k = torch.randint(0, 60, (b,), generator=g, dtype=torch.int32)
    top_k[::3] = 0
    top_p = torch.rand(b, generator=g) * 0.6 + 0.4
    top_p[1::4] = 1.0
    seeds = torch.randint(0, 2**62, (b,), generator=g)
    offsets = torch.randint(0, 10000, (b,), generator=g)
    return [t.to(device) for t in (temperature, top_k, top_p, seeds, offsets)]


@pytest.mark.parametrize("b,v", [(16, 300), (9, 5000)])  # 5000 > one 4096 block (+ padding)
def test_sample_matches_reference(b, v):
    logits = torch.randn(b, v, device=DEVICE) * 3
    params = _sampling_params(b)
    got = SAMP.sample(logits, *params)
    want = REF.sample(logits, *params)
    assert got.dtype == torch.int64
    assert torch.equal(got, want)


def test_sample_edge_cases():
    v = 257
    logits = torch.randn(6, v, device=DEVICE)
    logits[0, 10] = logits[0, 200] = 50.0  # greedy tie: the lowest index wins
    temperature = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.5, 1.0], device=DEVICE)
    top_k = torch.tensor([0, 1, 1000, 0, 3, 0], dtype=torch.int32, device=DEVICE)
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.9, 1e-9], device=DEVICE)
    seeds = torch.arange(6, device=DEVICE) * 7919
    offsets = torch.arange(6, device=DEVICE)
    got = SAMP.sample(logits, temperature, top_k, top_p, seeds, offsets)
    assert got[0] == 10
    assert got[1] == logits[1].argmax()  # top-k 1 is greedy
    assert got[5] == logits[5].argmax()  # tiny top-p keeps the top token only
    assert torch.equal(got, REF.sample(logits, temperature, top_k, top_p, seeds, offsets))


def test_sample_exact_ties_follow_stable_order():
    """Quantised logits tie at the top-k / top-p boundary: the kernel keeps tied tokens in
    index order (a stable sort). reference.sample uses an unstable sort there, so this checks
    against an independent oracle of the kept set instead."""
    b, v = 12, 400
    logits = (torch.randn(b, v, device=DEVICE) * 8).round() / 4
    temperature, top_k, top_p, seeds, offsets = _sampling_params(b)
    temperature = temperature.clamp_min(0.3)
    got = SAMP.sample(logits, temperature, top_k, top_p, seeds, offsets)
    probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)
    u = REF.hash_uniform(seeds, offsets, v)
    for i in range(b):
        order = torch.sort(probs[i], descending=True, stable=True).indices
        sp = probs[i][order]
        k = int(top_k[i]) if int(top_k[i]) > 0 else v
        keep_sorted = (torch.arange(v, device=DEVICE) < k) & (sp.cumsum(0) - sp < top_p[i])
        keep = torch.zeros(v, dtype=torch.bool, device=DEVICE)
        keep[order[keep_sorted]] = True
        score = torch.where(keep, probs[i] / -torch.log(u[i]), torch.full_like(probs[i], -1.0))
        assert int(got[i]) == int(score.argmax()), i


# ----------------------------------------------------------------------------- GPU: real shapes


LLAMA8B_LINEARS = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@gpu
@pytest.mark.parametrize("n,k", LLAMA8B_LINEARS)
@pytest.mark.parametrize("m", [1, 8, 32])
@pytest.mark.parametrize("fmt", ["w4g64", "w6g64", "dense"])
def test_linear_llama8b_shapes(n, k, m, fmt):
    dtype = torch.bfloat16
    weight = make_weight(fmt, n, k, dtype)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    mask = make_mask("some", m) if m > 1 else None
    out = LIN.linear(x, weight, row_mask=mask)
    expected = REF.linear(x.float(), dense32(weight))
    keep = torch.ones(m, dtype=torch.bool, device=DEVICE) if mask is None else mask
    assert_close(out[keep], expected[keep], dtype)


@gpu
def test_linear_and_decode_in_cuda_graph():
    """Masks and context lengths are read on the device only: one captured graph serves any
    mask / length, and a launch whose mask is all False leaves everything untouched."""
    dtype = torch.bfloat16
    weight = make_w4(4096, 4096, 64, dtype)
    x = torch.randn(8, 4096, device=DEVICE, dtype=dtype)
    mask = torch.zeros(8, dtype=torch.bool, device=DEVICE)
    out = torch.zeros(8, 4096, device=DEVICE, dtype=dtype)
    lens = [100, 4096, 1, 2000]
    k_cache, v_cache, tables, ctx = paged_setup(lens, 8, 128, 16, 1200, 256, dtype)
    q = torch.randn(4, 32, 128, device=DEVICE, dtype=dtype)
    scratch = DEC.alloc_decode_scratch(4, 32, 128, device=DEVICE)
    att = [None]

    def step():
        LIN.linear(x, weight, row_mask=mask, out=out)
        att[0] = DEC.paged_decode_attention(
            q, k_cache, v_cache, tables, ctx, 128**-0.5, scratch=scratch
        )

    step()  # warm-up: compile and allocate outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    assert not out.any()  # mask all False: nothing written
    mask[torch.tensor([1, 6])] = True
    ctx.copy_(torch.tensor([5, 17, 4000, 64], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    expected = REF.linear(x.float(), dense32(weight))
    assert_close(out[mask], expected[mask], dtype)
    assert not out[~mask].any()
    ref = REF.paged_decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, ctx,
                                     128**-0.5)  # fmt: skip
    assert_close(att[0], ref, dtype, scale=2.0)


@gpu
def test_decode_attention_llama8b_batch32():
    dtype = torch.bfloat16
    lens = torch.randint(1, 4097, (32,)).tolist()
    k_cache, v_cache, tables, ctx = paged_setup(lens, 8, 128, 16, 32 * 256 + 1, 256, dtype)
    q = torch.randn(32, 32, 128, device=DEVICE, dtype=dtype)
    out = DEC.paged_decode_attention(q, k_cache, v_cache, tables, ctx, 128**-0.5)
    ref = REF.paged_decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, ctx,
                                     128**-0.5)  # fmt: skip
    assert_close(out, ref, dtype, scale=2.0)


@gpu
def test_prefill_attention_2048_vs_sdpa():
    dtype = torch.bfloat16
    t, hq, hkv, d, page = 2048, 32, 8, 128, 16
    k_cache, v_cache, tables, ctx = paged_setup([t], hkv, d, page, 200, 128, dtype)
    q = torch.randn(t, hq, d, device=DEVICE, dtype=dtype)
    cu = torch.tensor([0, t], dtype=torch.int32, device=DEVICE)
    out = PRE.prefill_attention(q, k_cache, v_cache, cu, tables, ctx, d**-0.5, max_seqlen=t)
    k = REF._gather_kv(k_cache, tables[0], t).repeat_interleave(hq // hkv, dim=1)
    v = REF._gather_kv(v_cache, tables[0], t).repeat_interleave(hq // hkv, dim=1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
    ).transpose(0, 1)
    assert_close(out, sdpa, dtype, scale=2.0)


@gpu
def test_sample_llama_vocab():
    b, v = 8, 128256
    logits = torch.randn(b, v, device=DEVICE, dtype=torch.bfloat16).float() * 4
    params = _sampling_params(b)
    assert torch.equal(SAMP.sample(logits, *params), REF.sample(logits, *params))
