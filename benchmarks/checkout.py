"""Running from the checkout with no install: `import river` from the repository root and
`river.kernels` from kernels/ (the mapping setup.py's package_dir makes on install) through an
import hook; running a module or script like `python` would, with that hook in place; and
running a benchmark script in a fresh interpreter (what the scripts' tests do)."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import pathlib
import subprocess
import sys

from common import ROOT


class _CheckoutKernels(importlib.abc.MetaPathFinder):
    """Finds `river.kernels` in the checkout's kernels/ (setup.py's package_dir mapping)."""

    def __init__(self, root: pathlib.Path):
        self.kernels = root / "kernels"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "river.kernels":
            return None  # its submodules are found through the package's __path__
        return importlib.util.spec_from_file_location(
            fullname, self.kernels / "__init__.py", submodule_search_locations=[str(self.kernels)]
        )


def use_checkout(root: pathlib.Path = ROOT) -> None:
    """Make `import river` and `import river.kernels` load this checkout, also where river is
    installed from another one (the hook goes first on sys.meta_path)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if not any(isinstance(f, _CheckoutKernels) for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutKernels(root))
    for name, where in (("river", root / "river"), ("river.kernels", root / "kernels")):
        mod = sys.modules.get(name)
        if mod is not None and pathlib.Path(mod.__file__).resolve().parent != where:
            raise RuntimeError(f"{name} was imported from {mod.__file__} before use_checkout()")


def exec_in_checkout(argv: list[str]) -> None:
    """`-m MODULE ARGS` or `SCRIPT ARGS`: run it like `python` would, with this checkout
    importable (how every gpu_check step runs)."""
    import runpy

    if not argv or argv == ["-m"]:
        raise SystemExit("--exec needs -m MODULE or a script path")
    module = argv[1] if argv[0] == "-m" else None
    # sys.path[0] as `python` would set it: the working directory for -m, else the script's
    # directory (in place of the calling script's); then the checkout goes in front
    sys.path[0] = os.getcwd() if module else str(pathlib.Path(argv[0]).resolve().parent)
    use_checkout()
    if module:
        sys.argv = [module, *argv[2:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


def run_script(script: pathlib.Path, *args, cwd=ROOT, env=None, timeout=180):
    """`python SCRIPT ARGS` in a fresh interpreter, output captured as text."""
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
