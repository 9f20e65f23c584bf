"""The shapes of `river serve`'s answers: OpenAI completion and chat completion objects, the
chunks of a streamed answer, usage, river's own `river` field, and server-sent event framing.

Pure functions over plain values, so they are testable without a server and never touch the
engine.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING

# river.exits imports torch: the type is only named here, so the `river` command line (which
# imports river.server) stays fast.
if TYPE_CHECKING:
    from river.exits import ExitConfig


def new_id(kind: str) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def river_info(backbone_layers: list[int], num_layers: int, exit: ExitConfig) -> dict:
    """river's extra response field: how deep the generated tokens ran in the backbone."""
    mean = sum(backbone_layers) / len(backbone_layers) if backbone_layers else 0.0
    drafts = {"draft": exit.draft, "draft_len": exit.draft_len} if exit.mode == "lossless" else {}
    return {
        "mean_backbone_layers": round(mean, 4),
        "num_layers": num_layers,
        "exit": {
            "mode": exit.mode,
            "threshold": exit.threshold,
            "min_layer": exit.min_layer,
            "policy": exit.policy,
            **drafts,
        },
    }


def response(kind, rid, created, model, text, finish_reason, use: dict, extra: dict) -> dict:
    """A whole (non-streamed) completion or chat completion."""
    if kind == "completion":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    else:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        obj = "chat.completion"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": use,
        "river": extra,
    }


def chunk(kind, rid, created, model, text, finish_reason=None, role=False, use=False) -> dict:
    """One streamed chunk. `use=False` leaves the usage key out (stream_options not asked);
    with include_usage every chunk carries "usage": null until the last one."""
    if kind == "completion":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    else:
        delta = {}
        if role:
            delta["role"] = "assistant"
        if text or role:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    if use is not False:
        out["usage"] = use
    return out


def usage_chunk(kind, rid, created, model, use: dict, extra: dict) -> dict:
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "usage": use,
        "river": extra,
    }


def sse(obj) -> bytes:
    """One server-sent event; `[DONE]` ends the stream."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
