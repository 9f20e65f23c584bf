"""Decode throughput per exit mode: river's CUDA-graph decode step against HF transformers.

On a GPU (H100 is the target):
    python benchmarks/bench_decode.py                         # default model, 1B and 8B shapes
    python benchmarks/bench_decode.py --models 1b,8b --rtn    # random weights only, RTN twins
    python benchmarks/bench_decode.py --exit-histogram hist.json
    python benchmarks/bench_decode.py --record-histogram hist.json   # record on the real model
    python benchmarks/bench_decode.py --hf-skip 8b:32                # HF too slow there
On a CPU-only machine (a smoke test, times mean nothing):
    python benchmarks/bench_decode.py --tiny               # eager decode
    python benchmarks/bench_decode.py --tiny --pad-eager   # the padded step the graphs capture

What is timed: N decode steps of DecodeGraphRunner (CUDA-graph replays; eager on CPU) over a
KV cache prefilled with `--context` random tokens per row, between CUDA events, after warm-up.
The batch is loaded into the graph's static inputs once (run()); each step then replays
(replay()), feeds the argmax token back and advances positions, slots and lengths in place, all
on the device: the device work of an engine that keeps its decode state on the GPU, not its
Python loop. Modes: full (backbone-only graph: the no-early-exit baseline), full-shared
(full requests in the graph that also holds the river, as the engine runs them), w4, river,
propagate, mask. Random weights make cosine similarities meaningless, so every exit is forced:
`--exit-layers K` (each token runs K backbone layers) or `--exit-histogram FILE` (per-row depths
drawn each step from a histogram recorded on the real model, rescaled to each model's depth).
HF baseline: transformers `generate` (eager PyTorch, SDPA attention, same bf16 weights as
views of river's tensors), decode-only time per step = (t(2 + N new tokens) - t(2)) / N.

tok_s = batch * steps / time; ms_per_token = time per decode step (each row gets one token).
ideal_speedup = weight bytes read per step in `full` / in the mode, counting a layer's bf16
weights when any row of the batch is in the backbone there and its 4-bit twin (0.5 byte per
weight + bf16 scale and zero per group) when any row is in the river, plus the lm_head;
ideal_speedup_kv also counts the K/V reads of attention. Results go to
benchmarks/results/decode-<device>.json and a PNG beside it; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import RESULTS, device_slug, run_metadata, write_json  # noqa: E402

MODES = ("full", "full-shared", "w4", "river", "propagate", "mask")

# Random-weight model shapes (HF Llama-3.2-1B and Llama-3.1-8B; rope scaling left out: it
# changes no cost).
SHAPES = {
    "1b": dict(
        name="llama-3.2-1b-shape",
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        name="llama-3.1-8b-shape",
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        name="tiny-random",
        hidden_size=64,
        intermediate_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        vocab_size=256,
        tie_word_embeddings=True,
    ),
}

RECORD_PROMPTS = [
    "def quicksort(arr):",
    "Write a short story about a lighthouse keeper.",
    "The three laws of thermodynamics are",
    "import numpy as np\n\ndef moving_average(x, w):",
    "Explain how a hash map works.",
    "class LinkedList:\n    def __init__(self):",
    "The capital of France is",
    "Q: What is 17 * 23?\nA:",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models",
        default=None,
        help="comma list of default,1b,8b (default: all three; --tiny: tiny)",
    )
    p.add_argument("--model", default=None, help="HF Llama dir for 'default' (Engine() default)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny random model, eager")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--batches", default=None, help="comma list (default 1,8,32; tiny: 1,4)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    ex = p.add_mutually_exclusive_group()
    ex.add_argument(
        "--exit-layers",
        type=int,
        default=None,
        help="forced exit after K backbone layers (default 4; tiny: 2)",
    )
    ex.add_argument(
        "--exit-histogram",
        default=None,
        help="JSON of Engine.exit_histogram() counts: per-row depths drawn per step",
    )
    p.add_argument("--context", type=int, default=None, help="prefilled tokens per row (512)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (128; tiny: 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed decode steps (16; tiny: 1)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--group-size", type=int, default=64, help="W4 group size of random twins")
    p.add_argument("--rtn", action="store_true", help="RTN twins for random models (fast)")
    p.add_argument("--no-graphs", action="store_true", help="eager decode steps on the GPU too")
    p.add_argument(
        "--pad-eager",
        action="store_true",
        help="without graphs, run the padded static step the graphs capture (CPU smoke test)",
    )
    p.add_argument("--skip-hf", action="store_true", help="no HF transformers baseline")
    p.add_argument("--hf-skip", default="", help="model:batch pairs to skip HF for, e.g. 8b:32")
    p.add_argument("--hf-steps", type=int, default=None, help="HF timed new tokens (32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default results/decode-<dev>.json)")
    p.add_argument("--plot", default=None, help="PNG path (default: beside the JSON)")
    p.add_argument(
        "--record-histogram",
        default=None,
        metavar="FILE",
        help="record an exit histogram on the real model with river exits at "
        "--threshold/--min-layer, write it to FILE, and exit",
    )
    p.add_argument("--threshold", type=float, default=0.9, help="river threshold (recording)")
    p.add_argument("--min-layer", type=int, default=8, help="river min_layer (recording)")
    p.add_argument("--record-tokens", type=int, default=256, help="tokens per prompt (recording)")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = dict(
        models="tiny" if tiny else "default,1b,8b",
        batches="1,4" if tiny else "1,8,32",
        context=24 if tiny else 512,
        steps=4 if tiny else 128,
        warmup=1 if tiny else 16,
        hf_steps=4 if tiny else 32,
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.exit_layers is None and args.exit_histogram is None:
        args.exit_layers = 2 if tiny else 4
    return args


# ----------------------------------------------------------------------------- models


def random_weights(cfg, device, dtype, seed=0, std=0.02) -> dict:
    """The weights dict LlamaModel takes (river.checkpoint.load_weights layout), random normal
    projections and unit norms, generated directly on `device` in `dtype`."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

    def rnd(*shape):
        return torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(std)

    def ones(n):
        return torch.ones(n, device=device, dtype=dtype)

    out = {"embed": rnd(cfg.vocab_size, h), "norm": ones(h)}
    out["lm_head"] = out["embed"] if cfg.tie_word_embeddings else rnd(cfg.vocab_size, h)
    out["layers"] = [
        {
            "input_norm": ones(h),
            "post_norm": ones(h),
            "q": rnd(cfg.num_heads * d, h),
            "k": rnd(cfg.num_kv_heads * d, h),
            "v": rnd(cfg.num_kv_heads * d, h),
            "o": rnd(h, cfg.num_heads * d),
            "gate": rnd(i, h),
            "up": rnd(i, h),
            "down": rnd(h, i),
        }
        for _ in range(cfg.num_layers)
    ]
    return out


