"""Lossless river (ExitConfig("lossless")): the river drafts, the backbone verifies, and the
output is exactly the backbone's. The accept rule on synthetic distributions, then the engine on
the tiny model: greedy output equal to `full` (alone, and in a staggered batch with other
modes), the cache equal to what `full` writes, stop/EOS/max_tokens, sampling's distribution."""

import json
import math

import pytest
import torch
from helpers import assert_pool_full

from river import ExitConfig, InvalidRequestError, SamplingParams
from river.speculative import DraftLength, accept, accept_greedy, draw, warped_probs

GREEDY = dict(temperature=0, ignore_eos=True)


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper quantile of chi-square(df) (z = 3.09: 0.999) by Wilson-Hilferty."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def chi2_homogeneity(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Two-sample chi-square statistic over the cells where both counts are not tiny."""
    keep = (a + b) >= 10
    a, b = a[keep].double(), b[keep].double()
    na, nb = a.sum(), b.sum()
    tot = a + b
    ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
    stat = float(((a - ea) ** 2 / ea).sum() + ((b - eb) ** 2 / eb).sum())
    return stat, int(keep.sum()) - 1


# ----------------------------------------------------------------------------- the rule


def test_accept_emits_the_target_distribution():
    """Drafts from q, verified against p: the first emitted token is distributed as p_1 (and
    not as q_1), for a draft that disagrees a lot with the target."""
    torch.manual_seed(0)
    n, k, v = 40000, 3, 6
    p = torch.softmax(torch.randn(k + 1, v) * 1.5, -1)
    q = torch.softmax(torch.randn(k, v) * 1.5, -1)
    seeds = torch.arange(n, dtype=torch.int64)
    offsets = torch.zeros(n, dtype=torch.int64)
    drafts = torch.stack(
        [draw(q[j].expand(n, v), seeds, offsets + j, 0x1234) for j in range(k)], dim=1
    )
    verdict = accept(
        drafts,
        q.expand(n, k, v),
        p.expand(n, k + 1, v),
        torch.full((n,), k, dtype=torch.int64),
        seeds,
        offsets,
    )
    first = verdict.tokens[:, 0]
    counts = torch.bincount(first, minlength=v).double()
    expected = p[0].double() * n
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < chi2_critical(v - 1), (counts / n, p[0])
    # the same statistic against q_1 is enormous: the test can tell the two apart
    wrong = q[0].double() * n
    assert float(((counts - wrong) ** 2 / wrong).sum()) > 10 * chi2_critical(v - 1)
    assert 0 < verdict.accepted.float().mean() < k


def test_accept_greedy_rule():
    drafts = torch.tensor([[5, 6, 7], [5, 6, 7], [1, 2, 3], [9, 9, 9]])
    target = torch.tensor([[5, 6, 7, 8], [5, 0, 7, 8], [4, 2, 3, 8], [9, 9, 9, 9]])
    lengths = torch.tensor([3, 3, 3, 1])
    v = accept_greedy(drafts, target, lengths)
    assert v.accepted.tolist() == [3, 1, 0, 1]
    assert [v.tokens[i, : a + 1].tolist() for i, a in enumerate(v.accepted.tolist())] == [
        [5, 6, 7, 8],
        [5, 0],
        [4],
        [9, 9],
    ]
    # the general rule on one-hot distributions decides the same
    onehot = torch.nn.functional.one_hot
    g = accept(
        drafts,
        onehot(drafts, 10).float(),
        onehot(target, 10).float(),
        lengths,
        torch.arange(4),
        torch.zeros(4, dtype=torch.int64),
    )
    assert g.accepted.tolist() == v.accepted.tolist()


def test_warped_probs_keeps_the_sampler_set():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    p = warped_probs(
        logits, torch.tensor([1.0, 0.0]), torch.tensor([2, 0]), torch.tensor([1.0, 1.0])
    )
    assert torch.allclose(p.sum(-1), torch.ones(2))
    assert p[0, 2:].eq(0).all() and p[0, 0] > p[0, 1] > 0  # top-2
    assert p[1].tolist() == [0.0, 0.0, 0.0, 1.0]  # greedy: one-hot argmax


def test_draft_length_rule():
    d = DraftLength.start(None, 6)
    assert d.current == 4
    d.update(4, 4)
    assert d.current == 5
    d.update(5, 5)
    d.update(6, 6)
    assert d.current == 6  # capped
    d.update(6, 2)
    assert d.current == 3  # the accepted count + 1
    fixed = DraftLength.start(2, 8)
    fixed.update(2, 0)
    assert fixed.current == 2


