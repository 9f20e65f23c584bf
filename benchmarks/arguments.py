"""The command-line flags the benchmark scripts share, declared once: the parser itself, the
model, the device, the result files, kernel-name filters, the river's exit settings, and the
comma lists most scripts take (checked against their choices with the parser's own errors).
Each script adds its own flags beside these. Only argparse here: gpu_check.py starts light.
"""

from __future__ import annotations

import argparse

SUPPRESS = argparse.SUPPRESS  # the help of an internal flag


def parser(description: str, raw: bool = True) -> argparse.ArgumentParser:
    """raw: --help prints the description as written (the scripts' docstrings are laid out)."""
    if not raw:
        return argparse.ArgumentParser(description=description)
    return argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )


def add_model(p, default: str = "the default model", what: str = "HF Llama dir") -> None:
    p.add_argument("--model", default=None, help=f"{what} (default: {default})")


def add_device(p) -> None:
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")


def add_outputs(p, json_name: str, default=None, flag: str = "--out", plot: bool = True) -> None:
    """The result JSON (`flag`) and, with plot, its PNG (--plot)."""
    p.add_argument(flag, default=default, help=f"JSON path (default results/{json_name})")
    if plot:
        p.add_argument("--plot", default=None, help="PNG path (default: beside the JSON)")


def add_only(p, what: str) -> None:
    p.add_argument("--only", default="", help=f"comma list of {what} to keep (substring match)")


def add_compute(p) -> None:
    """--dtype and --ops of the engine (None leaves the device's defaults)."""
    for flag, choices, text in (
        ("--dtype", ("float32", "bfloat16"), "compute dtype (default: the engine's)"),
        ("--ops", ("reference", "cpu", "triton"), "op set; reference + float32 is the oracle"),
    ):
        p.add_argument(flag, choices=choices, default=None, help=text)


def add_group_size(p, what: str) -> None:
    p.add_argument("--group-size", type=int, default=64, help=f"W4 group size of {what}")


def add_exit(p, threshold=None, min_layer=None, note: str = "") -> None:
    """--threshold and --min-layer of the river exit; None leaves the engine's defaults."""
    th = "the engine's, 0.96" if threshold is None else threshold
    ml = "the engine's, 4" if min_layer is None else min_layer
    p.add_argument(
        "--threshold", type=float, default=threshold, help=f"river threshold{note} (default {th})"
    )
    p.add_argument(
        "--min-layer", type=int, default=min_layer, help=f"river min_layer{note} (default {ml})"
    )


def split(text: str) -> list[str]:
    """The items of a comma list (empty items dropped)."""
    return [s for s in str(text).split(",") if s]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{value} is not positive")
    return value


def add_list(p, flag: str, what: str, default=None, of=str, choices=None, note=None) -> None:
    """A comma-list flag, parsed into a list: each item converted by `of` and one of `choices`
    when given, at least one item (argparse parses a string default the same way, so a bad
    value fails as a usage error, exit status 2). The help names the choices and the default,
    or `note` in the default's place."""

    def parse(text):
        try:
            values = [of(s) for s in split(text)]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: not a comma list of {what} ({e})") from e
        bad = [v for v in values if choices is not None and v not in choices]
        if bad or not values:
            known = "" if choices is None else f"; choose from {list(choices)}"
            raise argparse.ArgumentTypeError(f"unknown or no {what} {bad}{known}")
        return values

    text = f"comma list of {what}"
    if choices is not None:
        text += f", from {','.join(choices)}"
    if note or default:
        text += f" (default {note or default})"
    p.add_argument(flag, default=default, type=parse, help=text)


def add_switches(p, helps: dict[str, str]) -> None:
    """On/off flags (store_true), {flag: help}."""
    for flag, text in helps.items():
        p.add_argument(flag, action="store_true", help=text)


def selected(name: str, only: str) -> bool:
    """Whether --only keeps `name`: no filter, or one of its items is a substring of it."""
    keys = split(only)
    return not keys or any(k in name for k in keys)
