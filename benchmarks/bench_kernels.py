# Over 400 lines, one concept: its cases and sweeps share settings fixed before kernel imports.
"""Kernel benchmarks: river's Triton ops against their torch baselines.

On a GPU (the numbers that matter; H100 is the target):
    python benchmarks/bench_kernels.py                # full run, writes the JSON, prints a table
    python benchmarks/bench_kernels.py --markdown     # ... and a markdown table for BENCHMARKS.md
    python benchmarks/bench_kernels.py --sweep        # also sweep the launch settings and show
                                                      # the best beside the heuristic's choice
On a CPU-only machine:
    python benchmarks/bench_kernels.py --dry-run      # tiny shapes in the Triton interpreter:
                                                      # proves the script runs, times mean nothing

Cases: W4A16 and W6A16 (group 64) and bf16 linears at the Llama-3-8B decode shapes (qkv 6144x4096,
o 4096x4096, gate_up 28672x4096, down 4096x14336) for M = 1, 8, 32 against cuBLAS (torch bf16
matmul); the cost of a launch whose row mask is all False, inside a CUDA graph; the fused W4 KV
projection; paged decode attention (32 q heads, 8 kv heads, head_dim 128, batch 1 and 32, 4096
context) against SDPA on a contiguous cache; prefill attention (2048 causal tokens) against
SDPA; sampling over a 128256 vocabulary against the torch reference.

Each result row: kernel, shape, M, dtype, us, baseline, baseline_us, speedup (baseline_us / us),
TBps (effective bytes / time: packed weights + scales + zeros for W4 and W6, weights for bf16,
K/V for attention). The JSON (benchmarks/results/kernels-<device>.json) also records the
device, torch and triton versions, the git commit and the command line.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import pathlib
import re
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import arguments  # noqa: E402
from common import RESULTS, ROOT, git_commit  # noqa: E402
from timing import kernel_us  # noqa: E402


def _parse_args(argv=None):
    p = arguments.parser(__doc__)
    arguments.add_switches(
        p,
        {
            "--dry-run": "tiny shapes, Triton interpreter on CPU",
            "--markdown": "also print a markdown table",
            "--sweep": "sweep linear/decode launch settings",
        },
    )
    arguments.add_only(p, "kernel names")
    arguments.add_outputs(p, "kernels-<device>.json", plot=False)
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time in ms")
    return p.parse_args(argv)


ARGS = _parse_args()

import torch  # noqa: E402

if ARGS.dry_run and not torch.cuda.is_available():
    # must precede the first import of a kernel module (triton decides at decoration time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

try:
    import river.kernels as K
except ImportError:  # not installed: use the repository checkout
    sys.path.insert(0, str(ROOT))
    import kernels as K

from river.quantize import W4Weight, W6Weight  # noqa: E402

SETTINGS = importlib.import_module(f"{K.__name__}.matmul_settings")
DEC = importlib.import_module(f"{K.__name__}.decode_attention")
REF = importlib.import_module(f"{K.__name__}.reference")

DRY = ARGS.dry_run
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter's tl.dot mishandles bf16: the dry run uses fp16
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16
GROUP = 64


# ----------------------------------------------------------------------------- timing


def bench(fn, graph=False):
    """Microseconds per call (timing.kernel_us: do_bench, in a CUDA graph with graph=True)."""
    return kernel_us(fn, DEVICE == "cuda", ARGS.rep, graph)


def row(kernel, shape, m, us, baseline, baseline_us, nbytes=None, **extra):
    r = {
        "kernel": kernel,
        "shape": shape,
        "M": m,
        "dtype": str(DTYPE).replace("torch.", ""),
        "us": round(us, 3),
        "baseline": baseline,
        "baseline_us": round(baseline_us, 3) if baseline_us is not None else None,
        "speedup": round(baseline_us / us, 3) if baseline_us else None,
        "TBps": round(nbytes / (us * 1e-6) / 1e12, 3) if nbytes else None,
    }
    r.update(extra)
    print(
        f"{kernel:28s} {shape:28s} M={m!s:>4} {r['us']:>10.2f} us  "
        f"{baseline:>16s} {r['baseline_us'] or 0:>10.2f} us  x{r['speedup'] or 0:<6.2f} "
        f"{r['TBps'] or 0:6.3f} TB/s",
        flush=True,
    )
    return r


def wanted(name):
    return arguments.selected(name, ARGS.only)


def make_w4(n, k):
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEVICE)
    s = (torch.rand(n, k // GROUP, device=DEVICE) * 0.02 + 0.005).to(DTYPE)
    z = (torch.rand(n, k // GROUP, device=DEVICE) * 15).to(DTYPE)
    return W4Weight(q, s, z, GROUP)


def w4_bytes(n, k):
    return n * k // 2 + 2 * n * (k // GROUP) * torch.finfo(DTYPE).bits // 8


def make_w6(n, k):
    lo = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEVICE)
    hi = torch.randint(0, 256, (n, k // 4), dtype=torch.uint8, device=DEVICE)
    s = (torch.rand(n, k // GROUP, device=DEVICE) * 0.005 + 0.001).to(DTYPE)
    z = (torch.rand(n, k // GROUP, device=DEVICE) * 63).to(DTYPE)
    return W6Weight(lo, hi, s, z, GROUP)


def w6_bytes(n, k):
    return w4_bytes(n, k) + n * k // 4


# ----------------------------------------------------------------------------- cases


LINEAR_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
MS = [1, 8, 32]
if DRY:
    LINEAR_SHAPES = [(96, 256), (64, 512)]
    MS = [1, 8]


def bench_linears(results):
    for n, k in LINEAR_SHAPES:
        dense = torch.randn(n, k, device=DEVICE).to(DTYPE) * k**-0.5
        w4 = make_w4(n, k)
        w6 = make_w6(n, k) if wanted("linear_w6") else None
        for m in MS:
            x = torch.randn(m, k, device=DEVICE).to(DTYPE)
            out = torch.empty(m, n, device=DEVICE, dtype=DTYPE)
            cublas = bench(functools.partial(torch.matmul, x, dense.t(), out=out))
            shape = f"{n}x{k}"
            if wanted("linear_w4"):
                us = bench(functools.partial(K.linear, x, w4, out=out))
                results.append(
                    row("linear_w4a16", shape, m, us, "cublas_bf16", cublas, w4_bytes(n, k))
                )
            if w6 is not None:
                us = bench(functools.partial(K.linear, x, w6, out=out))
                results.append(
                    row("linear_w6a16", shape, m, us, "cublas_bf16", cublas, w6_bytes(n, k))
                )
            if wanted("linear_bf16"):
                us = bench(functools.partial(K.linear, x, dense, out=out))
                results.append(row("linear_bf16", shape, m, us, "cublas_bf16", cublas, n * k * 2))
            if wanted("gate_up") and n == max(s[0] for s in LINEAR_SHAPES):  # 28672: gate+up
                y = torch.empty(m, n // 2, device=DEVICE, dtype=DTYPE)
                us = bench(functools.partial(K.gate_up_silu, x, w4, out=y))
                results.append(
                    row("gate_up_silu_w4a16", shape, m, us, "cublas_bf16", cublas, w4_bytes(n, k))
                )


def bench_skipped_launch(results):
    """A masked launch with no active row, in a CUDA graph: the cost of the mask check."""
    if not wanted("skipped"):
        return
    n, k = LINEAR_SHAPES[1]
    w4 = make_w4(n, k)
    for m in MS:
        x = torch.randn(m, k, device=DEVICE).to(DTYPE)
        out = torch.empty(m, n, device=DEVICE, dtype=DTYPE)
        none = torch.zeros(m, dtype=torch.bool, device=DEVICE)
        every = torch.ones(m, dtype=torch.bool, device=DEVICE)
        active = bench(lambda x=x, out=out, e=every: K.linear(x, w4, row_mask=e, out=out), True)
        skipped = bench(lambda x=x, out=out, z=none: K.linear(x, w4, row_mask=z, out=out), True)
        results.append(
            row("linear_w4a16_mask_none", f"{n}x{k}", m, skipped, "mask_all_true", active)
        )


def bench_qkv(results):
    if not wanted("qkv"):
        return
    hq, hkv, d, k, page = (32, 8, 128, 4096, 16) if not DRY else (4, 2, 32, 256, 16)
    n = (hq + 2 * hkv) * d
    w4 = make_w4(n, k)
    dense = torch.randn(n, k, device=DEVICE).to(DTYPE) * k**-0.5
    cos = torch.rand(4096, d // 2, device=DEVICE)
    sin = torch.rand(4096, d // 2, device=DEVICE)
    kc = torch.zeros(64, page, hkv, d, device=DEVICE, dtype=DTYPE)
    vc = torch.zeros_like(kc)
    for m in MS:
        x = torch.randn(m, k, device=DEVICE).to(DTYPE)
        pos = torch.arange(m, device=DEVICE)
        slots = torch.arange(m, device=DEVICE)
        q = torch.empty(m, hq, d, device=DEVICE, dtype=DTYPE)
        base = bench(
            lambda x=x, p=pos, s=slots: REF.qkv_rope_store(
                x, dense, cos, sin, p, kc, vc, s, hq, hkv
            )
        )
        us = bench(
            lambda x=x, p=pos, s=slots, q=q: K.qkv_rope_store(
                x, w4, cos, sin, p, kc, vc, s, hq, hkv, q_out=q
            )
        )
        results.append(
            row("qkv_rope_store_w4a16", f"{n}x{k}", m, us, "torch_bf16_ops", base, w4_bytes(n, k))
        )


def _paged(b, ctx, hkv, d, page):
    blocks = ctx // page
    k_cache = torch.randn(b * blocks + 1, page, hkv, d, device=DEVICE).to(DTYPE)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(b * blocks, device=DEVICE).int().view(b, blocks)
    lens = torch.full((b,), ctx, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, tables, lens


def bench_decode(results):
    if not wanted("decode"):
        return
    hq, hkv, d, page, ctx = (32, 8, 128, 16, 4096) if not DRY else (8, 2, 32, 16, 64)
    for b in (1, 32) if not DRY else (1, 3):
        k_cache, v_cache, tables, lens = _paged(b, ctx, hkv, d, page)
        q = torch.randn(b, hq, d, device=DEVICE).to(DTYPE)
        scratch = DEC.alloc_decode_scratch(b, hq, d, device=DEVICE)
        # baseline: SDPA on the same K/V already contiguous (what a dense cache would give)
        kk = k_cache[tables.long()].reshape(b, ctx, hkv, d).transpose(1, 2).contiguous()
        vv = v_cache[tables.long()].reshape(b, ctx, hkv, d).transpose(1, 2).contiguous()
        qq = q.unsqueeze(2)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        base = bench(functools.partial(sdpa, qq, kk, vv, enable_gqa=True))
        us = bench(
            functools.partial(
                K.paged_decode_attention,
                q,
                k_cache,
                v_cache,
                tables,
                lens,
                d**-0.5,
                scratch=scratch,
            )
        )
        nbytes = 2 * b * ctx * hkv * d * k_cache.element_size()
        results.append(
            row(
                "paged_decode_attention",
                f"{hq}/{hkv}x{d} ctx{ctx}",
                b,
                us,
                "sdpa_dense",
                base,
                nbytes,
                splits=DEC.decode_num_splits(b, hkv, ctx),
            )  # fmt: skip
        )


def bench_prefill(results):
    if not wanted("prefill"):
        return
    t, hq, hkv, d, page = (2048, 32, 8, 128, 16) if not DRY else (64, 4, 2, 32, 16)
    k_cache, v_cache, tables, lens = _paged(1, t, hkv, d, page)
    q = torch.randn(t, hq, d, device=DEVICE).to(DTYPE)
    cu = torch.tensor([0, t], dtype=torch.int32, device=DEVICE)
    kk = k_cache[tables.long()].reshape(1, t, hkv, d).transpose(1, 2).contiguous()
    vv = v_cache[tables.long()].reshape(1, t, hkv, d).transpose(1, 2).contiguous()
    qq = q.transpose(0, 1).unsqueeze(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    base = bench(lambda: sdpa(qq, kk, vv, is_causal=True, enable_gqa=True))
    us = bench(lambda: K.prefill_attention(q, k_cache, v_cache, cu, tables, lens, d**-0.5, t))
    flops = 4 * t * t * hq * d / 2  # causal: half of the QK^T and PV products
    nbytes = 2 * t * hkv * d * k_cache.element_size()
    results.append(
        row(
            "prefill_attention",
            f"{hq}/{hkv}x{d} causal",
            t,
            us,
            "sdpa_causal",
            base,
            nbytes,
            TFLOPs=round(flops / (us * 1e-6) / 1e12, 1),
        )  # fmt: skip
    )


def bench_sampling(results):
    if not wanted("sample"):
        return
    v = 128256 if not DRY else 1000
    for b in (1, 32) if not DRY else (2,):
        logits = torch.randn(b, v, device=DEVICE) * 4
        temp = torch.full((b,), 0.8, device=DEVICE)
        for label, top_k, top_p in (("temp", 0, 1.0), ("top_k50", 50, 1.0), ("top_p0.9", 0, 0.9)):
            k_ = torch.full((b,), top_k, dtype=torch.int32, device=DEVICE)
            p_ = torch.full((b,), top_p, device=DEVICE)
            seeds = torch.arange(b, device=DEVICE)
            offs = torch.zeros(b, dtype=torch.int64, device=DEVICE)
            base = bench(functools.partial(REF.sample, logits, temp, k_, p_, seeds, offs))
            us = bench(functools.partial(K.sample, logits, temp, k_, p_, seeds, offs))
            results.append(row(f"sample_{label}", f"V={v}", b, us, "torch_reference", base))


def bench_rms_norm(results):
    if not wanted("rms_norm"):
        return
    h = 4096 if not DRY else 320
    w = torch.rand(h, device=DEVICE).to(DTYPE)
    for m in MS:
        x = torch.randn(m, h, device=DEVICE).to(DTYPE)
        r = torch.randn(m, h, device=DEVICE).to(DTYPE)
        base = bench(lambda x=x, r=r: REF.rms_norm(x, w, 1e-5, r))
        us = bench(lambda x=x, r=r: K.rms_norm(x, w, 1e-5, r))
        results.append(row("rms_norm_residual", f"{h}", m, us, "torch_ops", base, 4 * m * h * 2))


# ----------------------------------------------------------------------------- sweep


def sweep_linear(sweep):
    """Try launch settings per (format, shape, M): the best beside linear_settings' choice."""
    lines = []
    for n, k in LINEAR_SHAPES:
        formats = {
            "w4": make_w4(n, k),
            "w6": make_w6(n, k),
            "dense": torch.randn(n, k, device=DEVICE).to(DTYPE),
        }
        for m in MS:
            x = torch.randn(m, k, device=DEVICE).to(DTYPE)
            out = torch.empty(m, n, device=DEVICE, dtype=DTYPE)
            for fmt, weight in formats.items():
                bm = 1 if m == 1 else SETTINGS.m_bucket(m)
                # the W6 GEMV's plane words spill past a 256-column K step (matmul_settings)
                gemv_bks = {"w4": [256, 512], "w6": [128, 256], "dense": [128, 256]}[fmt]
                bks = gemv_bks if bm == 1 else [64, 128]
                packed = fmt != "dense"
                chosen = SETTINGS.linear_settings(n, k, m, packed, 64, num_sms(), fmt == "w6")
                tried = {chosen}
                for bn in (16, 32, 64, 128):
                    for bk in bks:
                        for split in (1, 2, 4, 8, 16, 32):
                            for warps in (4, 8):
                                tried.add(SETTINGS.LaunchSettings(bm, bn, bk, split, warps, 3))
                timed = {}
                for cfg in tried:
                    try:
                        timed[cfg] = bench(
                            lambda x=x, w=weight, o=out, s=cfg: K.linear(x, w, out=o, settings=s)
                        )
                    except Exception as e:  # out of resources, ...
                        print(f"  skip {cfg}: {type(e).__name__}")
                if not timed:
                    continue
                best = min(timed, key=timed.get)
                row = {"key": [fmt, n, k, m], "us": timed[best], "settings": vars(best)}
                row |= {"chosen_us": timed.get(chosen), "chosen": vars(chosen)}
                sweep.append(row)
                lines.append(
                    f"  {fmt} {n}x{k} M={m}: best {timed[best]:.2f} us {vars(best)}; "
                    f"heuristic {timed.get(chosen, float('nan')):.2f} us"
                )
    print("\nlinear launch settings, best vs heuristic:")
    print("\n".join(lines))


