"""What compile_sm90.py reports of each compiled kernel: registers, spills and stack from
ptxas -v (re-assembled from the cached PTX when the kernel came from TRITON_CACHE_DIR), the
variant's constexprs in short, whether it would load on an H100/H200, and the table."""

from __future__ import annotations

import pathlib
import re
import subprocess
import tempfile

from sm90_driver import ARCH

# Hopper limits a launch must fit (CUDA occupancy tables, compute capability 9.0)
MAX_REGS_PER_THREAD = 255
REGS_PER_BLOCK = 65536
MAX_SHARED_PER_BLOCK = 232448  # 227 KiB of opt-in dynamic shared memory

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


def constexprs_of(kernel_fn, kwargs) -> dict:
    names = {kernel_fn.arg_names[i] for i in kernel_fn.constexprs}
    return {k: v for k, v in kwargs.items() if k in names}


def variant_label(constexprs: dict, num_warps: int) -> str:
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


def launch_problems(v) -> list[str]:
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
