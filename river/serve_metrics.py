"""The numbers behind `river serve`'s /metrics: the engine thread's running totals, the frozen
snapshot it publishes for the HTTP side, and that snapshot as Prometheus text.

Only the engine thread touches a StatsRecorder; the HTTP side reads nothing but the LoopStats
it publishes, which is immutable, so the two never share mutable state.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

TPS_WINDOW_S = 10.0  # decode tok/s is measured over this trailing window
_HIST_EVERY_S = 0.2  # the exit histogram is a device read: refresh it at most this often


@dataclass(frozen=True)
class LoopStats:
    """A snapshot the engine thread publishes after every step; /metrics renders it."""

    finished: tuple[tuple[str, int], ...] = ()  # (finish_reason, count): stop, length, abort, error
    rejected: int = 0  # requests the engine refused when they were added
    prompt_tokens: int = 0
    generation_tokens: int = 0
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sum over decode steps of the rows in the step
    decode_rows_max: int = 0  # the largest decode batch so far
    decode_tokens_per_s: float = 0.0
    exit_histogram: tuple[int, ...] = ()  # [k] = decode tokens that ran k backbone layers


class StatsRecorder:
    """The engine thread's counters. It bumps `finished`, `rejected` and `prompt_tokens` itself,
    reports each step through `step`, and takes a LoopStats with `snapshot`."""

    def __init__(self):
        self.finished = collections.Counter({"stop": 0, "length": 0, "abort": 0, "error": 0})
        self.rejected = self.prompt_tokens = 0
        self._generated = 0
        self._decode_steps = self._decode_rows = self._decode_rows_max = 0
        self._window: collections.deque = collections.deque()  # (t_start, t_end, decode rows)
        self._hist: tuple[int, ...] = ()
        self._hist_at = 0.0

    def step(self, t0: float, t1: float, tokens: int, decode_rows: int) -> None:
        """An engine step from t0 to t1 gave `tokens` tokens, `decode_rows` of them by decode."""
        self._generated += tokens
        if decode_rows:
            self._decode_steps += 1
            self._decode_rows += decode_rows
            self._decode_rows_max = max(self._decode_rows_max, decode_rows)
            self._window.append((t0, t1, decode_rows))

    def snapshot(self, engine, t: float, hist: bool = False) -> LoopStats:
        """The totals at time t, with the engine's queues and pool; `hist` forces a fresh read
        of the exit histogram (otherwise it is reused for up to _HIST_EVERY_S)."""
        if hist or t - self._hist_at >= _HIST_EVERY_S:
            self._hist = tuple(engine.exit_histogram())
            self._hist_at = t
        while self._window and self._window[0][1] < t - TPS_WINDOW_S:
            self._window.popleft()
        tps = 0.0
        if self._window:
            span = max(t - self._window[0][0], 1e-9)
            tps = sum(rows for _, _, rows in self._window) / span
        sched, alloc = engine.scheduler, engine.allocator
        return LoopStats(
            finished=tuple(self.finished.items()),
            rejected=self.rejected,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self._generated,
            running=len(sched.running),
            waiting=len(sched.waiting),
            kv_blocks_used=alloc.num_blocks - alloc.num_free,
            kv_blocks_total=alloc.num_blocks,
            decode_steps=self._decode_steps,
            decode_rows=self._decode_rows,
            decode_rows_max=self._decode_rows_max,
            decode_tokens_per_s=tps,
            exit_histogram=self._hist,
        )


# Unlabelled families, in the order /metrics lists them: LoopStats field -> (name, type).
_PLAIN_FAMILIES = {
    "rejected": ("river_requests_rejected_total", "counter"),
    "prompt_tokens": ("river_prompt_tokens_total", "counter"),
    "generation_tokens": ("river_generation_tokens_total", "counter"),
    "running": ("river_requests_running", "gauge"),
    "waiting": ("river_requests_waiting", "gauge"),
    "kv_blocks_used": ("river_kv_blocks_used", "gauge"),
    "kv_blocks_total": ("river_kv_blocks_total", "gauge"),
    "decode_steps": ("river_decode_steps_total", "counter"),
    "decode_rows": ("river_decode_rows_total", "counter"),
    "decode_rows_max": ("river_decode_batch_rows_max", "gauge"),
}
# Their HELP texts, by the same field (kept apart so every entry fits on one line).
_PLAIN_HELP = {
    "rejected": "Requests refused when added.",
    "prompt_tokens": "Prompt tokens admitted.",
    "generation_tokens": "Tokens generated (prefill and decode).",
    "running": "Requests in the running batch.",
    "waiting": "Requests queued for admission.",
    "kv_blocks_used": "KV cache blocks in use.",
    "kv_blocks_total": "KV cache blocks in the pool.",
    "decode_steps": "Decode steps run.",
    "decode_rows": "Rows over all decode steps (divided by the steps: the mean decode batch).",
    "decode_rows_max": "The largest decode batch so far (rows in one step).",
}


def render_metrics(s: LoopStats, window_s: float = TPS_WINDOW_S) -> str:
    """Prometheus text exposition (format 0.0.4)."""
    lines: list[str] = []

    def family(name, kind, help_text, samples):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            lab = "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""
            lines.append(f"{name}{suffix}{lab} {value}")

    family(
        "river_requests_total",
        "counter",
        "Requests finished, by finish reason (abort: the client went away).",
        [("", [("finish_reason", r)], n) for r, n in s.finished],
    )
    for attr, (name, kind) in _PLAIN_FAMILIES.items():
        family(name, kind, _PLAIN_HELP[attr], [("", [], getattr(s, attr))])
    family(
        "river_decode_tokens_per_second",
        "gauge",
        f"Decode tokens per second over the last {window_s:g} s.",
        [("", [], f"{s.decode_tokens_per_s:.3f}")],
    )
    buckets, cum = [], 0
    for k, n in enumerate(s.exit_histogram):
        cum += n
        buckets.append(("_bucket", [("le", str(k))], cum))
    buckets.append(("_bucket", [("le", "+Inf")], cum))
    total = sum(k * n for k, n in enumerate(s.exit_histogram))
    family(
        "river_exit_backbone_layers",
        "histogram",
        "Decode tokens by the number of bf16 backbone layers they ran.",
        buckets + [("_sum", [], total), ("_count", [], cum)],
    )
    return "\n".join(lines) + "\n"
