"""Activation statistics for the river quantizer: the model's own samples (the default),
random token ids, or Python's own text (GPTQ's Hessians).

The 4-bit error of a projection that matters is its output error, whose expectation weights each
input column's squared weight error by that channel's mean squared activation E[x_k^2]. A few
channels dominate: on SmolLM2-135M two intermediate neurons of layer 11 carry activations two
orders of magnitude above the rest, and the unweighted quantizer spends as much care on every
other column as on theirs. river.quantize takes E[x_k^2] as per-column importance.

The paper builds its river with no calibration data, and river can too: the statistics come from
the bf16 backbone reading uniformly random token ids (BOS first). Random tokens carry no text at
all, are reproducible from a seed and cost one prefill, yet they light up the same outlier
channels, because those channels are a property of the weights (attention sinks, the residual's
massive dimensions), not of the text. Measured on 24 held-out chunks of Python source (not
HumanEval), river with every layer from 5 on in 4 bits, KL to the bf16 model:

    unweighted hqq                               0.152
    random tokens, 8 x 256 (the default)         0.061
    the model's own sampled text, 32 x 256       0.055
    in-domain Python code, 32 x 256              0.055

So random tokens recover ~95% of what real text gives. Weighting by E[x^2]^0.5 or E[x^2]^1.5
instead measured worse (0.078, 0.070): the first power is the one the derivation asks for.

The default source is now the model's own samples (`source="self-samples"`): 16 sequences of
256 tokens it writes itself from BOS at temperature 1, still no outside data. At the default
precision (mix:0.43, static split 1) they improved both measures on the tuning text (top-1
agreement 0.932 -> 0.934-0.936, perplexity loss +1.86% -> +1.42-1.69% over three sample seeds),
and engine-scored on the held-out sets they gained agreement (HumanEval 0.954 -> 0.958, prose
0.910 -> 0.918) with perplexity unchanged within noise (BENCHMARKS.md, "Twin precision"). The
samples are drawn on the CPU in float32 from a seeded generator, so that every machine builds
the same twins (up to a sampled token landing on a rounding-sized edge of the distribution).

One source uses outside text and is not the default: `source="text"` (river_calibration
"text") reads documentation and code that ship with Python itself (bundled_text), and the
twins are quantized by GPTQ with each input's full second moment (activation_hessians,
river.gptq). The model's own samples do not give GPTQ correlations that hold on real text;
Python's text does on text like it. Engine-scored, the default river's perplexity loss on the
tuning text (Python's docs and code) fell from +0.51% to +0.26%, but general prose did not gain
(93.8% -> 93.6% agreement, +0.70% -> +0.80%), so the default stays data-free (BENCHMARKS.md,
"GPTQ at 6 bits").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from river.config import FUSED
from river.kv_cache import KVCache, blocks_needed
from river.model import LlamaModel
from river.scheduler import prefill_forward_batch

# The projections that read each observed input (river.model.LlamaModel.prefill's names).
_READERS = FUSED


SOURCES = ("random-tokens", "self-samples", "text")


@dataclass(frozen=True)
class Calibration:
    """How the activation statistics are measured: num_seqs sequences of seq_len ids, either
    uniform random ids ("random-tokens"), the model's own samples ("self-samples", drawn at
    `temperature` from BOS) or text that ships with Python ("text", bundled_text)."""

    num_seqs: int = 8
    seq_len: int = 256
    seed: int = 0
    source: str = "random-tokens"
    temperature: float = 1.0

    def __post_init__(self):
        if self.num_seqs <= 0 or self.seq_len <= 1:
            raise ValueError(
                f"calibration needs num_seqs >= 1 and seq_len >= 2, got {self.num_seqs} x "
                f"{self.seq_len}"
            )
        if self.source not in SOURCES:
            raise ValueError(f"calibration source must be one of {SOURCES}, got {self.source!r}")
        if not self.temperature > 0:
            raise ValueError(f"calibration temperature must be > 0, got {self.temperature}")

    @property
    def tag(self) -> str:
        """Identity for the quantization cache: other statistics mean other weights."""
        shape = f"{self.num_seqs}x{self.seq_len}:seed{self.seed}"
        if self.source == "self-samples":
            return f"act-msq:self-samples:{shape}:t{self.temperature:g}:cpu-fp32:v1"
        if self.source == "text":  # plus the ids' digest (text_tag): Python versions differ
            return f"hessian:text:{shape}:v1"
        return f"act-msq:random-tokens:{shape}:v1"


# The statistics river builds its twins from by default (EngineConfig.river_calibration):
# random ids are cheap and need no generation; the model's own samples measured better.
RANDOM_TOKENS = Calibration()
SELF_SAMPLES = Calibration(num_seqs=16, seq_len=256, source="self-samples")
# Real text for GPTQ's Hessians (river_calibration="text"): half English prose-like
# documentation, half code, from the Python installation itself (no download).
TEXT = Calibration(num_seqs=16, seq_len=256, source="text")
# bundled_text skips this many characters of every pydoc topic: the benchmarks' tuning text
# (benchmarks/texts.py, tune-prose) reads exactly those, so the two never overlap.
_TOPIC_SKIP = 1200


def random_tokens(vocab_size: int, bos_id: int | None, calib: Calibration) -> torch.Tensor:
    """int64 [num_seqs, seq_len] uniform ids from a fixed seed (CPU generator: the same ids on
    every device), BOS first when the model has one, like every real prompt."""
    g = torch.Generator().manual_seed(calib.seed)
    ids = torch.randint(0, vocab_size, (calib.num_seqs, calib.seq_len), generator=g)
    if bos_id is not None:
        ids[:, 0] = bos_id
    return ids


def bundled_text(calib: Calibration, encode) -> torch.Tensor:
    """int64 [num_seqs, seq_len]: calibration text that every Python installation carries.

    Half the sequences come from the language reference's topics (`pydoc_data.topics`, English
    documentation), each read from its 1,200th character on. The other half come from
    standard-library package modules (`Lib/<package>/*.py`, tests excluded). The candidates
    are sorted, shuffled by calib.seed and the first texts with seq_len tokens taken.
    encode(text) -> token ids, BOS first as for a prompt.

    This keeps the benchmarks' tuning text out by construction: it reads the topics' first
    1,200 characters and top-level stdlib modules. The text differs between Python versions, so
    the twins' cache identity carries the ids' digest (text_tag)."""
    import pathlib
    import random
    import sysconfig
    from pydoc_data.topics import topics

    want = 16 * calib.seq_len  # characters: seq_len tokens of any text with that many
    docs = [topics[k][_TOPIC_SKIP : _TOPIC_SKIP + want] for k in sorted(topics)]
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    code = []
    for path in sorted(root.glob("*/*.py")):
        if "site-packages" in path.parts or any(p.startswith("test") for p in path.parts[-2:]):
            continue
        try:
            code.append(path.read_text(encoding="utf-8")[:want])
        except (OSError, UnicodeDecodeError):
            continue
    rng = random.Random(calib.seed)
    seqs = []
    for pool, n in ((docs, calib.num_seqs // 2), (code, calib.num_seqs - calib.num_seqs // 2)):
        rng.shuffle(pool)
        got = []
        for text in pool:  # the first n texts long enough, in the shuffled order
            ids = encode(text)[: calib.seq_len]
            if len(ids) == calib.seq_len:
                got.append(ids)
            if len(got) == n:
                break
        if len(got) < n:
            raise RuntimeError(
                f"bundled_text: this Python installation has only {len(got)} texts of "
                f"{calib.seq_len} tokens where {n} are needed (no pydoc_data or stdlib?)"
            )
        seqs += got[:n]
    return torch.tensor(seqs, dtype=torch.long)


def text_tag(calib: Calibration, ids: torch.Tensor) -> str:
    """The cache identity of statistics measured on `ids` (bundled_text's)."""
    import hashlib

    digest = hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest()[:16]
    return f"{calib.tag}:ids-{digest}"


SCRATCH_BLOCK = 16  # tokens per block of the measurements' scratch KV caches


def scratch_cache(model: LlamaModel, num_seqs: int, seq_len: int):
    """(KVCache, block tables): a throwaway cache for num_seqs sequences of up to seq_len
    tokens, sequence i in its own contiguous blocks (the measurements here and in
    river.precision prefill or decode into it once)."""
    cfg = model.cfg
    per_seq = blocks_needed(seq_len, SCRATCH_BLOCK)
    kv = KVCache(
        cfg.num_layers, num_seqs * per_seq, SCRATCH_BLOCK, cfg.num_kv_heads, cfg.head_dim,
        model.dtype, model.device,
    )  # fmt: skip
    return kv, [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(num_seqs)]


@torch.inference_mode()
def own_samples(model: LlamaModel, calib: Calibration, progress=None) -> torch.Tensor:
    """int64 [num_seqs, seq_len]: sequences `model` writes itself, one decode step per token
    for all of them at once, from BOS (a seeded random first id for a model without one).

    Sampling is plain multinomial at calib.temperature from a seeded CPU generator, EOS
    included and written past (these are activation statistics, not answers: a sequence that
    ends goes on as the model continues after its EOS). `model` should be a float32 CPU model
    (river.twins passes one) so that the tokens, and the twins built from them, do not depend
    on the machine's accelerator. progress: optional callable(), called once per token position
    drawn."""
    from river.exits import ExitConfig, ExitParams
    from river.kv_cache import pad_block_tables, slots_for
    from river.model import ForwardBatch

    cfg = model.cfg
    s, n = calib.num_seqs, min(calib.seq_len, model.cos.shape[0])
    g = torch.Generator().manual_seed(calib.seed)
    first = random_tokens(cfg.vocab_size, cfg.bos_token_id, calib)[:, 0]  # BOS, or seeded ids
    kv, tables = scratch_cache(model, s, n)
    block_tables = pad_block_tables(tables).to(model.device)  # the same for every step
    exits = ExitParams.build([ExitConfig("full")] * s, model.device)
    ids = torch.empty(s, n, dtype=torch.long)
    ids[:, 0] = first
    start = prefill_forward_batch(first[:, None].tolist(), tables, SCRATCH_BLOCK, model.device)
    logits = model.prefill(start, kv)  # [S, V]
    for pos in range(1, n):
        probs = torch.softmax(logits.float().cpu()[:, : cfg.vocab_size] / calib.temperature, -1)
        ids[:, pos] = torch.multinomial(probs, 1, generator=g)[:, 0]
        if progress is not None:
            progress()
        if pos == n - 1:
            break
        batch = ForwardBatch(
            input_ids=ids[:, pos].to(model.device),
            positions=torch.full((s,), pos, dtype=torch.long, device=model.device),
            slot_mapping=torch.tensor(
                [slots_for(t, pos, pos + 1, SCRATCH_BLOCK)[0] for t in tables],
                device=model.device,
            ),
            block_tables=block_tables,
            context_lens=torch.full((s,), pos + 1, dtype=torch.int32, device=model.device),
        )
        logits, _ = model.decode(batch, kv, exits)
    return ids


@torch.inference_mode()
def activation_importance(
    model: LlamaModel, calib: Calibration = RANDOM_TOKENS, ids: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """{"layers.N.<proj>": float32 [K] on CPU}: mean squared input of every projection of every
    layer, from one full-backbone prefill into a scratch KV cache of `ids` (int64 [S, L]), by
    default calib's tokens: its random ids, or `model`'s own samples (own_samples)."""
    cfg = model.cfg
    seq_len = min(calib.seq_len, model.cos.shape[0])  # never past the RoPE table
    if ids is None:
        ids = (
            own_samples(model, calib)
            if calib.source == "self-samples"
            else random_tokens(cfg.vocab_size, cfg.bos_token_id, calib)
        )
    # [K]: float32 accumulation even for bf16 activations
    return _input_means(model, ids[:, :seq_len], lambda x: x.float().square().sum(0))


def _input_means(model: LlamaModel, ids: torch.Tensor, stat) -> dict[str, torch.Tensor]:
    """{"layers.N.<proj>": mean over the tokens of stat(x) on CPU}: one full-backbone prefill
    of `ids` into a scratch cache, stat(x [T, K]) summed over every projection's input (it
    returns the sum over T); the projections that read one input share its tensor."""
    kv, tables = scratch_cache(model, ids.shape[0], ids.shape[1])
    batch = prefill_forward_batch(ids.tolist(), tables, SCRATCH_BLOCK, model.device)
    sums: dict[tuple[int, str], torch.Tensor] = {}

    def observe(layer, name, x):
        part = stat(x)
        key = (layer, name)
        sums[key] = sums[key] + part if key in sums else part

    model.prefill(batch, kv, observe=observe)
    count = float(ids.numel())
    out = {}
    for (layer, name), total in sums.items():
        mean = (total / count).cpu()
        for proj in _READERS[name]:
            out[f"layers.{layer}.{proj}"] = mean
    return out


@torch.inference_mode()
def activation_hessians(model: LlamaModel, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"layers.N.<proj>": float32 [K, K] on CPU}: the second moment E[x x^T] of every
    projection's input over one full-backbone prefill of `ids` (int64 [S, L]); the projections
    that read one input share its tensor. GPTQ's Hessian (river.gptq), up to a constant.

    Memory: one [K, K] per layer and input, ~0.4 GB for SmolLM2-135M in float32 but ~33 GB at
    Llama-3.1-8B's shapes; measuring a model that size needs a layer at a time (not done)."""
    seq_len = min(ids.shape[1], model.cos.shape[0])

    def xtx(x):  # [K, K], kept on the CPU: the device holds one layer's at a time
        x = x.float()
        return (x.T @ x).cpu()

    return _input_means(model, ids[:, :seq_len], xtx)
