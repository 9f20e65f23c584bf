"""Exception types shared by every river module.

Everything river raises on purpose derives from `RiverError`, so callers can catch one type. The
subclasses say whose fault it was: a broken model on disk (`ModelLoadError`), a model river cannot
run (`UnsupportedModelError`), or a request that can never be served (`InvalidRequestError`,
`OutOfBlocksError`).
"""


class RiverError(Exception):
    """Base class for river errors."""


class ModelLoadError(RiverError):
    """Model path missing/unreadable, corrupt/truncated weight file, bad config."""


class UnsupportedModelError(ModelLoadError):
    """Config describes an architecture river does not run (not Llama-family)."""


class TokenizerError(ModelLoadError):
    """Tokenizer missing or unreadable."""


class InvalidRequestError(RiverError, ValueError):
    """Bad request: prompt too long, bad sampling values..."""


class ConfigError(RiverError, ValueError):
    """Bad engine setting (EngineConfig / Engine keyword arguments)."""


class OutOfBlocksError(RiverError):
    """KV pool cannot ever hold a request."""