def test_exit_config_checks():
    assert ExitConfig("lossless", draft="river").draft_config() == ExitConfig("river")
    assert ExitConfig("lossless").draft_config().mode == "w4"  # the measured better default
    for bad in (
        dict(draft="full"),
        dict(draft_len=-1),
        dict(draft_len=True),
        dict(max_draft_len=0),
        dict(draft_len=65),
        dict(draft_head="int8"),
    ):
        with pytest.raises(InvalidRequestError):
            ExitConfig("lossless", **bad)


# ----------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_model_dir):
    """A fp32 engine on a 3-layer random Llama with the default model's tokenizer, whose
    weights (N(0, 0.1)) move the hidden state enough that the twins disagree with the backbone
    now and then: the rejection path runs."""
    import shutil

    from helpers import tiny_checkpoint

    from river import Engine, EngineConfig

    path = tmp_path_factory.mktemp("lossless")
    vocab = json.loads((default_model_dir / "config.json").read_text())["vocab_size"]
    tiny_checkpoint(path, layers=3, vocab=vocab)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / f, path / f)
    cfg = EngineConfig(
        device="cpu", block_size=8, num_blocks=128, max_num_seqs=32, dtype=torch.float32
    )
    return Engine(str(path), cfg)


PROMPTS = ["def fib(n):", "Hello", "The quick brown fox", "x = [1, 2, 3]\nfor", "¿Qué?"]


@pytest.mark.parametrize(
    "draft,k,head", [("river", None, "w4"), ("w4", 2, "w4"), ("river", 4, "bf16")]
)
def test_greedy_equals_full(tiny, draft, k, head):
    full = tiny.generate(PROMPTS, SamplingParams(max_tokens=24, **GREEDY))
    exit = ExitConfig(
        "lossless", draft=draft, draft_len=k, min_layer=1, threshold=0.5, draft_head=head
    )
    outs = tiny.generate(PROMPTS, SamplingParams(max_tokens=24, exit=exit, **GREEDY))
    assert [o.token_ids for o in outs] == [o.token_ids for o in full]
    assert [o.text for o in outs] == [o.text for o in full]
    for o in outs:
        assert o.verify_passes > 0 and o.draft_tokens > 0
        assert len(o.token_ids) == 24 and o.finish_reason == "length"
        assert o.backbone_layers == [3] * 24
        assert 1 <= o.tokens_per_verify <= (k or 8) + 1
    # the backbone rejected some drafts: the rejection path ran
    assert sum(o.accepted_tokens for o in outs) < sum(o.draft_tokens for o in outs)
    assert_pool_full(tiny)


def test_staggered_mixed_batch_equals_full(tiny):
    """Lossless rows join a running batch one by one beside full/w4/river rows; every lossless
    row's output equals full's, and the others equal their own single-request outputs."""
    lossless = ExitConfig("lossless", draft_len=3, min_layer=1, threshold=0.5)
    modes = [lossless, ExitConfig("full"), lossless, ExitConfig("w4"), lossless]
    modes += [ExitConfig("river", min_layer=1), lossless, lossless]
    prompts = [f"item {i}: " + PROMPTS[i % len(PROMPTS)] for i in range(len(modes))]
    lengths = [20, 9, 15, 12, 7, 18, 11, 3]
    alone = []
    for p, m, n in zip(prompts, modes, lengths):
        mode = ExitConfig("full") if m.mode == "lossless" else m
        alone.append(tiny.generate(p, SamplingParams(max_tokens=n, exit=mode, **GREEDY))[0])
    reqs, steps = [], 0
    while len(reqs) < len(modes) or tiny.has_unfinished():
        if len(reqs) < len(modes) and steps % 2 == 0:  # a new request every other step
            i = len(reqs)
            sp = SamplingParams(max_tokens=lengths[i], exit=modes[i], **GREEDY)
            reqs.append(tiny.add_request(prompts[i], sp))
        tiny.step()
        steps += 1
    for r, a in zip(reqs, alone):
        assert r.output_ids == a.token_ids, r.params.exit.mode
    assert_pool_full(tiny)


