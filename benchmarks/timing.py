"""How the benchmarks measure time: CUDA events around queued device work (perf_counter on a
CPU), Triton's do_bench for single kernels (in a CUDA graph when asked), and the median and
spread of repeated measurements. torch and triton are imported only where they are used."""

from __future__ import annotations

import statistics
import time


class Timer:
    """CUDA events on a GPU (device time of the queued work), perf_counter on a CPU."""

    def __init__(self, device):
        import torch

        self.cuda = str(device).startswith("cuda")
        self.torch = torch

    def __enter__(self):
        if self.cuda:
            self.start = self.torch.cuda.Event(enable_timing=True)
            self.end = self.torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def kernel_us(fn, cuda: bool, rep_ms: int, graph: bool = False) -> float:
    """Microseconds per call: triton.testing.do_bench (CUDA events, L2 flushed between runs)
    or, with graph=True, do_bench_cudagraph (the call replayed inside a CUDA graph, i.e. with
    no CPU launch overhead). On CPU one timed call after one untimed (dry runs only)."""
    if not cuda:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    import triton

    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=rep_ms) * 1e3
    return triton.testing.do_bench(fn, rep=rep_ms) * 1e3


def median_spread(values) -> tuple[float, float, float]:
    """(median, min, max) of repeated measurements."""
    return statistics.median(values), min(values), max(values)
