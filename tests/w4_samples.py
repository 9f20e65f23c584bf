"""Sample weights and activation statistics for the W4 quantization tests (test_quantize.py,
test_twin_cache.py)."""

import torch


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def random_weights(n, k, seed=0, outliers=0.002):
    """Gaussian weights at a typical LLM scale with a few 10x outliers, [n, k] float32."""
    g = gen(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    mask = torch.rand(n, k, generator=g) < outliers
    return torch.where(mask, w * 10, w)


def channel_importance(k, seed=0, hot=(5, 70, 100), boost=1e3):
    """Mean squared activations: log-normal spread plus a few channels `boost` x louder, the
    shape measured on real models (massive activations in a handful of channels)."""
    imp = torch.randn(k, generator=gen(seed)).mul(0.5).exp()
    imp[list(hot)] *= boost
    return imp
