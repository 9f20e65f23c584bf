# Over 400 lines, one concept: the decode graph runner's tests share one set of fixtures.
"""The decode graph runner: bucket and padding bookkeeping, the padded static step against plain
model.decode (CPU, on a tiny random Llama built like tests/test_exits.py), the forced-exit
histogram sampler, and on a GPU: replay == eager for every bucket, 64 steps with no host sync,
greedy equality."""

import pathlib
import sys

import numpy as np
import pytest
import torch
from helpers import forbid_host_sync, tiny_checkpoint

from river.decode_inputs import DecodeInputs
from river.exits import AFTER_RIVER, ExitConfig, ExitParams
from river.graphs import DecodeGraphRunner, GraphBuckets, bucket_for, graph_buckets
from river.kv_cache import KVCache, pad_block_tables, slots_for
from river.model import ForwardBatch, LlamaModel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from forced_exits import (  # noqa: E402
    ExitHistogram,
    ForcedExitSampler,
    forced_exit_config,
    forced_exit_configs,
)

LAYERS = 4
BLOCK = 4
MAX_BLOCKS = 6  # per sequence: 24 tokens
NUM_BLOCKS = 8 * MAX_BLOCKS + 1  # 8 sequences, and the last block is the runner's padding block

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("graphs"), LAYERS)


def build(ckpt, device="cpu", dtype=torch.float32, river=True, num_blocks=NUM_BLOCKS):
    mc, weights, quant = ckpt
    # The CPU side runs the reference ops: the sync-free oracle of what the GPU captures.
    ops = "reference" if str(device) == "cpu" else None
    model = LlamaModel(mc, weights, device, dtype, 128, ops=ops)
    if river:
        model.attach_river(quant)
    kv = KVCache(mc.num_layers, num_blocks, BLOCK, mc.num_kv_heads, mc.head_dim, dtype, device)
    return model, kv


def clone_kv(kv):
    out = KVCache.__new__(KVCache)
    out.__dict__.update(kv.__dict__)
    out.k, out.v, out.valid = kv.k.clone(), kv.v.clone(), kv.valid.clone()
    return out


def tables_for(rows):
    return [[MAX_BLOCKS * i + j for j in range(MAX_BLOCKS)] for i in range(rows)]


def prefill(model, kv, rows, prompt_len=5, vocab=200, tables=None):
    """Random prompts of prompt_len tokens for `rows` sequences; returns their block tables."""
    tables = tables or tables_for(rows)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows * prompt_len,), generator=g)
    slots = [s for t in tables for s in slots_for(t, 0, prompt_len, BLOCK)]
    model.prefill(
        ForwardBatch(
            ids.to(model.device),
            torch.arange(prompt_len).repeat(rows).to(model.device),
            torch.tensor(slots, device=model.device),
            pad_block_tables(tables).to(model.device),
            torch.full((rows,), prompt_len, dtype=torch.int32, device=model.device),
            torch.arange(
                0, rows * prompt_len + 1, prompt_len, dtype=torch.int32, device=model.device
            ),
        ),
        kv,
    )
    return tables


