"""Parity of river's Llama forward (CPU reference ops, fp32) with Hugging Face transformers.

Tolerance: logits agree to atol 1e-4 + rtol 1e-4 in fp32 (both run the same math in a different
order; measured differences are ~1e-5 on these models).
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from river.checkpoint import load_config, load_weights
from river.exits import FULL, ExitParams
from river.kv_cache import KVCache, pad_block_tables, slots_for
from river.model import ForwardBatch, LlamaModel

ATOL, RTOL = 1e-4, 1e-4

TINY_CONFIGS = {
    "mha-tied-norope-scaling": dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True
    ),
    "gqa4-untied-llama3": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        rope_theta=500000.0,
    ),
    "gqa3-headdim40-tied": dict(
        num_attention_heads=6, num_key_value_heads=2, head_dim=40, tie_word_embeddings=True
    ),
}


def make_tiny(tmp_path, name, shard=False):
    kw = dict(
        vocab_size=300,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=3,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    kw.update(TINY_CONFIGS[name])
    cfg = LlamaConfig(**kw)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).float().eval()
    # Larger weights than the default init so logits are not all near zero.
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    path = tmp_path / name
    hf.save_pretrained(path, safe_serialization=True, max_shard_size="200KB" if shard else "5GB")
    return hf, path


def river_model(path, block_size=8, num_blocks=128):
    cfg, _ = load_config(path)
    model = LlamaModel(cfg, load_weights(path, cfg), "cpu", torch.float32, 256, ops="reference")
    kv = KVCache(
        cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu"
    )
    return model, kv


class Seqs:
    """Minimal block bookkeeping for driving LlamaModel directly (random block placement)."""

    def __init__(self, lengths, block_size, num_blocks, max_len):
        perm = torch.randperm(num_blocks).tolist()
        per = -(-max_len // block_size)
        self.tables = [perm[i * per : (i + 1) * per] for i in range(len(lengths))]
        self.bs = block_size

    def prefill(self, prompts):
        ids, pos, slots, cu = [], [], [], [0]
        for t, p in zip(self.tables, prompts):
            ids += p
            pos += range(len(p))
            slots += slots_for(t, 0, len(p), self.bs)
            cu.append(cu[-1] + len(p))
        return ForwardBatch(
            torch.tensor(ids),
            torch.tensor(pos),
            torch.tensor(slots),
            pad_block_tables(self.tables),
            torch.tensor([len(p) for p in prompts], dtype=torch.int32),
            torch.tensor(cu, dtype=torch.int32),
        )

    def decode(self, tokens, positions):
        slots = [t[p // self.bs] * self.bs + p % self.bs for t, p in zip(self.tables, positions)]
        return ForwardBatch(
            torch.tensor(tokens),
            torch.tensor(positions),
            torch.tensor(slots),
            pad_block_tables(self.tables),
            torch.tensor([p + 1 for p in positions], dtype=torch.int32),
        )


def check_parity(hf, model, kv, prompts, steps=16, vocab=None):
    """Prefill a mixed-length batch, then `steps` teacher-forced decode steps; compare every
    logit row with HF's forward over the same full sequence."""
    vocab = vocab or model.cfg.vocab_size
    max_len = max(len(p) for p in prompts) + steps + 1
    seqs = Seqs([len(p) for p in prompts], kv.block_size, kv.num_blocks, max_len)
    got = model.prefill(seqs.prefill(prompts), kv, all_logits=True)
    off = 0
    for p in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].float()
        torch.testing.assert_close(
            got[off : off + len(p)], ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"prefill logits: {m}"
        )
        off += len(p)
    seqs_now = [list(p) for p in prompts]
    exits = ExitParams.build([FULL] * len(prompts), "cpu")
    for _ in range(steps):
        toks = [int(torch.randint(vocab, ())) for _ in prompts]
        for s, t in zip(seqs_now, toks):
            s.append(t)
        logits, used = model.decode(seqs.decode(toks, [len(s) - 1 for s in seqs_now]), kv, exits)
        assert used.tolist() == [model.cfg.num_layers] * len(prompts)
        for i, s in enumerate(seqs_now):
            with torch.no_grad():
                ref = hf(torch.tensor([s])).logits[0, -1].float()
            torch.testing.assert_close(
                logits[i], ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"decode logits row {i}: {m}"
            )


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tiny_parity(tmp_path, name):
    hf, path = make_tiny(tmp_path, name, shard=name.startswith("gqa4"))
    if name.startswith("gqa4"):
        assert (path / "model.safetensors.index.json").exists(), "sharded checkpoint expected"
    model, kv = river_model(path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(300, (n,), generator=g).tolist() for n in (1, 7, 23, 12)]
    check_parity(hf, model, kv, prompts[:1], steps=4)
    check_parity(hf, model, kv, prompts, steps=16)
