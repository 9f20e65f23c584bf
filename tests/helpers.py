"""Test helpers shared by several test modules."""

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode


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


# Ops that read a tensor on the host, or turn host data into a tensor (which on a GPU is a
# blocking copy from pageable memory: `t[idx] = True` lifts the Python True into a tensor).
_SYNC_OPS = {
    "aten::_local_scalar_dense": "reads a tensor value on the host (.item(), bool(), int())",
    "aten::lift_fresh": "turns host data into a tensor (torch.tensor(...), t[idx] = <scalar>)",
    "aten::nonzero": "has a data-dependent shape (a device sync on a GPU)",
    "aten::_assert_async": "checks a tensor value on the host",
}


class _HostSyncGuard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        why = _SYNC_OPS.get(func._schema.name)
        if why is None and func._schema.name in ("aten::_to_copy", "aten::copy_"):
            devs = {a.device.type for a in args if isinstance(a, torch.Tensor)}
            dev = (kwargs or {}).get("device")
            if dev is not None:
                devs.add(torch.device(dev).type)
            if len(devs) > 1:
                why = "copies between the host and the device"
        if why is not None:
            raise AssertionError(f"host sync inside the decode step: {func} {why}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync():
    """The decode step's guard: fails on every host read of a tensor (patched methods that do
    not dispatch, such as tolist and cpu, plus a dispatch mode for the rest) and on host data
    entering the step as a tensor. On a GPU, torch's sync debug mode errors as well."""
    cuda = torch.cuda.is_available()
    if cuda:
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with forbid_host_sync(), _HostSyncGuard():
            yield
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(prev)
