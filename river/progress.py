"""Progress bars for long work (GGUF conversion, building the river twins): a tqdm bar on a
terminal, one plain line in logs and pipes, where a redrawn bar would only leave noise.

RIVER_PROGRESS=1 forces the bar (a terminal the process cannot detect, e.g. under some
launchers); RIVER_PROGRESS=0 silences both.
"""

from __future__ import annotations

import os
import sys


def progress_bar(iterable=None, *, total=None, desc: str, unit: str, enabled: bool = True):
    """A tqdm bar (possibly disabled) over `iterable` or for `total` steps."""
    from tqdm.auto import tqdm

    setting = os.environ.get("RIVER_PROGRESS", "").strip()
    if setting == "0":
        enabled = False
    show = enabled and (setting == "1" or sys.stderr.isatty())
    if enabled and not show:
        n = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else 0)
        size = f" ({n} {unit})" if n else ""
        print(f"river: {desc}{size} ...", file=sys.stderr, flush=True)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not show)
