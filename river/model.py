"""A minimal Llama forward over the paged KV cache, with a 4-bit river twin for every layer.

Prefill runs the bf16 backbone over a ragged batch of new tokens. Decode runs one token per row
through a per-layer loop in which each row is either in the backbone or past its exit; both
weight sets run over the whole batch under device-side row masks, so which row takes which path
is decided and consumed on the device.

Under tensor parallelism (river.parallel) each rank builds this model from its shard of the
weights: its heads, MLP channels and vocabulary rows. The forward is the same code with three
collectives: the embedding lookup and the o / down products are all-reduced, the logits
all-gathered; everything else (norms, the exit rule) runs on the replicated residual stream.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from river.config import FUSED, ModelConfig, rope_tables
from river.exits import AFTER_MASK, AFTER_PROPAGATE, AFTER_RIVER, ExitParams, exit_decision
from river.kv_cache import KVCache
from river.ops import get_ops
from river.parallel import local_config, mirrored, pad_rows


def _inference(fn):
    """torch.inference_mode around fn, except while torch.compile traces it (the compiled CPU
    step, river.graphs): there no_grad, since views of the KV cache made inside a traced
    inference-mode region fail in AOT autograd; the compiled step runs under inference mode."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        guard = torch.no_grad if torch.compiler.is_compiling() else torch.inference_mode
        with guard():
            return fn(*args, **kwargs)

    return run


@dataclass
class LayerWeights:
    """One decoder layer's projections, fused where the math allows (same input)."""

    qkv: object  # [(Hq + 2 Hkv) * D, H]: tensor, or W4Weight for a river twin
    o: object  # [H, Hq * D]
    gate_up: object  # [2 I, H]: gate rows, then up rows
    down: object  # [H, I]


@dataclass
class ForwardBatch:
    """Host-built indices of one forward pass (all on the model's device)."""

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    slot_mapping: torch.Tensor  # int64 [T]
    block_tables: torch.Tensor  # int32 [S, max_blocks]
    context_lens: torch.Tensor  # int32 [S]: cached tokens after this pass, per sequence
    cu_seqlens: torch.Tensor | None = None  # int32 [S + 1]; prefill only
    max_seqlen: int | None = None  # host int: most new tokens of one sequence (prefill grid)


