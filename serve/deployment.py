"""The LLM deployment (Serve name ``LLMEngine``): one replica is one whole pipeline of a store version.

It wraps ``serve.llm.LLMServer``: the stage actors go into the replica's own placement group
(``app.py`` sizes it: one bundle for the replica, one per stage), media go to the ``MediaEncoders``
deployment, and ``chat`` streams events to the ingress. A ``Follower`` thread keeps the replica
on the store's serving pointer (or the version pinned in ``user_config``).

With several replicas, retention requests reach the replica that already serves their model
(Ray Serve's model multiplexing: the ingress names the model as the request's
``multiplexed_model_id``, and ``hold`` here tells Serve which models this replica holds). The
router sends a request to a replica holding its model, else to one holding the fewest, so replicas
take distinct hot models instead of copies of the same ones. Holding a model is only a routing
hint: every replica serves every model (a model without a dense slot runs mask-native), and which
models get slots is the stages' demand-driven choice, which the routing feeds.
"""

from __future__ import annotations

import asyncio
import os

from ray import serve
from ray.util import get_current_placement_group

from serve import log
from serve.config import ServeOptions
from serve.errors import ApiError
from serve.metrics import ServeMetrics, StatsPoller
from serve.protocol import MERGED, ChatCompletionRequest
from serve.stage import StagePool


class LLMDeployment:
    async def __init__(self, encoders, options: dict):
        self.options = ServeOptions.from_args(options)
        placement_group = get_current_placement_group()
        # the stage processes start first, so their imports run beside this replica's own (torch,
        # transformers: most of a replica's start, which is why they are imported here, not above)
        self.stages = StagePool(self.options, placement_group)
        from serve.llm import LLMServer
        from serve.pipeline import RayPipeline
        from serve.versions import Follower

        async def encode(model_id, part_type, payload, limits):
            rows = await encoders.encode.remote(model_id, part_type, payload, limits)
            if isinstance(rows, ApiError):  # refused: answered, not raised (see serve.encoders)
                raise rows
            return rows

        self.server = LLMServer(self.options, encode, lambda weights: RayPipeline(weights, self.options, self.stages))
        await asyncio.get_running_loop().run_in_executor(None, self.server.versions.follow, self.options.version)
        self.follower = Follower(self.server.versions, self.options.follow_interval_s, self.options.version)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.metrics = ServeMetrics()
        self.poller = StatsPoller(self.server.versions, self.metrics, self.options.metrics_interval_s)
        # Serve keeps at most this many models on the replica (the least recently used is dropped,
        # and the router then sends that model elsewhere): as many as the replica has dense slots,
        # so the models routed here are the ones it can serve from slots. At least 1 (Serve's
        # minimum) when the budget holds none: a model then still stays with one replica, whose
        # steps read fewer distinct masks.
        self.models_held = max(1, self.server.versions.current.pipeline.slot_capacity())
        self.held: dict[str, HeldModel] = {}

        async def hold(model_id: str) -> HeldModel:
            """Serve's multiplexed "load": nothing to load (the stages hold every model), so it
            returns at once and a request never waits for it."""
            self.held[model_id] = HeldModel(model_id, self.held)
            return self.held[model_id]

        self.hold = serve.multiplexed(max_num_models_per_replica=self.models_held)(hold)

    async def reconfigure(self, user_config: dict) -> None:
        """``user_config: {"version": V}`` pins V (a RayService rollout); ``{"version": null}``
        follows the store's serving pointer again. In-flight requests keep their version."""
        unknown = sorted(set(user_config or {}) - {"version"})
        if unknown:
            raise ValueError(f"LLMEngine user_config takes 'version' only, not {unknown}")
        pinned = (user_config or {}).get("version", self.options.version)
        self.follower.pinned = pinned
        # loads beside the served version without blocking the replica's in-flight requests
        await asyncio.get_running_loop().run_in_executor(None, self.server.versions.follow, pinned)

    async def chat(self, request: ChatCompletionRequest):
        """The server's events; a failure is an ``error`` event (an ApiError), not an exception:
        Serve would log a traceback for each, a client's mistake included."""
        observed = self.metrics.request(request.model)
        try:
            async for event in self.server.chat(request):
                observed.observe(event)
                if event["type"] == "accepted" and request.model != MERGED:
                    await self.hold(request.model)  # admitted: a model of the served version
                yield event
        except Exception as e:  # noqa: BLE001 - every failure is the client's answer
            error = ApiError.from_exception(e)
            if error.status == 500:  # not a refusal, a lost process or a timeout: a bug, with its traceback
                log.exception("request failed")
            yield {"type": "error", "error": error}

    async def models(self) -> list[dict]:
        """The listing, with each model's residency on this replica now (polled off the loop)."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.poller.poll)
        except Exception as e:  # noqa: BLE001 - a stage being replaced: the last poll's residency
            log.info("residency not polled (%s); listing the last known", e)
        return self.server.models_listing(self.metrics.paths, self.replica)

    async def ready(self) -> dict:
        """``/readyz``: ``status`` is ``loading``, ``serving vN`` or ``degraded: why``."""
        return {**self.server.versions.status(), "models": self.server.model_ids()}

    async def stats(self) -> dict:
        return {**self.server.stats(), "pid": os.getpid(), "replica": self.replica,
                "models_held": sorted(self.held.copy()), "max_models_held": self.models_held}

    def check_health(self) -> None:
        """Fails (Serve replaces the replica) when it cannot get well by itself: a lost stage
        that does not rebuild, a dead step loop or follower thread."""
        why = self.server.versions.unhealthy() or (None if self.follower.alive else "the follower thread died")
        if why is not None:
            raise RuntimeError(why)

    def __del__(self):
        for part, stop in (("poller", "stop"), ("follower", "stop"), ("server", "shutdown"), ("stages", "shutdown")):
            if (owner := getattr(self, part, None)) is not None:  # a constructor that failed made fewer
                getattr(owner, stop)()


class HeldModel:
    """A model Serve routes to this replica. Serve calls ``__del__`` when it drops the model (the
    least recently used one, past ``max_num_models_per_replica``); garbage collection may call it
    again later, after the same model was held anew: only its own entry goes."""

    def __init__(self, model_id: str, held: dict):
        self.model_id, self._held = model_id, held

    def __del__(self):
        if self._held.get(self.model_id) is self:
            del self._held[self.model_id]
