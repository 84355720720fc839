"""The LLM deployment (Serve name ``LLMEngine``): one replica is one whole pipeline of a store version.

It wraps ``serve.llm.LLMServer``: the stage actors go into the replica's own placement group
(``app.py`` sizes it: one bundle for the replica, one per stage), media go to the ``MediaEncoders``
deployment, and ``chat`` streams events to the ingress. A ``Follower`` thread keeps the replica
on the store's serving pointer (or the version pinned in ``user_config``).
"""

from __future__ import annotations

import asyncio
import os

from ray.util import get_current_placement_group

from serve import log
from serve.config import ServeOptions
from serve.errors import ApiError
from serve.protocol import ChatCompletionRequest
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
        try:
            async for event in self.server.chat(request):
                yield event
        except Exception as e:  # noqa: BLE001 - every failure is the client's answer
            error = ApiError.from_exception(e)
            if error.status == 500:  # not a refusal, a lost process or a timeout: a bug, with its traceback
                log.exception("request failed")
            yield {"type": "error", "error": error}

    async def models(self) -> list[dict]:
        return self.server.models_listing()

    async def ready(self) -> dict:
        """``/readyz``: ``status`` is ``loading``, ``serving vN`` or ``degraded: why``."""
        return {**self.server.versions.status(), "models": self.server.model_ids()}

    async def stats(self) -> dict:
        return {**self.server.stats(), "pid": os.getpid()}

    def check_health(self) -> None:
        """Fails (Serve replaces the replica) when it cannot get well by itself: a lost stage
        that does not rebuild, a dead step loop or follower thread."""
        why = self.server.versions.unhealthy() or (None if self.follower.alive else "the follower thread died")
        if why is not None:
            raise RuntimeError(why)

    def __del__(self):
        for part, stop in (("follower", "stop"), ("server", "shutdown"), ("stages", "shutdown")):
            if (owner := getattr(self, part, None)) is not None:  # a constructor that failed made fewer
                getattr(owner, stop)()
