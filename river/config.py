"""Model and engine configuration (frozen dataclasses, checked on construction)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from river.errors import ConfigError, ModelLoadError, UnsupportedModelError

# Architectures whose checkpoints are plain Llama (same tensor names, same forward).
_LLAMA_ARCHS = {"LlamaForCausalLM"}
_LLAMA_TYPES = {"llama"}

# The seven projections of a decoder layer, as checkpoints and river's twins name them
# (weights["layers"][n][name]; twins "layers.{n}.{name}").
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# The weights the forward fuses (LlamaModel.LayerWeights' fields) -> the projections in each,
# in row order; fused projections read the same input and share one twin format.
FUSED = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"config: num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"config: head_dim must be even for RoPE, got {self.head_dim}")

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face config.json dict; refuses non-Llama architectures."""
        archs = cfg.get("architectures") or []
        mtype = cfg.get("model_type")
        if mtype not in _LLAMA_TYPES or (archs and not set(archs) & _LLAMA_ARCHS):
            raise UnsupportedModelError(
                f"{where}: river runs Llama-family models (model_type 'llama', "
                f"LlamaForCausalLM); got model_type={mtype!r}, architectures={archs}"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise UnsupportedModelError(f"{where}: {flag}=true is not supported")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            # transformers >= 5 writes rope settings as one `rope_parameters` dict; older
            # checkpoints have `rope_theta` and `rope_scaling` at top level.
            rp = cfg.get("rope_parameters") or {}
            rope_theta = cfg.get("rope_theta", rp.get("rope_theta", 10000.0))
            rs = cfg.get("rope_scaling") or rp
            scaling = None
            if rs:
                rtype = rs.get("rope_type", rs.get("type"))
                if rtype == "llama3":
                    scaling = RopeScaling(
                        factor=float(rs["factor"]),
                        low_freq_factor=float(rs["low_freq_factor"]),
                        high_freq_factor=float(rs["high_freq_factor"]),
                        original_max_position_embeddings=int(
                            rs["original_max_position_embeddings"]
                        ),
                    )
                elif rtype not in (None, "default"):
                    raise UnsupportedModelError(
                        f"{where}: rope_scaling type {rtype!r} is not supported "
                        "(supported: none, 'llama3')"
                    )
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope_theta),
                rope_scaling=scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{where}: missing or malformed field: {e!r}") from e


def rope_tables(cfg: ModelConfig, max_positions: int, device=None):
    """cos, sin [max_positions, head_dim // 2] float32, with llama3 frequency scaling if set."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = cfg.rope_scaling
    if rs is not None:
        # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, and the band
        # between is interpolated smoothly.
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / rs.factor + smooth * inv_freq, scaled)
    # float32 like HF so parity holds in fp32: angle = position * inv_freq in float32.
    t = torch.arange(max_positions, dtype=torch.float32)
    angles = torch.outer(t, inv_freq.float())
    return angles.cos().to(device), angles.sin().to(device)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine lays out memory and batches work."""

    device: str | None = None  # None: cuda if available, else cpu
    # None: bfloat16 on CUDA and on CPUs with native bf16 (river.cpu), else float32
    dtype: torch.dtype | None = None
    block_size: int = 16  # tokens per KV block (power of two)
    num_blocks: int | None = None  # None: sized from kv_cache_tokens
    kv_cache_tokens: int = 65536
    max_num_seqs: int = 64  # rows in one decode batch
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_prefill_tokens: int = 8192  # tokens in one prefill batch
    river_group_size: int = 64
    river_method: str = "hqq"
    # How the quantizer weighs each input channel's error (river.calibrate). Default
    # "self-samples": by its mean squared activation on text the model writes itself (16 x 256
    # tokens, once per model; no outside text); "random-tokens" the same on random token ids;
    # "none" plain weight MSE; "text": GPTQ with the inputs' full second moment on text that
    # ships with Python (river.calibrate.bundled_text: its docs and stdlib), better on code and
    # Python's docs, not on general prose (README "The river twins").
    river_calibration: str = "self-samples"
    # Twin precision (river.precision): "w4", "w6", "w8", "mix:B" (8-bit where it buys the most
    # quality per byte, 4-bit elsewhere, the twins reading B x bf16's bytes) or "mix6:B" (the
    # same from a 6-bit base).
    # Default "mix6:0.43": with the default river (one bf16 layer, then twins) a decode token
    # reads 0.448x of full's weight bytes at Llama-3.1-8B shapes, and agrees with full on 1.6
    # (HumanEval) and 2.1 (prose) points more tokens than "mix:0.43" at the same bytes
    # (README "Twin precision"). On the CPU "mix:0.43" decodes ~7-16% faster.
    river_precision: str = "mix6:0.43"
    # CPU only: torch intra-op threads. None: $RIVER_NUM_THREADS, else $OMP_NUM_THREADS, else
    # the cores idle at start-up (river.cpu explains why never more).
    num_threads: int | None = None
    # The op set (river.ops): None = "triton" on CUDA, "cpu" (the fast path) on CPU;
    # "reference" = the plain-PyTorch oracle ops (with dtype=torch.float32: the exact path).
    ops: str | None = None
    # Ranks the model is sharded across (river.parallel): one process per device, rank 0 the
    # engine's; 1 = no tensor parallelism.
    tensor_parallel_size: int = 1
    # CPU only: run each decode step through torch.compile (river.graphs.CompiledStep), the
    # CPU's counterpart of CUDA graphs: one fused graph instead of ~40 small ops per layer.
    # Each new (batch bucket, exit-mode mix) compiles once, tens of seconds on a small CPU;
    # batches whose exits are decided per token (a cosine rule) stay eager.
    torch_compile: bool = False

    def __post_init__(self):
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ConfigError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.river_method not in ("rtn", "hqq"):  # river.quantize.METHODS
            raise ConfigError(f"river_method must be 'rtn' or 'hqq', got {self.river_method!r}")
        if self.river_calibration not in ("self-samples", "random-tokens", "text", "none"):
            raise ConfigError(
                f"river_calibration must be 'self-samples', 'random-tokens', 'text' or 'none', "
                f"got {self.river_calibration!r}"
            )
        from river.precision import TwinPrecision

        TwinPrecision.parse(self.river_precision)  # a clear ConfigError now, not at first use
        if self.num_threads is not None and (
            not isinstance(self.num_threads, int) or self.num_threads <= 0
        ):
            raise ConfigError(f"num_threads must be a positive integer, got {self.num_threads!r}")
        for name in (
            "max_num_seqs",
            "kv_cache_tokens",
            "max_prefill_tokens",
            "river_group_size",
            "tensor_parallel_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and (
            not isinstance(self.max_model_len, int) or self.max_model_len <= 1
        ):
            raise ConfigError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if self.torch_compile and self.tensor_parallel_size > 1:
            raise ConfigError("torch_compile is not supported with tensor parallelism")
        if self.torch_compile and self.ops not in (None, "cpu"):
            raise ConfigError(f"torch_compile runs the 'cpu' op set, not ops={self.ops!r}")
        if self.ops not in (None, "reference", "cpu", "triton"):
            raise ConfigError(f"ops must be 'reference', 'cpu' or 'triton', got {self.ops!r}")
        if self.dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(
                f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {self.dtype!r}"
            )
        if self.device is not None:
            try:
                dev = torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}") from e
            if dev.type not in ("cpu", "cuda"):
                raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