def _cached_kv(engine, req_blocks, n):
    """K and V of the first n positions of a request's blocks, every layer: [L, n, Hkv, D]."""
    kv, bs = engine.kv, engine.kv.block_size
    idx = torch.tensor([req_blocks[p // bs] * bs + p % bs for p in range(n)])
    k = kv.k.flatten(1, 2)[:, idx]
    v = kv.v.flatten(1, 2)[:, idx]
    return k.clone(), v.clone()


def _run_keeping_blocks(engine, prompt, sp):
    req = engine.add_request(prompt, sp)
    blocks = None
    while engine.has_unfinished():
        engine.step()
        if req.blocks:
            blocks = list(req.blocks)
            if len(req.output_ids) >= sp.max_tokens - 1 and req.finish_reason is None:
                pass
    return req, blocks


def test_cache_after_lossless_equals_full(tiny):
    """Every kept position's K/V (prompt and generated tokens but the last, which is never fed)
    equals what a `full` request writes (the verify pass overwrote every draft's K/V)."""
    sp = SamplingParams(max_tokens=17, **GREEDY)
    exit = ExitConfig("lossless", draft="w4", draft_len=4)
    full, fb = _run_keeping_blocks(tiny, "def fib(n):", sp)
    n = len(full.prompt_ids) + len(full.output_ids) - 1
    k_full, v_full = _cached_kv(tiny, fb, n)
    ll, lb = _run_keeping_blocks(
        tiny, "def fib(n):", SamplingParams(max_tokens=17, exit=exit, **GREEDY)
    )
    assert ll.output_ids == full.output_ids and ll.drafted > 0
    k_ll, v_ll = _cached_kv(tiny, lb, n)
    # the decode path (one token) and the verify pass (k + 1 tokens) sum in different orders
    tol = (
        dict(atol=1e-5, rtol=1e-4) if k_full.dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    )
    torch.testing.assert_close(k_ll, k_full, **tol)
    torch.testing.assert_close(v_ll, v_full, **tol)
    # and they differ from the drafts' own K/V (the test can fail): a w4 request's cache
    w4, wb = _run_keeping_blocks(
        tiny, "def fib(n):", SamplingParams(max_tokens=17, exit=ExitConfig("w4"), **GREEDY)
    )
    k_w4, _ = _cached_kv(tiny, wb, n)
    p = len(full.prompt_ids)
    assert not torch.allclose(k_w4[:, p:], k_full[:, p:], **tol)


def test_stops_eos_and_max_tokens(tiny):
    """No token past a stop string, EOS or max_tokens, whatever a verify pass accepted."""
    exit = ExitConfig("lossless", draft_len=6, min_layer=1, threshold=0.5)
    full = tiny.generate("def fib(n):", SamplingParams(max_tokens=30, **GREEDY))[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    for sp in (
        SamplingParams(max_tokens=30, temperature=0, stop=[stop], ignore_eos=True),
        SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0),
    ):
        want = tiny.generate("def fib(n):", sp)[0]
        got = tiny.generate("def fib(n):", SamplingParams(**{**sp.__dict__, "exit": exit}))[0]
        assert (got.token_ids, got.text, got.finish_reason) == (
            want.token_ids,
            want.text,
            want.finish_reason,
        )
    assert_pool_full(tiny)


def test_stream_lossless(tiny):
    exit = ExitConfig("lossless", draft_len=3, min_layer=1)
    sp = SamplingParams(max_tokens=16, exit=exit, **GREEDY)
    assert "".join(tiny.stream("print(", sp)) == tiny.generate("print(", sp)[0].text
    assert_pool_full(tiny)


@pytest.mark.slow  # ~25 s: 1,200 seeded requests
def test_sampling_matches_full_distribution(tiny):
    """Seeded samples of the second generated token (the first one a verify pass decides):
    lossless and full draw from the same distribution (two-sample chi-square at 0.999)."""
    n = 600
    base = dict(max_tokens=3, temperature=1.0, top_k=6, ignore_eos=True)
    exit = ExitConfig("lossless", draft="w4", draft_len=1)
    full = tiny.generate(["Once"] * n, [SamplingParams(seed=s, **base) for s in range(n)])
    ll = tiny.generate(["Once"] * n, [SamplingParams(seed=s, exit=exit, **base) for s in range(n)])
    assert all(o.draft_tokens == 1 for o in ll)
    pairs = sorted({tuple(o.token_ids[:2]) for o in full + ll})

    def cells(outs):
        seen = [tuple(o.token_ids[:2]) for o in outs]
        return torch.tensor([seen.count(c) for c in pairs])

    # the first token comes from the same prefill sampler with the same seed
    assert [o.token_ids[0] for o in ll] == [o.token_ids[0] for o in full]
    stat, df = chi2_homogeneity(cells(full), cells(ll))
    assert df >= 3
    assert stat < chi2_critical(df), (stat, df)
    assert_pool_full(tiny)
