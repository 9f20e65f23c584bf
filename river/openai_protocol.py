"""What clients send to `river serve`: OpenAI request parsing, and the errors they get back.

Pure functions over plain dicts, so they are testable without a server and never touch the
engine (river.openai_responses shapes the answers). Request bodies are checked by hand rather
than by pydantic models: the checks are few, every refusal names the offending parameter the way
the OpenAI API does, and a string where a number belongs is an error instead of being coerced.

river's own settings are extra body fields (the openai client sends them with `extra_body`):
`top_k`, `ignore_eos` and `exit`, an object `{"mode", "threshold", "min_layer", "policy"}` (or
just the mode as a string). Fields of `exit` left out come from the server's default exit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

# river.exits and river.sampling import torch; they are imported where used, so that building
# the `river` command line (which imports river.server, and so this module) stays fast.
if TYPE_CHECKING:
    from river.exits import ExitConfig
    from river.sampling import SamplingParams

# OpenAI's default for /v1/completions; chat completions default to the rest of the context.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# The message roles OpenAI's chat API accepts (river takes no tools, but a template may still
# render a tool result the client sends)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error the client sees as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


@dataclass(frozen=True)
class ParsedRequest:
    """One checked request. Exactly one of prompt (completions) and messages (chat) is set;
    a completions prompt is text (encoded with BOS, like Engine.generate) or token ids."""

    kind: str  # "completion" or "chat"
    model: str | None
    prompt: str | list[int] | None
    messages: list[dict] | None
    params: SamplingParams
    max_tokens_given: bool  # False: chat without max_tokens, fill in the rest of the context
    stream: bool
    include_usage: bool


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _get_int(body, name, default, minimum, maximum=None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or v < minimum or (maximum is not None and v > maximum):
        where = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise bad(f"'{name}' must be an integer {where}, got {v!r}", name)
    return v


def _get_number(body, name, default, low, high, low_open=False):
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v) or v < low or (low_open and v == low) or v > high:
        lo = "(" if low_open else "["
        where = f"in {lo}{low}, {high}]" if high < math.inf else f">= {low}"
        raise bad(f"'{name}' must be a finite number {where}, got {v!r}", name)
    return float(v)


def _get_bool(body, name, default=False):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {v!r}", name)
    return v


def parse_exit(value, default: ExitConfig) -> ExitConfig:
    """The `exit` extra field: a mode string, or an object whose missing fields come from the
    server default. Raises APIError(400, param="exit") for anything ExitConfig refuses."""
    from river.exits import MODES, POLICIES, SIGNALS, ExitConfig

    if value is None:
        return default
    if isinstance(value, str):
        value = {"mode": value}
    if not isinstance(value, dict):
        raise bad(f"'exit' must be an object or a mode string, got {value!r}", "exit")
    fields = ("mode", "threshold", "min_layer", "policy", "draft", "draft_len", "signal")
    unknown = set(value) - set(fields)
    if unknown:
        raise bad(
            f"'exit' has unknown fields {sorted(unknown)}; it takes {', '.join(fields)}", "exit"
        )
    mode = value.get("mode", default.mode)
    if mode not in MODES:
        raise bad(f"unknown exit mode {mode!r}; modes are {', '.join(MODES)}", "exit.mode")
    policy = value.get("policy", default.policy)
    if policy not in POLICIES:
        raise bad(f"unknown exit policy {policy!r}; policies are {', '.join(POLICIES)}", "exit")
    threshold = value.get("threshold", default.threshold)
    if not _is_number(threshold):
        raise bad(f"'exit.threshold' must be a number, got {threshold!r}", "exit.threshold")
    min_layer = value.get("min_layer", default.min_layer)
    if not _is_int(min_layer):
        raise bad(f"'exit.min_layer' must be an integer, got {min_layer!r}", "exit.min_layer")
    draft = value.get("draft", default.draft)
    draft_len = value.get("draft_len", default.draft_len)
    if draft_len is not None and not _is_int(draft_len):
        raise bad(f"'exit.draft_len' must be an integer, got {draft_len!r}", "exit.draft_len")
    signal = value.get("signal", default.signal)
    if signal not in SIGNALS:
        raise bad(f"unknown exit signal {signal!r}; signals are {', '.join(SIGNALS)}", "exit")
    try:
        return ExitConfig(
            mode, float(threshold), min_layer, policy, draft, draft_len, signal=signal
        )
    except ValueError as e:  # ExitConfig's own range checks
        raise bad(str(e), "exit") from e


# Parameters river does not implement. Refused when set to anything but their neutral value,
# because silently ignoring them would return output the client did not ask for.
def _refuse_unsupported(body: dict, kind: str) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise bad(
            f"'n' must be 1 (river returns one choice per request; send {n!r} requests instead)",
            "n",
            "unsupported_parameter",
        )
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise bad("'best_of' must be 1", "best_of", "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v is not None and v != 0:
            raise bad(f"'{name}' is not supported (must be 0)", name, "unsupported_parameter")
    if body.get("logit_bias"):
        raise bad("'logit_bias' is not supported", "logit_bias", "unsupported_parameter")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad("'logprobs' is not supported", "logprobs", "unsupported_parameter")
    if kind == "completion":
        if body.get("echo"):
            raise bad("'echo' is not supported", "echo", "unsupported_parameter")
        if body.get("suffix"):
            raise bad("'suffix' is not supported", "suffix", "unsupported_parameter")
    else:
        for name in ("tools", "functions"):
            if body.get(name):
                raise bad(
                    f"'{name}' (tool calling) is not supported", name, "unsupported_parameter"
                )
        fmt = body.get("response_format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type", "text") != "text"):
            raise bad(
                "only response_format {'type': 'text'} is supported",
                "response_format",
                "unsupported_parameter",
            )


def _parse_prompt(body: dict):
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if not p:
            raise bad("'prompt' is empty", "prompt")
        return p
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        return list(p)
    if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        raise bad(
            "river takes one prompt per request; send the prompts as concurrent requests",
            "prompt",
            "unsupported_parameter",
        )
    raise bad("'prompt' must be a non-empty string or a list of token ids", "prompt")


def _parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list of {'role', 'content'} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        param = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"{param} must be an object with a string 'role'", param)
        if m["role"] not in CHAT_ROLES:
            raise bad(
                f"{param}.role must be one of {', '.join(CHAT_ROLES)}, got {m['role']!r}",
                f"{param}.role",
            )
        content = m.get("content")
        if content is None and m["role"] != "assistant":  # OpenAI: only assistant may omit it
            raise bad(f"{param} needs a 'content' (a {m['role']} message)", f"{param}.content")
        if isinstance(content, list):
            # Content parts: river reads text only, joined the way a template would show them.
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise bad(
                        f"{param}.content: only text parts are supported, got {kind!r}",
                        f"{param}.content",
                    )
                if not isinstance(part.get("text"), str):
                    raise bad(f"{param}.content: a text part needs a string 'text'", param)
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise bad(f"{param}.content must be a string or a list of text parts", param)
        out.append({**m, "content": content if content is not None else ""})
    return out


def parse_request(body: Any, kind: str, default_exit: ExitConfig) -> ParsedRequest:
    """Check a /v1/completions (kind "completion") or /v1/chat/completions ("chat") body."""
    from river.sampling import MAX_SEED, MAX_TOP_K, SamplingParams

    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model")
    _refuse_unsupported(body, kind)
    prompt = _parse_prompt(body) if kind == "completion" else None
    messages = _parse_messages(body) if kind == "chat" else None

    max_name = "max_tokens"
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_name = "max_completion_tokens"  # the newer name of the same setting
    max_tokens = _get_int(body, max_name, None, 1)
    given = max_tokens is not None
    if not given:
        # Chat: a placeholder that the server replaces by the rest of the context window.
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if kind == "completion" else 1
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise bad("'stop' must be a non-empty string or a list of them", "stop")
    stream = _get_bool(body, "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise bad("'stream_options' is only allowed with stream=true", "stream_options")
        if not isinstance(opts, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        include_usage = _get_bool(opts, "include_usage")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_get_number(body, "temperature", 1.0, 0.0, math.inf),
        top_k=_get_int(body, "top_k", 0, 0, MAX_TOP_K),
        top_p=_get_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=_get_int(body, "seed", None, 0, MAX_SEED),
        stop=stop,
        ignore_eos=_get_bool(body, "ignore_eos"),
        exit=parse_exit(body.get("exit"), default_exit),
    )
    return ParsedRequest(kind, model, prompt, messages, params, given, stream, include_usage)


def with_max_tokens(parsed: ParsedRequest, max_tokens: int) -> ParsedRequest:
    return replace(parsed, params=replace(parsed.params, max_tokens=max_tokens))
