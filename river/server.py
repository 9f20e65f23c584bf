"""`river serve`: an OpenAI-compatible HTTP server that batches requests across clients.

Two threads, each the only owner of its side: the engine thread (river.serve_loop) owns the
Engine and steps it, and the asyncio event loop (uvicorn) runs the HTTP app (river.serve_app).
This module holds what a server runs (ServerConfig), how it is started (the `river serve`
command line, `python -m river.server`, and ServerHandle for tests and benchmarks).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from river.serve_loop import EngineLoop

# The engine's modules import torch, and the HTTP app FastAPI: they are imported where used, so
# that `river --help` (whose parser add_serve_parser extends) pays for neither.
if TYPE_CHECKING:
    from river.config import EngineConfig
    from river.exits import ExitConfig


@dataclass(frozen=True)
class ServerConfig:
    """What `river serve` runs. default_exit applies to requests that send no `exit` field, and
    fills the fields a partial `exit` object leaves out."""

    model: str | None = None  # None: the default model
    engine: EngineConfig | None = None  # None: EngineConfig()
    default_exit: ExitConfig | None = None  # None: full backbone
    api_key: str | None = None
    served_model_name: str | None = None  # None: the model directory's name
    preload_river: bool = True  # build/load the 4-bit twins at start, not on the first request
    # With torch_compile: compile the decode steps of default_exit requests for batches up to
    # this many rows before reporting ready (Engine.warmup); 0: compile on first use instead.
    warmup_max_batch: int = 8

    def __post_init__(self):
        from river.config import EngineConfig
        from river.exits import FULL, ExitConfig

        if self.engine is None:
            object.__setattr__(self, "engine", EngineConfig())
        if self.default_exit is None:
            object.__setattr__(self, "default_exit", FULL)
        if not isinstance(self.engine, EngineConfig):
            raise ValueError(f"engine must be an EngineConfig, got {self.engine!r}")
        if not isinstance(self.default_exit, ExitConfig):
            raise ValueError(f"default_exit must be an ExitConfig, got {self.default_exit!r}")
        if isinstance(self.warmup_max_batch, bool) or not isinstance(self.warmup_max_batch, int):
            raise ValueError(f"warmup_max_batch must be an int, got {self.warmup_max_batch!r}")
        if self.warmup_max_batch < 0:
            raise ValueError(f"warmup_max_batch must be >= 0, got {self.warmup_max_batch}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string or None")


# ---------------------------------------------------------------------------- running it
def _uvicorn_server(app, engine_loop: EngineLoop, **config):
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # End the streams first: uvicorn's graceful shutdown waits for open connections.
            engine_loop.request_stop()
            super().handle_exit(sig, frame)

    return _Server(uvicorn.Config(app, lifespan="off", timeout_graceful_shutdown=5, **config))


class ServerHandle:
    """A server in this process: uvicorn in one thread, the engine loop in another. For tests
    and benchmarks; port 0 picks a free port (see `.port`, `.url`)."""

    def __init__(
        self,
        config: ServerConfig,
        host: str = "127.0.0.1",
        port: int = 0,
        engine_factory=None,
        log_level: str = "warning",
    ):
        from river.serve_app import build_app

        self.engine_loop = EngineLoop(config, engine_factory)
        self.app = build_app(self.engine_loop)
        # Bind here so the port is known (and taken) before the server thread runs.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        self.server = _uvicorn_server(self.app, self.engine_loop, log_level=log_level)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, name="river-http", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, wait_ready: bool = True, timeout: float = 300.0) -> ServerHandle:
        self.engine_loop.start()
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        if wait_ready:
            self.engine_loop.ready.wait(max(0.0, deadline - time.monotonic()))
            if self.engine_loop.state != "ready":
                self.stop()
                raise RuntimeError(f"the engine did not load: {self.engine_loop.load_error}")
        return self

    def stop(self) -> None:
        self.engine_loop.stop()
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(30)
        self._sock.close()

    def __enter__(self) -> ServerHandle:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------- command line
# river.exits.MODES and POLICIES, spelled out so the parser is built without importing torch
# (tests/test_server_lifecycle.py checks they agree).
EXIT_MODES = ("full", "w4", "river", "propagate", "mask", "lossless")
EXIT_POLICIES = ("per_row", "batch_min")
_DESCRIPTION = (
    "Serve /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics. Requests "
    "from all clients share the engine's batches. river's own settings are extra body fields: "
    'top_k, ignore_eos, and exit ({"mode", "threshold", "min_layer", "policy"} or a mode string).'
)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to the `river` command line."""
    s = subparsers.add_parser(
        "serve",
        help="serve an OpenAI-compatible HTTP API with continuous batching",
        description=_DESCRIPTION,
    )
    _add_serve_arguments(s)
    s.set_defaults(func=run_serve)
    return s


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0..65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in 0..65535, got {port}")
    return port


