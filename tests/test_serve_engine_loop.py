"""The engine's step loop as the server drives it (``AsyncEngine`` over a real ``LocalPipeline`` of
the session's merged store): streaming, cancellation that stops a request early, and the failure
path when a stage is lost (every request ends at once, nothing hangs, nothing steps again).

``Gated`` wraps the real pipeline so a test decides when each step may start: cancellations and
failures land at a known step, never by timing luck.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from mmer_dist.errors import InvalidInputError
from mmer_dist.model.async_engine import AsyncEngine
from mmer_dist.model.engine import Engine, GenerationRequest, LocalPipeline, StageLostError
from mmer_dist.model.prompt import Retention, TextPart, plan_prompt
from mmer_dist.model.sampling import SamplingParams
from mmer_dist.store.store import Store
from mmer_dist.store.weights import VersionWeights

TEXT = (1, 5, 30, 31, 32, 40, 41, 50)


class Gated:
    """A real pipeline whose steps each need a permit: ``permits`` of them, then ``allow()`` opens
    the gate for good; ``held`` is set while a step waits. ``lose()`` makes the next step and every
    later call find its stage gone, as a killed stage actor would."""

    def __init__(self, pipe: LocalPipeline, permits: int | None = None):
        self.pipe, self.lost = pipe, False
        self.version, self.vocabulary, self.max_positions = pipe.version, pipe.vocabulary, pipe.max_positions
        self.forwards = 0
        self._permits = permits  # None: open
        self._gate = threading.Condition()
        self.held = threading.Event()

    def allow(self) -> None:
        with self._gate:
            self._permits = None
            self._gate.notify_all()

    def lose(self) -> None:
        self.lost = True

    def _check(self) -> None:
        if self.lost:
            raise StageLostError("stage 0 is gone (killed by the test)")

    def forward(self, batch):
        with self._gate:
            while self._permits == 0:
                self.held.set()
                self._gate.wait()
            if self._permits is not None:
                self._permits -= 1
        self._check()
        self.forwards += 1
        return self.pipe.forward(batch)

    def release(self, request_ids) -> None:
        self._check()
        self.pipe.release(request_ids)

    def slot_capacity(self) -> int:
        return self.pipe.slot_capacity()

    def stats(self) -> list[dict]:
        return self.pipe.stats()


@pytest.fixture(scope="module")
def pipe(merged_store) -> LocalPipeline:
    return LocalPipeline.build(VersionWeights(Store.open(str(merged_store)), 1), 1, dtype=torch.float32,
                               slot_budget_bytes=1 << 30)


def request(pipe, rid: str, n: int) -> GenerationRequest:
    prompt = plan_prompt([TextPart(TEXT)], Retention("llava-hf"), pipe.vocabulary)
    return GenerationRequest(rid, prompt, SamplingParams(n))


def cached(pipe) -> int:
    """Requests with KV caches on the pipeline's stages."""
    return sum(len(s.caches) for s in pipe.stages)


def test_streams_equal_the_synchronous_engine_and_bad_requests_fail_their_caller(pipe):
    engine = AsyncEngine(Engine(pipe))

    async def collect(rid, n):
        return [e async for e in engine.generate(request(pipe, rid, n))]

    async def main():
        return await asyncio.gather(collect("a", 5), collect("b", 7))

    try:
        a, b = asyncio.run(main())
        want = Engine(pipe).generate([request(pipe, "ref", 7)])["ref"]
        assert [e.token for e in b] == [e.token for e in want] and [e.token for e in a] == [e.token for e in want][:5]
        assert a[-1].finish_reason == "length" and engine.finished == {"length": 2}
        with pytest.raises(InvalidInputError, match="max_tokens"):  # past the context: refused at the call
            engine.generate(request(pipe, "c", 300))
    finally:
        engine.shutdown()
    assert not cached(pipe)


def test_a_cancelled_request_stops_at_the_next_step(pipe):
    gated = Gated(pipe, permits=1)  # the prefill runs; the first decode step waits for the test
    engine = AsyncEngine(Engine(gated))

    async def cancel_after_the_first_token():
        stream = engine.generate(request(pipe, "cancel", 200))
        first = await stream.__anext__()
        assert await asyncio.to_thread(gated.held.wait, 60)  # the next step is under way
        await stream.aclose()  # the client is gone: the abort waits for the step in progress
        gated.allow()
        return first

    try:
        first = asyncio.run(cancel_after_the_first_token())
        engine.shutdown()  # joins the loop: every command it had is done
        assert first.token is not None and first.finish_reason is None
        # one step in flight when the abort came, then none: 2 of its 200 tokens, its caches freed
        assert gated.forwards == 2 and engine.finished == {"abort": 1}
        assert not cached(pipe)
    finally:
        engine.shutdown()


def test_a_lost_stage_ends_every_request_at_once_and_the_engine_stops(pipe):
    gated = Gated(pipe, permits=1)  # the prefill runs; the test holds the next step, then loses its stage
    failed = threading.Event()
    engine = AsyncEngine(Engine(gated), on_failure=failed.set)

    async def main():
        running = engine.generate(request(pipe, "running", 50))
        first = await running.__anext__()
        assert await asyncio.to_thread(gated.held.wait, 60)  # the next step waits at the gate

        async def collect(stream):
            return [e async for e in stream]

        queued = asyncio.ensure_future(collect(engine.generate(request(pipe, "queued", 50))))
        await asyncio.sleep(0)  # it is handed to the loop, which is held in the step
        gated.lose()
        gated.allow()
        return first, await collect(running), await queued

    try:
        first, running, queued = asyncio.run(main())
        assert first.finish_reason is None
        assert running[-1].finish_reason == "unavailable" and "stage 0 is gone" in running[-1].error
        assert [e.finish_reason for e in queued] == ["unavailable"]
        assert failed.wait(10) and isinstance(engine.failure, StageLostError)
        with pytest.raises(StageLostError, match="the engine stopped"):  # later requests fail at the call
            engine.generate(request(pipe, "late", 5))
        steps = gated.forwards
        engine.shutdown()
        assert gated.forwards == steps == 1  # the lost step raised before its forward; none after it
    finally:
        engine.shutdown()
        pipe.release(["running"])  # the cache a real lost stage would have taken with it
