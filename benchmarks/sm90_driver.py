"""Compiling for Hopper (sm_90) with no GPU: a stand-in triton driver that answers only what
compiling asks (the target, device 0, stream 0); a compile-only mode in which each launcher's
`kernel[grid](...)` compiles (a warm-up: the same binding, specialisation and compile as a
launch, minus loading the cubin) and reports instead of launching; and storage-less tensors
that the launchers take for CUDA ones. compile_sm90.py's docstring says why each is enough.
"""

from __future__ import annotations

import contextlib

ARCH = 90


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


def cuda_like_empty():
    """`empty(*shape, dtype)` making meta tensors (no storage) whose is_cuda is True, so that the
    one launcher choice that asks (sampling's libdevice exp/log) takes its CUDA branch."""
    import torch

    class CudaLikeMeta(torch.Tensor):
        """A meta tensor that answers is_cuda=True."""

        @property
        def is_cuda(self):
            return True

    def empty(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta").as_subclass(CudaLikeMeta)

    return empty
