"""`river serve`: an OpenAI-compatible HTTP server that batches requests across clients.

Two threads, each the only owner of its side:
- the engine thread owns the Engine: it loads it, adds and aborts requests, and steps it. Between
  two steps it drains a thread-safe inbox of submissions and aborts, so a request that arrives
  while others are generating joins their batch at the next step, and a client that leaves has
  its KV blocks back in the pool before the next step runs.
- the asyncio event loop (uvicorn) owns HTTP. Each request has an asyncio.Queue that the engine
  thread feeds through loop.call_soon_threadsafe, so neither side ever waits on the other.
The HTTP side never touches the Engine: it tokenizes with its own Tokenizer instance and reads
only the plain values and the frozen stats snapshot the engine thread publishes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import queue
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from river.errors import OutOfBlocksError, RiverError
from river.openai_protocol import (
    APIError,
    LoopStats,
    bad,
    chunk,
    error_body,
    new_id,
    now,
    parse_request,
    render_metrics,
    response,
    river_info,
    sse,
    usage,
    usage_chunk,
    with_max_tokens,
)

# The engine's modules import torch: they are imported where used, so that `river --help`
# (whose parser add_serve_parser extends) does not pay for torch.
if TYPE_CHECKING:
    from river.config import EngineConfig
    from river.exits import ExitConfig
    from river.sampling import SamplingParams

log = logging.getLogger("river.server")

_STOP = object()
_TPS_WINDOW_S = 10.0  # decode tok/s is measured over this trailing window
_HIST_EVERY_S = 0.2  # the exit histogram is a device read: refresh it at most this often


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
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string or None")


@dataclass(frozen=True)
class _Event:
    kind: str  # accepted, text, done, error, disconnected
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    backbone_layers: tuple[int, ...] = ()
    error: APIError | None = None


_DISCONNECTED = _Event("disconnected")


class _Job:
    """One HTTP request as both threads see it. The asyncio side reads `queue` and sets `done`;
    the engine thread owns `req` and `sent` (characters of req.text already handed out)."""

    def __init__(self, aio_loop, prompt_ids: list[int], params: SamplingParams):
        self.aio_loop = aio_loop
        self.queue: asyncio.Queue[_Event] = asyncio.Queue()
        self.prompt_ids = prompt_ids
        self.params = params
        # Keep back a tail that could still turn into a stop string (as Engine.stream does).
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.req = None
        self.sent = 0
        self.done = False


def _deliver(batch):
    for q, ev in batch:
        q.put_nowait(ev)


def _post(events: list[tuple[_Job, _Event]]) -> None:
    """Hand events to their event loops: one wake-up per loop per step, not one per event."""
    by_loop: dict = {}
    for job, ev in events:
        by_loop.setdefault(job.aio_loop, []).append((job.queue, ev))
    for aio_loop, batch in by_loop.items():
        try:
            aio_loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # that event loop has closed: nobody is listening any more
            pass


class EngineLoop:
    """The engine thread. `submit`, `abort` and `stop` are safe from any thread; everything
    else about the Engine happens on this thread."""

    def __init__(self, config: ServerConfig, engine_factory=None, on_load_error=None):
        self.config = config
        self._factory = engine_factory or self._default_factory
        self._on_load_error = on_load_error
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders submit() against the state leaving "ready"
        self._thread = threading.Thread(target=self._run, name="river-engine", daemon=True)
        self.state = "loading"  # loading -> ready -> stopped, or loading -> failed
        self.load_error: str | None = None
        self.ready = threading.Event()  # set once state leaves "loading"
        # Published once at load, for the HTTP side (plain values, never the Engine itself).
        self.model_name: str | None = None
        self.max_model_len = 0
        self.num_layers = 0
        self.tokenizer = None  # the HTTP side's own Tokenizer instance
        self.stats = LoopStats()
        # Engine-thread state.
        self._active: dict[int, _Job] = {}
        self._finished = collections.Counter({"stop": 0, "length": 0, "abort": 0, "error": 0})
        self._rejected = self._prompt_tokens = self._generated = 0
        self._decode_steps = self._decode_rows = self._decode_rows_max = 0
        self._window: collections.deque = collections.deque()  # (t_start, t_end, decode rows)
        self._hist: tuple[int, ...] = ()
        self._hist_at = 0.0

    def _default_factory(self):
        from river.engine import Engine

        return Engine(self.config.model, self.config.engine)

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: _Job) -> None:
        with self._lock:
            if self.state != "ready":
                raise unavailable(self)
            self._inbox.put(("submit", job))

    def abort(self, job: _Job) -> None:
        self._inbox.put(("abort", job))

    def request_stop(self) -> None:
        """Ask the thread to abort everything and end (safe from a signal handler)."""
        self._inbox.put(_STOP)

    def stop(self, timeout: float = 30.0) -> None:
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            engine = self._factory()
            if self.config.preload_river:
                engine.ensure_river(progress=False)
            from river.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(engine.model_dir)
        except BaseException as e:  # any load failure is reported, not raised
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("river serve: the engine failed to load: %s", self.load_error)
            with self._lock:
                self.state = "failed"
            self.ready.set()
            if self._on_load_error is not None:
                self._on_load_error(self.load_error)
            return
        self.model_name = self.config.served_model_name or engine.model_dir.name
        self.max_model_len = engine.max_model_len
        self.num_layers = engine.model_config.num_layers
        self.tokenizer = tokenizer
        self._hist = tuple(engine.exit_histogram())
        self._publish(engine, time.perf_counter())
        with self._lock:
            self.state = "ready"
        self.ready.set()
        log.info("river serve: %s ready", self.model_name)
        try:
            self._serve(engine)
        except BaseException:
            log.exception("river serve: the engine loop crashed")
            raise
        finally:
            with self._lock:
                self.state = "stopped"
            self._shutdown(engine)

    def _serve(self, engine) -> None:
        while True:
            busy = engine.has_unfinished()
            for cmd in self._drain(block=not busy):
                if cmd is _STOP:
                    return
                op, job = cmd
                if op == "submit":
                    self._add(engine, job)
                else:
                    self._abort(engine, job)
            if engine.has_unfinished():
                self._step(engine)
            else:
                self._publish(engine, time.perf_counter(), hist=True)

    def _drain(self, block: bool) -> list:
        """Everything queued, up to and including a stop: what follows a stop is left for
        _shutdown to answer."""
        cmds = []
        if block:
            try:
                # The timeout only lets an idle loop republish its stats (tok/s decays to 0).
                cmds.append(self._inbox.get(timeout=1.0))
            except queue.Empty:
                return cmds
        while not cmds or cmds[-1] is not _STOP:
            try:
                cmds.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return cmds

    def _add(self, engine, job: _Job) -> None:
        try:
            req = engine.add_request(job.prompt_ids, job.params)
        except OutOfBlocksError as e:
            self._rejected += 1
            _post([(job, _Event("error", error=bad(str(e), "max_tokens", "kv_cache_exceeded")))])
            return
        except (RiverError, ValueError) as e:  # InvalidRequestError, or an ExitConfig ValueError
            self._rejected += 1
            _post([(job, _Event("error", error=bad(str(e))))])
            return
        except Exception as e:  # one bad request must not end the loop
            log.exception("river serve: adding a request failed")
            self._rejected += 1
            err = APIError(500, f"the engine could not add the request: {e}", "server_error")
            _post([(job, _Event("error", error=err))])
            return
        job.req = req
        self._active[req.request_id] = job
        self._prompt_tokens += len(req.prompt_ids)
        _post([(job, _Event("accepted", prompt_tokens=len(req.prompt_ids)))])

    def _abort(self, engine, job: _Job) -> None:
        req = job.req
        if req is None or self._active.pop(req.request_id, None) is None:
            return  # refused when added, or already finished
        engine.abort(req)
        self._finished["abort"] += 1

    def _step(self, engine) -> None:
        t0 = time.perf_counter()
        try:
            progressed = engine.step()
        except Exception as e:  # fail the batch, keep serving
            log.exception("river serve: an engine step failed")
            err = APIError(500, f"the engine step failed: {type(e).__name__}: {e}", "server_error")
            events = []
            for job in self._active.values():
                engine.abort(job.req)
                self._finished["error"] += 1
                events.append((job, _Event("error", error=err)))
            self._active.clear()
            self._publish(engine, time.perf_counter(), hist=True)
            _post(events)
            return
        t1 = time.perf_counter()
        rows = engine.last_step_decode_rows  # tokens that came from a decode step
        self._generated += len(progressed)
        if rows:
            self._decode_steps += 1
            self._decode_rows += rows
            self._decode_rows_max = max(self._decode_rows_max, rows)
            self._window.append((t0, t1, rows))
        events = []
        for r in progressed:
            job = self._active.get(r.request_id)
            if job is None:
                continue
            finished = r.finish_reason is not None
            end = len(r.text) if finished else len(r.text) - job.hold
            piece = r.text[job.sent : end] if end > job.sent else ""
            job.sent = max(job.sent, end)
            if finished:
                del self._active[r.request_id]
                self._finished[r.finish_reason] += 1
                ev = _Event(
                    "done",
                    text=piece,
                    prompt_tokens=len(r.prompt_ids),
                    completion_tokens=len(r.output_ids),
                    finish_reason=r.finish_reason,
                    backbone_layers=tuple(r.backbone_layers),
                )
                events.append((job, ev))
            elif piece:
                events.append((job, _Event("text", text=piece)))
        # Publish before handing out tokens, so a client that has its answer sees it counted.
        self._publish(engine, t1)
        _post(events)

    def _publish(self, engine, t: float, hist: bool = False) -> None:
        if hist or t - self._hist_at >= _HIST_EVERY_S:
            self._hist = tuple(engine.exit_histogram())
            self._hist_at = t
        while self._window and self._window[0][1] < t - _TPS_WINDOW_S:
            self._window.popleft()
        tps = 0.0
        if self._window:
            span = max(t - self._window[0][0], 1e-9)
            tps = sum(rows for _, _, rows in self._window) / span
        sched, alloc = engine.scheduler, engine.allocator
        self.stats = LoopStats(
            finished=tuple(self._finished.items()),
            rejected=self._rejected,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generated,
            running=len(sched.running),
            waiting=len(sched.waiting),
            kv_blocks_used=alloc.num_blocks - alloc.num_free,
            kv_blocks_total=alloc.num_blocks,
            decode_steps=self._decode_steps,
            decode_rows=self._decode_rows,
            decode_rows_max=self._decode_rows_max,
            decode_tokens_per_s=tps,
            exit_histogram=self._hist,
        )

    def _shutdown(self, engine) -> None:
        """Abort every request, answer whatever is still queued, and publish the empty pool."""
        err = APIError(503, "the server is shutting down", "service_unavailable", None, "shutdown")
        events = []
        for job in self._active.values():
            engine.abort(job.req)
            self._finished["abort"] += 1
            events.append((job, _Event("error", error=err)))
        self._active.clear()
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                break
            if cmd is not _STOP and cmd[0] == "submit":
                events.append((cmd[1], _Event("error", error=err)))
        self._publish(engine, time.perf_counter(), hist=True)
        _post(events)


def unavailable(engine_loop: EngineLoop) -> APIError:
    if engine_loop.state == "loading":
        return APIError(
            503,
            "the model is still loading; retry in a moment",
            "service_unavailable",
            None,
            "model_loading",
        )
    if engine_loop.state == "failed":
        return APIError(
            500, f"the engine failed to load: {engine_loop.load_error}", "server_error", None
        )
    return APIError(503, "the server is shutting down", "service_unavailable", None, "shutdown")


# ---------------------------------------------------------------------------- HTTP
def build_app(engine_loop: EngineLoop):
    """The FastAPI app over an EngineLoop (started separately)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from river import __version__

    cfg = engine_loop.config
    app = FastAPI(title="river", version=__version__, openapi_url=None, docs_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request, e):
        log.exception("river serve: unhandled error")
        body = error_body(f"internal error: {type(e).__name__}: {e}", "server_error")
        return JSONResponse(body, status_code=500)

    def check_auth(request) -> None:
        if cfg.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), cfg.api_key.encode()
        ):
            raise APIError(
                401,
                "missing or invalid API key (send 'Authorization: Bearer <key>')",
                "authentication_error",
                None,
                "invalid_api_key",
            )

    def check_ready() -> None:
        if engine_loop.state != "ready":
            raise unavailable(engine_loop)

    async def health(request):
        state = engine_loop.state
        status = {"ready": 200, "loading": 503, "stopped": 503}.get(state, 500)
        body = {"status": "ok" if state == "ready" else state}
        if engine_loop.load_error:
            body["error"] = engine_loop.load_error
        return JSONResponse(body, status_code=status)

    async def metrics(request):
        return PlainTextResponse(
            render_metrics(engine_loop.stats, _TPS_WINDOW_S), media_type="text/plain; version=0.0.4"
        )

    async def models(request):
        check_auth(request)
        check_ready()
        card = {
            "id": engine_loop.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "river",
            "max_model_len": engine_loop.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(request):
        return await generate(request, "completion")

    async def chat_completions(request):
        return await generate(request, "chat")

    # Plain Starlette routes: the handlers read the body themselves (openai_protocol), so
    # FastAPI's signature-driven validation (and its 422 errors) stays out of the way.
    app.add_route("/health", health, methods=["GET"])
    app.add_route("/metrics", metrics, methods=["GET"])
    app.add_route("/v1/models", models, methods=["GET"])
    app.add_route("/v1/completions", completions, methods=["POST"])
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])

    def tokenize(parsed) -> list[int]:
        tok = engine_loop.tokenizer
        if parsed.kind == "chat":
            text = tok.apply_chat_template(parsed.messages, add_generation_prompt=True)
            return tok.encode(text, add_special_tokens=False)
        if isinstance(parsed.prompt, str):
            return tok.encode(parsed.prompt, add_special_tokens=True)  # as Engine.generate does
        return parsed.prompt

    async def generate(request, kind: str):
        check_auth(request)
        check_ready()
        try:
            body = await request.json()
        except ValueError as e:
            raise bad(f"the request body is not valid JSON: {e}") from e
        parsed = parse_request(body, kind, cfg.default_exit)
        if parsed.model is not None and parsed.model not in (engine_loop.model_name, cfg.model):
            raise APIError(
                404,
                f"the model {parsed.model!r} does not exist; this server serves "
                f"{engine_loop.model_name!r}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        param = "prompt" if kind == "completion" else "messages"
        try:
            # Off the event loop: a long prompt or template takes a while to encode.
            ids = await asyncio.to_thread(tokenize, parsed)
        except (RiverError, ValueError) as e:  # the chat template refused the messages
            raise bad(str(e), param) from e
        limit = engine_loop.max_model_len
        if len(ids) >= limit:
            raise bad(
                f"the prompt is {len(ids)} tokens; the context window of {engine_loop.model_name}"
                f" is {limit} tokens, and at least one must be left to generate",
                param,
                "context_length_exceeded",
            )
        if not parsed.max_tokens_given and kind == "chat":
            parsed = with_max_tokens(parsed, limit - len(ids))
        job = _Job(asyncio.get_running_loop(), ids, parsed.params)
        watcher = asyncio.create_task(watch_disconnect(request, job))
        handed_off = False
        try:
            engine_loop.submit(job)
            first = await job.queue.get()
            if first.kind == "error":
                job.done = True
                raise first.error
            if first.kind == "disconnected":
                return Response(status_code=499)  # nobody reads this; the finally aborts
            rid, created, model = new_id(kind), now(), engine_loop.model_name
            if parsed.stream:
                stream = event_stream(job, parsed, first.prompt_tokens, rid, created, model)

                def on_close():
                    watcher.cancel()
                    if not job.done:
                        engine_loop.abort(job)

                handed_off = True
                return _EventStream(stream, on_close)
            parts = []
            while True:
                ev = await job.queue.get()
                if ev.kind == "disconnected":
                    return Response(status_code=499)
                if ev.kind == "error":
                    job.done = True
                    raise ev.error
                parts.append(ev.text)
                if ev.kind == "done":
                    job.done = True
                    break
            body = response(
                kind,
                rid,
                created,
                model,
                "".join(parts),
                ev.finish_reason,
                usage(first.prompt_tokens, ev.completion_tokens),
                river_info(list(ev.backbone_layers), engine_loop.num_layers, parsed.params.exit),
            )
            return JSONResponse(body)
        finally:
            if not handed_off:
                watcher.cancel()
                if not job.done:
                    engine_loop.abort(job)

    async def watch_disconnect(request, job: _Job) -> None:
        """Once the body is read, the next ASGI message is http.disconnect: the client left."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.queue.put_nowait(_DISCONNECTED)
                return

    async def event_stream(job: _Job, parsed, prompt_tokens, rid, created, model):
        kind = parsed.kind
        use = None if parsed.include_usage else False
        if kind == "chat":
            yield sse(chunk(kind, rid, created, model, "", role=True, use=use))
        while True:
            ev = await job.queue.get()
            if ev.kind == "disconnected":
                return
            if ev.kind == "error":
                job.done = True
                yield sse(ev.error.body())
                break
            if ev.kind == "text":
                yield sse(chunk(kind, rid, created, model, ev.text, use=use))
                continue
            job.done = True
            if ev.text and kind == "chat":  # a chat stream's last chunk is an empty delta
                yield sse(chunk(kind, rid, created, model, ev.text, use=use))
            last = ev.text if kind == "completion" else ""
            yield sse(chunk(kind, rid, created, model, last, ev.finish_reason, use=use))
            if parsed.include_usage:
                info = river_info(
                    list(ev.backbone_layers), engine_loop.num_layers, parsed.params.exit
                )
                use_ = usage(prompt_tokens, ev.completion_tokens)
                yield sse(usage_chunk(kind, rid, created, model, use_, info))
            break
        yield sse("[DONE]")

    class _EventStream(StreamingResponse):
        """Server-sent events that abort the request as soon as the client is gone, whether
        the disconnect shows up as a message (watch_disconnect) or as a failed send."""

        def __init__(self, chunks, on_close):
            super().__init__(
                chunks,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
            self._on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await send(
                    {
                        "type": "http.response.start",
                        "status": self.status_code,
                        "headers": self.raw_headers,
                    }
                )
                async for data in self.body_iterator:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # ASGI 2.4 servers raise on a send to a closed connection
                pass
            finally:
                # Run the generator's cleanup now, not whenever it is garbage collected.
                await self.body_iterator.aclose()
                self._on_close()

    return app


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


# river.exits.MODES and POLICIES, spelled out so the parser is built without importing torch
# (tests/test_server.py checks they agree).
EXIT_MODES = ("full", "w4", "river", "propagate", "mask")
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


def _add_serve_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="Hugging Face Llama directory (default: the bundled SmolLM2-135M)",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    s.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: no key)",
    )
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    s.add_argument(
        "--exit",
        default="full",
        choices=EXIT_MODES,
        help="default exit mode of requests that do not choose one (default full)",
    )
    s.add_argument("--threshold", type=float, default=None, help="default exit cosine threshold")
    s.add_argument(
        "--min-layer", type=int, default=None, help="default backbone layers before exit"
    )
    s.add_argument("--policy", default=None, choices=EXIT_POLICIES, help="default exit policy")
    s.add_argument(
        "--max-num-seqs", type=int, default=64, help="rows in one decode batch (default 64)"
    )
    s.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=None,
        help="tokens the KV pool holds (default: the engine's, 65536)",
    )
    s.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients send and /v1/models lists (default: the directory name)",
    )
    s.add_argument(
        "--lazy-river",
        action="store_true",
        help="build the 4-bit river twins on the first w4/river request instead of at start",
    )
    s.add_argument(
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
    engine_kw = {"device": args.device, "max_num_seqs": args.max_num_seqs}
    if args.kv_cache_tokens is not None:
        engine_kw["kv_cache_tokens"] = args.kv_cache_tokens
    return ServerConfig(
        model=args.model,
        engine=EngineConfig(**engine_kw),
        default_exit=ExitConfig(**exit_kw),
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        preload_river=not args.lazy_river,
    )


def run_serve(args) -> int:
    """`river serve`: load the model in the engine thread while uvicorn already answers
    /health (503 until ready); returns 2 if the model fails to load."""
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"river serve: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(message)s")
    holder = {}

    def on_load_error(msg):
        server = holder.get("server")
        if server is not None:
            server.should_exit = True

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