def sweep_decode(sweep):
    """Try every split count of the decode attention: the best beside decode_num_splits'."""
    hq, hkv, d, page, ctx = (32, 8, 128, 16, 4096) if not DRY else (8, 2, 32, 16, 64)
    lines = []
    for b in (1, 4, 16, 32, 64) if not DRY else (1, 3):
        k_cache, v_cache, tables, lens = _paged(b, ctx, hkv, d, page)
        q = torch.randn(b, hq, d, device=DEVICE).to(DTYPE)
        scratch = DEC.alloc_decode_scratch(b, hq, d, max_splits=DEC.MAX_SPLITS, device=DEVICE)
        timed = {}
        for splits in (1, 2, 4, 8, 16):
            if splits > DEC.MAX_SPLITS:
                break
            fn = functools.partial(
                K.paged_decode_attention, q, k_cache, v_cache, tables, lens, d**-0.5,
                scratch=scratch, num_splits=splits,
            )  # fmt: skip
            timed[splits] = bench(fn)
        best = min(timed, key=timed.get)
        chosen = DEC.decode_num_splits(b, hkv, ctx, num_sms())
        sweep.append(
            {"key": ["decode", b * hkv, ctx], "us": timed[best], "splits": best,
             "chosen": chosen, "chosen_us": timed.get(chosen)}
        )  # fmt: skip
        lines.append(f"  rows*Hkv={b * hkv} ctx={ctx}: best {best} splits, heuristic {chosen}")
    print("\ndecode attention splits, best vs heuristic:")
    print("\n".join(lines))


