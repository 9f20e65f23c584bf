"""The CPU as a decode device: how many threads torch may use, and which dtype is native.

Threads. torch's intra-op pool (OpenMP) spin-waits at the end of every parallel region. When
another process is busy on one of the cores, the thread that shares that core is descheduled
and its partner spins for its whole time slice, so every small op of a decode step costs
milliseconds (measured on a 2-core machine: 3.6 tok/s instead of 16 with one core busy, and a
19-minute test suite instead of 2). A thread pool larger than the idle cores is never faster
here, so the default is the number of cores that are idle when the engine starts, measured from
/proc/stat over a short window. RIVER_NUM_THREADS (or `Engine(num_threads=...)`) overrides it;
an explicit OMP_NUM_THREADS is respected as the user's choice.
"""

from __future__ import annotations

import functools
import os
import time

import torch

_SAMPLE_S = 0.05  # long enough for a busy core to show ~100% busy, short enough to go unnoticed


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_times() -> list[tuple[int, int]] | None:
    """(busy, total) jiffies per core, or None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            lines = [ln.split() for ln in f if ln.startswith("cpu") and ln[3].isdigit()]
    except OSError:
        return None
    out = []
    for fields in lines:
        vals = [int(v) for v in fields[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        out.append((sum(vals) - idle, sum(vals)))
    return out


def idle_cores(sample_s: float = _SAMPLE_S) -> float | None:
    """How many of this process's cores were idle over `sample_s` seconds (None if unknown).
    This process sleeps while sampling, so its own load does not count."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None
    before = _cpu_times()
    if before is None:
        return None
    time.sleep(sample_s)
    after = _cpu_times()
    idle = 0.0
    for c in allowed:
        if c >= len(before) or c >= len(after):
            continue
        busy = after[c][0] - before[c][0]
        total = after[c][1] - before[c][1]
        idle += 1.0 - busy / total if total > 0 else 1.0
    return idle


def default_num_threads() -> int:
    """RIVER_NUM_THREADS, else OMP_NUM_THREADS, else the idle cores (at least one)."""
    for var in ("RIVER_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                n = 0
            if n <= 0:
                raise ValueError(f"{var} must be a positive integer, got {value!r}")
            return n
    cores = _available_cores()
    idle = idle_cores()
    if idle is None:
        return cores
    # A core that is more than half busy is taken: rounding keeps a lightly loaded machine at
    # full width and drops the cores another process holds.
    return max(1, min(cores, int(idle + 0.5)))


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads (None: default_num_threads()); returns the number set."""
    n = default_num_threads() if num_threads is None else int(num_threads)
    if n <= 0:
        raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@functools.cache
def has_native_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX), where bf16
    weights halve the bytes a decode step reads without an emulation penalty."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and (
            torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")
            and _cpu_flags() & {"avx512_bf16", "amx_bf16"} != set()
        )
    except (AttributeError, RuntimeError):
        return False


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def default_cpu_dtype() -> torch.dtype:
    """bfloat16 on CPUs with native bf16, else float32."""
    return torch.bfloat16 if has_native_bf16() else torch.float32
