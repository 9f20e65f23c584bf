"""Serving load benchmark: concurrent streaming clients against `river serve`, full vs river exit.

    python benchmarks/bench_serve.py                               # default model, 8 clients
    python benchmarks/bench_serve.py --clients 16 --requests 64 --max-tokens 128 --device cuda
    python benchmarks/bench_serve.py --model path/to/hf-llama-dir --modes full,w4,river

The script starts the server itself (`python -m river.server`, the code behind `river serve`, in
a subprocess on a free loopback port), waits for /health, and sends one warm-up request per
exit mode. Then, per exit mode, `--clients` workers (httpx + asyncio) share `--requests`
streaming /v1/completions requests: greedy, ignore_eos, so every request generates exactly
`--max-tokens` tokens and the modes do the same work. Prompts cycle through a fixed list of code
and prose.

Reported per mode:
- ttft_ms: request sent -> first streamed text (includes queueing behind other requests);
- itl_ms: gaps between successive text chunks of a request (one chunk per token, except that a
  token which completes no character rides with the next);
- requests_per_s, output_tok_s: over the wall time of the mode's whole run;
- mean_backbone_layers (decode tokens, from /metrics' exit histogram) and mean_decode_batch
  (decode rows per step, from /metrics), both as deltas over the run.
Results go to benchmarks/results/serve-<device>.json with the device, versions, commit and
command; a markdown table is printed.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import arguments  # noqa: E402
from common import device_slug, pick_device, result_path, run_metadata, write_json  # noqa: E402
from prompts import prompts  # noqa: E402

PROMPTS = prompts(
    "fibonacci", "printing-press", "numpy-normalize", "lighthouse", "stack", "thermodynamics",
    "sql", "village-no-comma",
)  # fmt: skip


def parse_args(argv=None):
    p = arguments.parser(__doc__)
    arguments.add_model(p)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--requests", type=int, default=32, help="requests per exit mode (default 32)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    arguments.add_list(p, "--modes", "exit modes", "full,river")
    arguments.add_exit(p)
    arguments.add_device(p)
    p.add_argument("--max-num-seqs", type=int, default=64, help="server decode batch rows")
    arguments.add_outputs(p, "serve-<dev>.json", flag="--output", plot=False)
    p.add_argument("--startup-timeout", type=float, default=900, help="seconds to wait for load")
    args = p.parse_args(argv)
    for name in ("clients", "requests", "max_tokens"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(xs) -> dict:
    import numpy as np

    if not xs:
        return {"p50": None, "p90": None, "p99": None}
    q = np.percentile(np.asarray(xs, dtype=float), [50, 90, 99])
    return {
        "p50": round(float(q[0]), 3),
        "p90": round(float(q[1]), 3),
        "p99": round(float(q[2]), 3),
    }


_SAMPLE = re.compile(r'^([a-z_]+)(?:\{le="([^"]+)"\}|\{[^}]*\})? (\S+)$')


async def scrape(client) -> dict:
    """The few /metrics values the benchmark uses: counters, and the exit histogram buckets."""
    text = (await client.get("/metrics")).text
    out, buckets = {}, {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, le, value = m[1], m[2], float(m[3])
        if name == "river_exit_backbone_layers_bucket" and le != "+Inf":
            buckets[int(le)] = value
        elif "{" not in line:
            out[name] = value
    out["hist"] = [buckets[k] for k in sorted(buckets)]
    return out


def exit_body(mode: str, args) -> dict:
    body = {"mode": mode}
    if args.threshold is not None:
        body["threshold"] = args.threshold
    if args.min_layer is not None:
        body["min_layer"] = args.min_layer
    return body


async def one_request(client, model, prompt, args, mode) -> dict:
    import json

    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "exit": exit_body(mode, args),
    }
    t0 = time.perf_counter()
    stamps, tokens, error = [], 0, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"error": f"{r.status_code}: {r.text[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                error = obj["error"]["message"]
            elif obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            elif obj["choices"] and obj["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    if error or not stamps:
        return {"error": error or "no text streamed"}
    return {
        "ttft_ms": (stamps[0] - t0) * 1e3,
        "itl_ms": [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])],
        "tokens": tokens,
    }


async def run_mode(url, model, args, mode) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one_request(client, model, PROMPTS[0], args, mode)  # warm-up (river twins, caches)
        before = await scrape(client)
        todo = iter(range(args.requests))
        results = []

        async def worker():
            for i in todo:  # a shared iterator: each request goes to whichever client is free
                results.append(
                    await one_request(client, model, PROMPTS[i % len(PROMPTS)], args, mode)
                )

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.clients)))
        wall = time.perf_counter() - t0
        after = await scrape(client)
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    hist = [a - b for a, b in zip(after["hist"], before["hist"])]
    steps = after["river_decode_steps_total"] - before["river_decode_steps_total"]
    rows = after["river_decode_rows_total"] - before["river_decode_rows_total"]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(results),
        "errors": len(errors),
        "first_errors": errors[:3],
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 3),
        "output_tok_s": round(tokens / wall, 2),
        "ttft_ms": percentiles([r["ttft_ms"] for r in ok]),
        "itl_ms": percentiles([x for r in ok for x in r["itl_ms"]]),
        "mean_backbone_layers": round(
            sum(k * n for k, n in enumerate(hist)) / max(sum(hist), 1), 3
        ),
        "num_layers": len(hist) - 1,
        "mean_decode_batch": round(rows / max(steps, 1), 2),
        "max_decode_batch": int(after["river_decode_batch_rows_max"]),
    }


def start_server(args, port, log):
    cmd = [sys.executable, "-m", "river.server"]
    if args.model:
        cmd.append(args.model)
    cmd += ["--port", str(port), "--device", args.device, "--log-level", "warning"]
    cmd += ["--max-num-seqs", str(args.max_num_seqs)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url, proc, log, timeout) -> str:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the server exited ({proc.returncode}):\n{log.read().decode()}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return httpx.get(url + "/v1/models").json()["data"][0]["id"]
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the server was not ready after {timeout} s")
        time.sleep(0.5)


def table(results: dict) -> str:
    head = (
        "| exit | req/s | out tok/s | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms | layers | "
        "batch mean/max | errors |"
    )
    lines = [head, "|" + "---|" * 8]
    for mode, r in results.items():
        t, i = r["ttft_ms"], r["itl_ms"]
        lines.append(
            f"| {mode} | {r['requests_per_s']:.2f} | {r['output_tok_s']:.1f} | "
            f"{t['p50']:.0f}/{t['p90']:.0f}/{t['p99']:.0f} | "
            f"{i['p50']:.1f}/{i['p90']:.1f}/{i['p99']:.1f} | "
            f"{r['mean_backbone_layers']:.2f}/{r['num_layers']} | "
            f"{r['mean_decode_batch']:.1f}/{r['max_decode_batch']} | {r['errors']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import fastapi
    import httpx
    import uvicorn

    import river

    args.device = pick_device(args.device)
    modes = args.modes
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = start_server(args, port, log)
        try:
            t0 = time.perf_counter()
            model = wait_ready(url, proc, log, args.startup_timeout)
            print(f"server ready in {time.perf_counter() - t0:.1f} s ({model})", file=sys.stderr)
            results = {}
            for mode in modes:
                results[mode] = asyncio.run(run_mode(url, model, args, mode))
                print(f"{mode}: done in {results[mode]['wall_s']} s", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(30)
    meta = run_metadata(args.device)
    meta.update(
        river=river.__version__,
        fastapi=fastapi.__version__,
        uvicorn=uvicorn.__version__,
        httpx=httpx.__version__,
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
    )
    payload = {
        "meta": meta,
        "config": {
            "model": model,
            "clients": args.clients,
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "max_num_seqs": args.max_num_seqs,
            "exits": {m: exit_body(m, args) for m in modes},
        },
        "results": results,
    }
    out = result_path(args.output, f"serve-{device_slug(args.device)}.json")
    write_json(out, payload)
    print(table(results))
    print(f"wrote {out}", file=sys.stderr)
    return 1 if any(r["errors"] for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