class LlamaModel:
    def __init__(
        self, cfg: ModelConfig, weights: dict, device, dtype, max_positions: int, ops=None,
        tp=None,
    ):  # fmt: skip
        """ops: the op set (river.ops: "reference", "cpu" or "triton"; None = the device's).
        tp: this rank's river.parallel.Group, with `weights` its shard (river.parallel's
        shard_weights); None: one process, all of the model."""
        self.cfg = cfg
        self.tp = tp
        # the dimensions this rank computes (all of them without tensor parallelism)
        self.local = local_config(cfg, tp.world if tp is not None else 1)
        self.vocab_start = 0 if tp is None else tp.rank * self.local.vocab_size
        self.mirror = None  # rank 0's river.parallel.Leader under tensor parallelism
        self.trace: list | None = None  # decode's residual after every layer, if tracing
        self.device = torch.device(device)
        self.dtype = dtype
        self.ops = get_ops(self.device, ops)

        def dev(t):
            return t.to(device=self.device, dtype=dtype).contiguous()

        self.embed = dev(weights["embed"])
        self.lm_head = self.embed if cfg.tie_word_embeddings else dev(weights["lm_head"])
        self.norm = dev(weights["norm"])
        self.input_norms = [dev(lw["input_norm"]) for lw in weights["layers"]]
        self.post_norms = [dev(lw["post_norm"]) for lw in weights["layers"]]
        self.layers = [
            LayerWeights(
                qkv=dev(torch.cat([lw["q"], lw["k"], lw["v"]])),
                o=dev(lw["o"]),
                gate_up=dev(torch.cat([lw["gate"], lw["up"]])),
                down=dev(lw["down"]),
            )
            for lw in weights["layers"]
        ]
        self.river: list[LayerWeights] | None = None
        self.draft_head = None  # a 4-bit twin of the LM head, for lossless drafts only
        # The LM head's twin that tokens which left the backbone take their logits from
        # (river.precision: 8-bit in the w8 and mix precisions; None: the bf16 head).
        self.river_head = None
        self.cos, self.sin = rope_tables(cfg, max_positions, self.device)
        self.scale = cfg.head_dim**-0.5

    # ------------------------------------------------------------------ river twins
    def _place_twin(self, w, packed=True):
        """A W4Weight, W6Weight or W8Weight as this model's ops take it (see attach_river)."""
        if packed and self.ops.kind == "cpu" and self.dtype == torch.bfloat16:
            from river.kernels.cpu import Int4CpuWeight, Int6CpuWeight, Int8CpuWeight

            try:
                cls = {4: Int4CpuWeight, 6: Int6CpuWeight, 8: Int8CpuWeight}[w.bits]
                return cls.from_quantized(w)
            except ValueError:  # a shape the pack cannot tile: dense bf16 instead
                pass
        w = w.to(device=self.device, dtype=self.dtype)
        return w if self.device.type == "cuda" else w.dequantize(self.dtype).contiguous()

    @mirrored("model")
    def build_draft_head(self, group_size: int, method: str) -> None:
        """Quantize this rank's LM head rows to the 4-bit draft head (lossless drafts; plain
        weight error). Under tensor parallelism each rank quantizes its own vocabulary rows."""
        from river.quantize import quantize_w4

        real = min(self.local.vocab_size, self.cfg.vocab_size - self.vocab_start)
        head = self.lm_head[:real].float().cpu()  # the zero padding past V is not quantized
        q = quantize_w4(head, group_size=group_size, method=method)
        self.attach_draft_head(pad_rows(q, self.local.vocab_size - real))

    @mirrored("model")
    def trace_residual(self, on: bool = True) -> None:
        """Keep decode's residual stream after every layer in `trace` (tests: under tensor
        parallelism every rank must hold the same bits, since the exit rule reads it)."""
        self.trace = [] if on else None

    @mirrored("model")
    def detach_river(self) -> None:
        """Drop the river twins and the river head (before attaching another precision)."""
        self.river = None
        self.river_head = None

    def attach_draft_head(self, quantized) -> None:
        """The 4-bit LM head lossless drafts use (ExitParams.draft_head): a draft token then
        reads no bf16 weight past its exit. Never used for an emitted token's logits."""
        self.draft_head = self._place_twin(quantized)

    def attach_river(self, quantized: dict, packed: bool = True, head=None) -> None:
        """quantized: {"layers.N.q": W4Weight or W8Weight, ...} for the seven projections of
        every layer; the projections fused into one weight (q/k/v, gate/up) share a format
        (river.precision plans them so).

        On CUDA the twins feed the W4A16 / W8A16 kernels. The CPU fast ops in bf16 take them as
        torch's packed int4 / int8 (Int4CpuWeight / Int8CpuWeight); otherwise (fp32, or the
        reference ops) they are dequantized once, since the reference ops would dequantize on
        every call. packed=False dequantizes on the CPU fast path too (torch's int4/int8 CPU
        matmuls are GEMV loops, ~6x slower than the bf16 GEMM at prefill-sized batches: the
        static-split analysis of bench_quality prefills through the twins).
        head: the LM head's twin (W8Weight) rows on the river path take their logits from, or
        None (they use the bf16 head).
        """

        def cat(*ws):
            if len(ws) == 1:
                return ws[0]
            if len({type(w) for w in ws}) != 1:
                raise ValueError("projections fused into one weight must share a twin format")
            return type(ws[0]).cat(ws)

        def place(w):
            return self._place_twin(w, packed)

        self.river_head = None if head is None else place(head)
        self.river = [
            LayerWeights(
                **{
                    fused: place(cat(*(quantized[f"layers.{n}.{p}"] for p in projs)))
                    for fused, projs in FUSED.items()
                }
            )
            for n in range(self.cfg.num_layers)
        ]

    # ------------------------------------------------------------------ prefill
    @mirrored("model")
    @torch.inference_mode()
    def prefill(
        self,
        batch: ForwardBatch,
        kv: KVCache,
        all_logits: bool = False,
        observe=None,
        twins_from: int | None = None,
    ):
        """Full-backbone pass over the new tokens of S sequences; K/V written to the cache.

        Returns logits [S, V] at each sequence's last new token, or [T, V] with all_logits.
        observe(layer, name, x) sees the input [T, K] of every projection (name "qkv", "o",
        "gate_up" or "down"); river.calibrate uses it to measure activation statistics.
        twins_from: layers from this index on run their river twins instead, for every token: a
        static split, which teacher-forced gives exactly what decoding every token with
        `ExitConfig("river", threshold=-1, min_layer=twins_from)` gives (up to rounding), in one
        batched pass (river.precision's sensitivity measurement, bench_quality's analysis).
        """
        if twins_from is not None and twins_from < self.cfg.num_layers and self.river is None:
            raise RuntimeError("prefill(twins_from=...) needs the river twins attached")
        ops, cfg, lc = self.ops, self.cfg, self.local
        h = self._embed(batch.input_ids)  # [T, H]
        residual = None
        block, offset = _block_offset(batch.slot_mapping, kv.block_size)
        kv.valid[:, block, offset] = kv.true  # a KV-masked request may have left holes here
        for n, w in enumerate(self.layers):
            if twins_from is not None and n >= twins_from:
                w = self.river[n]
            x, residual = ops.rms_norm(h, self.input_norms[n], cfg.rms_norm_eps, residual)
            q = ops.qkv_rope_store(
                x,
                w.qkv,
                self.cos,
                self.sin,
                batch.positions,
                kv.k[n],
                kv.v[n],
                batch.slot_mapping,
                lc.num_heads,
                lc.num_kv_heads,
            )
            a = ops.prefill_attention(
                q,
                kv.k[n],
                kv.v[n],
                batch.cu_seqlens,
                batch.block_tables,
                batch.context_lens,
                self.scale,
                max_seqlen=batch.max_seqlen,
            )
            a = a.reshape(a.shape[0], -1)
            h = self._reduce(ops.linear(a, w.o))
            x2, residual = ops.rms_norm(h, self.post_norms[n], cfg.rms_norm_eps, residual)
            act = ops.gate_up_silu(x2, w.gate_up)
            h = self._reduce(ops.linear(act, w.down))
            if observe is not None:
                for name, t in (("qkv", x), ("o", a), ("gate_up", x2), ("down", act)):
                    observe(n, name, t)
        if not all_logits:
            last = batch.cu_seqlens[1:].long() - 1
            h, residual = h[last], residual[last]
        x, _ = ops.rms_norm(h, self.norm, cfg.rms_norm_eps, residual)
        head = self.lm_head
        if twins_from is not None and twins_from < cfg.num_layers and self.river_head is not None:
            head = self.river_head  # as decode: a token that left the backbone
        return self._gather(ops.linear(x, head)).float()

    # ------------------------------------------------------------------ decode
    @mirrored("model")
    @_inference
    def decode(
        self, batch: ForwardBatch, kv: KVCache, exits: ExitParams, active=None, scratch=None
    ):
        """One token per row. Each row runs the backbone until exit_decision() moves it out, then
        its mode's path (river twins, CALM propagation or KV masking) for the remaining layers.

        active: bool [B] rows that hold a real request (graph buckets pad the batch).
        scratch: the op set's decode scratch (ops.alloc_decode_scratch), owned by the caller so
        that a captured graph never allocates; None: the ops allocate what they need.
        Returns (logits float32 [B, V], backbone layers used int32 [B]). No host sync inside.
        """
        ops, cfg, lc = self.ops, self.cfg, self.local
        b = batch.input_ids.shape[0]
        dev = self.device
        if active is None:
            active = torch.ones(b, dtype=torch.bool, device=dev)
        h = self._embed(batch.input_ids)  # [B, H] residual stream
        exited = exits.start_exited & active
        used = torch.zeros(b, dtype=torch.int32, device=dev)
        use_river = exits.uses_river and self.river is not None
        if exits.uses_river and self.river is None:
            raise RuntimeError("a request uses the river but no river weights are attached")
        q = torch.zeros(b, lc.num_heads, cfg.head_dim, dtype=self.dtype, device=dev)
        a_out = torch.zeros(b, cfg.hidden_size, dtype=self.dtype, device=dev)
        mlp = torch.zeros(b, lc.intermediate_size, dtype=self.dtype, device=dev)
        block, offset = _block_offset(batch.slot_mapping, kv.block_size)
        # The slot may last have been left as a hole by a KV-masked request: mark it written in
        # every layer once, and let KV masking punch its holes below.
        kv.valid[:, block, offset] = kv.true
        until, river_from = exits.backbone_until, exits.river_from
        for n, w in enumerate(self.layers):
            rw = self.river[n] if use_river else None
            # host-side: past `until` no row can be in the backbone (static splits, w4), and
            # before `river_from` none can be on the river
            backbone_on = exits.uses_backbone and (until is None or n < until)
            river_on = use_river and (river_from is None or n >= river_from)
            bb = active & ~exited  # rows in the bf16 backbone at this layer
            rv = active & exited & (exits.after == AFTER_RIVER)
            frozen = active & exited & (exits.after != AFTER_RIVER)
            # K/V of this layer: backbone rows and CALM-propagated rows use the bf16 weights,
            # river rows the 4-bit twin, into the same slot; KV-masked rows write nothing.
            x, _ = ops.rms_norm(h, self.input_norms[n], cfg.rms_norm_eps)
            kv_bf16 = bb  # (built only when the backbone runs: on the CPU every small op costs)
            if backbone_on:
                kv_bf16 = bb | (frozen & (exits.after == AFTER_PROPAGATE))
            for weights, rows, on in ((w, kv_bf16, backbone_on), (rw, rv, river_on)):
                if on:
                    ops.qkv_rope_store(
                        x, weights.qkv, self.cos, self.sin, batch.positions, kv.k[n], kv.v[n],
                        batch.slot_mapping, lc.num_heads, lc.num_kv_heads, row_mask=rows,
                        q_out=q,
                    )  # fmt: skip
            if exits.uses_kv_mask:
                kv.valid[n, block, offset] = ~(frozen & (exits.after == AFTER_MASK))
            computing = bb | rv
            a = ops.paged_decode_attention(
                q,
                kv.k[n],
                kv.v[n],
                batch.block_tables,
                batch.context_lens,
                self.scale,
                row_mask=computing,
                kv_valid=kv.valid[n] if exits.uses_kv_mask else None,
                scratch=scratch,
            ).reshape(b, -1)
            paths = ((w, bb, backbone_on), (rw, rv, river_on))
            _two_path(ops.linear, a, "o", paths, a_out)
            h_mid = h + self._reduce(a_out)
            x, _ = ops.rms_norm(h_mid, self.post_norms[n], cfg.rms_norm_eps)
            _two_path(ops.gate_up_silu, x, "gate_up", paths, mlp)
            _two_path(ops.linear, mlp, "down", paths, a_out)
            self._reduce(a_out)
            h_new = torch.where(computing.unsqueeze(1), h_mid + a_out, h)
            used += bb.int()
            if exits.may_exit and n + 1 < cfg.num_layers and (until is None or n < until):
                exited = exited | exit_decision(n, h, h_new, bb, exits)
            h = h_new
            if self.trace is not None:
                self.trace.append(h.clone())
        x, _ = ops.rms_norm(h, self.norm, cfg.rms_norm_eps)
        if exits.draft_head and self.draft_head is not None:
            return self._gather(ops.linear(x, self.draft_head)).float(), used
        if use_river and exits.river_head and self.river_head is not None:
            if until is not None and until < cfg.num_layers:
                # host-side: every row left at a fixed layer (static split, w4): all on the river
                return self._gather(ops.linear(x, self.river_head)).float(), used
            # rows on the river path read the head's twin, the others the bf16 head
            on_river = active & exited & (exits.after == AFTER_RIVER)
            logits = torch.zeros(b, lc.vocab_size, dtype=self.dtype, device=dev)
            ops.linear(x, self.lm_head, row_mask=~on_river, out=logits)
            ops.linear(x, self.river_head, row_mask=on_river, out=logits)
            return self._gather(logits).float(), used
        return self._gather(ops.linear(x, self.lm_head)).float(), used

    # ------------------------------------------------------------------ tensor parallelism
    def _embed(self, ids):
        """[T, H] rows of the embedding; a rank holds V/N of them, the others add zeros."""
        if self.tp is None:
            return self.embed[ids]
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.local.vocab_size)
        h = self.embed[local.clamp(0, self.local.vocab_size - 1)]
        return self.tp.all_reduce(torch.where(mine.unsqueeze(1), h, torch.zeros_like(h)))

    def _reduce(self, partial):
        """The o / down product: a partial sum on each rank, summed in place."""
        return partial if self.tp is None else self.tp.all_reduce(partial)

    def _gather(self, logits):
        """[..., V/N] logits of this rank's vocabulary rows -> [..., V]."""
        return logits if self.tp is None else self.tp.gather_vocab(logits, self.cfg.vocab_size)


def _two_path(op, x, name, paths, out):
    """The same projection in both weight sets; each writes only its own rows of `out`.
    paths: ((weights, row mask, runs), ...) for the backbone and the river."""
    for weights, rows, on in paths:
        if on:
            op(x, getattr(weights, name), row_mask=rows, out=out)


def _block_offset(slot_mapping, block_size):
    slots = slot_mapping.long()
    return slots // block_size, slots % block_size