def split_projections(model) -> dict:
    """{"layers.N.q": tensor, ...}: views of the model's fused bf16 weights, per projection."""
    cfg = model.cfg
    q, kv, i = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    out = {}
    for n, w in enumerate(model.layers):
        parts = {
            "q": w.qkv[:q],
            "k": w.qkv[q : q + kv],
            "v": w.qkv[q + kv :],
            "o": w.o,
            "gate": w.gate_up[:i],
            "up": w.gate_up[i:],
            "down": w.down,
        }
        out.update({f"layers.{n}.{p}": t for p, t in parts.items()})
    return out


@contextlib.contextmanager
def _gpu_sized_chunks(device):
    """quantize_w4 works in row chunks sized for CPU caches (~256K weights); on a GPU that means
    tens of thousands of tiny launches per model. Bigger chunks there (benchmark only)."""
    import river.quantize as rq

    saved = rq._CHUNK_ELEMS
    if str(device).startswith("cuda"):
        rq._CHUNK_ELEMS = 1 << 24
    try:
        yield
    finally:
        rq._CHUNK_ELEMS = saved


def attach_random_river(model, group_size, method):
    """Quantize the model's own weights (on its device) and attach them as the river twins."""
    from river.quantize import quantize_w4

    t = time.perf_counter()
    with _gpu_sized_chunks(model.device):
        quant = {
            name: quantize_w4(w, group_size=group_size, method=method)
            for name, w in split_projections(model).items()
        }
    model.attach_river(quant)
    print(f"  river twins ({method}, g{group_size}) in {time.perf_counter() - t:.1f}s", flush=True)


