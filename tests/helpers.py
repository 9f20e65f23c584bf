"""Test helpers shared by several test modules."""

import contextlib

import torch


@contextlib.contextmanager
def forbid_host_sync():
    """Make every host read of a tensor raise, as a CUDA sync would be on the GPU."""
    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def boom(*a, **k):
        raise AssertionError("host sync inside the decode step")

    try:
        for n in names:
            setattr(torch.Tensor, n, boom)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def assert_pool_full(engine):
    """Every KV block is back in the pool and no request is queued or running."""
    assert engine.allocator.num_free == engine.allocator.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting
