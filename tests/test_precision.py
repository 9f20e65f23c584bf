"""Twin precision: the 8-bit format and quantizer, the CPU int8 weight, the per-projection plan
under a byte budget, the static-split prefill, and the engine's river_precision setting."""

import pytest
import torch
from helpers import forbid_host_sync, tiny_checkpoint

from river import Engine, EngineConfig, ExitConfig, SamplingParams
from river.errors import ConfigError, InvalidRequestError
from river.exits import ExitParams
from river.kv_cache import KVCache
from river.model import LlamaModel
from river.precision import (
    UNITS,
    TwinPrecision,
    plan,
    select,
    twin_fraction,
    unit_sensitivity,
    weight_bytes,
)
from river.quantize import quantize_w4
from river.scheduler import prefill_forward_batch
from river.w8 import W8Weight, quantize_w8

# ----------------------------------------------------------------------------- format


@pytest.mark.parametrize("n,k", [(1, 8), (40, 64), (300, 576), (7, 33)])
def test_w8_round_trip_error_is_half_a_step(n, k):
    torch.manual_seed(n)
    w = torch.randn(n, k) * torch.rand(n, 1) * 3
    q = quantize_w8(w)
    assert q.qweight.dtype == torch.int8 and q.scales.shape == (n,)
    assert int(q.qweight.abs().max()) <= 127
    # scales are bf16 numbers (the GPU's cast is lossless)
    assert torch.equal(q.scales, q.scales.to(torch.bfloat16).float())
    err = (q.dequantize() - w).abs()
    # within half a step of each row, plus what a clip point can cut (at most 20% of max|w|)
    assert bool((err <= q.scales[:, None] * 0.5 + 0.2 * w.abs().amax(1, keepdim=True)).all())
    # and far below a 4-bit twin's error on the same weight
    if k % 8 == 0:
        w4 = quantize_w4(w, group_size=8, method="rtn")
        assert float((q.dequantize() - w).square().mean()) < 0.05 * float(
            (w4.dequantize() - w).square().mean()
        )


def test_w8_importance_moves_the_clip():
    """A row with one outlier column: weighting that column up keeps it exact (no clipping),
    weighting it down clips it for a finer step on the rest."""
    torch.manual_seed(0)
    w = torch.randn(4, 64) * 0.1
    w[:, 5] = 2.0
    loud = torch.ones(64)
    loud[5] = 1e4
    quiet = torch.ones(64)
    quiet[5] = 1e-6
    a, b = quantize_w8(w, loud), quantize_w8(w, quiet)
    assert (a.dequantize()[:, 5] - 2.0).abs().max() < (b.dequantize()[:, 5] - 2.0).abs().max()
    rest = [c for c in range(64) if c != 5]
    err_a = (a.dequantize() - w)[:, rest].square().sum()
    err_b = (b.dequantize() - w)[:, rest].square().sum()
    assert err_b < err_a


