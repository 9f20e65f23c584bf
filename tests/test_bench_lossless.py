"""The lossless benchmark's arithmetic: draft byte ratios and the ideal speedup."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_lossless")
shapes = pytest.importorskip("shapes")


def test_draft_bytes_ratio_at_8b():
    r_w4 = bench.draft_bytes_ratio(shapes.LLAMA_3_1_8B, 64, 0.0)
    # W4 g64 layers are ~0.28x of bf16; the bf16 LM head (7% of the bytes) lifts a draft to ~0.33x
    assert 0.30 < r_w4 < 0.36
    assert bench.draft_bytes_ratio(shapes.LLAMA_3_1_8B, 64, 1.0) == pytest.approx(1.0)
    half = bench.draft_bytes_ratio(shapes.LLAMA_3_1_8B, 64, 0.5)
    assert half == pytest.approx((1 + r_w4) / 2, rel=1e-6)


def test_draft_bytes_ratio_follows_the_plan():
    """Drafts read the engine's twins: a plan of a 30-layer model maps onto 8B's 32 layers."""
    from river.precision import UNITS

    cfg = shapes.LLAMA_3_1_8B
    w4 = {(n, u): 4 for n in range(30) for u in UNITS}
    w8 = {(n, u): 8 for n in range(30) for u in UNITS}
    r_w4 = bench.draft_bytes_ratio(cfg, 64, 0.0)
    assert bench.draft_bytes_ratio(cfg, 64, 0.0, bits=w4) == pytest.approx(r_w4)
    r_w8 = bench.draft_bytes_ratio(cfg, 64, 0.0, bits=w8)
    assert 0.5 < r_w8 < 0.56  # 8-bit layers ~0.5x, the bf16 head lifts them
    assert bench.draft_bytes_ratio(cfg, 64, 1.0, bits=w8) == pytest.approx(1.0)
    assert bench.draft_bytes_ratio(cfg, 64, 0.5, bits=w8) == pytest.approx((1 + r_w8) / 2)


def test_ideal_speedup():
    cfg = shapes.LLAMA_3_1_8B
    # no drafts: one token per verify pass, the cost of full
    assert bench.ideal_speedup(100, 100, 0, 0.0, cfg, 64, False) == pytest.approx(1.0)
    # k = 4 w4 drafts, all kept: 5 tokens for 1 + 4 x 0.33 passes
    r = bench.draft_bytes_ratio(cfg, 64, 0.0)
    assert bench.ideal_speedup(500, 100, 400, 0.0, cfg, 64, False) == pytest.approx(5 / (1 + 4 * r))
    # the 4-bit head makes a draft cheaper
    assert bench.draft_bytes_ratio(cfg, 64, 0.0, w4_head=True) < r - 0.04
    # drafts as expensive as the backbone can never pay
    assert bench.ideal_speedup(200, 100, 400, 1.0, cfg, 64, False) < 1


def test_first_difference():
    assert bench.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert bench.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert bench.first_difference([1, 2], [1, 2, 3]) == 2
