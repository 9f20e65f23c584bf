"""W4 quantization: the packed format the GEMV kernel reads and the methods' error. The
on-disk cache of the twins is tests/test_twin_cache.py."""

import pytest
import torch
from w4_samples import channel_importance, gen, random_weights

import river.quantize as rq
from river.quantize import W4Weight, pack_int4, quantize_model, quantize_w4, unpack_int4


def _expand(t, group_size):
    return t.float().repeat_interleave(group_size, dim=1)  # [N, K // G] -> [N, K]


# --------------------------------------------------------------------------- format
def test_pack_nibble_order_hand_built():
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]], dtype=torch.uint8)
    # byte j = q[2j] in the low nibble, q[2j + 1] in the high nibble
    expected = torch.tensor([[0x21, 0x43], [0x0F, 0xF0]], dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8
    assert torch.equal(packed, expected)
    assert torch.equal(unpack_int4(expected), q)


def test_pack_unpack_round_trip_any_int_dtype():
    q = torch.randint(0, 16, (7, 10), generator=gen())
    for dtype in (torch.uint8, torch.int32, torch.int64):
        packed = pack_int4(q.to(dtype))
        assert packed.shape == (7, 5)
        assert torch.equal(unpack_int4(packed), q.to(torch.uint8))


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([[0, 16]]))
    with pytest.raises(ValueError, match="integer"):
        pack_int4(torch.zeros(1, 2))