def test_w8_errors():
    with pytest.raises(ValueError, match="2-D"):
        quantize_w8(torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        quantize_w8(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="importance has 3"):
        quantize_w8(torch.ones(2, 4), torch.ones(3))
    with pytest.raises(ValueError, match="int8"):
        W8Weight(torch.zeros(2, 4, dtype=torch.uint8), torch.ones(2))
    with pytest.raises(ValueError, match="scales"):
        W8Weight(torch.zeros(2, 4, dtype=torch.int8), torch.ones(3))


@pytest.mark.parametrize("m", [1, 3, 4, 5, 40])  # the int8 matmul up to 4 rows, bf16 GEMM past
def test_int8_cpu_weight_matches_dequantized(m):
    from river.kernels import cpu

    torch.manual_seed(m)
    w8 = quantize_w8(torch.randn(48, 96))
    packed = cpu.Int8CpuWeight.from_quantized(w8)
    assert torch.equal(packed.dequantize(), w8.dequantize())
    x = torch.randn(m, 96).to(torch.bfloat16)
    want = x.float() @ w8.dequantize().t()
    got = cpu.linear(x, packed)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    mask = torch.zeros(m, dtype=torch.bool)
    mask[0] = True
    out = cpu.linear(x, packed, row_mask=mask)
    torch.testing.assert_close(
        out[0].float(), want[0], rtol=2e-2, atol=2e-2 * float(want.abs().max())
    )
    assert not out[1:].any()
    with pytest.raises(TypeError, match="bf16"):
        cpu.linear(torch.randn(1, 96), packed)


# ----------------------------------------------------------------------------- plan


def test_precision_parse():
    assert TwinPrecision.parse("w4") == TwinPrecision("w4")
    assert TwinPrecision.parse("mix:0.4").budget == 0.4
    assert TwinPrecision.parse("mix:0.4").spec == "mix:0.4"
    assert TwinPrecision.parse("w8").bits_needed == (8,)
    assert TwinPrecision.parse("w6").bits_needed == (6,)
    six = TwinPrecision.parse("mix6:0.45")
    assert (six.preset, six.budget, six.spec, six.base_bits) == ("mix6", 0.45, "mix6:0.45", 6)
    assert six.bits_needed == (4, 6, 8) and six.head_bits == 8  # (4: the units' ranking)
    for bad in ("mix", "mix:1.5", "mix:x", "w16", "", None, 4, "mix6", "mix6:0", "w6:0.4"):
        with pytest.raises(ConfigError):
            TwinPrecision.parse(bad)


def _cfg(layers=6):
    from river.config import ModelConfig

    return ModelConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=layers, num_heads=4,
        num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip


def test_plan_spends_the_budget_on_the_most_sensitive_units():
    cfg = _cfg()
    units = [(n, u) for n in range(cfg.num_layers) for u in UNITS]
    assert set(plan(TwinPrecision("w4"), cfg).values()) == {4}
    assert set(plan(TwinPrecision("w8"), cfg).values()) == {8}
    sens = {key: 0.001 for key in units}
    sens[(5, "down")] = 1.0  # one unit far more sensitive than the rest
    sens[(0, "o")] = 0.5
    prev = 0.0
    for budget in (0.29, 0.32, 0.36, 0.4, 0.45, 0.49):
        bits = plan(TwinPrecision("mix", budget), cfg, sens)
        frac = twin_fraction(bits, cfg)
        assert frac <= budget + 1e-9  # never over
        assert frac >= prev  # more budget never buys less
        prev = frac
        if budget >= 0.32:
            assert bits[(5, "down")] == 8 and bits[(0, "o")] == 8
    assert twin_fraction({key: 4 for key in units}, cfg) == pytest.approx(0.28125)
    with pytest.raises(ValueError, match="sensitivities"):
        plan(TwinPrecision("mix", 0.4), cfg)
    # mix6: a 6-bit base, the same ranking; below the all-6-bit bytes nothing is upgraded
    assert set(plan(TwinPrecision("w6"), cfg).values()) == {6}
    assert twin_fraction({key: 6 for key in units}, cfg) == pytest.approx(0.40625)
    assert set(plan(TwinPrecision("mix6", 0.4), cfg, sens).values()) == {6}
    prev = 0.0
    for budget in (0.41, 0.43, 0.45, 0.49):
        bits = plan(TwinPrecision("mix6", budget), cfg, sens)
        assert set(bits.values()) <= {6, 8}
        frac = twin_fraction(bits, cfg)
        assert prev <= frac <= budget + 1e-9
        prev = frac
    assert bits[(5, "down")] == 8 and bits[(0, "o")] == 8


def test_weight_bytes():
    assert weight_bytes(10, 64, 16) == 1280
    assert weight_bytes(10, 64, 8) == 660  # a byte per weight + a bf16 scale per row
    assert weight_bytes(10, 64, 4, 64) == 360  # nibbles + bf16 scale and zero per group
    assert weight_bytes(10, 64, 6, 64) == 520  # 3/4 byte a weight + the group's scale, zero
    with pytest.raises(ValueError, match="6- or 8-bit"):
        weight_bytes(10, 64, 5)


# ----------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("precision"), layers=3)


def _mixed_twins(tiny3):
    mc, weights, quant4 = tiny3
    quant8 = {k: quantize_w8(weights["layers"][int(k.split(".")[1])][k.split(".")[2]])
              for k in quant4}  # fmt: skip
    bits = {(n, u): 8 if (n + len(u)) % 2 else 4 for n in range(mc.num_layers) for u in UNITS}
    return select(bits, {4: quant4, 8: quant8}), bits


def _prefill(model, seqs, twins_from=None):
    cfg = model.cfg
    kv = KVCache(cfg.num_layers, 4 * len(seqs), 16, cfg.num_kv_heads, cfg.head_dim,
                 model.dtype, "cpu")  # fmt: skip
    tables = [list(range(4 * i, 4 * i + 4)) for i in range(len(seqs))]
    batch = prefill_forward_batch(seqs, tables, 16, "cpu")
    return model.prefill(batch, kv, all_logits=True, twins_from=twins_from), kv, tables


def test_static_split_prefill_equals_decoding_with_that_split(tiny3):
    """prefill(twins_from=k) gives each token what decoding it with a static exit after k
    layers gives (bench_quality's static-split passes rest on this), with mixed twins."""
    mc, weights, _ = tiny3
    quant, _ = _mixed_twins(tiny3)
    model = LlamaModel(mc, weights, "cpu", torch.float32, 128, ops="reference")
    model.attach_river(quant)
    seq = [5, 9, 33, 2, 7, 11, 12, 40]
    for k in (0, 1, 2):
        want, _, _ = _prefill(model, [seq], twins_from=k)
        # decode: prefill the first token with the same split, then one token per step
        _, kv, tables = _prefill(model, [seq[:1]], twins_from=k)
        from river.kv_cache import pad_block_tables
        from river.model import ForwardBatch

        exits = ExitParams.build([ExitConfig("river", -1.0, k) if k else ExitConfig("w4")], "cpu")
        for pos in range(1, len(seq)):
            batch = ForwardBatch(
                torch.tensor([seq[pos]]), torch.tensor([pos]), torch.tensor([pos]),
                pad_block_tables(tables), torch.tensor([pos + 1], dtype=torch.int32),
            )  # fmt: skip
            logits, used = model.decode(batch, kv, exits)
            assert int(used[0]) == k
            torch.testing.assert_close(logits[0], want[pos], atol=1e-4, rtol=1e-4)


def test_decode_with_mixed_twins_has_no_host_sync(tiny3):
    from river.kv_cache import pad_block_tables
    from river.model import ForwardBatch

    mc, weights, _ = tiny3
    quant, bits = _mixed_twins(tiny3)
    assert set(bits.values()) == {4, 8}
    model = LlamaModel(mc, weights, "cpu", torch.float32, 128, ops="reference")
    model.attach_river(quant)
    kv = KVCache(mc.num_layers, 8, 4, mc.num_kv_heads, mc.head_dim, torch.float32, "cpu")
    cfgs = [ExitConfig("river", 0.3, 1), ExitConfig("w4"), ExitConfig("full")]
    exits = ExitParams.build(cfgs, "cpu")
    batch = ForwardBatch(
        torch.tensor([3, 4, 5]), torch.zeros(3, dtype=torch.long), torch.tensor([0, 4, 8]),
        pad_block_tables([[0], [1], [2]]), torch.ones(3, dtype=torch.int32),
    )  # fmt: skip
    with forbid_host_sync():
        logits, used = model.decode(batch, kv, exits)
    assert logits.shape == (3, 200) and int(used[1]) == 0 and int(used[2]) == 3


def test_fused_units_must_share_a_format(tiny3):
    mc, weights, quant4 = tiny3
    bad = dict(quant4)
    bad["layers.0.k"] = quantize_w8(weights["layers"][0]["k"])
    model = LlamaModel(mc, weights, "cpu", torch.float32, 128, ops="reference")
    with pytest.raises(ValueError, match="share a twin format"):
        model.attach_river(bad)


def test_unit_sensitivity_ranks_units(tiny3):
    from river.calibrate import Calibration

    mc, weights, quant4 = tiny3
    model = LlamaModel(mc, weights, "cpu", torch.float32, 128, ops="reference")
    sens = unit_sensitivity(model, {4: quant4}, Calibration(2, 16))
    assert set(sens) == {(n, u) for n in range(mc.num_layers) for u in UNITS}
    assert all(v >= 0 for v in sens.values()) and max(sens.values()) > 0
    assert model.river is None and all(isinstance(w.qkv, torch.Tensor) for w in model.layers)


# ----------------------------------------------------------------------------- engine


@pytest.mark.parametrize("spec", ["w8", "mix:0.4", "w6", "mix6:0.45"])
def test_engine_river_precision(tiny_dir, spec):
    cfg = EngineConfig(
        device="cpu", block_size=8, num_blocks=64, river_precision=spec, dtype=torch.float32
    )
    eng = Engine(str(tiny_dir), cfg)
    prompt = "def add(a, b):"
    [full] = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, exit=ExitConfig("w4"))
    [w] = eng.generate([prompt], sp)
    assert len(w.token_ids) == 8
    assert eng.river_bits is not None
    want = {"w8": {8}, "mix:0.4": {4, 8}, "w6": {6}, "mix6:0.45": {6, 8}}[spec]
    assert set(eng.river_bits.values()) == want
    kinds = {type(getattr(lw, f)).__name__ for lw in eng.model.river for f in UNITS}
    assert kinds == {"Tensor"}  # fp32 CPU: dequantized once
    # switching precision between requests rebuilds the twins from the caches
    eng.set_river_precision("w4")
    assert set(eng.river_bits.values()) == {4}
    [w4] = eng.generate([prompt], sp)
    assert len(w4.token_ids) == 8 and full.token_ids
    with pytest.raises(ConfigError):
        eng.set_river_precision("w5")


