"""The HTTP side of `river serve`: the FastAPI app with its routes (/v1/completions,
/v1/chat/completions, /v1/models, /health, /metrics), API-key checks, OpenAI-shaped errors, and
each request's events turned into one JSON answer or a stream of server-sent events.

It runs on the asyncio event loop (uvicorn) and never touches the Engine: it tokenizes with the
engine loop's own Tokenizer instance, hands Jobs to the EngineLoop, and reads only the plain
values and the frozen stats snapshot the engine thread publishes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from river import __version__
from river.errors import RiverError
from river.openai_protocol import APIError, bad, error_body, parse_request, with_max_tokens
from river.openai_responses import (
    chunk,
    new_id,
    now,
    response,
    river_info,
    sse,
    usage,
    usage_chunk,
)
from river.serve_loop import DISCONNECTED, EngineLoop, Job, unavailable
from river.serve_metrics import TPS_WINDOW_S, render_metrics

log = logging.getLogger("river.server")


def build_app(engine_loop: EngineLoop):
    """The FastAPI app over an EngineLoop (started separately)."""
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
            render_metrics(engine_loop.stats, TPS_WINDOW_S), media_type="text/plain; version=0.0.4"
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
            # the rest of the context window, or of the KV pool where that is smaller (a
            # request reserves blocks for its whole budget)
            room = min(limit - len(ids), engine_loop.pool_tokens + 1 - len(ids))
            parsed = with_max_tokens(parsed, max(1, room))
        job = Job(asyncio.get_running_loop(), ids, parsed.params)
        watcher = asyncio.create_task(_watch_disconnect(request, job))
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

    async def event_stream(job: Job, parsed, prompt_tokens, rid, created, model):
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

    return app


async def _watch_disconnect(request, job: Job) -> None:
    """Once the body is read, the next ASGI message is http.disconnect: the client left."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.queue.put_nowait(DISCONNECTED)
            return


class _EventStream(StreamingResponse):
    """Server-sent events that abort the request as soon as the client is gone, whether
    the disconnect shows up as a message (_watch_disconnect) or as a failed send."""

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