def test_dequantize_matches_formula():
    g = gen(1)
    n, k, gs = 5, 8, 4
    q = torch.randint(0, 16, (n, k), generator=g)
    scales = torch.rand(n, k // gs, generator=g) + 0.1
    zeros = torch.rand(n, k // gs, generator=g) * 15
    w4 = W4Weight(pack_int4(q), scales, zeros, gs)
    assert w4.shape == (n, k)
    expected = torch.empty(n, k)
    for i in range(n):
        for j in range(k):
            expected[i, j] = (q[i, j] - zeros[i, j // gs]) * scales[i, j // gs]
    torch.testing.assert_close(w4.dequantize(), expected, rtol=0, atol=1e-6)
    assert w4.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_w4weight_validates_shapes():
    with pytest.raises(ValueError, match="scales"):
        W4Weight(torch.zeros(4, 4, dtype=torch.uint8), torch.zeros(4, 3), torch.zeros(4, 2), 4)
    with pytest.raises(ValueError, match="uint8"):
        W4Weight(torch.zeros(4, 4, dtype=torch.int32), torch.zeros(4, 2), torch.zeros(4, 2), 4)


def test_to_casts_only_scales_and_zeros_and_is_lossless_in_bf16():
    w4 = quantize_w4(random_weights(16, 128), group_size=64)
    b = w4.to(dtype=torch.bfloat16)
    assert b.qweight.dtype == torch.uint8 and b.group_size == 64
    assert b.scales.dtype == torch.bfloat16 and b.zeros.dtype == torch.bfloat16
    # scales/zeros are snapped to bf16-representable values at quantization time
    assert torch.equal(b.scales.float(), w4.scales)
    assert torch.equal(b.zeros.float(), w4.zeros)
    assert torch.equal(b.qweight, w4.qweight)


# --------------------------------------------------------------------------- methods
@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_shapes_and_dtypes_with_odd_rows(method):
    w = random_weights(123, 192)
    w4 = quantize_w4(w, group_size=64, method=method)
    assert w4.shape == (123, 192)
    assert w4.qweight.shape == (123, 96) and w4.qweight.dtype == torch.uint8
    assert w4.scales.shape == w4.zeros.shape == (123, 3)
    assert w4.scales.dtype == w4.zeros.dtype == torch.float32
    assert bool((w4.scales > 0).all())
    assert torch.isfinite(w4.dequantize()).all()


def test_rtn_error_bound_per_element():
    w = random_weights(123, 256, seed=2)
    w4 = quantize_w4(w, group_size=64, method="rtn")
    err = (w - w4.dequantize()).abs()
    bound = _expand(w4.scales, 64) / 2 + 1e-6
    assert bool((err <= bound).all()), float((err - bound).max())
    # the range is spent: some group hits both ends of 0..15
    q = unpack_int4(w4.qweight)
    assert int(q.min()) == 0 and int(q.max()) == 15


def test_hqq_reduces_mse_vs_rtn_and_never_loses_a_group():
    w = random_weights(512, 576, seed=3)
    rtn = quantize_w4(w, method="rtn")
    hqq = quantize_w4(w, method="hqq")
    e_rtn = (w - rtn.dequantize()).square().view(512, -1, 64).sum(-1)  # [N, groups]
    e_hqq = (w - hqq.dequantize()).square().view(512, -1, 64).sum(-1)
    reduction = 1 - float(e_hqq.sum() / e_rtn.sum())
    print(f"hqq vs rtn MSE reduction: {reduction:.1%}")
    assert reduction > 0.10  # ~17% measured on these weights, ~33% on SmolLM2's
    assert bool((e_hqq <= e_rtn * (1 + 1e-5) + 1e-12).all())


def test_hqq_iterations_bound_and_zero_iterations_still_refines():
    w = random_weights(64, 128, seed=4)
    rtn = (w - quantize_w4(w, method="rtn").dequantize()).square().sum()
    for iters in (0, 1, 20):
        err = (w - quantize_w4(w, method="hqq", iters=iters).dequantize()).square().sum()
        assert err < rtn


def _weighted_group_errors(w, w4, imp, group_size=64):
    n, k = w.shape
    return ((w - w4.dequantize()).square() * imp).view(n, k // group_size, group_size).sum(-1)


def test_importance_lowers_the_weighted_error_and_never_loses_a_group_to_rtn():
    w = random_weights(256, 192, seed=11)
    imp = channel_importance(192)
    plain = quantize_w4(w)
    weighted = quantize_w4(w, importance=imp)
    rtn = quantize_w4(w, method="rtn")
    e_plain = _weighted_group_errors(w, plain, imp)
    e_weighted = _weighted_group_errors(w, weighted, imp)
    e_rtn = _weighted_group_errors(w, rtn, imp)
    gain = 1 - float(e_weighted.sum() / e_plain.sum())
    print(f"importance-weighted error vs unweighted hqq: -{gain:.1%}")
    assert gain > 0.3  # the hot columns dominate: they get (nearly) exact grid points
    assert bool((e_weighted <= e_rtn * (1 + 1e-5) + 1e-12).all())
    # what the weighting trades away: the plain (unweighted) error goes up a little
    assert (w - weighted.dequantize()).square().sum() > (w - plain.dequantize()).square().sum()


def test_uniform_importance_is_plain_hqq():
    w = random_weights(64, 128, seed=12)
    plain = quantize_w4(w)
    for imp in (torch.ones(128), torch.full((128,), 7.5)):
        flat = quantize_w4(w, importance=imp)
        e_plain = (w - plain.dequantize()).square().sum()
        e_flat = (w - flat.dequantize()).square().sum()
        # same objective, other float summation order: equal to rounding
        torch.testing.assert_close(e_flat, e_plain, rtol=1e-3, atol=0)
    zero = quantize_w4(w, importance=torch.zeros(128))  # no information: unweighted
    assert torch.equal(zero.qweight, plain.qweight)


def test_rtn_ignores_importance_and_importance_is_validated():
    w = random_weights(16, 128, seed=13)
    a = quantize_w4(w, method="rtn")
    b = quantize_w4(w, method="rtn", importance=channel_importance(128))
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
    with pytest.raises(ValueError, match="expected K=128"):
        quantize_w4(w, importance=torch.ones(64))
    bad = torch.ones(128)
    bad[3] = -1.0
    with pytest.raises(ValueError, match="non-negative"):
        quantize_w4(w, importance=bad)
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        quantize_w4(w, importance=bad)


def test_quantize_model_uses_per_namechannel_importance():
    named = {"a": random_weights(32, 128, 1), "b": random_weights(32, 128, 2)}
    imp = channel_importance(128)
    out = quantize_model(named, progress=False, importance={"a": imp})
    assert torch.equal(out["a"].qweight, quantize_w4(named["a"], importance=imp).qweight)
    assert torch.equal(out["b"].qweight, quantize_w4(named["b"]).qweight)  # no entry: plain


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_constant_groups_are_exact_and_finite(method):
    w = random_weights(6, 256, seed=5)
    w[0] = 0.0  # all-zero row
    w[1, :64] = 0.37  # constant positive group
    w[2, 64:128] = -1.25  # constant negative group
    w[3, 128:192] = 1e-30  # constant, tiny
    w[4, :] = 3.0  # constant row
    w4 = quantize_w4(w, group_size=64, method=method)
    for t in (w4.scales, w4.zeros, w4.dequantize()):
        assert torch.isfinite(t).all()
    deq = w4.dequantize()
    torch.testing.assert_close(deq[0], w[0], rtol=0, atol=0)
    torch.testing.assert_close(deq[1, :64], w[1, :64], rtol=1e-2, atol=0)
    torch.testing.assert_close(deq[2, 64:128], w[2, 64:128], rtol=1e-2, atol=0)
    torch.testing.assert_close(deq[3, 128:192], w[3, 128:192], rtol=0, atol=1e-29)
    torch.testing.assert_close(deq[4], w[4], rtol=1e-2, atol=0)
    assert bool((w4.scales > 0).all())


def test_group_size_must_divide_k():
    with pytest.raises(ValueError, match=r"K=100 is not divisible by group_size=64"):
        quantize_w4(torch.zeros(4, 100), group_size=64)
    with pytest.raises(ValueError, match="even"):
        quantize_w4(torch.zeros(4, 9), group_size=3)


def test_rejects_bad_method_shape_and_nonfinite():
    with pytest.raises(ValueError, match="method"):
        quantize_w4(torch.zeros(4, 64), method="gptq")
    with pytest.raises(ValueError, match="2-D"):
        quantize_w4(torch.zeros(64))
    w = torch.zeros(4, 64)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_w4(w)


def test_chunking_does_not_change_rtn(monkeypatch):
    w = random_weights(123, 128, seed=6)
    whole = quantize_w4(w, method="rtn")
    monkeypatch.setattr(rq, "_CHUNK_ELEMS", 10 * 128)  # 13 chunks, the last one ragged
    chunked = quantize_w4(w, method="rtn")
    assert torch.equal(whole.qweight, chunked.qweight)
    assert torch.equal(whole.scales, chunked.scales)
    assert torch.equal(whole.zeros, chunked.zeros)
    hqq = quantize_w4(w, method="hqq")
    assert (w - hqq.dequantize()).square().sum() < (w - whole.dequantize()).square().sum()


def test_other_group_sizes():
    w = random_weights(10, 256, seed=7)
    for gs in (32, 128, 256):
        w4 = quantize_w4(w, group_size=gs)
        assert w4.scales.shape == (10, 256 // gs) and w4.group_size == gs
        assert (w - w4.dequantize()).abs().max() < 0.05


def test_quantize_model_keeps_names_and_order_and_thread_count():
    named = {
        "z.last": random_weights(8, 64, 1),
        "a.first": random_weights(16, 128, 2),
        "m": random_weights(3, 64),
    }
    threads = torch.get_num_threads()
    out = quantize_model(named, progress=False)
    assert list(out) == list(named)
    assert torch.get_num_threads() == threads
    for name, w in named.items():
        assert out[name].shape == tuple(w.shape)
        single = quantize_w4(w)
        assert torch.equal(out[name].qweight, single.qweight)


# --------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_gptq_lowers_the_output_error_under_correlated_inputs(bits):
    """With a Hessian E[x x^T] the quantizers compensate each column's rounding error in the
    columns after it (river.gptq): the output error tr(dW H dW^T) falls well below what the
    same quantizer reaches weighing columns by E[x^2] alone."""
    from river.quantize import quantize_w6
    from river.w8 import quantize_w8

    g = gen(7)
    n, k = 96, 192  # odd row count, K three groups of 64
    mix = torch.eye(k) + 2 * torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(1024, k, generator=g) @ mix
    x[:, 5] *= 30  # an outlier channel, as real models have
    h = x.T @ x / len(x)
    w = torch.randn(n, k, generator=g)

    def quant(imp):
        if bits == 8:
            return quantize_w8(w, imp)
        return (quantize_w4 if bits == 4 else quantize_w6)(w, 64, importance=imp)

    def out_err(q):
        d = w - q.dequantize()
        return float(((d @ h) * d).sum())

    diag_q, gptq_q = quant(h.diagonal().clone()), quant(h)
    assert out_err(gptq_q) < 0.75 * out_err(diag_q)
    assert type(gptq_q) is type(diag_q) and gptq_q.shape == diag_q.shape
    with pytest.raises(ValueError, match="Hessian"):
        quant(h[:-1, :-1])
    with pytest.raises(ValueError, match="Hessian"):
        quant(torch.full((k, k), float("nan")))


def test_gptq_keeps_columns_the_calibration_never_reached():
    """A silent input column (H_kk = 0) keeps its weights quantized, not zeroed: real text
    may reach it."""
    g = gen(3)
    w = torch.randn(32, 128, generator=g)
    x = torch.randn(256, 128, generator=g)
    x[:, 10] = 0
    q = quantize_w4(w, 64, importance=x.T @ x / 256)
    assert torch.allclose(q.dequantize()[:, 10], w[:, 10], atol=0.5)
    assert bool(torch.isfinite(q.dequantize()).all())
