"""Test helpers shared by several test modules."""

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@contextlib.contextmanager
def forbid_host_sync():
    """Make every host read of a tensor raise, as a CUDA sync would be on the GPU."""
    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def boom(*a, **k):
        raise AssertionError("host sync inside the decode step")

    try:
        for n in names:
            setattr(torch.Tensor, n, boom)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def assert_pool_full(engine):
    """Every KV block is back in the pool and no request is queued or running."""
    assert engine.allocator.num_free == engine.allocator.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting


# Ops that read a tensor on the host, or turn host data into a tensor (which on a GPU is a
# blocking copy from pageable memory: `t[idx] = True` lifts the Python True into a tensor).
_SYNC_OPS = {
    "aten::_local_scalar_dense": "reads a tensor value on the host (.item(), bool(), int())",
    "aten::lift_fresh": "turns host data into a tensor (torch.tensor(...), t[idx] = <scalar>)",
    "aten::nonzero": "has a data-dependent shape (a device sync on a GPU)",
    "aten::_assert_async": "checks a tensor value on the host",
}


class _HostSyncGuard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        why = _SYNC_OPS.get(func._schema.name)
        if why is None and func._schema.name in ("aten::_to_copy", "aten::copy_"):
            devs = {a.device.type for a in args if isinstance(a, torch.Tensor)}
            dev = (kwargs or {}).get("device")
            if dev is not None:
                devs.add(torch.device(dev).type)
            if len(devs) > 1:
                why = "copies between the host and the device"
        if why is not None:
            raise AssertionError(f"host sync inside the decode step: {func} {why}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync():
    """The decode step's guard: fails on every host read of a tensor (patched methods that do
    not dispatch, such as tolist and cpu, plus a dispatch mode for the rest) and on host data
    entering the step as a tensor. On a GPU, torch's sync debug mode errors as well."""
    cuda = torch.cuda.is_available()
    if cuda:
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with forbid_host_sync(), _HostSyncGuard():
            yield
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(prev)


def tiny_checkpoint(path, layers=4, hidden=64, inter=128, heads=4, kv_heads=2, vocab=200, group=32):
    """A random Llama saved at `path` (2-D weights ~ N(0, 0.1), so layers change the hidden
    state enough for exits to matter), loaded back as river reads it, with W4 twins of group
    `group`: (ModelConfig, weights, {"layers.N.proj": W4Weight})."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from river.checkpoint import load_config, load_weights
    from river.config import PROJECTIONS
    from river.quantize import quantize_w4

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    hf.save_pretrained(path, safe_serialization=True)
    mc, _ = load_config(path)
    weights = load_weights(path, mc)
    quant = {
        f"layers.{n}.{p}": quantize_w4(weights["layers"][n][p], group_size=group)
        for n in range(layers)
        for p in PROJECTIONS
    }
    return mc, weights, quant


def tiny_text_model(path, src_dir, *, hidden, inter, layers, heads, kv_heads, vocab_delta=0,
                    tie=True, init_std=None):  # fmt: skip
    """A random Llama saved at `path` with the vocabulary (less `vocab_delta` rows) and the
    tokenizer of the HF model at `src_dir`, so an engine on it reads and writes real text.
    init_std: redraw every 2-D weight ~ N(0, init_std) (None: transformers' init)."""
    import json
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    src = json.loads((src_dir / "config.json").read_text())
    cfg = LlamaConfig(
        vocab_size=src["vocab_size"] - vocab_delta,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=src.get("bos_token_id"),
        eos_token_id=src.get("eos_token_id"),
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg)
    if init_std is not None:
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() == 2:
                    p.normal_(0, init_std)
    hf.save_pretrained(path, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src_dir / f, path / f)
    return path


def run_modes(engine, modes, prompts, max_tokens=32):
    """{mode name: (token ids per prompt, backbone layers per prompt)}: greedy generation of
    every prompt under each ExitConfig of `modes` ({name: ExitConfig})."""
    from river import SamplingParams

    out = {}
    for name, exit_cfg in modes.items():
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                exit=exit_cfg)  # fmt: skip
        res = engine.generate(prompts, params)
        out[name] = ([o.token_ids for o in res], [o.backbone_layers for o in res])
    return out
