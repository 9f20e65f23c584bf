"""River-LLM exit paths on a tiny random Llama: each mode against a hand-built reference model,
per-row vs batch_min decisions, and the no-host-sync guarantee of the decode step."""

import pytest
import torch
from helpers import forbid_host_sync, tiny_checkpoint

from river.config import PROJECTIONS
from river.exits import ExitConfig, ExitParams, exit_decision
from river.kv_cache import KVCache, pad_block_tables, slots_for
from river.model import ForwardBatch, LlamaModel

LAYERS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("exits"), layers=LAYERS)


def build(tiny, layer_source=None, num_layers=None, river=True):
    """A model whose layer n uses backbone ('b') or dequantized river ('r') weights."""
    mc, weights, quant = tiny
    w = dict(weights)
    layers = []
    for n, lw in enumerate(weights["layers"][: num_layers or LAYERS]):
        src = (layer_source or "b" * LAYERS)[n]
        twin = {p: quant[f"layers.{n}.{p}"].dequantize() for p in PROJECTIONS}
        layers.append({**lw, **(twin if src == "r" else {})})
    w["layers"] = layers
    cfg = mc if num_layers is None else type(mc)(**{**mc.__dict__, "num_layers": num_layers})
    model = LlamaModel(cfg, w, "cpu", torch.float32, 128, ops="reference")
    if river:
        model.attach_river(quant)
    kv = KVCache(cfg.num_layers, 32, 4, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    return model, kv


PROMPTS = [[5, 9, 33, 2, 7], [11, 12], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
TOKENS = [[17, 3, 99], [8, 150, 60], [1, 2, 3]]


def run(model, kv, configs, steps=3, prefill_model=None):
    """Prefill PROMPTS (full backbone: `prefill_model` if given), then `steps` teacher-forced
    decode steps under exits. Returns the logits of every step [steps, B, V] and backbone
    layers used [steps, B]."""
    tables = [[4 * i + j for j in range(4)] for i in range(len(PROMPTS))]  # 16 slots each
    cu = [0]
    for p in PROMPTS:
        cu.append(cu[-1] + len(p))
    (prefill_model or model).prefill(
        ForwardBatch(
            torch.tensor(sum(PROMPTS, [])),
            torch.tensor([i for p in PROMPTS for i in range(len(p))]),
            torch.tensor([s for t, p in zip(tables, PROMPTS) for s in slots_for(t, 0, len(p), 4)]),
            pad_block_tables(tables),
            torch.tensor([len(p) for p in PROMPTS], dtype=torch.int32),
            torch.tensor(cu, dtype=torch.int32),
        ),
        kv,
    )
    exits = ExitParams.build(configs, "cpu")
    all_logits, all_used = [], []
    for s in range(steps):
        pos = [len(p) + s for p in PROMPTS]
        batch = ForwardBatch(
            torch.tensor([t[s] for t in TOKENS]),
            torch.tensor(pos),
            torch.tensor([t[p // 4] * 4 + p % 4 for t, p in zip(tables, pos)]),
            pad_block_tables(tables),
            torch.tensor([p + 1 for p in pos], dtype=torch.int32),
        )
        logits, used = model.decode(batch, kv, exits)
        all_logits.append(logits)
        all_used.append(used)
    return torch.stack(all_logits), torch.stack(all_used)


def test_exit_config_validation():
    with pytest.raises(ValueError, match="mode"):
        ExitConfig("early")
    with pytest.raises(ValueError, match="policy"):
        ExitConfig("river", policy="max")
    with pytest.raises(ValueError, match="threshold"):
        ExitConfig("river", threshold=2.0)
    with pytest.raises(ValueError, match="min_layer"):
        ExitConfig("river", min_layer=-1)
    with pytest.raises(ValueError, match="signal"):
        ExitConfig("river", signal="entropy")
    with pytest.raises(ValueError, match="relative update norm in \\[0, 2\\]"):
        ExitConfig("river", threshold=-0.5, signal="update")
    ExitConfig("river", threshold=1.5, signal="update")  # an update norm may exceed 1


def test_update_signal_decision():
    """signal="update": exit when ||out - in|| / ||out|| < threshold, row by row beside cosine
    rows (the same batch, each row its own signal)."""
    h_in = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    h_out = torch.tensor([[1.0, 0.1], [2.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    # relative updates: 0.0995, 0.5, 0, 0.667; cosines: 0.995, 1, 1, 1
    cfgs = [
        ExitConfig("river", 0.2, 0, signal="update"),
        ExitConfig("river", 0.2, 0, signal="update"),
        ExitConfig("river", 0.9, 0),
        ExitConfig("river", 0.7, 0, signal="update"),
    ]
    p = ExitParams.build(cfgs, "cpu")
    assert p.uses_update and p.signal.tolist() == [1, 1, 0, 1]
    everyone = torch.ones(4, dtype=torch.bool)
    assert exit_decision(0, h_in, h_out, everyone, p).tolist() == [True, False, True, True]
    # a growing state with the same direction: the cosine says exit, the update does not
    assert not ExitParams.build([ExitConfig("river", 0.9, 0)], "cpu").uses_update
    assert ExitParams.build([ExitConfig("river", 0.9, 0)], "cpu").backbone_until is None
    assert (
        ExitParams.build([ExitConfig("river", 0.2, 1, signal="update")], "cpu").backbone_until
        is None
    )


def test_decision_per_row_and_batch_min():
    h_in = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    h_out = torch.tensor([[1.0, 0.1], [0.0, 1.0], [1.0, 0.0], [1.0, 0.05]])  # cos .995, 0, 1, .99
    cfgs = [
        ExitConfig("river", 0.9, 0),
        ExitConfig("river", 0.9, 0),
        ExitConfig("river", 0.9, 0, "batch_min"),
        ExitConfig("river", 0.9, 0, "batch_min"),
    ]
    p = ExitParams.build(cfgs, "cpu")
    everyone = torch.ones(4, dtype=torch.bool)
    assert exit_decision(0, h_in, h_out, everyone, p).tolist() == [True, False, True, True]
    # a batch_min row that fails holds the other batch_min rows back, not the per_row ones
    h_out2 = h_out.clone()
    h_out2[3] = torch.tensor([0.0, 1.0])
    assert exit_decision(0, h_in, h_out2, everyone, p).tolist() == [True, False, False, False]
    # rows already out of the backbone neither exit again nor hold others back
    in_bb = torch.tensor([True, True, True, False])
    assert exit_decision(0, h_in, h_out2, in_bb, p).tolist() == [True, False, True, False]
    # min_layer counts backbone layers run: after layer index 2, three layers have run
    p3 = ExitParams.build([ExitConfig("river", 0.9, 3)] * 4, "cpu")
    assert not exit_decision(1, h_in, h_out, everyone, p3).any()
    assert exit_decision(2, h_in, h_out, everyone, p3).tolist() == [True, False, True, True]


def test_full_and_never_exit_equal_backbone(tiny):
    ref, used_ref = run(*build(tiny, river=False), [ExitConfig("full")] * 3)
    assert (used_ref == LAYERS).all()
    got, used = run(*build(tiny), [ExitConfig("river", threshold=1.0, min_layer=0)] * 3)
    torch.testing.assert_close(got, ref)
    assert (used == LAYERS).all()


def test_w4_equals_dequantized_model(tiny):
    backbone, _ = build(tiny, river=False)
    ref_model, ref_kv = build(tiny, "rrrr", river=False)
    ref, _ = run(ref_model, ref_kv, [ExitConfig("full")] * 3, prefill_model=backbone)
    got, used = run(*build(tiny), [ExitConfig("w4")] * 3)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (used == 0).all()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_river_forced_exit_equals_hybrid(tiny, k):
    """threshold -1 exits as soon as min_layer allows: k backbone layers then the river twins,
    whose K/V land in the shared cache; equals a model built from those very layers."""
    model, kv = build(tiny)
    got, used = run(model, kv, [ExitConfig("river", threshold=-1.0, min_layer=k)] * 3)
    ref_model, ref_kv = build(tiny, "b" * k + "r" * (LAYERS - k), river=False)
    backbone, _ = build(tiny, river=False)
    ref, _ = run(ref_model, ref_kv, [ExitConfig("full")] * 3, prefill_model=backbone)
    assert (used == k).all()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kv.k, ref_kv.k, atol=1e-5, rtol=1e-5)  # KV share: same slots
    torch.testing.assert_close(kv.v, ref_kv.v, atol=1e-5, rtol=1e-5)


def test_per_row_exits_are_independent(tiny):
    cfgs = [ExitConfig("river", -1.0, 1), ExitConfig("full"), ExitConfig("river", -1.0, 3)]
    got, used = run(*build(tiny), cfgs)
    assert used[0].tolist() == [1, LAYERS, 3]
    for i, c in enumerate(cfgs):
        alone, _ = run(*build(tiny), [c] * 3)
        torch.testing.assert_close(got[:, i], alone[:, i], atol=1e-5, rtol=1e-5)


def test_batch_min_waits_for_all_rows(tiny):
    cfgs = [ExitConfig("river", -1.0, 1, "batch_min"), ExitConfig("river", -1.0, 3, "batch_min")]
    cfgs.append(ExitConfig("river", -1.0, 1, "batch_min"))
    _, used = run(*build(tiny), cfgs)
    assert (used == 3).all(), "no batch_min row may exit before every one of them passes"


@pytest.mark.parametrize("k", [1, 3])
def test_propagate_and_mask_freeze_the_state(tiny, k):
    """After the exit both baselines output from the frozen hidden state, i.e. the logits of a
    model truncated to k layers (on the first step, before their K/V choices matter)."""
    trunc, tkv = build(tiny, num_layers=k, river=False)
    ref, _ = run(trunc, tkv, [ExitConfig("full")] * 3, steps=1)
    for mode in ("propagate", "mask"):
        model, kv = build(tiny)
        got, used = run(model, kv, [ExitConfig(mode, -1.0, k)] * 3, steps=1)
        assert (used == k).all()
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=mode)
        slot = kv.valid[:, 0]  # row 0's block 0 holds its prompt: always valid
        assert slot.all()
        pos = len(PROMPTS[0])  # row 0's decode token slot
        written = kv.valid[:, pos // 4, pos % 4]
        expect = [True] * LAYERS if mode == "propagate" else [n < k for n in range(LAYERS)]
        assert written.tolist() == expect, mode


def test_decode_step_has_no_host_sync(tiny):
    model, kv = build(tiny)
    cfgs = [
        ExitConfig("river", 0.3, 1),
        ExitConfig("river", 0.99, 2, "batch_min"),
        ExitConfig("propagate", 0.5, 1),
        ExitConfig("mask", 0.5, 2),
        ExitConfig("river", 0.5, 1, signal="update"),
    ]
    exits = ExitParams.build(cfgs, "cpu")
    b = len(cfgs)
    batch = ForwardBatch(
        torch.tensor([3, 4, 5, 6, 7]),
        torch.zeros(b, dtype=torch.long),
        torch.tensor([0, 4, 8, 12, 16]),
        pad_block_tables([[0], [1], [2], [3], [4]]),
        torch.ones(b, dtype=torch.int32),
    )
    with forbid_host_sync():
        with pytest.raises(AssertionError, match="host sync"):
            torch.ones(2).sum().item()  # the guard works
        logits, used = model.decode(batch, kv, exits)
    assert logits.shape == (b, 200)
    assert used.min() < LAYERS, "some row must exit so the exit path is exercised"


def test_server_exit_object_takes_the_signal():
    from river.openai_protocol import APIError, parse_exit

    got = parse_exit({"mode": "river", "threshold": 0.3, "signal": "update"}, ExitConfig())
    assert got == ExitConfig("river", 0.3, 1, signal="update")
    assert parse_exit({"mode": "river"}, ExitConfig()).signal == "cosine"
    with pytest.raises(APIError, match="unknown exit signal"):
        parse_exit({"mode": "river", "signal": "entropy"}, ExitConfig())
    with pytest.raises(APIError, match="relative update norm"):
        parse_exit({"mode": "river", "threshold": -1, "signal": "update"}, ExitConfig())