def _can_listen(host: str, port: int) -> str | None:
    """None if (host, port) can be bound now, else why not: checked before the model loads, so
    a busy port is one clear error instead of a load followed by uvicorn's exit. The socket
    is made the way uvicorn makes its own (IPv6 for a host with a colon, else IPv4)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


def _add_serve_arguments(s: argparse.ArgumentParser) -> None:
    arg = s.add_argument  # an option given no default defaults to None
    arg(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="Hugging Face Llama directory (default: the bundled SmolLM2-135M)",
    )
    arg("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    arg("--port", type=_port, default=8000, help="port to listen on (default 8000)")
    arg("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: no key)")
    arg("--device", help="cpu or cuda (default: cuda if available)")
    arg(
        "--exit",
        default="full",
        choices=EXIT_MODES,
        help="default exit mode of requests that do not choose one (default full)",
    )
    arg("--threshold", type=float, help="default exit cosine threshold")
    arg("--min-layer", type=int, help="default backbone layers before exit")
    arg("--policy", choices=EXIT_POLICIES, help="default exit policy")
    arg("--max-num-seqs", type=int, default=64, help="rows in one decode batch (default 64)")
    arg(
        "--tp",
        "--tensor-parallel-size",
        dest="tp",
        type=int,
        default=1,
        help="shard the model across this many processes (one per GPU; gloo on the CPU); "
        "the server starts the other ranks itself, or run under torchrun (README)",
    )
    arg(
        "--torch-compile",
        action="store_true",
        help="CPU: decode steps through torch.compile. Each batch size and exit mode compiles "
        "once (tens of seconds with a cold inductor cache, a few seconds warm): those of the "
        "default exit up to --warmup-max-batch rows at start, the others on first use",
    )
    arg(
        "--warmup-max-batch",
        type=int,
        default=8,
        help="with --torch-compile: compile the default exit's decode steps for batches up to "
        "this many rows before /health reports ready (default 8; 0: compile on first use)",
    )
    from river.cli import CALIBRATION_HELP, CALIBRATIONS, precision_spec

    arg(
        "--river-precision",
        type=precision_spec,
        help="river twins: w4, w6, w8, mix:B or mix6:B (default: the engine's, see README)",
    )
    arg("--river-calibration", choices=CALIBRATIONS, help=CALIBRATION_HELP)
    arg(
        "--kv-cache-tokens",
        type=int,
        help="tokens the KV pool holds (default: the engine's, 65536)",
    )
    arg(
        "--served-model-name",
        help="the model id clients send and /v1/models lists (default: the directory name)",
    )
    arg(
        "--lazy-river",
        action="store_true",
        help="build the river twins on the first w4/river request instead of at start",
    )
    arg(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default info)",
    )


def config_from_args(args) -> ServerConfig:
    from river.config import EngineConfig
    from river.exits import ExitConfig

    exit_kw = {"mode": args.exit}
    for name in ("threshold", "min_layer", "policy"):
        if getattr(args, name) is not None:
            exit_kw[name] = getattr(args, name)
    engine_kw = {
        "device": args.device,
        "max_num_seqs": args.max_num_seqs,
        "tensor_parallel_size": args.tp,
        "torch_compile": args.torch_compile,
    }
    if args.river_precision is not None:
        engine_kw["river_precision"] = args.river_precision
    if args.river_calibration is not None:
        engine_kw["river_calibration"] = args.river_calibration
    if args.kv_cache_tokens is not None:
        engine_kw["kv_cache_tokens"] = args.kv_cache_tokens
    return ServerConfig(
        model=args.model,
        engine=EngineConfig(**engine_kw),
        default_exit=ExitConfig(**exit_kw),
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        preload_river=not args.lazy_river,
        warmup_max_batch=args.warmup_max_batch,
    )


def run_serve(args) -> int:
    """`river serve`: load the model in the engine thread while uvicorn already answers
    /health (503 until ready); returns 2 if the model fails to load."""
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"river serve: error: {e}", file=sys.stderr)
        return 2
    if config.engine.tensor_parallel_size > 1 and os.environ.get("RANK", "0") != "0":
        # torchrun's rank 1..: no HTTP server here; this Engine serves rank 0's steps and ends
        # the process when rank 0 closes (river.parallel)
        from river.engine import Engine

        Engine(config.model, config.engine)
    why = _can_listen(args.host, args.port)
    if why is not None:
        print(f"river serve: error: {why}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(message)s")
    holder = {}

    def on_load_error(msg):
        server = holder.get("server")
        if server is not None:
            server.should_exit = True

    from river.serve_app import build_app

    engine_loop = EngineLoop(config, on_load_error=on_load_error)
    app = build_app(engine_loop)
    server = _uvicorn_server(
        app, engine_loop, host=args.host, port=args.port, log_level=args.log_level
    )
    holder["server"] = server
    print(
        f"river serve: loading {args.model or 'the default model'}; "
        f"listening on http://{args.host}:{args.port} (/health is 503 until the model is ready)",
        file=sys.stderr,
    )
    engine_loop.start()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down for
        pass
    finally:
        engine_loop.stop()
    if engine_loop.state == "failed" or engine_loop.load_error:
        print(f"river serve: error: {engine_loop.load_error}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    """`python -m river.server [MODEL] ...`: the same as `river serve`."""
    p = argparse.ArgumentParser(prog="river serve", description=_DESCRIPTION)
    _add_serve_arguments(p)
    return run_serve(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
