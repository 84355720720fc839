"""The engine's step loop on its own thread, with an asyncio face for servers.

``AsyncEngine.generate`` validates a request at once (a bad request fails its caller, never the
loop) and returns its stream: iterating it hands the request to the loop thread and yields its
``TokenEvent``s as steps produce them. A caller
that stops listening (a client disconnect cancels the task) aborts its request, which frees its
KV caches at the next step boundary. Requests join and leave between steps: that is all the
continuous batching a server needs.

An engine that cannot step any more (its pipeline lost a stage, or a step raised: a bug) ends
every request at once (``unavailable`` / ``error``), answers later ones the same way, and says
why in ``failure``; its owner replaces it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from mmer_dist.errors import InvalidInputError
from mmer_dist.model.engine import Engine, GenerationRequest, StageLostError, TokenEvent

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: Engine, name: str = "mmer-engine", on_failure: Callable[[], None] | None = None):
        """``on_failure()`` is called (on the loop thread) once the engine cannot step any more."""
        self.engine = engine
        self._on_failure = on_failure
        self._commands: queue.Queue = queue.Queue()
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self.failure: BaseException | None = None  # why it stopped stepping: a lost stage, or a bug
        self._closed = False  # the loop has ended: nothing more is answered
        self.finished: collections.Counter[str] = collections.Counter()  # requests ended, by finish reason
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """The request's events, once iterated; a request the engine cannot run raises here."""
        if self.failure is not None:
            raise StageLostError(f"the engine stopped: {self.failure}")
        self.engine.validate(request)
        return self._stream(request)

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request.request_id in self._listeners:
                raise InvalidInputError(f"request id {request.request_id!r} is already in use")
            self._listeners[request.request_id] = (loop, events)
            closed = self._closed
        self._commands.put(("add", request))
        self._wake.set()
        if closed:  # stopped meanwhile: nothing would ever answer
            self._deliver(TokenEvent(request.request_id, finish_reason="unavailable", error="the engine stopped"))
        finished = False
        try:
            while True:
                event = await events.get()
                yield event
                if event.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:  # the caller went away: free the request's caches
                self._commands.put(("abort", request.request_id))
                self._wake.set()
            with self._lock:
                self._listeners.pop(request.request_id, None)

    def stats(self) -> dict:
        # Engine.stats copies what it iterates: read from another thread
        return {**self.engine.stats(), "finished": dict(self.finished)}

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the loop thread -------------------------------------------------------------------------

    def _deliver(self, event: TokenEvent) -> None:
        with self._lock:
            target = self._listeners.get(event.request_id)
            if event.finish_reason is not None:
                self.finished[event.finish_reason] += 1
        if target is not None:
            loop, events = target
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening
                pass

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                if self.failure is not None:
                    self._deliver(TokenEvent(arg.request_id, finish_reason="unavailable", error=str(self.failure)))
                    continue
                try:
                    self.engine.enqueue(arg)
                except Exception as e:  # validated already; a race on the id, say
                    self._deliver(TokenEvent(arg.request_id, finish_reason="error", error=str(e)))
            elif (event := self.engine.abort(arg)) is not None:
                self._deliver(event)

    def _fail(self, failure: BaseException, reason: str) -> None:
        """No more steps: every request ends now, and later ones at once."""
        first = self.failure is None
        self.failure = failure
        for event in self.engine.fail_all(reason, f"{type(failure).__name__}: {failure}"):
            self._deliver(event)
        if first and self._on_failure is not None:
            self._on_failure()

    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                self._apply_commands()
                if self.failure is not None or not self.engine.has_work:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                try:
                    events = self.engine.step()
                except Exception as e:  # noqa: BLE001 - the engine contains step failures: this is a bug
                    log.exception("engine step failed; the engine stops")
                    self._fail(e, "error")
                    continue
                for event in events:
                    self._deliver(event)
                if self.engine.lost is not None:
                    self._fail(self.engine.lost, "unavailable")
        finally:  # aborts still queued free their caches; whoever still listens hears that nothing more comes
            try:
                self._apply_commands()
            except Exception:  # noqa: BLE001 - closing goes on
                log.exception("could not apply the engine's last commands")
            with self._lock:
                self._closed = True
                waiting = list(self._listeners)
            for request_id in waiting:
                self._deliver(TokenEvent(request_id, finish_reason="unavailable", error="the engine stopped"))