def test_set_river_precision_refused_in_flight(tiny_dir):
    eng = Engine(str(tiny_dir), EngineConfig(device="cpu", block_size=8, num_blocks=64))
    eng.add_request("hello", SamplingParams(max_tokens=4, exit=ExitConfig("w4")))
    eng.step()
    with pytest.raises(InvalidRequestError, match="in flight"):
        eng.set_river_precision("w8")
    while eng.has_unfinished():
        eng.step()
    eng.set_river_precision("w8")  # usable afterwards
    assert set(eng.river_bits.values()) == {8}


def test_bad_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="river_precision"):
        EngineConfig(river_precision="w3")


@pytest.mark.parametrize(
    "spec,packed", [("mix:0.4", "Int8CpuWeight"), ("mix6:0.45", "Int6CpuWeight")]
)
def test_bf16_cpu_engine_packs_both_formats(tiny_dir, spec, packed):
    from river.kernels import cpu

    from river.cpu import default_cpu_dtype

    if default_cpu_dtype() != torch.bfloat16:
        pytest.skip("no native bf16 on this CPU")
    eng = Engine(str(tiny_dir), EngineConfig(device="cpu", block_size=8, num_blocks=64,
                                             river_precision=spec))  # fmt: skip
    eng.generate("x", SamplingParams(max_tokens=2, exit=ExitConfig("w4")))
    kinds = {type(getattr(lw, f)) for lw in eng.model.river for f in UNITS}
    assert kinds <= {cpu.Int4CpuWeight, cpu.Int6CpuWeight, cpu.Int8CpuWeight, torch.Tensor}
    assert getattr(cpu, packed) in kinds and cpu.Int8CpuWeight in kinds


