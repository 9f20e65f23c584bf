"""The CPU fast ops (river.kernels.cpu) against the reference oracle: same semantics under row
masks (empty, partial, full), bf16 and fp32, and the packed int4 twins against the dequantized
W4 weights they come from."""

import pytest
import torch
from river.kernels import cpu, reference

from river.quantize import quantize_w4

TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2)}
MASKS = ["none", "empty", "some", "all"]


def make_mask(kind, m):
    if kind == "none":
        return None
    if kind == "empty":
        return torch.zeros(m, dtype=torch.bool)
    if kind == "all":
        return torch.ones(m, dtype=torch.bool)
    return torch.arange(m) % 3 == 1


def close(got, want, dtype, msg):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=msg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("m", [1, 5])
def test_linear_and_gate_up_match_reference(dtype, mask, m):
    x = torch.randn(m, 80, dtype=dtype)
    w = torch.randn(48, 80, dtype=dtype) / 9
    rm = make_mask(mask, m)
    out0 = torch.full((m, 48), 7.0, dtype=dtype)
    got = cpu.linear(x, w, row_mask=rm, out=out0.clone())
    want = reference.linear(x, w, row_mask=rm, out=out0.clone())
    close(got, want, dtype, f"linear {mask}")
    got = cpu.gate_up_silu(x, w, row_mask=rm)
    want = reference.gate_up_silu(x, w, row_mask=rm)
    close(got, want, dtype, f"gate_up {mask}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_matches_reference(dtype, residual):
    x = torch.randn(3, 72, dtype=dtype)
    r = torch.randn(3, 72, dtype=dtype) if residual else None
    w = torch.randn(72, dtype=dtype)
    (y, res), (y0, res0) = cpu.rms_norm(x, w, 1e-5, r), reference.rms_norm(x, w, 1e-5, r)
    close(y, y0, dtype, "rms_norm")
    assert torch.equal(res, res0)


def _cache(dtype, blocks=12, bs=4, hkv=2, d=16):
    k = torch.randn(blocks, bs, hkv, d, dtype=dtype)
    return k, torch.randn_like(k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", MASKS)
def test_qkv_rope_store_matches_reference(dtype, mask):
    m, hq, hkv, d, k_in = 5, 4, 2, 16, 40
    cos, sin = torch.randn(64, d // 2), torch.randn(64, d // 2)
    x = torch.randn(m, k_in, dtype=dtype)
    w = torch.randn((hq + 2 * hkv) * d, k_in, dtype=dtype) / 6
    pos = torch.tensor([3, 0, 17, 9, 30])
    slots = torch.tensor([5, 9, 20, 33, 47])
    rm = make_mask(mask, m)
    kc, vc = _cache(dtype)
    kc0, vc0 = kc.clone(), vc.clone()
    q_init = torch.full((m, hq, d), 3.0, dtype=dtype)
    got = cpu.qkv_rope_store(x, w, cos, sin, pos, kc, vc, slots, hq, hkv, rm, q_init.clone())
    want = reference.qkv_rope_store(
        x, w, cos, sin, pos, kc0, vc0, slots, hq, hkv, rm, q_init.clone()
    )
    close(got, want, dtype, f"q {mask}")
    close(kc, kc0, dtype, f"k cache {mask}")
    close(vc, vc0, dtype, f"v cache {mask}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("lens", [[7], [7, 7], [1, 13, 30]])
@pytest.mark.parametrize("holes", [False, True])
def test_decode_attention_matches_reference(dtype, mask, lens, holes):
    b, hq, hkv, d, bs = len(lens), 4, 2, 16, 4
    kc, vc = _cache(dtype, blocks=40, bs=bs, hkv=hkv, d=d)
    perm = torch.randperm(40)
    width = 9
    tables = torch.full((b, width), -1, dtype=torch.int32)
    for i, n in enumerate(lens):
        nb = -(-n // bs)
        tables[i, :nb] = perm[i * width : i * width + nb].int()
    ctx = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(b, hq, d, dtype=dtype)
    rm = make_mask(mask, b)
    valid = (torch.rand(40, bs) > 0.3) if holes else None
    got = cpu.paged_decode_attention(q, kc, vc, tables, ctx, 0.25, rm, valid)
    want = reference.paged_decode_attention(q, kc, vc, tables, ctx, 0.25, rm, valid)
    close(got, want, dtype, f"attention {mask} {lens} holes={holes}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "new, lens",
    [([3, 1, 5], [9, 1, 30]), ([5, 5], [5, 12]), ([2], [7]), ([20, 2], [20, 33])],
)  # extends over a prefix, whole prompts, one sequence, and past the batched limit
def test_prefill_attention_matches_reference(dtype, new, lens):
    s, hq, hkv, d, bs, width = len(lens), 6, 2, 16, 4, 9
    kc, vc = _cache(dtype, blocks=40, bs=bs, hkv=hkv, d=d)
    perm = torch.randperm(40)
    tables = torch.full((s, width), -1, dtype=torch.int32)
    for i, n in enumerate(lens):
        nb = -(-n // bs)
        tables[i, :nb] = perm[i * width : i * width + nb].int()
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(new), hq, d, dtype=dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    got = cpu.prefill_attention(q, kc, vc, cu, tables, ctx, 0.25, max_seqlen=max(new))
    want = reference.prefill_attention(q, kc, vc, cu, tables, ctx, 0.25)
    close(got, want, dtype, f"prefill {new} {lens}")


@pytest.mark.parametrize("n, k, g", [(96, 128, 64), (48, 192, 32)])
def test_int4_pack_equals_dequantized_twin(n, k, g):
    torch.manual_seed(1)
    w = torch.randn(n, k) / 10
    w4 = quantize_w4(w, g, method="rtn")
    packed = cpu.Int4CpuWeight.from_quantized(w4)
    dense = w4.dequantize(torch.float32)
    # The packed form sees zero' = (8 - z) * s rounded once to bf16: at most half a bf16 ulp
    # of each group's zero' away from the dequantized twin.
    got = packed.dequantize(torch.float32)
    zero = ((8.0 - w4.zeros.float()) * w4.scales.float()).abs()
    bound = (zero * 2.0**-8).repeat_interleave(g, dim=1) + dense.abs() * 2.0**-8 + 1e-6
    assert ((got - dense).abs() <= bound).all()
    x = torch.randn(3, k, dtype=torch.bfloat16)
    y = cpu.linear(x, packed)
    ref = x.float() @ dense.t()
    torch.testing.assert_close(y.float(), ref, atol=3e-2 * ref.abs().max().item(), rtol=0)


def test_int4_pack_refuses_untileable_shapes():
    with pytest.raises(ValueError, match="divisible by 16"):
        cpu.Int4CpuWeight.from_quantized(quantize_w4(torch.randn(40, 64), 32, method="rtn"))


def test_int4_needs_bf16_activations():
    w4 = quantize_w4(torch.randn(32, 64), 64, method="rtn")
    with pytest.raises(TypeError, match="bf16"):
        cpu.linear(torch.randn(2, 64), cpu.Int4CpuWeight.from_quantized(w4))


def test_engine_runs_bf16_with_packed_twins_on_cpu(tiny_dir):
    """With native bf16 the CPU engine defaults to bf16 + the fast ops and packs the twins;
    the fp32 reference engine (the oracle) is one setting away."""
    from river import Engine, ExitConfig, SamplingParams
    from river.cpu import has_native_bf16

    kw = {"device": "cpu", "num_blocks": 32, "block_size": 8, "river_precision": "w4"}
    fast = Engine(str(tiny_dir), **kw)
    oracle = Engine(str(tiny_dir), dtype=torch.float32, ops="reference", **kw)
    assert oracle.model.ops.kind == "reference" and fast.model.ops.kind == "cpu"
    if not has_native_bf16():
        pytest.skip("this CPU has no native bf16: the fast path stays fp32")
    assert fast.dtype == torch.bfloat16
    fast.ensure_river(progress=False)
    assert isinstance(fast.model.river[0].qkv, cpu.Int4CpuWeight)
    sp = SamplingParams(max_tokens=6, temperature=0.0, exit=ExitConfig("river", min_layer=1))
    out = fast.generate(["def f(x):", "Hello"], sp)
    assert all(len(o.token_ids) == 6 for o in out)