def build_random(key, args, device, dtype, max_positions):
    from river.config import ModelConfig
    from river.model import LlamaModel

    shape = dict(SHAPES[key])
    name = shape.pop("name")
    cfg = ModelConfig(**shape, rope_theta=500000.0, max_position_embeddings=max_positions)
    model = LlamaModel(
        cfg, random_weights(cfg, device, dtype, args.seed), device, dtype, max_positions
    )
    gc.collect()  # the unfused weights dict is garbage now
    method = "rtn" if args.rtn else "hqq"
    attach_random_river(model, args.group_size, method)
    return name, model, None, f"random, river {method} g{args.group_size}"


def build_default(args, device, max_positions):
    from river import Engine, EngineConfig

    engine = Engine(
        args.model, EngineConfig(device=str(device), num_blocks=1, max_model_len=max_positions)
    )
    engine.ensure_river(progress=True)
    name = engine.model_dir.name
    return name, engine.model, engine.model_dir, f"real weights, river {engine.config.river_method}"


def hf_config_for(model, model_dir):
    from transformers import LlamaConfig

    if model_dir is not None:
        return LlamaConfig.from_pretrained(model_dir)
    c = model.cfg
    return LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings,
    )


def hf_twin(model, model_dir):
    """An HF LlamaForCausalLM whose parameters are views of river's tensors (no second copy):
    built on the meta device, every weight then replaced by a view."""
    import itertools

    import torch
    from transformers import LlamaForCausalLM

    hf_cfg = hf_config_for(model, model_dir)
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)

    def param(t):
        return torch.nn.Parameter(t, requires_grad=False)

    hf.model.embed_tokens.weight = param(model.embed)
    hf.model.norm.weight = param(model.norm)
    tied = model.lm_head is model.embed
    hf.lm_head.weight = hf.model.embed_tokens.weight if tied else param(model.lm_head)
    proj = split_projections(model)
    for n, layer in enumerate(hf.model.layers):
        at, mlp = layer.self_attn, layer.mlp
        for mod, p in (
            (at.q_proj, "q"),
            (at.k_proj, "k"),
            (at.v_proj, "v"),
            (at.o_proj, "o"),
            (mlp.gate_proj, "gate"),
            (mlp.up_proj, "up"),
            (mlp.down_proj, "down"),
        ):
            mod.weight = param(proj[f"layers.{n}.{p}"])
        layer.input_layernorm.weight = param(model.input_norms[n])
        layer.post_attention_layernorm.weight = param(model.post_norms[n])
    # rotary inv_freq is a computed buffer: rebuild the module off the meta device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg).to(model.device)
    meta = [n for n, t in itertools.chain(hf.named_parameters(), hf.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"HF twin: tensors left on the meta device: {meta[:5]}")
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    hf.generation_config.pad_token_id = 0
    return hf.eval()


# ----------------------------------------------------------------------------- timing


class Timer:
    """CUDA events on a GPU (device time of the queued work), perf_counter on a CPU."""

    def __init__(self, device):
        import torch

        self.cuda = str(device).startswith("cuda")
        self.torch = torch

    def __enter__(self):
        if self.cuda:
            self.start = self.torch.cuda.Event(enable_timing=True)
            self.end = self.torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class Bench:
    """One model: a KV cache prefilled with `context` random tokens for max(batches) rows, each
    row owning a contiguous run of blocks (so a slot advances by +1 per token)."""

    def __init__(self, model, args, device):
        import torch

        from river.graphs import DecodeGraphRunner
        from river.kv_cache import KVCache

        self.model, self.args, self.device = model, args, device
        cfg = model.cfg
        self.rows = max(args.batches)
        bs = args.block_size
        tokens = args.context + args.warmup + args.steps + 1
        self.bps = -(-tokens // bs)  # blocks per row
        # + 1: the last block is the graph runner's padding block (never given to a row)
        self.kv = KVCache(
            cfg.num_layers,
            self.rows * self.bps + 1,
            bs,
            cfg.num_kv_heads,
            cfg.head_dim,
            model.dtype,
            device,
        )
        self.tables = torch.arange(self.rows * self.bps, dtype=torch.int32, device=device).view(
            self.rows, self.bps
        )
        self._prefill()
        graphs = False if args.no_graphs else None
        t = time.perf_counter()
        opts = dict(enabled=graphs, pad_eager=args.pad_eager)
        self.shared = DecodeGraphRunner(model, self.kv, self.rows, self.bps, **opts)
        self.backbone = DecodeGraphRunner(
            model, self.kv, self.rows, self.bps, include_river=False, **opts
        )
        if self.shared.use_graphs:
            print(
                f"  captured {2 * len(self.shared.buckets)} graphs in "
                f"{time.perf_counter() - t:.1f}s",
                flush=True,
            )

    def _prefill(self):
        import torch

        from river.model import ForwardBatch

        ctx, bs, dev = self.args.context, self.args.block_size, self.device
        g = torch.Generator(device=dev).manual_seed(self.args.seed + 1)
        per_call = max(1, 4096 // ctx)  # rows per prefill call: bounded activations
        for r0 in range(0, self.rows, per_call):
            rows = range(r0, min(self.rows, r0 + per_call))
            n = len(rows)
            pos = torch.arange(ctx, device=dev)
            self.model.prefill(
                ForwardBatch(
                    input_ids=torch.randint(
                        0, self.model.cfg.vocab_size, (n * ctx,), generator=g, device=dev
                    ),
                    positions=pos.repeat(n),
                    slot_mapping=torch.cat([r * self.bps * bs + pos for r in rows]),
                    block_tables=self.tables[r0 : r0 + n],
                    context_lens=torch.full((n,), ctx, dtype=torch.int32, device=dev),
                    cu_seqlens=torch.arange(0, n * ctx + 1, ctx, dtype=torch.int32, device=dev),
                ),
                self.kv,
            )
        sync(dev)

    def time_mode(self, mode, batch, hist):
        """(seconds for args.steps steps, mean backbone layers per token)."""
        import torch
        from forced_exits import ForcedExitSampler, forced_exit_configs

        from river.exits import ExitParams
        from river.model import ForwardBatch

        args, dev, cfg = self.args, self.device, self.model.cfg
        runner = self.backbone if mode == "full" else self.shared
        base = "full" if mode == "full-shared" else mode
        sampler = None
        if hist is not None and base in ("river", "propagate", "mask"):
            exits = ExitParams.build(forced_exit_configs(base, batch, 1), dev)
            sampler = ForcedExitSampler(hist, cfg.num_layers, batch, dev, seed=args.seed)
        else:
            exits = ExitParams.build(forced_exit_configs(base, batch, args.exit_layers), dev)
        ctx, bs = args.context, args.block_size
        g = torch.Generator(device=dev).manual_seed(args.seed + 2)
        cur = ForwardBatch(
            input_ids=torch.randint(0, cfg.vocab_size, (batch,), generator=g, device=dev),
            positions=torch.full((batch,), ctx, dtype=torch.int64, device=dev),
            slot_mapping=torch.arange(batch, device=dev) * self.bps * bs + ctx,
            block_tables=self.tables[:batch],
            context_lens=torch.full((batch,), ctx + 1, dtype=torch.int32, device=dev),
        )
        used_sum = torch.zeros(batch, dtype=torch.int64, device=dev)

        def advance(b, logits):
            b.input_ids.copy_(logits.argmax(-1))  # the token goes back on the device
            b.positions.add_(1)
            b.slot_mapping.add_(1)  # contiguous blocks per row
            b.context_lens.add_(1)

        with torch.inference_mode():
            state = None
            if runner.padded:
                # Load the static inputs once (one step, at position ctx), then advance them in
                # place: the per-step device work is the replay, the argmax fed back and three
                # increments, as for an engine that keeps its decode state on the device.
                logits, _ = runner.run(cur, exits)
                state = runner.inputs.head(batch)
                advance(state, logits)

            def step():
                if state is None:
                    if sampler is not None:
                        sampler.fill(exits.min_layer, exits.start_exited)
                    logits, used = runner.run(cur, exits)
                    advance(cur, logits)
                else:
                    if sampler is not None:
                        sampler.fill(state.min_layer, state.start_exited)
                    logits, used = runner.replay(batch)
                    advance(state, logits)
                used_sum.add_(used)

            for _ in range(args.warmup):
                step()
            used_sum.zero_()
            with Timer(dev) as t:
                for _ in range(args.steps):
                    step()
        return t.seconds, used_sum.sum().item() / (batch * args.steps)


def time_hf(hf, batch, args, device, vocab):
    """Seconds per decode step of HF generate (greedy), prefill cancelled out."""
    import torch

    g = torch.Generator(device=device).manual_seed(args.seed + 3)
    ids = torch.randint(0, vocab, (batch, args.context), generator=g, device=device)
    mask = torch.ones_like(ids)

    def gen(n):
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
            )
        sync(device)
        assert out.shape[1] == args.context + n
        return time.perf_counter() - t

    gen(2)  # warm-up (kernels, allocator)
    short = min(gen(2) for _ in range(2))
    long = gen(2 + args.hf_steps)
    return max(long - short, 1e-9) / args.hf_steps


def check_hf_twin(model, hf, kv, device):
    """Same weights, same math: last-token logits of a short prompt, river prefill vs HF. The
    prompt's K/V go to the padding block (whatever the graph runner leaves there is junk)."""
    import torch

    from river.model import ForwardBatch

    n, pad = min(8, kv.block_size), kv.num_blocks - 1
    ids = torch.arange(1, n + 1, device=device)
    logits = model.prefill(
        ForwardBatch(
            ids,
            torch.arange(n, device=device),
            pad * kv.block_size + torch.arange(n, device=device),
            torch.tensor([[pad]], dtype=torch.int32, device=device),
            torch.tensor([n], dtype=torch.int32, device=device),
            torch.tensor([0, n], dtype=torch.int32, device=device),
        ),
        kv,
    )
    with torch.inference_mode():
        ref = hf(ids.view(1, -1)).logits[0, -1].float()
    err = (logits[0] - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    print(f"  HF twin check: max |river - HF| / max |HF| = {err:.2e}", flush=True)
    if err > 0.1:
        raise RuntimeError("the HF baseline does not compute what river computes")


# ----------------------------------------------------------------------------- ideal bytes


def exit_distribution(num_layers, args, hist):
    """P(a token runs k backbone layers), k = 0..num_layers, for the forced exits."""
    if hist is not None:
        return list(hist.rescaled(num_layers).probs)
    k = min(max(args.exit_layers, 0), num_layers)
    return [1.0 if j == k else 0.0 for j in range(num_layers + 1)]


def bytes_per_step(cfg, mode, batch, probs, context, group_size):
    """(weight bytes, KV bytes) read by one decode step of `batch` rows (expected values when
    the rows' exit depths are random: a weight set is read at a layer if any row needs it)."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * d * h
    params = qkv + h * cfg.num_heads * d + 2 * i * h + h * i
    bf16 = 2 * params + 2 * 2 * h  # + the two norms
    w4 = params // 2 + 2 * 2 * params // group_size  # nibbles + bf16 scale and zero per group
    head = 2 * cfg.vocab_size * h + 2 * batch * h  # lm_head + the embedding rows
    kv_row = 2 * 2 * cfg.num_kv_heads * d * (context + 1)  # K and V of one row at one layer
    base = "full" if mode == "full-shared" else mode
    weights, kv = head, 0.0
    for n in range(cfg.num_layers):
        p_out = sum(probs[: n + 1])  # P(row has left the backbone before layer n)
        if base == "full":
            p_out = 0.0
        elif base == "w4":
            p_out = 1.0
        any_bb = 1.0 - p_out**batch
        any_out = 1.0 - (1.0 - p_out) ** batch
        if base in ("full", "w4", "river"):
            weights += any_bb * bf16 + any_out * w4
            kv += batch * kv_row  # every row attends at every layer
        elif base == "propagate":
            # the exited rows' K/V come from the fused bf16 qkv weight: read whenever any row
            # is there at all (every row is in the backbone or propagating)
            weights += any_bb * (bf16 - 2 * qkv) + 2 * qkv
            kv += batch * (1 - p_out) * kv_row
        elif base == "mask":
            weights += any_bb * bf16
            kv += batch * (1 - p_out) * kv_row
    return weights, kv


# ----------------------------------------------------------------------------- output


def print_table(rows):
    print(
        "| model | mode | batch | backbone layers | tok/s | ms/token | speedup vs full "
        "| ideal (weights) | ideal (+KV) | efficiency |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def f(x, spec):
        return "" if x is None else format(x, spec)

    for r in rows:
        eff = None
        if r.get("ideal_speedup") and r.get("speedup_vs_full"):
            eff = r["speedup_vs_full"] / r["ideal_speedup"]
        print(
            f"| {r['model']} | {r['mode']} | {r['batch']} | {f(r['backbone_layers'], '.2f')} "
            f"| {f(r['tok_s'], '.1f')} | {f(r['ms_per_token'], '.3f')} "
            f"| {f(r['speedup_vs_full'], '.2f')} | {f(r['ideal_speedup'], '.2f')} "
            f"| {f(r.get('ideal_speedup_kv'), '.2f')} | {f(eff, '.0%')} |"
        )


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for col, m in enumerate(models):
        mr = [r for r in rows if r["model"] == m]
        modes = list(dict.fromkeys(r["mode"] for r in mr))
        batches = sorted({r["batch"] for r in mr})
        width = 0.8 / len(modes)
        for j, mode in enumerate(modes):
            xs, tok, spd, ideal = [], [], [], []
            for bi, b in enumerate(batches):
                r = next((r for r in mr if r["mode"] == mode and r["batch"] == b), None)
                if r is None:
                    continue
                xs.append(bi + (j - (len(modes) - 1) / 2) * width)
                tok.append(r["tok_s"])
                spd.append(r["speedup_vs_full"] or 0.0)
                ideal.append(r["ideal_speedup"])
            axes[0, col].bar(xs, tok, width, label=mode)
            axes[1, col].bar(xs, spd, width, label=mode)
            pts = [(x, y) for x, y in zip(xs, ideal, strict=True) if y is not None]
            if pts:
                axes[1, col].plot(
                    *zip(*pts, strict=True), "k_", ms=14, mew=2, label="ideal" if j == 0 else None
                )
        for ax in axes[:, col]:
            ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
            ax.grid(axis="y", alpha=0.3)
        axes[0, col].set_title(m)
        axes[0, col].set_ylabel("decode tokens / s")
        axes[1, col].set_ylabel("speedup vs full (black: ideal, weight bytes)")
        axes[0, col].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def record_histogram(args):
    from river import Engine, ExitConfig, SamplingParams

    engine = Engine(args.model, device=args.device)
    sp = SamplingParams(
        max_tokens=args.record_tokens,
        temperature=0,
        ignore_eos=True,
        exit=ExitConfig("river", args.threshold, args.min_layer),
    )
    engine.exit_histogram(reset=True)
    engine.generate(RECORD_PROMPTS, sp)
    counts = engine.exit_histogram()
    mean = sum(k * c for k, c in enumerate(counts)) / max(sum(counts), 1)
    out = {
        "counts": counts,
        "model": engine.model_dir.name,
        "threshold": args.threshold,
        "min_layer": args.min_layer,
        "mean_backbone_layers": mean,
    }
    pathlib.Path(args.record_histogram).write_text(json.dumps(out, indent=1))
    print(
        f"wrote {args.record_histogram}: {sum(counts)} tokens, mean {mean:.2f} backbone "
        f"layers of {engine.model_config.num_layers}"
    )


def main(argv=None):
    args = parse_args(argv)
    if args.record_histogram:
        record_histogram(args)
        return
    import torch
    from forced_exits import ExitHistogram

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.batches = [int(b) for b in str(args.batches).split(",")]
    modes = [m for m in args.modes.split(",") if m]
    bad = set(modes) - set(MODES)
    if bad:
        raise SystemExit(f"unknown modes {sorted(bad)}; choose from {MODES}")
    if (device.type != "cuda" or args.no_graphs) and not args.pad_eager:
        modes = [m for m in modes if m != "full-shared"]  # plain eager: the same as full
    hist = None
    if args.exit_histogram:
        hist = ExitHistogram.from_json(json.loads(pathlib.Path(args.exit_histogram).read_text()))
    hf_skip = {tuple(x.split(":")) for x in args.hf_skip.split(",") if x}
    max_positions = args.context + args.warmup + args.steps + max(args.hf_steps, 0) + 64
    out = pathlib.Path(args.out) if args.out else RESULTS / f"decode-{device_slug(device)}.json"
    meta = run_metadata(str(device))
    exit_spec = (
        {"exit_histogram": args.exit_histogram, "mean_layers_source": hist.mean_layers()}
        if hist
        else {"exit_layers": args.exit_layers}
    )
    rows = []

    def save():
        write_json(
            out,
            {
                **meta,
                "context": args.context,
                "steps": args.steps,
                "graphs": device.type == "cuda" and not args.no_graphs,
                **exit_spec,
                "results": rows,
            },
        )

    for key in args.models.split(","):
        torch.manual_seed(args.seed)
        print(f"== {key} ==", flush=True)
        if key == "default":
            name, model, model_dir, note = build_default(args, device, max_positions)
        elif key in SHAPES:
            name, model, model_dir, note = build_random(key, args, device, dtype, max_positions)
        else:
            raise SystemExit(f"unknown model {key!r}: default, 1b, 8b or tiny")
        cfg = model.cfg
        print(f"  {name}: {cfg.num_layers} layers, hidden {cfg.hidden_size} ({note})", flush=True)
        bench = Bench(model, args, device)
        hf = None
        if not args.skip_hf:
            hf = hf_twin(model, model_dir)
            check_hf_twin(model, hf, bench.kv, device)
        probs = exit_distribution(cfg.num_layers, args, hist)
        # the twins' real group size (CPU twins are dequantized: assume the flag's)
        group = getattr(model.river[0].qkv, "group_size", args.group_size)
        for batch in args.batches:
            full_w, full_kv = bytes_per_step(cfg, "full", batch, probs, args.context, group)
            full_tok = None
            for mode in modes:
                secs, layers = bench.time_mode(mode, batch, hist)
                tok_s = batch * args.steps / secs
                if mode == "full":
                    full_tok = tok_s
                w, kvb = bytes_per_step(cfg, mode, batch, probs, args.context, group)
                rows.append(
                    {
                        "model": name,
                        "mode": mode,
                        "batch": batch,
                        "backbone_layers": round(layers, 3),
                        "tok_s": round(tok_s, 2),
                        "ms_per_token": round(1e3 * secs / args.steps, 4),
                        "speedup_vs_full": round(tok_s / full_tok, 3) if full_tok else None,
                        "ideal_speedup": round(full_w / w, 3),
                        "ideal_speedup_kv": round((full_w + full_kv) / (w + kvb), 3),
                        "weight_gb_per_step": round(w / 1e9, 4),
                    }
                )
                print(
                    f"  batch {batch:3d} {mode:12s} {tok_s:10.1f} tok/s "
                    f"{1e3 * secs / args.steps:8.3f} ms/step  layers {layers:5.2f}  "
                    f"ideal x{full_w / w:.2f}",
                    flush=True,
                )
            if hf is not None and (key, str(batch)) not in hf_skip:
                per_step = time_hf(hf, batch, args, device, cfg.vocab_size)
                rows.append(
                    {
                        "model": name,
                        "mode": "hf-transformers",
                        "batch": batch,
                        "backbone_layers": cfg.num_layers,
                        "tok_s": round(batch / per_step, 2),
                        "ms_per_token": round(1e3 * per_step, 4),
                        "speedup_vs_full": round(batch / per_step / full_tok, 3)
                        if full_tok
                        else None,
                        "ideal_speedup": None,
                        "ideal_speedup_kv": None,
                    }
                )
                print(
                    f"  batch {batch:3d} {'hf':12s} {batch / per_step:10.1f} tok/s "
                    f"{1e3 * per_step:8.3f} ms/step",
                    flush=True,
                )
            save()
        del bench, hf, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    save()
    png = pathlib.Path(args.plot) if args.plot else out.with_suffix(".png")
    plot(rows, png)
    print_table(rows)
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
