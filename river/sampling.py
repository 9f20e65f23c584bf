"""Per-request generation settings and outputs (vLLM-style names)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from river.errors import InvalidRequestError
from river.exits import FULL, ExitConfig

# What SamplingParams() means when neither the caller nor the model's generation_config.json
# says otherwise (vLLM's and transformers' conventions: plain sampling at temperature 1).
DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
# Seeds and top_k travel to the sampler as int64 and int32 tensors
MAX_SEED, MAX_TOP_K = 2**63 - 1, 2**31 - 1


@dataclass(frozen=True)
class SamplingParams:
    """max_tokens: tokens to generate; temperature 0 is greedy; top_k 0 and top_p 1.0 are off;
    seed makes sampling reproducible per request; stop: strings that end generation (not
    included in the text); ignore_eos keeps generating past EOS; exit: how decode tokens leave
    the backbone (ExitConfig).

    temperature, top_k and top_p left at None take the model's defaults: the values in its
    generation_config.json when present, else DEFAULTS (temperature 1.0, top_k 0, top_p 1.0).
    The engine fills them in when a request is queued (Engine.default_sampling_params() shows
    them); pass temperature=0 for greedy output.
    """

    max_tokens: int = 16
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | list[str] | str | None = None
    ignore_eos: bool = False
    exit: ExitConfig = field(default=FULL)

    def __post_init__(self):
        def bad(msg):
            raise InvalidRequestError(f"SamplingParams: {msg}")

        def number(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool):
            bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.max_tokens <= 0:
            bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        t = self.temperature
        if t is not None and (not number(t) or not (0.0 <= t < float("inf"))):
            bad(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        k = self.top_k
        if k is not None and (
            not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_TOP_K
        ):
            bad(f"top_k must be an integer in [0, 2**31 - 1] (0 disables it), got {k!r}")
        p = self.top_p
        if p is not None and (not number(p) or not (0.0 < p <= 1.0)):
            bad(f"top_p must be in (0, 1] (1 disables it), got {p!r}")
        if self.seed is not None and (
            not isinstance(self.seed, int)
            or isinstance(self.seed, bool)
            or not 0 <= self.seed <= MAX_SEED
        ):
            bad(f"seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            bad(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if not isinstance(self.exit, ExitConfig):
            bad(f"exit must be an ExitConfig, got {type(self.exit).__name__}")
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif not isinstance(stop, (list, tuple)):
            bad(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        stop = tuple(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            bad(f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)

    def with_defaults(self, defaults: dict) -> SamplingParams:
        """A copy whose unset (None) temperature/top_k/top_p come from `defaults`, then
        DEFAULTS."""
        fill = {
            name: defaults.get(name, DEFAULTS[name])
            for name in DEFAULTS
            if getattr(self, name) is None
        }
        return replace(self, **fill) if fill else self


@dataclass
class RequestOutput:
    """The result of one prompt. backbone_layers[i] is how many bf16 backbone layers produced
    generated token i (the first token comes from the full-backbone prefill)."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    # "stop" (EOS or stop string), "length", "abort" (Engine.abort), "error" (an engine step
    # that carried it failed), or None while running
    finish_reason: str | None
    backbone_layers: list[int]
    num_layers: int
    elapsed_s: float = 0.0  # queued -> finished (excludes model load and the twin build)
    first_token_s: float = 0.0  # queued -> first token (the prefill, and any wait before it)
    # lossless mode: drafts proposed, drafts the backbone kept, verify passes run, and the bf16
    # backbone layers all the draft passes ran (the rest of their layers ran the 4-bit twins)
    draft_tokens: int = 0
    accepted_tokens: int = 0
    verify_passes: int = 0
    draft_backbone_layers: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first per second of decoding (0 for a one-token output)."""
        decode_s = self.elapsed_s - self.first_token_s
        return (len(self.token_ids) - 1) / decode_s if decode_s > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Lossless: the fraction of drafted tokens the backbone kept (0 without drafts)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_verify(self) -> float:
        """Lossless: tokens emitted per backbone verify pass (accepted drafts + 1 each)."""
        n = self.verify_passes
        return (self.accepted_tokens + n) / n if n else 0.0

    @property
    def mean_backbone_layers(self) -> float:
        return sum(self.backbone_layers) / max(len(self.backbone_layers), 1)
