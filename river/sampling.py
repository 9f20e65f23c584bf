"""Per-request generation settings and outputs (vLLM-style names)."""

from __future__ import annotations

from dataclasses import dataclass, field

from river.errors import InvalidRequestError
from river.exits import FULL, ExitConfig


@dataclass(frozen=True)
class SamplingParams:
    """max_tokens: tokens to generate; temperature 0 is greedy; top_k 0 and top_p 1.0 are off;
    seed makes sampling reproducible per request; stop: strings that end generation (not
    included in the text); ignore_eos keeps generating past EOS; exit: how decode tokens leave
    the backbone (ExitConfig)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] | list[str] | str | None = None
    ignore_eos: bool = False
    exit: ExitConfig = field(default=FULL)

    def __post_init__(self):
        def bad(msg):
            raise InvalidRequestError(f"SamplingParams: {msg}")

        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (self.temperature >= 0.0) or self.temperature == float("inf"):
            bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.exit, ExitConfig):
            bad(f"exit must be an ExitConfig, got {type(self.exit).__name__}")
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        stop = tuple(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            bad(f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)


@dataclass
class RequestOutput:
    """The result of one prompt. backbone_layers[i] is how many bf16 backbone layers produced
    generated token i (the first token comes from the full-backbone prefill)."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS or stop string), "length", or None while running
    backbone_layers: list[int]
    num_layers: int
    elapsed_s: float = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def mean_backbone_layers(self) -> float:
        return sum(self.backbone_layers) / max(len(self.backbone_layers), 1)
