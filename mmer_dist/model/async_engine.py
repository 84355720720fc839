"""The engine's step loop on its own thread, with an asyncio face for servers.

``AsyncEngine.generate`` validates a request at once (a bad request fails its caller, never the
loop), hands it to the loop thread and yields its ``TokenEvent``s as steps produce them. A caller
that stops listening (a client disconnect cancels the task) aborts its request, which frees its
KV caches at the next step boundary. Requests join and leave between steps: that is all the
continuous batching a server needs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from mmer_dist.model.engine import Engine, GenerationRequest, TokenEvent

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: Engine, name: str = "mmer-engine"):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def active(self) -> int:
        """Requests admitted or waiting (a version is dropped once this is 0)."""
        with self._lock:
            return len(self._listeners)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        self.engine.validate(request)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request.request_id in self._listeners:
                from mmer_dist.errors import InvalidInputError
                raise InvalidInputError(f"request id {request.request_id!r} is already in use")
            self._listeners[request.request_id] = (loop, events)
        self._commands.put(("add", request))
        self._wake.set()
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
        return self.engine.stats()  # read from another thread: Engine.stats copies what it iterates

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout)

    # -- the loop thread -------------------------------------------------------------------------

    def _deliver(self, event: TokenEvent) -> None:
        with self._lock:
            target = self._listeners.get(event.request_id)
        if target is not None:
            loop, events = target
            loop.call_soon_threadsafe(events.put_nowait, event)

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add(arg)
                except Exception as e:  # validated already; a race on the id, say
                    self._deliver(TokenEvent(arg.request_id, finish_reason="error", error=str(e)))
            elif (event := self.engine.abort(arg)) is not None:
                self._deliver(event)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            self._apply_commands()
            if not self.engine.has_work:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception:  # the engine contains step failures; this is a bug: keep the loop alive
                log.exception("engine step failed")
                continue
            for event in events:
                self._deliver(event)