def test_river_rows_read_the_head_twin(tiny3):
    """Rows on the river path take their logits from the head's twin, backbone rows from the
    bf16 head; prefill(twins_from=k) does the same as decode (the static-split analysis)."""
    from river.kv_cache import pad_block_tables
    from river.model import ForwardBatch

    mc, weights, quant4 = tiny3
    head8 = quantize_w8(weights["embed"] if mc.tie_word_embeddings else weights["lm_head"])
    plain = LlamaModel(mc, weights, "cpu", torch.float32, 128, ops="reference")
    plain.attach_river(quant4)
    twin = LlamaModel(mc, weights, "cpu", torch.float32, 128, ops="reference")
    twin.attach_river(quant4, head=head8)
    swapped = LlamaModel(mc, weights, "cpu", torch.float32, 128, ops="reference")
    swapped.attach_river(quant4)
    swapped.lm_head = head8.dequantize()  # every row through the twin head
    cfgs = [ExitConfig("river", -1.0, 1), ExitConfig("full"), ExitConfig("w4")]
    exits = ExitParams.build(cfgs, "cpu")
    outs = {}
    for name, model in (("plain", plain), ("twin", twin), ("swapped", swapped)):
        kv = KVCache(mc.num_layers, 8, 4, mc.num_kv_heads, mc.head_dim, torch.float32, "cpu")
        batch = ForwardBatch(
            torch.tensor([3, 4, 5]), torch.zeros(3, dtype=torch.long), torch.tensor([0, 4, 8]),
            pad_block_tables([[0], [1], [2]]), torch.ones(3, dtype=torch.int32),
        )  # fmt: skip
        outs[name], _ = model.decode(batch, kv, exits)
    torch.testing.assert_close(outs["twin"][1], outs["plain"][1])  # full row: bf16 head
    for row in (0, 2):  # river and w4 rows: the twin head
        torch.testing.assert_close(outs["twin"][row], outs["swapped"][row], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(outs["twin"][row], outs["plain"][row], atol=1e-4)
    seq = [[5, 9, 33, 2]]
    got, _, _ = _prefill(twin, seq, twins_from=1)
    want, _, _ = _prefill(swapped, seq, twins_from=1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    full_twin, _, _ = _prefill(twin, seq)
    full_plain, _, _ = _prefill(plain, seq)
    torch.testing.assert_close(full_twin, full_plain)  # a full prefill never reads it


def test_static_split_skips_the_backbone_past_its_layer(tiny3):
    """ExitParams.backbone_until (host-side, static splits and w4 only) skips the backbone's ops
    and the exit decision past the split without changing a logit."""
    from river.kv_cache import pad_block_tables
    from river.model import ForwardBatch

    mc, weights, quant4 = tiny3
    model = LlamaModel(mc, weights, "cpu", torch.float32, 128, ops="reference")
    model.attach_river(quant4)
    cfgs = [ExitConfig("river", -1.0, 2), ExitConfig("w4"), ExitConfig("river", -1.0, 0)]
    exits = ExitParams.build(cfgs, "cpu")
    assert exits.backbone_until == 2
    assert ExitParams.build([*cfgs, ExitConfig("full")], "cpu").backbone_until is None
    assert ExitParams.build([ExitConfig("river", 0.5, 1)], "cpu").backbone_until is None
    outs = []
    for until in (2, None):
        exits.backbone_until = until
        kv = KVCache(mc.num_layers, 8, 4, mc.num_kv_heads, mc.head_dim, torch.float32, "cpu")
        batch = ForwardBatch(
            torch.tensor([3, 4, 5]), torch.zeros(3, dtype=torch.long), torch.tensor([0, 4, 8]),
            pad_block_tables([[0], [1], [2]]), torch.ones(3, dtype=torch.int32),
        )  # fmt: skip
        outs.append(model.decode(batch, kv, exits))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert outs[0][1].tolist() == outs[1][1].tolist() == [2, 0, 1]
