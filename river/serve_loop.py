"""The engine thread of `river serve` and the life of a request as both threads see it.

The engine thread is the only owner of the Engine: it loads it, adds and aborts requests, and
steps it. Between two steps it drains a thread-safe inbox of submissions and aborts, so a request
that arrives while others are generating joins their batch at the next step, and a client that
leaves has its KV blocks back in the pool before the next step runs. Each request (a Job) has an
asyncio.Queue that the engine thread feeds through loop.call_soon_threadsafe, so neither side
ever waits on the other. Besides the events of each job, the HTTP side reads only the plain
values and the frozen stats snapshot that this thread publishes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from river.errors import OutOfBlocksError, RiverError
from river.openai_protocol import APIError, bad
from river.serve_metrics import LoopStats, StatsRecorder

if TYPE_CHECKING:
    from river.sampling import SamplingParams
    from river.server import ServerConfig

# One logger for all of `river serve`, named after its entry point.
log = logging.getLogger("river.server")

_STOP = object()


@dataclass(frozen=True)
class JobEvent:
    """What the engine thread tells a request: it was accepted, more text, done, an error; or,
    from the HTTP side itself, that its client disconnected."""

    kind: str  # accepted, text, done, error, disconnected
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    backbone_layers: tuple[int, ...] = ()
    error: APIError | None = None


DISCONNECTED = JobEvent("disconnected")


class Job:
    """One HTTP request as both threads see it. The asyncio side reads `queue` and sets `done`;
    the engine thread owns `req` and `sent` (characters of req.text already handed out)."""

    def __init__(self, aio_loop, prompt_ids: list[int], params: SamplingParams):
        self.aio_loop = aio_loop
        self.queue: asyncio.Queue[JobEvent] = asyncio.Queue()
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


def _post(events: list[tuple[Job, JobEvent]]) -> None:
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
        self.pool_tokens = 0  # the KV pool's capacity: a request's prompt + max_tokens - 1
        self.num_layers = 0
        self.tokenizer = None  # the HTTP side's own Tokenizer instance
        self.stats = LoopStats()
        # Engine-thread state.
        self._active: dict[int, Job] = {}
        self._totals = StatsRecorder()

    def _default_factory(self):
        from river.engine import Engine

        return Engine(self.config.model, self.config.engine)

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.state != "ready":
                raise unavailable(self)
            self._inbox.put(("submit", job))

    def abort(self, job: Job) -> None:
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
            if engine.config.torch_compile and self.config.warmup_max_batch:
                log.info(
                    "river serve: compiling the decode steps of batches up to %d rows "
                    "(--warmup-max-batch; tens of seconds each with a cold inductor cache)",
                    self.config.warmup_max_batch,
                )
                t = time.perf_counter()
                n = engine.warmup(self.config.default_exit, self.config.warmup_max_batch, False)
                log.info(
                    "river serve: %d decode steps compiled in %.0f s", n, time.perf_counter() - t
                )
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
        self.pool_tokens = engine.scheduler.allocator.num_blocks * engine.scheduler.block_size
        self.num_layers = engine.model_config.num_layers
        self.tokenizer = tokenizer
        self._publish(engine, time.perf_counter(), hist=True)
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

    def _add(self, engine, job: Job) -> None:
        try:
            req = engine.add_request(job.prompt_ids, job.params)
        except OutOfBlocksError as e:
            self._totals.rejected += 1
            _post([(job, JobEvent("error", error=bad(str(e), "max_tokens", "kv_cache_exceeded")))])
            return
        except (RiverError, ValueError) as e:  # InvalidRequestError, or an ExitConfig ValueError
            self._totals.rejected += 1
            _post([(job, JobEvent("error", error=bad(str(e))))])
            return
        except Exception as e:  # one bad request must not end the loop
            log.exception("river serve: adding a request failed")
            self._totals.rejected += 1
            err = APIError(500, f"the engine could not add the request: {e}", "server_error")
            _post([(job, JobEvent("error", error=err))])
            return
        job.req = req
        self._active[req.request_id] = job
        self._totals.prompt_tokens += len(req.prompt_ids)
        _post([(job, JobEvent("accepted", prompt_tokens=len(req.prompt_ids)))])

    def _abort(self, engine, job: Job) -> None:
        req = job.req
        if req is None or self._active.pop(req.request_id, None) is None:
            return  # refused when added, or already finished
        engine.abort(req)
        self._totals.finished["abort"] += 1

    def _fail_active(self, engine, err: APIError, reason: str) -> list[tuple[Job, JobEvent]]:
        """Abort every running request, counted as finished for `reason`; their error events."""
        events = []
        for job in self._active.values():
            engine.abort(job.req)
            self._totals.finished[reason] += 1
            events.append((job, JobEvent("error", error=err)))
        self._active.clear()
        return events

    def _step(self, engine) -> None:
        t0 = time.perf_counter()
        try:
            progressed = engine.step()
        except Exception as e:  # fail the batch, keep serving
            log.exception("river serve: an engine step failed")
            err = APIError(500, f"the engine step failed: {type(e).__name__}: {e}", "server_error")
            events = self._fail_active(engine, err, "error")
            self._publish(engine, time.perf_counter(), hist=True)
            _post(events)
            return
        t1 = time.perf_counter()
        # engine.last_step_decode_rows: the tokens that came from a decode step
        self._totals.step(t0, t1, len(progressed), engine.last_step_decode_rows)
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
                self._totals.finished[r.finish_reason] += 1
                ev = JobEvent(
                    "done",
                    text=piece,
                    prompt_tokens=len(r.prompt_ids),
                    completion_tokens=len(r.output_ids),
                    finish_reason=r.finish_reason,
                    backbone_layers=tuple(r.backbone_layers),
                )
                events.append((job, ev))
            elif piece:
                events.append((job, JobEvent("text", text=piece)))
        # Publish before handing out tokens, so a client that has its answer sees it counted.
        self._publish(engine, t1)
        _post(events)

    def _publish(self, engine, t: float, hist: bool = False) -> None:
        self.stats = self._totals.snapshot(engine, t, hist)

    def _shutdown(self, engine) -> None:
        """Abort every request, answer whatever is still queued, and publish the empty pool."""
        err = APIError(503, "the server is shutting down", "service_unavailable", None, "shutdown")
        events = self._fail_active(engine, err, "abort")
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                break
            if cmd is not _STOP and cmd[0] == "submit":
                events.append((cmd[1], JobEvent("error", error=err)))
        self._publish(engine, time.perf_counter(), hist=True)
        _post(events)
        close = getattr(engine, "close", None)  # (test doubles may have none)
        if close is not None:
            close()  # the other tensor-parallel ranks, if any


def unavailable(engine_loop: EngineLoop) -> APIError:
    """The error for a request the engine cannot take in its current state."""
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
