"""The quality benchmark's bookkeeping: default choice, replot from a results file, bytes per
decode token, the oracle curve."""

import json
import math
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_quality")


def _rows():
    row = lambda mode, thr, ml, ppl, agree, layers, by: {  # noqa: E731
        "mode": mode,
        "threshold": thr,
        "min_layer": ml,
        "precision": "w4" if mode in ("w4", "river", "static") else None,
        "ppl": ppl,
        "top1_agree": agree,
        "backbone_layers": layers,
        "bytes_model": by,
        "bytes_8b": by,
        "pass_at_1": None,
    }
    return [
        row("full", None, None, 3.0, 1.0, 30.0, 1.0),
        row("w4", None, None, 3.2, 0.91, 0.0, 0.33),
        row("static", -1.0, 2, 3.19, 0.915, 2.0, 0.36),
        row("river", 0.95, 4, 3.15, 0.92, 4.3, 0.41),
        row("river", 0.96, 4, 3.14, 0.925, 5.0, 0.43),
        row("river", 0.97, 4, 3.12, 0.93, 9.1, 0.5),  # better, but over the byte budget
        row("propagate", 0.96, 4, 6e7, 0.04, 4.8, 0.5),
        row("mask", 0.96, 4, 6e7, 0.04, 4.7, 0.45),
    ]


def test_default_is_best_agreement_within_the_byte_budget():
    rows = _rows()
    best = bench.choose_default(rows, max_bytes=0.45)
    assert (best["threshold"], best["min_layer"]) == (0.96, 4)
    assert bench.choose_default(rows, max_bytes=0.6)["threshold"] == 0.97
    assert bench.choose_default(rows, max_bytes=0.37)["mode"] == "static"
    assert bench.choose_default(rows, max_bytes=0.3) is None


def _cfg(layers=30):
    from river.config import ModelConfig

    return ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=layers,
        num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e4,
        max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip


def test_token_bytes_ratio():
    from decode_cost import token_bytes_ratio

    from river.precision import UNITS, unit_shapes, weight_bytes

    cfg = _cfg()
    units = [(n, u) for n in range(30) for u in UNITS]
    w4 = {k: 4 for k in units}
    w8 = {k: 8 for k in units}
    assert token_bytes_ratio(cfg, None, [30]) == 1.0
    assert token_bytes_ratio(cfg, w4, [30]) == pytest.approx(1.0)  # never left the backbone
    shapes = unit_shapes(cfg)
    layer16 = sum(weight_bytes(*shapes[u], 16) for u in UNITS) + 4 * 576
    layer4 = sum(weight_bytes(*shapes[u], 4) for u in UNITS) + 4 * 576
    head = 2 * 49152 * 576
    full = head + 30 * layer16
    assert token_bytes_ratio(cfg, w4, [0]) == pytest.approx((head + 30 * layer4) / full)
    assert token_bytes_ratio(cfg, w4, [4]) == pytest.approx(
        (head + 4 * layer16 + 26 * layer4) / full
    )
    # a mean over tokens; deeper exits and wider twins read more; the 8-bit head reads less
    two = token_bytes_ratio(cfg, w4, [0, 4])
    assert two == pytest.approx(
        (token_bytes_ratio(cfg, w4, [0]) + token_bytes_ratio(cfg, w4, [4])) / 2
    )
    assert token_bytes_ratio(cfg, w4, [2]) < token_bytes_ratio(cfg, w4, [3])
    assert token_bytes_ratio(cfg, w4, [2]) < token_bytes_ratio(cfg, w8, [2])
    assert token_bytes_ratio(cfg, w8, [2], head_bits=8) < token_bytes_ratio(cfg, w8, [2])
    # a 30-layer plan mapped onto a 32-layer target: as the target's own uniform plan
    cfg32 = _cfg(32)
    w4_32 = {(n, u): 4 for n in range(32) for u in UNITS}
    assert token_bytes_ratio(cfg32, w4, [0]) == pytest.approx(token_bytes_ratio(cfg32, w4_32, [0]))
    assert token_bytes_ratio(cfg32, w4, [15]) == pytest.approx(
        token_bytes_ratio(cfg32, w4_32, [16])
    )


