"""river: an LLM inference engine with River-LLM token-level early exit (KV share).

The public names are imported lazily so that `import river.kernels` (or the CLI's --help) does
not pay for loading the whole engine.
"""

import importlib

_EXPORTS = {
    "Engine": "river.engine",
    "EngineConfig": "river.config",
    "ModelConfig": "river.config",
    "ExitConfig": "river.exits",
    "SamplingParams": "river.sampling",
    "RequestOutput": "river.sampling",
    "RiverError": "river.errors",
    "ModelLoadError": "river.errors",
    "UnsupportedModelError": "river.errors",
    "TokenizerError": "river.errors",
    "InvalidRequestError": "river.errors",
    "OutOfBlocksError": "river.errors",
    "ConfigError": "river.errors",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'river' has no attribute {name!r}")
