"""Reading a llama.cpp GGUF file with the `gguf` package: its metadata, a check that every tensor
lies inside the file, and tensors dequantized to float32 in torch's dimension order.

Every failure becomes a ModelLoadError (UnsupportedModelError for a quantization the package
cannot decode) that names the file, so a corrupt or truncated download reads as such.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from river.errors import ModelLoadError, UnsupportedModelError


def open_gguf(path: pathlib.Path):
    import gguf

    if not path.exists():
        raise ModelLoadError(f"GGUF file does not exist: {path}")
    if not path.is_file():
        raise ModelLoadError(f"GGUF path is not a file: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError... on bad bytes
        raise ModelLoadError(
            f"{path} is not a readable GGUF file (corrupt or truncated?): {e}"
        ) from e


def read_metadata(reader, path: pathlib.Path) -> dict[str, Any]:
    import gguf

    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the reader's own header bookkeeping
        try:
            value = field.contents()
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot read metadata field {key!r}: {e}") from e
        if field.types == [gguf.GGUFValueType.FLOAT32]:
            # The shortest decimal that round-trips the float32, so 1e-5 stays 1e-5 in the
            # config rather than becoming 9.999999747378752e-06.
            value = float(str(np.float32(value)))
        meta[key] = value
    return meta


def check_tensor_bounds(reader, path: pathlib.Path) -> None:
    """Every tensor must lie wholly inside the file: a truncated download must not slip through."""
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ModelLoadError(
                f"{path} is truncated or corrupt: tensor {t.name!r} needs bytes "
                f"[{t.data_offset}, {t.data_offset + t.n_bytes}) but the file has {size}"
            )


def dequantize(tensor, path: pathlib.Path) -> np.ndarray:
    import gguf

    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise UnsupportedModelError(
            f"{path}: tensor {tensor.name!r} uses quantization {tensor.tensor_type.name}, "
            f"which the gguf package cannot dequantize: {e}"
        ) from e
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot dequantize tensor {tensor.name!r}: {e}") from e
    # GGUF lists dimensions fastest-first (ggml's ne[]); torch wants them slowest-first.
    shape = tuple(reversed([int(d) for d in tensor.shape]))
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
