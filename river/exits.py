"""Exit configuration and the device-side exit decision of River-LLM and its baselines.

Every decode row carries its request's exit settings as tensors; the per-layer decision is pure
tensor arithmetic, so the decode step never reads a device value on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from river.errors import InvalidRequestError

MODES = ("full", "w4", "river", "propagate", "mask", "lossless")
DRAFTS = ("river", "w4")  # what drafts in lossless mode
POLICIES = ("per_row", "batch_min")
# What the exit rule measures at each layer (the `signal` code of ExitParams): the paper's
# cosine between the layer's input and output, or the layer's relative update
# ||out - in|| / ||out|| (exit when small).
SIGNALS = ("cosine", "update")
SIGNAL_COSINE, SIGNAL_UPDATE = 0, 1

# What an exited row does in the layers it skips (the `after` code of ExitParams).
AFTER_RIVER, AFTER_PROPAGATE, AFTER_MASK = 0, 1, 2


@dataclass(frozen=True)
class ExitConfig:
    """How a request's decode tokens leave the bf16 backbone.

    mode: "full" (backbone only), "w4" (every layer in its 4-bit twin), "river" (backbone until
      cos(layer input, layer output) > threshold at a depth >= min_layer, then the 4-bit river
      twins, writing K/V into the same cache slots), "propagate" (CALM: the exited hidden state
      is frozen and only projected to K/V by the skipped layers' bf16 K/V weights), "mask"
      (D-LLM: skipped layers write nothing and attention ignores the holes), "lossless" (the
      river drafts, the backbone verifies: output exactly `full`'s; river/speculative.py).
    threshold: cosine similarity an exit needs (river, and a lossless river draft).
    min_layer: backbone layers a token runs before it may exit.
    policy: "per_row" (each sequence exits on its own) or "batch_min" (the paper: a layer exits
      only when every batch_min row still in the backbone passes).
    signal: "cosine" (the paper: exit when cos(in, out) > threshold) or "update" (exit when the
      layer's relative update ||out - in|| / ||out|| < threshold, a threshold in [0, 2]).
    draft: lossless only: "w4" (every layer in its twin, default) or "river" (the exit above)
      drafts.
    draft_len: lossless only: tokens drafted per verify pass; None adapts it per request
      (grow while every draft is accepted, shrink after a rejection) within [1, max_draft_len].
    draft_head: lossless only: "w4" (drafts take their logits from a 4-bit twin of the LM head,
      so a draft reads no bf16 weight past its exit) or "bf16" (the backbone's head).
    """

    mode: str = "full"
    # River defaults: a static split after one bf16 layer (threshold -1: every token exits at
    # min_layer). Measured on the tuning text (benchmarks/results/quality-tune-cpu.json), the
    # cosine rule never beat the static split at equal weight bytes, and with the mixed-precision
    # twins (EngineConfig.river_precision) a bf16 layer buys less than the same bytes spent on
    # 8-bit twins; see README "Twin precision". The paper's rule: threshold=0.96, min_layer=4.
    threshold: float = -1.0
    min_layer: int = 1
    policy: str = "per_row"
    # w4 drafts measured best: 1.90x ideal at 8B bytes against the river exit's 1.62x, and 1.24x
    # against 0.93x wall-clock at batch 1 on the CPU (benchmarks/results/lossless-cpu*.json)
    draft: str = "w4"
    draft_len: int | None = None
    max_draft_len: int = 8
    draft_head: str = "w4"
    signal: str = "cosine"  # (last: callers pass the fields above positionally)

    def __post_init__(self):
        # InvalidRequestError is also a ValueError: callers catching either keep working.
        if self.mode not in MODES:
            raise InvalidRequestError(f"ExitConfig: mode must be one of {MODES}, got {self.mode!r}")
        if self.policy not in POLICIES:
            raise InvalidRequestError(
                f"ExitConfig: policy must be one of {POLICIES}, got {self.policy!r}"
            )
        if self.signal not in SIGNALS:
            raise InvalidRequestError(
                f"ExitConfig: signal must be one of {SIGNALS}, got {self.signal!r}"
            )
        lo, hi = (-1.0, 1.0) if self.signal == "cosine" else (0.0, 2.0)
        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, (int, float))
            or not lo <= self.threshold <= hi
        ):
            what = "a cosine" if self.signal == "cosine" else "a relative update norm"
            raise InvalidRequestError(
                f"ExitConfig: threshold is {what} in [{lo:g}, {hi:g}], got {self.threshold!r}"
            )
        if isinstance(self.min_layer, bool) or not isinstance(self.min_layer, int):
            raise InvalidRequestError(
                f"ExitConfig: min_layer must be an integer >= 0, got {self.min_layer!r}"
            )
        if self.min_layer < 0:
            raise InvalidRequestError(f"ExitConfig: min_layer must be >= 0, got {self.min_layer}")
        if self.draft_head not in ("w4", "bf16"):
            raise InvalidRequestError(
                f"ExitConfig: draft_head must be 'w4' or 'bf16', got {self.draft_head!r}"
            )
        if self.draft not in DRAFTS:
            raise InvalidRequestError(
                f"ExitConfig: draft must be one of {DRAFTS}, got {self.draft!r}"
            )
        for name, lo in (("draft_len", 0), ("max_draft_len", 1)):
            v = getattr(self, name)
            if v is None and name == "draft_len":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= 64:
                raise InvalidRequestError(
                    f"ExitConfig: {name} must be an integer in [{lo}, 64], got {v!r}"
                )

    def draft_config(self) -> ExitConfig:
        """The exit the drafts of a lossless request run with."""
        return ExitConfig(
            self.draft, self.threshold, self.min_layer, self.policy, signal=self.signal
        )

    def check_depth(self, num_layers: int) -> None:
        """Refuse a min_layer the model cannot honour (it would silently behave like `full`)."""
        exits_midway = self.mode in ("river", "propagate", "mask") or (
            self.mode == "lossless" and self.draft == "river"
        )
        if exits_midway and self.min_layer >= num_layers:
            raise InvalidRequestError(
                f"ExitConfig: min_layer must be in [0, {num_layers - 1}] for this "
                f"{num_layers}-layer model, got {self.min_layer}"
            )


FULL = ExitConfig("full")


@dataclass
class ExitParams:
    """Per-row exit settings of one decode batch, on the device.

    uses_backbone / uses_river are host-side facts about the batch's requests (not device
    values): they let a batch of only `full` (or only `w4`) rows skip the other weight set
    entirely on the CPU path, where masked ops still cost their full compute.
    """

    threshold: torch.Tensor  # float32 [B]; +inf never exits
    min_layer: torch.Tensor  # int32 [B]
    start_exited: torch.Tensor  # bool [B]: w4 rows are in the river from layer 0
    after: torch.Tensor  # int8 [B]: AFTER_* code
    batch_min: torch.Tensor  # bool [B]
    signal: torch.Tensor  # int8 [B]: SIGNAL_* code
    uses_backbone: bool
    uses_river: bool
    uses_kv_mask: bool
    # False when no row can leave the backbone mid-way (only full/w4 rows): the per-layer exit
    # decision is then skipped, which only matters on the CPU where every small op costs.
    may_exit: bool = True
    # Lossless drafts only: the logits come from the model's 4-bit LM head twin.
    draft_head: bool = False
    # Rows on the river path take their logits from the head's twin when the model has one
    # (river.precision); lossless drafts with draft_head="bf16" turn it off.
    river_head: bool = True
    # Host-side: a layer count after which no row is in the backbone (every row is w4 or a
    # static-split river, threshold <= -1), or None. The CPU path then skips the backbone's
    # ops and the exit decision from there on; a captured graph leaves it None.
    backbone_until: int | None = None
    # Host-side: some row exits on the relative update (else only the cosine is computed,
    # which only matters on the CPU); a captured graph computes both.
    uses_update: bool = True
    # Host-side: the first layer at which a row can be on the river path (0 with a w4 row,
    # else the smallest min_layer of a river row, at least 1), or None (no row ever is): the
    # CPU path skips the twins' ops before it. A captured graph leaves it None.
    river_from: int | None = None

    @classmethod
    def build(cls, configs: list[ExitConfig], device) -> ExitParams:
        if any(c.mode == "lossless" for c in configs):
            raise ValueError("lossless rows run river.lossless, not a plain decode step")
        inf = float("inf")
        # threshold <= -1 is a static split: every row exits at min_layer (-inf: any finite
        # cosine passes, so the rule and the host-side backbone_until below agree)
        # the update signal passes when 1 - ||out - in|| / ||out|| > 1 - threshold
        thr = [
            (1.0 - c.threshold if c.signal == "update" else c.threshold)
            if c.mode in ("river", "propagate", "mask")
            else inf
            for c in configs
        ]
        thr = [-inf if t <= -1 else t for t in thr]
        static = all(
            c.mode == "w4" or (c.mode == "river" and c.signal == "cosine" and c.threshold <= -1)
            for c in configs
        )
        # the first layer each twin-using row can be on the river; with a static batch (every
        # row w4 or a static river) that is also the layer it leaves the backbone at
        firsts = [
            0 if c.mode == "w4" else max(c.min_layer, 1)
            for c in configs
            if c.mode in ("w4", "river")
        ]
        until = max(firsts) if static and configs else None
        after = {
            "river": AFTER_RIVER,
            "w4": AFTER_RIVER,
            "full": AFTER_RIVER,
            "propagate": AFTER_PROPAGATE,
            "mask": AFTER_MASK,
        }
        return cls(
            threshold=torch.tensor(thr, dtype=torch.float32, device=device),
            min_layer=torch.tensor(
                [c.min_layer for c in configs], dtype=torch.int32, device=device
            ),
            start_exited=torch.tensor([c.mode == "w4" for c in configs], device=device),
            after=torch.tensor([after[c.mode] for c in configs], dtype=torch.int8, device=device),
            batch_min=torch.tensor([c.policy == "batch_min" for c in configs], device=device),
            signal=torch.tensor(
                [SIGNAL_UPDATE if c.signal == "update" else SIGNAL_COSINE for c in configs],
                dtype=torch.int8,
                device=device,
            ),
            uses_backbone=any(c.mode != "w4" for c in configs),
            uses_river=any(c.mode in ("w4", "river") for c in configs),
            uses_kv_mask=any(c.mode == "mask" for c in configs),
            may_exit=any(c.mode in ("river", "propagate", "mask") for c in configs),
            backbone_until=until,
            uses_update=any(c.signal == "update" for c in configs),
            river_from=min(firsts) if firsts else None,
        )


def exit_decision(layer: int, h_in, h_out, in_backbone, params: ExitParams):
    """Rows of `in_backbone` that leave the backbone after (0-based) layer `layer`.

    h_in, h_out: [B, H] residual stream before and after the layer. Returns bool [B].
    """
    cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
    score = cos
    if params.uses_update:
        out = h_out.float()
        update = (out - h_in.float()).norm(dim=-1) / out.norm(dim=-1).clamp_min(1e-12)
        score = torch.where(params.signal == SIGNAL_UPDATE, 1.0 - update, cos)
    passed = (score > params.threshold) & (params.min_layer <= layer + 1) & in_backbone
    # batch_min: the layer is an exit for the batch_min rows only if all of them still in the
    # backbone pass; rows not in that set count as passing.
    group = in_backbone & params.batch_min
    all_pass = (passed | ~group).all()
    return torch.where(params.batch_min, passed & all_pass, passed)
