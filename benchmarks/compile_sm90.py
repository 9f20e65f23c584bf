"""Compile every Triton kernel variant river launches for Hopper (sm_90), with no GPU.

    python benchmarks/compile_sm90.py                        # all variants, both models
    python benchmarks/compile_sm90.py --models smollm2-135m --batches 1,8
    python benchmarks/compile_sm90.py --json report.json     # also: RIVER_COMPILE_REPORT=path
    python benchmarks/compile_sm90.py --list                 # the launches, nothing compiled

What is compiled: each op the engine launches on CUDA (river/model.py through river/ops.py),
through its real host launcher in kernels/*.py, so the settings table, split-K choices, grid
and constexprs are the engine's own: rms_norm with and without the residual; the decode-step
projections (o, down, lm_head, gate_up_silu) in bf16 and W4 (group 64) with the row mask the
two-path decode passes; qkv_rope_store in bf16 and W4, with and without a row mask, at decode
sizes and at a prefill size; paged decode attention with a row mask, with and without
kv_valid, at the context capacity of the graph runner (the model's window) and at a short
eager one (each picks its own split count); prefill attention; sampling. Shapes: the default
model (SmolLM2-135M) and Llama-3.1-8B at batch 1, 8, 32 and 64. Distinct variants compile
once (the JIT's cache, and TRITON_CACHE_DIR across runs); the table has one row per compiled
kernel with the launches that map to it.

How it compiles without a GPU:
* A stand-in driver: triton.runtime.driver.set_active() takes a DriverBase whose
  get_current_target() is GPUTarget("cuda", 90, 32), device 0, stream 0. The JIT asks the
  active driver only for the target (to build its binder and backend), the device and the
  stream; Triton -> LLVM -> PTX runs in-process and PTX -> cubin in the ptxas inside the
  triton wheel (Triton targets sm_90a for capability 9.0). Nothing else of it is used, since
  nothing launches.
* Launches become warm-ups: inside compile_only(), `kernel[grid](...)` calls
  kernel.run(..., warmup=True): the same binding, specialisation and compile as a launch,
  minus loading the cubin. The launchers run unchanged.
* Tensors are meta tensors (shape, dtype and strides without storage) of a subclass whose
  is_cuda is True, so the one launcher choice that asks (sampling's libdevice exp/log) takes
  its CUDA branch. data_ptr() is 0: pointers specialise as 16-byte aligned, as CUDA
  allocations are. A meta device has no index, so the launchers size split-K for 132 SMs
  (kernels/linear.py _num_sms): the H100 SXM's and the H200's count.
* Registers and spills come from ptxas -v (TRITON_DUMP_PTXAS_LOG, captured per compile); a
  kernel loaded from TRITON_CACHE_DIR is re-assembled with ptxas -v from its cached PTX.

Exit status 1 if any launch fails to compile or a kernel could not be loaded on an H100/H200
(over 255 registers a thread, 64K registers or 227 KiB of shared memory a block).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

# Compile for real: this script exists to run the CUDA backend, never the interpreter. Triton
# reads TRITON_INTERPRET when a kernel module is imported, so drop it before any import.
os.environ.pop("TRITON_INTERPRET", None)
# Triton 3.9 warns once that FP fusion is on by default (as in 3.6, the version on the GPU
# machines) when TRITON_DEFAULT_FP_FUSION is unset. Setting the variable would silence it but
# also change every kernel's cache key, so that a later engine run would not find these in
# TRITON_CACHE_DIR: silence the warning instead.
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gpu_check import ROOT, use_checkout  # noqa: E402

ARCH = 90
# Hopper limits a launch must fit (CUDA occupancy tables, compute capability 9.0)
MAX_REGS_PER_THREAD = 255
REGS_PER_BLOCK = 65536
MAX_SHARED_PER_BLOCK = 232448  # 227 KiB of opt-in dynamic shared memory


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_len: int  # context window: the graph runner's block-table capacity


MODELS = {
    "smollm2-135m": ModelShape(576, 1536, 9, 3, 64, 49152, 8192),
    "llama-3.1-8b": ModelShape(4096, 14336, 32, 8, 128, 128256, 131072),
}
BATCHES = (1, 8, 32, 64)
BLOCK_SIZE = 16  # EngineConfig.block_size
GROUP = 64  # EngineConfig.river_group_size
EAGER_CONTEXT = 256  # a short eager decode: the block table only as wide as the longest row
PREFILL_TOKENS = 512


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma list of {', '.join(MODELS)} (default: all)",
    )
    p.add_argument(
        "--batches",
        default=",".join(map(str, BATCHES)),
        help=f"comma list of decode batch sizes (default {','.join(map(str, BATCHES))})",
    )
    p.add_argument("--only", default="", help="comma list of op names to keep (substring match)")
    p.add_argument(
        "--json",
        default=os.environ.get("RIVER_COMPILE_REPORT"),
        help="write the report here (default: $RIVER_COMPILE_REPORT, else no file)",
    )
    p.add_argument("--list", action="store_true", help="print the launches and exit")
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="compile in this many processes (default: 2, or 1 on a single core)",
    )
    p.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    bad = sorted(set(args.models) - set(MODELS))
    if bad:
        p.error(f"unknown model(s) {bad}; choose from {list(MODELS)}")
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        p.error(f"--batches must be a comma list of integers, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1:
        p.error("--batches needs at least one positive batch size")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.shard is not None and not (0 <= args.shard < args.jobs and args.json):
        p.error("--shard K (internal) needs 0 <= K < --jobs and --json")
    return args


# ----------------------------------------------------------------------------- compile-only mode


def _stand_in_driver():
    """A triton driver that only answers what compiling asks: the target, device 0, stream 0."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class CompileOnlyDriver(DriverBase):
        @classmethod
        def is_active(cls):
            return False  # never chosen by triton's own driver discovery

        def get_current_target(self):
            return GPUTarget("cuda", ARCH, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("meta")

        def map_python_to_cpp_type(self, ty):
            raise RuntimeError("compile-only driver: no launcher is built")

        def get_benchmarker(self):
            raise RuntimeError("compile-only driver: nothing can be timed")

    return CompileOnlyDriver()


@contextlib.contextmanager
def compile_only(on_compile):
    """Inside, `kernel[grid](...)` compiles for sm_90 and calls on_compile(kernel_fn, grid,
    kwargs, compiled) instead of launching."""
    from triton.runtime import driver
    from triton.runtime.jit import KernelInterface

    def getitem(kernel_fn, grid):
        def warm(*args, **kwargs):
            compiled = kernel_fn.run(*args, grid=grid, warmup=True, **kwargs)
            on_compile(kernel_fn, grid, kwargs, compiled)
            return compiled

        return warm

    driver.set_active(_stand_in_driver())
    saved = KernelInterface.__getitem__
    KernelInterface.__getitem__ = getitem
    try:
        yield
    finally:
        KernelInterface.__getitem__ = saved


def _cuda_like():
    import torch

    class CudaLikeMeta(torch.Tensor):
        """A meta tensor that answers is_cuda=True (see the module docstring)."""

        @property
        def is_cuda(self):
            return True

    def empty(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta").as_subclass(CudaLikeMeta)

    return empty


# ----------------------------------------------------------------------------- the launches


@dataclasses.dataclass
class Launch:
    op: str
    model: str
    batch: int
    what: str  # the engine call this stands for
    fn: object


def engine_launches(models, batches):
    """The kernel launches of the engine's forward passes, per model and decode batch."""
    return [lc for name in models for lc in _model_launches(name, MODELS[name], batches)]


def _model_launches(name, s: ModelShape, batches):
    import river.kernels as K
    import torch

    from river.quantize import W4Weight

    empty = _cuda_like()
    bf16, i32, i64 = torch.bfloat16, torch.int32, torch.int64
    q_dim = s.heads * s.head_dim
    qkv_rows = (s.heads + 2 * s.kv_heads) * s.head_dim

    def w4(n, k):
        q = empty(n, k // 2, dtype=torch.uint8)
        return W4Weight(
            q, empty(n, k // GROUP, dtype=bf16), empty(n, k // GROUP, dtype=bf16), GROUP
        )

    shapes = {"qkv": (qkv_rows, s.hidden), "o": (s.hidden, q_dim),
              "gate_up": (2 * s.inter, s.hidden), "down": (s.hidden, s.inter)}  # fmt: skip
    weights = {
        "bf16": {p: empty(n, k, dtype=bf16) for p, (n, k) in shapes.items()},
        "w4": {p: w4(n, k) for p, (n, k) in shapes.items()},
    }
    lm_head = empty(s.vocab, s.hidden, dtype=bf16)
    norm_w = empty(s.hidden, dtype=bf16)
    cos = empty(s.max_len, s.head_dim // 2, dtype=torch.float32)
    sin = empty(s.max_len, s.head_dim // 2, dtype=torch.float32)
    num_blocks = 4096
    k_cache = empty(num_blocks, BLOCK_SIZE, s.kv_heads, s.head_dim, dtype=bf16)
    v_cache = empty(num_blocks, BLOCK_SIZE, s.kv_heads, s.head_dim, dtype=bf16)
    kv_valid = empty(num_blocks, BLOCK_SIZE, dtype=torch.bool)
    scale = s.head_dim**-0.5
    out = []

    def add(op, batch, what, fn):
        out.append(Launch(op, name, batch, what, fn))

    def qkv(x, weight, mask, q_out):
        m = x.shape[0]
        return lambda: K.qkv_rope_store(
            x, weight, cos, sin, empty(m, dtype=i64), k_cache, v_cache, empty(m, dtype=i64),
            s.heads, s.kv_heads, row_mask=mask, q_out=q_out,
        )  # fmt: skip

    def proj(op, x, weight, mask, y):
        return lambda: op(x, weight, row_mask=mask, out=y)

    def decode_attention(q, tables, lens, mask, valid):
        return lambda: K.paged_decode_attention(
            q, k_cache, v_cache, tables, lens, scale, row_mask=mask, kv_valid=valid
        )

    for b in batches:
        x = empty(b, s.hidden, dtype=bf16)
        mask = empty(b, dtype=torch.bool)
        q = empty(b, s.heads, s.head_dim, dtype=bf16)
        attn = empty(b, q_dim, dtype=bf16)
        h_out = empty(b, s.hidden, dtype=bf16)
        act = empty(b, s.inter, dtype=bf16)
        add("rms_norm", b, "decode", lambda x=x: K.rms_norm(x, norm_w, 1e-5))
        add("rms_norm+residual", b, "prefill", lambda x=x: K.rms_norm(x, norm_w, 1e-5, x))
        for fmt, w in weights.items():
            add(f"qkv_rope_store {fmt}", b, "decode two-path", qkv(x, w["qkv"], mask, q))
            add(f"qkv_rope_store {fmt}", b, "no row mask", qkv(x, w["qkv"], None, q))
            add(f"linear {fmt}", b, "o_proj", proj(K.linear, attn, w["o"], mask, h_out))
            add(f"linear {fmt}", b, "down_proj", proj(K.linear, act, w["down"], mask, h_out))
            add(
                f"gate_up_silu {fmt}",
                b,
                "gate_up",
                proj(K.gate_up_silu, x, w["gate_up"], mask, act),
            )
        add("linear bf16", b, "lm_head", lambda x=x: K.linear(x, lm_head))
        for capacity, what in ((s.max_len, "graph capacity"), (EAGER_CONTEXT, "short eager")):
            tables = empty(b, capacity // BLOCK_SIZE, dtype=i32)
            lens = empty(b, dtype=i32)
            for valid in (None, kv_valid):
                label = f"{what} ctx {capacity}" + (" kv_valid" if valid is not None else "")
                add(
                    "paged_decode_attention",
                    b,
                    label,
                    decode_attention(q, tables, lens, mask, valid),
                )
        logits = empty(b, s.vocab, dtype=torch.float32)
        temp = empty(b, dtype=torch.float32)
        add(
            "sample", b, "sampled decode",
            lambda lg=logits, t=temp, b=b: K.sample(
                lg, t, empty(b, dtype=i32), t, empty(b, dtype=i64), empty(b, dtype=i64)
            ),
        )  # fmt: skip
        # a prefill of b sequences sharing PREFILL_TOKENS new tokens
        qp = empty(PREFILL_TOKENS, s.heads, s.head_dim, dtype=bf16)
        add(
            "prefill_attention", b, f"prefill {PREFILL_TOKENS} tokens",
            lambda qp=qp, b=b: K.prefill_attention(
                qp, k_cache, v_cache, empty(b + 1, dtype=i32),
                empty(b, PREFILL_TOKENS // BLOCK_SIZE, dtype=i32), empty(b, dtype=i32), scale,
            ),
        )  # fmt: skip
    xp = empty(PREFILL_TOKENS, s.hidden, dtype=bf16)
    qp = empty(PREFILL_TOKENS, s.heads, s.head_dim, dtype=bf16)
    add("qkv_rope_store bf16", PREFILL_TOKENS, "prefill", qkv(xp, weights["bf16"]["qkv"], None, qp))
    return out


# ----------------------------------------------------------------------------- resource usage

_USAGE = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill "
    r"loads.*?Used (?P<regs>\d+) registers",
    re.S,
)


def parse_ptxas(log: str) -> dict | None:
    m = _USAGE.search(log)
    if m is None:
        return None
    return {
        "regs": int(m["regs"]),
        "spill_stores": int(m["st"]),
        "spill_loads": int(m["ld"]),
        "stack": int(m["stack"]),
    }


def ptxas_usage(ptx: str) -> dict | None:
    """ptxas -v on PTX from the cache, with the flags triton uses for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "k.ptx"
        src.write_text(ptx)
        arch = sm_arch_from_capability(ARCH)
        cmd = [get_ptxas(ARCH).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={arch}", str(src), "-o", f"{src}.o"]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
    return parse_ptxas(res.stdout + res.stderr)


def _constexprs(kernel_fn, kwargs) -> dict:
    names = {kernel_fn.arg_names[i] for i in kernel_fn.constexprs}
    return {k: v for k, v in kwargs.items() if k in names}


def _variant_label(constexprs: dict, num_warps: int) -> str:
    """The constexprs of a launch, compactly: flags that are on, NAME=value for the rest."""
    parts = []
    for k, v in constexprs.items():
        if k == "DOT_PRECISION" or (k == "GROUP" and constexprs.get("USE_W4") is False):
            continue  # (the quantization group of a dense weight is a placeholder)
        if isinstance(v, bool):
            if v:
                parts.append(k)
        else:
            parts.append(f"{k}={v}")
    parts.append(f"warps={num_warps}")
    return " ".join(parts)


# ----------------------------------------------------------------------------- main


def compile_all(launches):
    """Run every launch in compile-only mode; returns (variants by hash, launch records)."""
    import triton

    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed: captured below
    variants: dict[str, dict] = {}
    records = []
    current: dict = {}

    def on_compile(kernel_fn, grid, kwargs, compiled):
        key = compiled.hash
        current["hashes"].append(key)
        v = variants.get(key)
        if v is None:
            constexprs = _constexprs(kernel_fn, kwargs)
            v = variants[key] = {
                "kernel": compiled.metadata.name,
                "variant": _variant_label(constexprs, compiled.metadata.num_warps),
                "constexprs": constexprs,
                "num_warps": compiled.metadata.num_warps,
                "shared": compiled.metadata.shared,
                "seconds": round(time.perf_counter() - current["t0"], 2),
                "ops": [],
                "launches": [],
                "grids": [],
            }
            usage = parse_ptxas(current["log"].getvalue())
            if usage is None:  # loaded from TRITON_CACHE_DIR: no ptxas ran
                usage = ptxas_usage(compiled.asm["ptx"])
                v["usage_from"] = "ptxas -v on the cached ptx"
            v.update(usage or {"regs": None})
        launch = current["launch"]
        if launch["op"] not in v["ops"]:
            v["ops"].append(launch["op"])
        v["launches"].append({k: launch[k] for k in ("model", "batch", "what")})
        if list(grid) not in v["grids"]:
            v["grids"].append(list(grid))
        current["log"] = io.StringIO()  # a second kernel in one launcher call logs afresh

    with compile_only(on_compile):
        for index, lc in launches:
            tag = {"index": index, "op": lc.op, "model": lc.model, "batch": lc.batch,
                   "what": lc.what}  # fmt: skip
            current.update(launch=tag, t0=time.perf_counter(), log=io.StringIO(), hashes=[])
            try:
                with contextlib.redirect_stdout(current["log"]):
                    lc.fn()
                status, error = "ok", None
            except Exception as e:  # a compile error fails the run, after the others compiled
                status, error = "error", f"{type(e).__name__}: {e}"
                traceback.print_exc(file=sys.stderr)
            if status == "ok" and not current["hashes"]:
                status, error = "error", "the launcher launched no kernel"
            records.append({**tag, "status": status, "error": error, "kernels": current["hashes"]})
    return variants, records


def _launch_problems(v) -> list[str]:
    """Why this kernel would not load on an H100/H200 (triton raises OutOfResources there)."""
    regs = v.get("regs")
    if regs is None:
        return ["no ptxas resource report"]
    out = []
    if regs > MAX_REGS_PER_THREAD:
        out.append(f"{regs} registers a thread > {MAX_REGS_PER_THREAD}")
    if regs * v["num_warps"] * 32 > REGS_PER_BLOCK:
        out.append(f"{regs} x {v['num_warps'] * 32} threads > {REGS_PER_BLOCK} registers a block")
    if v["shared"] > MAX_SHARED_PER_BLOCK:
        out.append(f"{v['shared']} bytes of shared memory > {MAX_SHARED_PER_BLOCK}")
    return out


def _shards(launches, jobs):
    """Split the launches into `jobs` lists, keeping each (model, op) together (its batches
    share variants, which should compile in one process) and balancing the launch counts."""
    groups: dict[tuple, list] = {}
    for index, lc in enumerate(launches):
        groups.setdefault((lc.model, lc.op), []).append(index)
    shards = [[] for _ in range(jobs)]
    for g in sorted(groups.values(), key=len, reverse=True):
        min(shards, key=len).extend(g)
    return [sorted(s) for s in shards if s]


def _run_shards(args, n_launches):
    """Compile in `args.jobs` child processes of this script (one ptxas and one LLVM at a time
    each) and merge what they report."""
    with tempfile.TemporaryDirectory(prefix="compile-sm90-") as tmp:
        procs = []
        for k in range(args.jobs):
            part = pathlib.Path(tmp) / f"shard{k}.json"
            cmd = [sys.executable, __file__, "--models", ",".join(args.models),
                   "--batches", ",".join(map(str, args.batches)), "--only", args.only,
                   "--jobs", str(args.jobs), "--shard", str(k), "--json", str(part)]  # fmt: skip
            procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL), part))
        variants, records = {}, []
        for proc, part in procs:
            proc.wait()
            if not part.exists():
                raise SystemExit(f"a compile shard exited with status {proc.returncode}: no report")
            doc = json.loads(part.read_text())
            records += doc["launches"]
            for h, v in doc["variants"].items():
                if h not in variants:
                    variants[h] = v
                    continue
                seen = variants[h]  # the same kernel reached from two shards (e.g. sample)
                seen["ops"] += [op for op in v["ops"] if op not in seen["ops"]]
                seen["launches"] += v["launches"]
                seen["grids"] += [g for g in v["grids"] if g not in seen["grids"]]
    records.sort(key=lambda r: r["index"])
    if len(records) != n_launches:
        raise SystemExit(f"the shards reported {len(records)} of {n_launches} launches")
    return variants, records


def _shapes(launches) -> str:
    by_model: dict[str, list] = {}
    for lc in launches:
        by_model.setdefault(lc["model"], []).append(lc["batch"])
    return "; ".join(f"{m} b{','.join(map(str, sorted(set(b))))}" for m, b in by_model.items())


def table(variants) -> str:
    head = ("op", "variant (constexprs)", "shapes (model, batches)", "regs", "spill st/ld B",
            "smem B", "s")  # fmt: skip
    rows = [head]
    for v in sorted(variants.values(), key=lambda v: (v["ops"][0], v["variant"])):
        rows.append(
            (
                ", ".join(v["ops"]),
                v["variant"],
                _shapes(v["launches"]),
                str(v.get("regs")),
                f"{v.get('spill_stores')}/{v.get('spill_loads')}",
                str(v["shared"]),
                f"{v['seconds']:.1f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    use_checkout()
    import torch
    import triton

    wanted = [s for s in args.only.split(",") if s]
    launches = [
        lc
        for lc in engine_launches(args.models, args.batches)
        if not wanted or any(w in lc.op for w in wanted)
    ]
    if args.list:
        for lc in launches:
            print(f"{lc.op:24s} {lc.model:14s} b{lc.batch:<4d} {lc.what}")
        return 0
    t0 = time.perf_counter()
    if args.shard is not None:  # a child of _run_shards: compile my share, report raw
        mine = _shards(launches, args.jobs)
        picked = mine[args.shard] if args.shard < len(mine) else []
        variants, records = compile_all([(i, launches[i]) for i in picked])
        doc = {"variants": variants, "launches": records}
        pathlib.Path(args.json).write_text(json.dumps(doc) + "\n")
        return 0
    if args.jobs > 1:
        variants, records = _run_shards(args, len(launches))
    else:
        variants, records = compile_all(list(enumerate(launches)))
    seconds = time.perf_counter() - t0
    for v in variants.values():
        v["problems"] = _launch_problems(v)
    errors = [r for r in records if r["status"] != "ok"]
    unloadable = {h: v["problems"] for h, v in variants.items() if v["problems"]}
    print(table(variants))
    print(
        f"\n{len(records)} launches -> {len(variants)} kernels compiled for sm_{ARCH} "
        f"in {seconds:.1f} s with {args.jobs} process(es) (triton {triton.__version__}); "
        f"{len(errors)} failed, {len(unloadable)} would not load on an H100/H200"
    )
    for r in errors:
        print(f"FAILED {r['op']} {r['model']} b{r['batch']} ({r['what']}): {r['error']}")
    for h, problems in unloadable.items():
        print(
            f"WOULD NOT LOAD {', '.join(variants[h]['ops'])} {variants[h]['variant']}: {problems}"
        )
    if args.json:
        doc = {
            "target": f"cuda sm_{ARCH}",
            "triton": triton.__version__,
            "torch": torch.__version__,
            "command": " ".join([pathlib.Path(sys.argv[0]).name] + sys.argv[1:]),
            "root": str(ROOT),
            "jobs": args.jobs,
            "seconds": round(seconds, 1),
            "variants": [{"hash": h, **v} for h, v in variants.items()],
            "launches": records,
        }
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}")
    return 1 if errors or unloadable else 0


if __name__ == "__main__":
    sys.exit(main())