def test_bytes_per_step_follows_the_plan():
    """bench_decode's ideal speedup reads the twins at the engine's plan and the river head for
    rows that left: at batch 1 it agrees with bench_quality's per-token byte count."""
    from decode_cost import bytes_per_step, exit_distribution, token_bytes_ratio

    from river.precision import UNITS

    cfg = _cfg()
    mixed = {(n, u): (8 if (n + len(u)) % 3 == 0 else 6) for n in range(30) for u in UNITS}
    w4 = {(n, u): 4 for n in range(30) for u in UNITS}
    for k in (1, 4):
        probs = exit_distribution(30, k, None)
        full, _ = bytes_per_step(cfg, "full", 1, probs, 100, 64)
        for plan, head_bits in ((mixed, 8), (w4, 16), (mixed, 16)):
            river, _ = bytes_per_step(cfg, "river", 1, probs, 100, 64, plan, head_bits)
            want = token_bytes_ratio(cfg, plan, [k], 64, head_bits)
            assert river / full == pytest.approx(want, rel=2e-3)  # norms and embedding rows
    # no plan: every twin 4-bit, as before
    probs = exit_distribution(30, 1, None)
    none, _ = bytes_per_step(cfg, "river", 1, probs, 100, 64)
    assert none == pytest.approx(bytes_per_step(cfg, "river", 1, probs, 100, 64, w4)[0])
    # a 6/8 plan reads more than 4-bit twins; the 8-bit river head less than the bf16 one
    assert bytes_per_step(cfg, "river", 1, probs, 100, 64, mixed)[0] > none
    assert (bytes_per_step(cfg, "w4", 8, probs, 100, 64, mixed, 8)[0]
            < bytes_per_step(cfg, "w4", 8, probs, 100, 64, mixed, 16)[0])  # fmt: skip


def test_oracle_curve_picks_the_shallowest_matching_split():
    import front
    import torch
    from static_split import SplitScores

    full = SplitScores(torch.zeros(4), torch.tensor([1, 2, 3, 4]))
    passes = {
        0: SplitScores(torch.full((4,), -1.0), torch.tensor([1, 0, 0, 0])),
        2: SplitScores(torch.full((4,), -0.5), torch.tensor([1, 2, 0, 0])),
        4: SplitScores(torch.full((4,), -0.2), torch.tensor([0, 2, 3, 0])),
    }

    class _Eng:  # what bytes_fields reads
        model_config = _cfg()
        river_head_bits = 16

        class config:  # noqa: N801
            river_group_size = 64

    w4 = {(n, u): 4 for n in range(30) for u in ("qkv", "o", "gate_up", "down")}
    pts = {p["cap"]: p for p in front.oracle_curve(full, passes, [0, 2, 4], _Eng, w4)}
    assert pts[0]["top1_agree"] == 0.25 and pts[0]["backbone_layers"] == 0
    # cap 2: token 0 at 0, token 1 at 2, tokens 2-3 miss and run the cap
    assert pts[2]["top1_agree"] == 0.5 and pts[2]["backbone_layers"] == pytest.approx(1.5)
    # cap 4: token 2 matches at 4; token 3 never matches
    assert pts[4]["top1_agree"] == 0.75
    assert pts[4]["backbone_layers"] == pytest.approx((0 + 2 + 4 + 4) / 4)
    assert pts[4]["ppl"] == pytest.approx(math.exp((1.0 + 0.5 + 0.2 + 0.2) / 4))
    assert pts[2]["bytes_8b"] < pts[4]["bytes_8b"]


def test_replot_reads_the_results_file(tmp_path, capsys):
    out = tmp_path / "quality-x.json"
    out.write_text(json.dumps({"num_layers": 30, "results": _rows()}))
    bench.main(["--replot", "--out", str(out)])
    png = tmp_path / "quality-x.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| river | w4 | 0.96 | 4 | 3.140 | 0.925 | 5.00 | 0.430 | 0.430 |" in table


def test_bootstrap_se_resamples_sequences():
    same = [(10, 9, -5.0)] * 8
    se = bench.bootstrap_se(same, [-5.0] * 8)
    assert se["top1_agree_se"] == pytest.approx(0.0, abs=1e-12)
    assert se["ppl_rel_se"] == pytest.approx(0.0, abs=1e-12)
    mixed = [(10, 10, -5.0), (10, 5, -9.0)] * 4
    se = bench.bootstrap_se(mixed, [-5.0] * 8)
    # 8 sequences, agreement 1.0 or 0.5 each: the SE of the mean is ~0.25 / sqrt(8)
    assert 0.05 < se["top1_agree_se"] < 0.13
    assert se["ppl_rel_se"] > 0


def test_prose_sets_are_disjoint_and_split_at_the_first_sentence():
    texts = pytest.importorskip("texts")
    first, second, both = (texts.load(n) for n in ("prose", "prose2", "prose-all"))
    assert (len(first), len(second)) == (30, 60)
    assert both == first + second
    assert not {p for p, _ in first} & {p for p, _ in second}  # no passage counted twice
    for prompt, rest in both:
        assert prompt.endswith(".") and rest.startswith(" ") and len(rest.split()) > 80
    assert texts.load("prose2", limit=5) == second[:5]
