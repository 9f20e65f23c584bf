"""Forced exits for decode benchmarks on random weights (whose cosine similarities mean
nothing): exit configurations that leave after exactly k backbone layers, and per-row depths
drawn from an exit histogram recorded on a real model. Benchmark-only: not part of the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from river.exits import ExitConfig, ExitParams


def forced_exit_config(mode: str, layers: int) -> ExitConfig:
    """An ExitConfig that leaves the backbone after exactly `layers` backbone layers whatever the
    hidden states (threshold -1 passes every check), for benchmarks on random weights.
    layers >= num_layers never exits; 0 is only possible as the river ("w4")."""
    if mode in ("full", "w4"):
        return ExitConfig(mode)
    if layers <= 0:
        if mode == "river":
            return ExitConfig("w4")
        raise ValueError(f"mode {mode!r} runs at least one backbone layer per token")
    return ExitConfig(mode, threshold=-1.0, min_layer=layers)


def forced_exit_configs(mode: str, batch: int, layers: int) -> list[ExitConfig]:
    return [forced_exit_config(mode, layers)] * batch


@dataclass(frozen=True)
class ExitHistogram:
    """counts[k] = decode tokens that ran k backbone layers, k = 0..num_layers
    (Engine.exit_histogram())."""

    counts: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "counts", tuple(float(c) for c in self.counts))
        if len(self.counts) < 2 or any(c < 0 for c in self.counts) or sum(self.counts) <= 0:
            raise ValueError("an exit histogram needs >= 2 non-negative counts, not all zero")

    @classmethod
    def from_json(cls, obj) -> ExitHistogram:
        """A list of counts, or a dict with it under "counts" or "exit_histogram"."""
        if isinstance(obj, dict):
            obj = obj.get("counts", obj.get("exit_histogram"))
        if not isinstance(obj, list):
            raise ValueError("exit histogram JSON: expected a list of counts")
        return cls(tuple(obj))

    @property
    def num_layers(self) -> int:
        return len(self.counts) - 1

    @property
    def probs(self) -> np.ndarray:
        c = np.asarray(self.counts, dtype=np.float64)
        return c / c.sum()

    def mean_layers(self) -> float:
        return float((self.probs * np.arange(len(self.counts))).sum())

    def rescaled(self, num_layers: int) -> ExitHistogram:
        """The same exit depths as fractions of a model with num_layers layers: k maps to
        k * num_layers / self.num_layers, split linearly between the two nearest integers, so
        the mean backbone fraction is preserved exactly."""
        if num_layers == self.num_layers:
            return self
        out = np.zeros(num_layers + 1)
        for k, c in enumerate(self.counts):
            x = k * num_layers / self.num_layers
            lo = int(math.floor(x))
            frac = x - lo
            out[lo] += c * (1.0 - frac)
            if frac > 0:
                out[lo + 1] += c * frac
        return ExitHistogram(tuple(out.tolist()))

    def sample(self, rng: np.random.Generator, size) -> np.ndarray:
        """Exit layer counts (int32) drawn i.i.d. from the histogram."""
        return rng.choice(len(self.counts), size=size, p=self.probs).astype(np.int32)


class ForcedExitSampler:
    """Per-row exit depths drawn from a histogram each step, on the host, written into the exit
    tensors of the rows (which must have threshold -1: see forced_exit_config): k backbone
    layers is min_layer = k, and k = 0 is start_exited. The host RNG keeps the device free of
    syncs; on CUDA each draw goes through a ring of pinned buffers, and a slot is rewritten only
    once the copy that last read it has run (a wait that only happens when the host runs `ring`
    steps ahead of the GPU)."""

    def __init__(
        self, hist: ExitHistogram, num_layers: int, rows: int, device, seed: int = 0, ring: int = 16
    ):
        self.hist = hist.rescaled(num_layers)
        self.rows = rows
        self.device = torch.device(device)
        self._rng = np.random.default_rng(seed)
        self._cuda = self.device.type == "cuda"
        slots = ring if self._cuda else 1
        self._min_layer = torch.zeros(slots, rows, dtype=torch.int32, pin_memory=self._cuda)
        self._start = torch.zeros(slots, rows, dtype=torch.bool, pin_memory=self._cuda)
        self._events = [torch.cuda.Event() for _ in range(slots)] if self._cuda else None
        self._step = 0

    @staticmethod
    def exit_params(configs, device) -> ExitParams:
        """ExitParams.build(configs) for rows whose depths fill() rewrites each step: the
        host-side facts about depths (backbone_until, river_from), true of the configs'
        min_layer but not of the drawn depths, are cleared so that no step skips a layer a
        drawn row needs."""
        return replace(ExitParams.build(configs, device), backbone_until=None, river_from=None)

    def fill(self, min_layer: torch.Tensor, start_exited: torch.Tensor) -> np.ndarray:
        """Draw len(min_layer) depths, copy them in; returns the draws (host int32)."""
        n = min_layer.shape[0]
        if n > self.rows:
            raise ValueError(f"sampler built for {self.rows} rows, asked for {n}")
        k = self.hist.sample(self._rng, n)
        slot = self._step % self._min_layer.shape[0]
        self._step += 1
        if self._cuda:
            self._events[slot].synchronize()
        self._min_layer[slot, :n].numpy()[:] = k
        self._start[slot, :n].numpy()[:] = k == 0
        min_layer.copy_(self._min_layer[slot, :n], non_blocking=True)
        start_exited.copy_(self._start[slot, :n], non_blocking=True)
        if self._cuda:
            self._events[slot].record()
        return k
