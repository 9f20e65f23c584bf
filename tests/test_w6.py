"""The 6-bit twins: the two-plane format, the quantizer at 6 bits, the CPU weight that runs one as
torch's int4 matmul over twice the columns, and their cache file."""

import pytest
import torch
from w4_samples import channel_importance, random_weights

from river.quantize import (
    W6Weight,
    pack_int2,
    quantize_w4,
    quantize_w6,
    unpack_int2,
    unpack_int4,
)
from river.twin_cache import load_or_quantize

# ----------------------------------------------------------------------------- format


def test_int2_pack_round_trip_and_layout():
    q = torch.randint(0, 4, (5, 3, 16))
    p = pack_int2(q)
    assert p.dtype == torch.uint8 and p.shape == (5, 3, 4)
    assert torch.equal(unpack_int2(p), q.to(torch.uint8))
    # column 4j in the lowest two bits
    assert int(pack_int2(torch.tensor([1, 2, 3, 0]))[0]) == 1 | 2 << 2 | 3 << 4
    for bad in (
        torch.tensor([4, 0, 0, 0]),
        torch.tensor([-1, 0, 0, 0]),
        torch.zeros(6, dtype=torch.int64),
    ):
        with pytest.raises(ValueError):
            pack_int2(bad)
    with pytest.raises(ValueError):
        pack_int2(torch.zeros(4))  # float
    with pytest.raises(ValueError):
        unpack_int2(torch.zeros(4, dtype=torch.int8))


def test_w6_planes_hold_the_codes():
    torch.manual_seed(0)
    q = torch.randint(0, 64, (32, 128))
    s, z = torch.rand(32, 2) + 0.1, torch.rand(32, 2) * 63
    w = W6Weight.from_codes(q, s, z, 64)
    assert w.shape == (32, 128) and w.bits == 6
    assert torch.equal(w.codes(), q.to(torch.uint8))
    assert torch.equal(unpack_int4(w.qweight), (q & 15).to(torch.uint8))  # the 4-bit layout
    want = ((q.float().view(32, 2, 64) - z[..., None]) * s[..., None]).view(32, 128)
    assert torch.equal(w.dequantize(), want)
    both = W6Weight.cat([w, w])
    assert both.shape == (64, 128) and torch.equal(both.dequantize(), torch.cat([want, want]))
    moved = w.to(dtype=torch.bfloat16)
    assert moved.qweight_hi.dtype == torch.uint8 and moved.scales.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="0..63"):
        W6Weight.from_codes(q + 1, s, z, 64)
    with pytest.raises(ValueError, match="qweight_hi"):
        W6Weight(w.qweight, w.qweight_hi[:, :-1], s, z, 64)
    with pytest.raises(ValueError, match="group_size"):
        W6Weight(w.qweight, w.qweight_hi, s, z, 48)
    with pytest.raises(ValueError, match="different group sizes"):
        W6Weight.cat([w, quantize_w6(torch.randn(8, 128), group_size=32)])


# ----------------------------------------------------------------------------- quantizer


@pytest.mark.parametrize("method", ["rtn", "hqq"])
@pytest.mark.parametrize("n,k,g", [(1, 64, 64), (40, 192, 64), (33, 128, 32)])
def test_w6_error_is_a_sixteenth_of_w4(method, n, k, g):
    """Four times finer grid, about sixteen times less squared error, on every shape."""
    w = random_weights(n, k, seed=n)
    q6, q4 = quantize_w6(w, g, method), quantize_w4(w, g, method)
    assert int(q6.codes().max()) <= 63
    assert torch.equal(q6.scales, q6.scales.to(torch.bfloat16).float())  # bf16 numbers
    e6 = float((q6.dequantize() - w).square().mean())
    e4 = float((q4.dequantize() - w).square().mean())
    assert e6 < e4 / 8
    # within half a step of the group (plus what a clip can cut on hqq's side)
    step = q6.scales.repeat_interleave(g, 1)
    slack = 0.0 if method == "rtn" else 0.25 * w.abs().amax()
    assert bool(((q6.dequantize() - w).abs() <= 0.5 * step + 1e-6 + slack).all())


def test_w6_importance_weights_the_error():
    w = random_weights(16, 128, seed=3)
    imp = channel_importance(128)
    plain, weighted = quantize_w6(w), quantize_w6(w, importance=imp)

    def werr(q):
        return float(((q.dequantize() - w).square() * imp).sum())

    assert werr(weighted) < werr(plain)


def test_w6_shape_errors():
    with pytest.raises(ValueError, match="multiple of 4"):
        quantize_w6(torch.randn(4, 66), group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        quantize_w6(torch.randn(4, 96), group_size=64)


# ----------------------------------------------------------------------------- the CPU weight


@pytest.mark.parametrize("m", [1, 5])
def test_int6_cpu_weight_matches_dequantized(m):
    """One int4 matmul over [hi | lo] gives the 6-bit twin's product to bf16's rounding (the
    zeros (8 - z) s are rounded once to bf16, as for the 4-bit twins)."""
    from river.kernels import cpu

    torch.manual_seed(m)
    w = random_weights(96, 192, seed=m)
    q = quantize_w6(w)
    packed = cpu.Int6CpuWeight.from_quantized(q)
    assert packed.shape == (96, 192) and packed.bits == 6
    x = torch.randn(m, 192, dtype=torch.bfloat16)
    want = x.float() @ q.dequantize().t()
    got = cpu.linear(x, packed).float()
    assert float((got - want).norm() / want.norm()) < 1e-2
    deq = packed.dequantize()
    assert float((deq - q.dequantize()).abs().max()) <= 0.01 * float(w.abs().max())
    with pytest.raises(TypeError, match="bf16"):
        cpu.linear(torch.randn(1, 192), packed)
    with pytest.raises(ValueError, match="divisible by 16"):
        cpu.Int6CpuWeight.from_quantized(quantize_w6(random_weights(8, 64)))


# ----------------------------------------------------------------------------- cache


def test_w6_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("RIVER_HOME", str(tmp_path / "home"))
    named = {"layers.0.q": random_weights(64, 128, 0), "layers.0.down": random_weights(32, 192, 1)}
    first = load_or_quantize(tmp_path, named, progress=False, bits=6)
    assert (tmp_path / "river-w6-g64-hqq.safetensors").is_file()
    assert all(isinstance(w, W6Weight) for w in first.values())
    second = load_or_quantize(tmp_path, named, progress=False, bits=6)
    for name in named:
        for field in ("qweight", "qweight_hi", "scales", "zeros"):
            assert torch.equal(getattr(first[name], field), getattr(second[name], field))
    # the 4-bit twins of the same weights have their own file, and are W4
    four = load_or_quantize(tmp_path, named, progress=False, bits=4)
    assert (tmp_path / "river-w4-g64-hqq.safetensors").is_file()
    assert all(w.bits == 4 for w in four.values())
    with pytest.raises(ValueError, match="6- or 8-bit"):
        load_or_quantize(tmp_path, named, progress=False, bits=5)


def test_w6_shard_cuts_on_whole_bytes():
    from river.errors import ConfigError
    from river.parallel import _cols

    w = quantize_w6(random_weights(16, 64), group_size=2)
    assert torch.equal(_cols(w, 0, 32).dequantize(), w.dequantize()[:, :32])
    with pytest.raises(ConfigError, match="multiple of 4"):
        _cols(w, 0, 30)