def num_sms() -> int:
    if DEVICE == "cuda":
        return torch.cuda.get_device_properties(0).multi_processor_count
    return 132


# ----------------------------------------------------------------------------- main


def device_name():
    if DEVICE == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return "cpu-interpreter"


def markdown(results):
    head = "| kernel | shape | M | us | baseline | baseline us | speedup | TB/s |"
    lines = [head, "|---|---|---:|---:|---|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {r['kernel']} | {r['shape']} | {r['M']} | {r['us']:.2f} | {r['baseline']} | "
            f"{r['baseline_us'] if r['baseline_us'] is not None else ''} | "
            f"{r['speedup'] if r['speedup'] is not None else ''} | "
            f"{r['TBps'] if r['TBps'] is not None else ''} |"
        )
    return "\n".join(lines)


def main():
    if DEVICE != "cuda" and not DRY:
        sys.exit("no CUDA device: run with --dry-run (Triton interpreter, tiny shapes)")
    torch.manual_seed(0)
    results, sweep = [], []
    with torch.inference_mode():
        bench_linears(results)
        if DEVICE == "cuda":
            bench_skipped_launch(results)
        bench_qkv(results)
        bench_decode(results)
        bench_prefill(results)
        bench_sampling(results)
        bench_rms_norm(results)
        if ARGS.sweep and wanted("linear"):
            sweep_linear(sweep)
        if ARGS.sweep and wanted("decode"):
            sweep_decode(sweep)
    doc = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(unknown=None, mark_dirty=False),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "dry_run": DRY,
        "results": results,
    }
    if sweep:
        doc["sweep"] = sweep
    if ARGS.out:
        path = pathlib.Path(ARGS.out)
    elif DRY:  # a dry run's numbers are meaningless: keep them out of benchmarks/results
        path = pathlib.Path(tempfile.gettempdir()) / f"kernels-{device_name()}.json"
    else:
        path = RESULTS / f"kernels-{device_name()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {path}")
    if ARGS.markdown:
        print()
        print(markdown(results))


if __name__ == "__main__":
    main()