def decode_batch(tables, tokens, positions, device, width=None):
    """A decode ForwardBatch; block tables cut to `width` columns (default: what is needed)."""
    width = width or max(p // BLOCK + 1 for p in positions)
    return ForwardBatch(
        torch.tensor(tokens, device=device),
        torch.tensor(positions, device=device),
        torch.tensor(
            [t[p // BLOCK] * BLOCK + p % BLOCK for t, p in zip(tables, positions, strict=True)],
            device=device,
        ),
        pad_block_tables([t[:width] for t in tables], width).to(device),
        torch.tensor([p + 1 for p in positions], dtype=torch.int32, device=device),
    )


MIXED = [
    ExitConfig("river", -1.0, 1),
    ExitConfig("full"),
    ExitConfig("w4"),
    ExitConfig("river", -1.0, 3),
    ExitConfig("propagate", -1.0, 2),
    ExitConfig("mask", -1.0, 1),
    ExitConfig("river", -1.0, 2, "batch_min"),
    ExitConfig("river", -1.0, 1, "batch_min"),
]


def mixed(n):
    return [MIXED[i % len(MIXED)] for i in range(n)]


def expected_used(cfgs):
    """Backbone layers each forced config runs (batch_min rows wait for the deepest of them)."""
    bm = max((c.min_layer for c in cfgs if c.policy == "batch_min"), default=0)
    out = []
    for c in cfgs:
        if c.mode == "w4":
            out.append(0)
        elif c.mode == "full":
            out.append(LAYERS)
        else:
            out.append(max(c.min_layer, bm) if c.policy == "batch_min" else c.min_layer)
    return out


# ------------------------------------------------------------------------------ bookkeeping


def test_buckets():
    assert GraphBuckets == (1, 2, 4, 8, 16, 32, 64)
    assert graph_buckets(64) == GraphBuckets
    assert graph_buckets(8) == (1, 2, 4, 8)
    assert graph_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert graph_buckets(1) == (1,)
    assert [bucket_for(n) for n in (1, 2, 3, 4, 5, 9, 33, 64)] == [1, 2, 4, 4, 8, 16, 64, 64]
    assert bucket_for(40, graph_buckets(48)) == 48
    with pytest.raises(ValueError, match="exceeds"):
        bucket_for(65)
    with pytest.raises(ValueError, match="exceeds"):
        bucket_for(9, graph_buckets(8))
    with pytest.raises(ValueError, match="at least one"):
        bucket_for(0)
    with pytest.raises(ValueError):
        graph_buckets(0)


def test_decode_inputs_share_one_buffer():
    inp = DecodeInputs.allocate(8, 5, "cpu")
    base, end = inp.buffer.data_ptr(), inp.buffer.data_ptr() + inp.buffer.numel()
    assert inp.rows == 8 and inp.max_blocks == 5
    assert inp.block_tables.shape == (8, 5) and inp.block_tables.dtype == torch.int32
    assert inp.after.dtype == torch.int8 and inp.active.dtype == torch.bool
    for name in (
        "input_ids",
        "positions",
        "slot_mapping",
        "block_tables",
        "context_lens",
        "min_layer",
        "threshold",
        "active",
        "start_exited",
        "after",
        "batch_min",
    ):
        t = getattr(inp, name)
        assert t.is_contiguous() and base <= t.data_ptr() < end, name
        assert (t.data_ptr() - base) % 256 == 0, name  # each field starts aligned
    inp.input_ids.fill_(7)
    inp.threshold.fill_(0.5)
    assert (inp.input_ids == 7).all() and (inp.threshold == 0.5).all()  # views do not overlap
    head = inp.head(4)
    assert head.rows == 4 and head.input_ids.data_ptr() == inp.input_ids.data_ptr()
    assert head.block_tables.shape == (4, 5) and head.buffer is inp.buffer
    ep = head.exit_params(uses_river=True)
    assert ep.uses_backbone and ep.uses_river and ep.uses_kv_mask
    assert ep.min_layer.data_ptr() == inp.min_layer.data_ptr()


def assert_padding(inp, rows, padding_block=NUM_BLOCKS - 1):
    r = slice(*rows)
    assert (inp.input_ids[r] == 0).all() and (inp.positions[r] == 0).all()
    assert (inp.slot_mapping[r] == padding_block * BLOCK).all()
    assert (inp.block_tables[r, 0] == padding_block).all()
    assert (inp.block_tables[r, 1:] == -1).all()
    assert (inp.context_lens[r] == 1).all()
    assert not inp.active[r].any() and not inp.start_exited[r].any()
    assert not inp.batch_min[r].any() and (inp.after[r] == AFTER_RIVER).all()
    assert torch.isinf(inp.threshold[r]).all()


def assert_rows(inp, batch, exits, active=None):
    n = batch.input_ids.shape[0]
    w = batch.block_tables.shape[1]
    assert inp.input_ids[:n].tolist() == batch.input_ids.tolist()
    assert inp.positions[:n].tolist() == batch.positions.tolist()
    assert inp.slot_mapping[:n].tolist() == batch.slot_mapping.tolist()
    assert inp.context_lens[:n].tolist() == batch.context_lens.tolist()
    assert inp.block_tables[:n, :w].tolist() == batch.block_tables.tolist()
    assert (inp.block_tables[:n, w:] == -1).all()
    for name in ("threshold", "min_layer", "start_exited", "after", "batch_min"):
        assert getattr(inp, name)[:n].tolist() == getattr(exits, name).tolist(), name
    want = [True] * n if active is None else active.tolist()
    assert inp.active[:n].tolist() == want


def test_static_buffers_after_copies(tiny):
    """Rows 0..n-1 hold the batch, rows n..bucket-1 padding; stale rows and stale block-table
    columns from earlier, larger or wider batches are cleaned when they come back into use."""
    model, kv = build(tiny)
    runner = DecodeGraphRunner(model, kv, 8, MAX_BLOCKS, enabled=False, pad_eager=True)
    assert runner.buckets == (1, 2, 4, 8) and runner.padding_block == NUM_BLOCKS - 1
    inp = runner.inputs
    assert_padding(inp, (0, 8))  # all padding before the first step
    tables = prefill(model, kv, 8)

    def step(n, width=None, active=None, pos=5):
        cfgs = mixed(n)
        batch = decode_batch(tables[:n], [3 + i for i in range(n)], [pos] * n, "cpu", width)
        exits = ExitParams.build(cfgs, "cpu")
        logits, used = runner.run(batch, exits, active)
        assert logits.shape == (n, 200) and used.shape == (n,)
        return batch, exits, used

    batch, exits, _ = step(3)
    assert_rows(inp, batch, exits)
    assert_padding(inp, (3, 8))
    batch, exits, _ = step(6, width=5)  # bucket 8, wide tables
    assert_rows(inp, batch, exits)
    assert_padding(inp, (6, 8))
    batch, exits, _ = step(2, width=2)  # bucket 2: rows 2..5 stale but outside the graph
    assert_rows(inp, batch, exits)
    assert inp.active[2:6].all()
    act = torch.tensor([True, False, True])
    batch, exits, _ = step(3, width=2, active=act)  # bucket 4: row 3 must be padding again
    assert_rows(inp, batch, exits, act)  # includes: columns 2..4 of rows 0..2 are -1 again
    assert_padding(inp, (3, 4))
    assert inp.active[4:6].all()  # still stale: not in bucket 4's rows


def test_padded_step_equals_decode(tiny):
    """The static padded step (what the graphs capture, here eager on CPU) gives model.decode's
    logits, exits and cache writes, over several steps and batch sizes."""
    model, kv = build(tiny)
    tables = prefill(model, kv, 7)
    ref_kv = clone_kv(kv)
    runner = DecodeGraphRunner(model, kv, 8, MAX_BLOCKS, enabled=False, pad_eager=True)
    plain = DecodeGraphRunner(model, ref_kv, 8, MAX_BLOCKS, enabled=False)
    assert plain.inputs is None  # eager, unpadded
    for s, n in enumerate((3, 7, 5, 1)):
        cfgs = mixed(n)
        batch = decode_batch(tables[:n], [(11 * i + s) % 200 for i in range(n)], [5 + s] * n, "cpu")
        exits = ExitParams.build(cfgs, "cpu")
        got, used = runner.run(batch, exits)
        ref, ref_used = plain.run(batch, exits)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert used.tolist() == ref_used.tolist() == expected_used(cfgs)
    real = slice(0, NUM_BLOCKS - 1)
    torch.testing.assert_close(kv.k[:, real], ref_kv.k[:, real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kv.v[:, real], ref_kv.v[:, real], atol=1e-5, rtol=1e-5)
    assert torch.equal(kv.valid[:, real], ref_kv.valid[:, real])  # mask rows punched holes


def test_backbone_only_runner_refuses_river(tiny):
    model, kv = build(tiny, river=False)
    runner = DecodeGraphRunner(model, kv, 4, MAX_BLOCKS, enabled=False, pad_eager=True)
    assert not runner.include_river
    tables = prefill(model, kv, 2)
    batch = decode_batch(tables, [1, 2], [5, 5], "cpu")
    for cfg in (ExitConfig("w4"), ExitConfig("river", -1.0, 2)):
        with pytest.raises(RuntimeError, match="without the river"):
            runner.run(batch, ExitParams.build([cfg] * 2, "cpu"))
    logits, used = runner.run(batch, ExitParams.build([ExitConfig("mask", -1.0, 2)] * 2, "cpu"))
    assert used.tolist() == [2, 2]
    model, kv = build(tiny)
    runner = DecodeGraphRunner(
        model, kv, 4, MAX_BLOCKS, enabled=False, pad_eager=True, include_river=False
    )
    with pytest.raises(RuntimeError, match="without the river"):
        runner.run(batch, ExitParams.build([ExitConfig("w4")] * 2, "cpu"))
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphRunner(model, kv, 4, MAX_BLOCKS, enabled=True)


def test_run_rejects_bad_shapes(tiny):
    model, kv = build(tiny)
    runner = DecodeGraphRunner(model, kv, 4, MAX_BLOCKS, enabled=False, pad_eager=True)
    tables = tables_for(5)
    exits = ExitParams.build(mixed(5), "cpu")
    with pytest.raises(ValueError, match="exceeds"):
        runner.run(decode_batch(tables, [1] * 5, [5] * 5, "cpu"), exits)
    wide = decode_batch(tables[:2], [1, 2], [5, 5], "cpu", width=MAX_BLOCKS + 1)
    with pytest.raises(ValueError, match="wide"):
        runner.run(wide, ExitParams.build(mixed(2), "cpu"))
    with pytest.raises(ValueError, match="ExitParams"):
        runner.run(decode_batch(tables[:2], [1, 2], [5, 5], "cpu"), exits)


def test_replay_on_inputs_updated_in_place(tiny):
    """run() loads the static inputs once; replay() then runs them as updated in place."""
    model, kv = build(tiny)
    tables = prefill(model, kv, 3)
    runner = DecodeGraphRunner(model, kv, 8, MAX_BLOCKS, enabled=False, pad_eager=True)
    plain = DecodeGraphRunner(model, clone_kv(kv), 8, MAX_BLOCKS, enabled=False)
    with pytest.raises(RuntimeError, match="run\\(\\) first"):
        runner.replay(3)
    with pytest.raises(RuntimeError, match="static inputs"):
        plain.replay(3)
    exits = ExitParams.build(mixed(3), "cpu")
    batch = decode_batch(tables, [1, 2, 3], [5] * 3, "cpu", width=MAX_BLOCKS)
    got, _ = runner.run(batch, exits)
    ref, _ = plain.run(batch, exits)
    state = runner.inputs.head(3)
    for s in range(1, 6):  # crosses a block boundary at position 8
        tokens = got.argmax(-1)
        state.input_ids.copy_(tokens)
        state.positions.add_(1)
        state.context_lens.add_(1)
        pos = 5 + s
        state.slot_mapping.copy_(
            torch.tensor([t[pos // BLOCK] * BLOCK + pos % BLOCK for t in tables])
        )
        got, used = runner.replay(3)
        ref, ref_used = plain.run(decode_batch(tables, tokens.tolist(), [pos] * 3, "cpu"), exits)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert used.tolist() == ref_used.tolist() == expected_used(mixed(3))
    with pytest.raises(RuntimeError, match="run\\(\\) first"):
        runner.replay(4)  # row 3 is padding


def test_host_staging_bookkeeping(tiny):
    """The pinned-twin path (graph mode on CUDA) keeps the same static inputs as direct copies:
    checked on CPU by switching it on for the padded eager step."""
    model, kv = build(tiny)
    tables = prefill(model, kv, 8)
    kv2 = clone_kv(kv)
    staged = DecodeGraphRunner(model, kv, 8, MAX_BLOCKS, enabled=False, pad_eager=True)
    staged._stage_on_host = True
    direct = DecodeGraphRunner(model, kv2, 8, MAX_BLOCKS, enabled=False, pad_eager=True)
    for s, (n, width) in enumerate(((3, 2), (8, 6), (2, 2), (5, 3), (3, 2))):
        batch = decode_batch(tables[:n], [9 * i % 200 for i in range(n)], [5 + s] * n, "cpu", width)
        exits = ExitParams.build(mixed(n), "cpu")
        got, used = staged.run(batch, exits)
        ref, ref_used = direct.run(batch, exits)
        assert torch.equal(staged.inputs.buffer, direct.inputs.buffer), f"step {s}"
        assert torch.equal(staged._host.inputs.buffer, direct.inputs.buffer)
        torch.testing.assert_close(got, ref)
        assert used.tolist() == ref_used.tolist()


def test_padded_run_reads_no_tensor_on_the_host(tiny):
    model, kv = build(tiny)
    runner = DecodeGraphRunner(model, kv, 8, MAX_BLOCKS, enabled=False, pad_eager=True)
    tables = prefill(model, kv, 5)
    batches = [
        (decode_batch(tables[:n], [1] * n, [5] * n, "cpu"), ExitParams.build(mixed(n), "cpu"))
        for n in (5, 3, 5)
    ]
    with forbid_host_sync():
        for batch, exits in batches:
            runner.run(batch, exits)


# ------------------------------------------------------------------------------ forced exits


def test_forced_exit_configs():
    assert forced_exit_config("river", 3) == ExitConfig("river", -1.0, 3)
    assert forced_exit_config("river", 0) == ExitConfig("w4")
    assert forced_exit_config("full", 3) == ExitConfig("full")
    assert forced_exit_config("mask", 2) == ExitConfig("mask", -1.0, 2)
    with pytest.raises(ValueError, match="at least one"):
        forced_exit_config("propagate", 0)
    assert forced_exit_configs("propagate", 3, 2) == [ExitConfig("propagate", -1.0, 2)] * 3


def test_histogram_json_and_rescale():
    h = ExitHistogram.from_json({"counts": [1, 0, 2, 0, 1]})
    assert h.num_layers == 4 and h.mean_layers() == pytest.approx(2.0)
    assert ExitHistogram.from_json([0, 3]).probs.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError):
        ExitHistogram((0, 0))
    with pytest.raises(ValueError):
        ExitHistogram.from_json({"nope": 1})
    for layers in (2, 4, 7, 16, 30):
        r = h.rescaled(layers)
        assert r.num_layers == layers and sum(r.counts) == pytest.approx(4.0)
        assert r.mean_layers() / layers == pytest.approx(h.mean_layers() / 4)
    assert h.rescaled(8).counts == (1, 0, 0, 0, 2, 0, 0, 0, 1)


def test_histogram_sampler_distribution():
    counts = [5, 0, 20, 10, 40, 25]  # 5 layers
    sampler = ForcedExitSampler(ExitHistogram(counts), 5, rows=64, device="cpu", seed=3)
    min_layer = torch.zeros(64, dtype=torch.int32)
    start = torch.ones(64, dtype=torch.bool)
    draws = []
    for _ in range(400):
        k = sampler.fill(min_layer, start)
        assert min_layer.tolist() == k.tolist()
        assert start.tolist() == (k == 0).tolist()
        draws.append(k)
    freq = np.bincount(np.concatenate(draws), minlength=6) / (400 * 64)
    np.testing.assert_allclose(freq, np.array(counts) / 100, atol=0.01)
    assert freq[1] == 0
    # the same seed gives the same draws
    again = ForcedExitSampler(ExitHistogram(counts), 5, rows=64, device="cpu", seed=3)
    assert again.fill(min_layer, start).tolist() == draws[0].tolist()
    with pytest.raises(ValueError, match="rows"):
        sampler.fill(torch.zeros(65, dtype=torch.int32), torch.zeros(65, dtype=torch.bool))


def test_sampled_exits_set_backbone_layers(tiny):
    """Each row runs exactly the drawn number of backbone layers, 0 and all of them included."""
    model, kv = build(tiny)
    tables = prefill(model, kv, 8)
    runner = DecodeGraphRunner(model, kv, 8, MAX_BLOCKS, enabled=False, pad_eager=True)
    sampler = ForcedExitSampler(ExitHistogram([1, 1, 1, 1, 1]), LAYERS, rows=8, device="cpu")
    for mode in ("river", "propagate", "mask"):
        exits = sampler.exit_params([ExitConfig(mode, -1.0, 1)] * 8, "cpu")
        seen = set()
        for s in range(4):
            k = sampler.fill(exits.min_layer, exits.start_exited)
            batch = decode_batch(tables, list(range(8)), [5 + s] * 8, "cpu")
            _, used = runner.run(batch, exits)
            assert used.tolist() == k.tolist(), mode
            seen.update(k.tolist())
        assert len(seen) >= 3


# ------------------------------------------------------------------------------ GPU


@pytest.fixture(scope="module")
def gpu_ckpt(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # Triton-friendly shapes: head_dim 64, K multiple of the W4 group (64)
    return tiny_checkpoint(tmp_path_factory.mktemp("graphs"), LAYERS, 256, 512, 4, 2, 512, 64)


def gpu_model(ckpt):
    model, kv = build(ckpt, "cuda", torch.bfloat16)
    tables = prefill(model, kv, 8, vocab=512)
    return model, kv, tables


def with_w6_twins(ckpt):
    """The checkpoint with 6-bit twins (RTN) in place of its 4-bit ones."""
    from river.quantize import quantize_w6

    mc, weights, quant = ckpt
    q6 = {}
    for name in quant:
        _, n, proj = name.split(".")
        q6[name] = quantize_w6(weights["layers"][int(n)][proj], group_size=64, method="rtn")
    return mc, weights, q6


@cuda
@pytest.mark.parametrize("twins", ["w4", "w6"])
def test_graph_replay_equals_eager_every_bucket(gpu_ckpt, twins):
    """For every bucket, full and padded: the replay is bitwise the padded eager step (same
    kernels, same shapes), and close to plain model.decode, with exits of every mode; with
    4-bit and with 6-bit twins (the W6 kernels captured)."""
    model, kv, tables = gpu_model(gpu_ckpt if twins == "w4" else with_w6_twins(gpu_ckpt))
    assert model.river[0].qkv.bits == int(twins[1])  # the packed twin reaches the kernels
    kv_pad, kv_plain = clone_kv(kv), clone_kv(kv)
    graphs = DecodeGraphRunner(model, kv, 8, MAX_BLOCKS)
    assert graphs.use_graphs and graphs.include_river
    padded = DecodeGraphRunner(model, kv_pad, 8, MAX_BLOCKS, enabled=False, pad_eager=True)
    plain = DecodeGraphRunner(model, kv_plain, 8, MAX_BLOCKS, enabled=False)
    for s, n in enumerate((1, 2, 3, 4, 5, 8, 7, 6)):
        cfgs = mixed(n)
        batch = decode_batch(
            tables[:n], [(37 * i + s) % 512 for i in range(n)], [5 + s] * n, "cuda"
        )
        exits = ExitParams.build(cfgs, "cuda")
        got, used = (t.clone() for t in graphs.run(batch, exits))
        ref, ref_used = padded.run(batch, exits)
        eager, eager_used = plain.run(batch, exits)
        assert torch.equal(got, ref), f"n={n}"
        assert used.tolist() == ref_used.tolist() == eager_used.tolist() == expected_used(cfgs)
        torch.testing.assert_close(got, eager, atol=5e-2, rtol=5e-2)
    real = slice(0, NUM_BLOCKS - 1)
    assert torch.equal(kv.k[:, real], kv_pad.k[:, real])
    assert torch.equal(kv.v[:, real], kv_pad.v[:, real])
    assert torch.equal(kv.valid[:, real], kv_plain.valid[:, real])


@cuda
def test_64_steps_without_host_sync(gpu_ckpt):
    """Tokens fed back on the device, positions advanced on the device, exit depths drawn on
    the host: 64 steps of run() and 16 of replay() under sync-debug 'error', with river exits
    happening."""
    n, width = 6, 24  # 24 blocks per row: 96 tokens, the 5-token prompt + 80 steps fit
    model, kv = build(gpu_ckpt, "cuda", torch.bfloat16, num_blocks=n * width + 1)
    tables = [[width * i + j for j in range(width)] for i in range(n)]
    prefill(model, kv, n, vocab=512, tables=tables)
    runner = DecodeGraphRunner(model, kv, 8, width, enabled=True)
    cur = decode_batch(tables, list(range(n)), [5] * n, "cuda", width=width)
    sampler = ForcedExitSampler(ExitHistogram([1, 2, 2, 2, 1]), LAYERS, rows=n, device="cuda")
    exits = sampler.exit_params([ExitConfig("river", -1.0, 2)] * n, "cuda")
    used_sum = torch.zeros(LAYERS + 1, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(64):
            sampler.fill(exits.min_layer, exits.start_exited)
            logits, used = runner.run(cur, exits)
            cur.input_ids.copy_(logits.argmax(-1))
            used_sum.index_add_(0, used.long(), torch.ones_like(used, dtype=torch.int64))
            # the next token: position + 1, its slot from the block table, on the device
            cur.positions += 1
            cur.context_lens += 1
            blk = torch.gather(cur.block_tables, 1, (cur.positions // BLOCK).unsqueeze(1))
            cur.slot_mapping.copy_(blk.squeeze(1).long() * BLOCK + cur.positions % BLOCK)
        # then 16 replays of the static inputs (still the last run()'s) advanced in place
        state = runner.inputs.head(n)
        for _ in range(16):
            state.input_ids.copy_(logits.argmax(-1))
            state.positions += 1
            state.context_lens += 1
            blk = torch.gather(state.block_tables, 1, (state.positions // BLOCK).unsqueeze(1))
            state.slot_mapping.copy_(blk.squeeze(1).long() * BLOCK + state.positions % BLOCK)
            sampler.fill(state.min_layer, state.start_exited)
            logits, used = runner.replay(n)
            used_sum.index_add_(0, used.long(), torch.ones_like(used, dtype=torch.int64))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    hist = used_sum.tolist()
    assert sum(hist) == 80 * n
    assert sum(hist[1:LAYERS]) > 0 and hist[0] > 0 and hist[LAYERS] > 0


def greedy(runner, tables, n, steps, cfgs):
    tokens = list(range(1, n + 1))
    out = []
    for s in range(steps):
        batch = decode_batch(tables[:n], tokens, [5 + s] * n, "cuda", width=MAX_BLOCKS)
        logits, _ = runner.run(batch, ExitParams.build(cfgs, "cuda"))
        tokens = logits.argmax(-1).tolist()
        out.append(tokens)
    return out


@cuda
def test_greedy_tokens_equal_eager(gpu_ckpt):
    """n == bucket: the graph runs exactly the eager kernels; n < bucket: exactly the padded
    eager step. Either way the greedy tokens are identical."""
    for n, padded in ((4, False), (3, True)):
        cfgs = mixed(n)
        model, kv, tables = gpu_model(gpu_ckpt)
        want = greedy(
            DecodeGraphRunner(model, clone_kv(kv), 4, MAX_BLOCKS, enabled=False, pad_eager=padded),
            tables,
            n,
            16,
            cfgs,
        )
        got = greedy(DecodeGraphRunner(model, kv, 4, MAX_BLOCKS), tables, n, 16, cfgs)
        assert got == want, f"n={n}"


@cuda
def test_host_staged_inputs_equal_device_inputs(gpu_ckpt):
    """A batch built on the host goes through the pinned twin in one upload (input ids may stay
    on the device, as fed back from the previous step); same bytes, same results."""
    model, kv, tables = gpu_model(gpu_ckpt)
    kv2 = clone_kv(kv)
    a = DecodeGraphRunner(model, kv, 8, MAX_BLOCKS)
    b = DecodeGraphRunner(model, kv2, 8, MAX_BLOCKS)
    for s, n in enumerate((5, 2, 7, 3, 8)):
        host = decode_batch(tables[:n], list(range(n)), [5 + s] * n, "cpu")
        if s % 2:
            host.input_ids = host.input_ids.cuda()
        dev = decode_batch(tables[:n], list(range(n)), [5 + s] * n, "cuda")
        cfgs = mixed(n)
        got, used = (t.clone() for t in a.run(host, ExitParams.build(cfgs, "cpu")))
        ref, ref_used = b.run(dev, ExitParams.build(cfgs, "cuda"))
        assert torch.equal(got, ref) and torch.equal(used, ref_used), f"n={n}"
        assert torch.equal(a.inputs.buffer, b.inputs.buffer)
