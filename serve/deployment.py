"""The LLM deployment (Serve name ``LLMEngine``): one replica is one whole pipeline of a store version.

It wraps ``serve.llm.LLMServer``: the stage actors go into the replica's own placement group
(``app.py`` sizes it: one bundle for the replica, one per stage), media go to the ``MediaEncoders``
deployment, and ``chat`` streams events to the ingress. A ``Follower`` thread keeps the replica
on the store's serving pointer (or the version pinned in ``user_config``).
"""

from __future__ import annotations

import asyncio
import logging

from ray.util import get_current_placement_group

from serve.config import ServeOptions
from serve.llm import LLMServer
from serve.pipeline import RayPipeline
from serve.protocol import ChatCompletionRequest
from serve.versions import Follower

log = logging.getLogger(__name__)


class LLMDeployment:
    async def __init__(self, encoders, options: dict):
        self.options = ServeOptions.from_args(options)
        placement_group = get_current_placement_group()

        async def encode(model_id, part_type, payload, limits):
            return await encoders.encode.remote(model_id, part_type, payload, limits)

        self.server = LLMServer(self.options, encode, lambda weights: RayPipeline(weights, self.options, placement_group))
        await asyncio.get_running_loop().run_in_executor(None, self.server.versions.follow, self.options.version)
        self.follower = Follower(self.server.versions, self.options.follow_interval_s, self.options.version)

    async def reconfigure(self, user_config: dict) -> None:
        """``user_config: {"version": V}`` pins V (a RayService rollout); ``{"version": null}``
        follows the store's serving pointer again. In-flight requests keep their version."""
        unknown = sorted(set(user_config or {}) - {"version"})
        if unknown:
            raise ValueError(f"LLMEngine user_config takes 'version' only, not {unknown}")
        self.follower.pinned = (user_config or {}).get("version", self.options.version)
        # loads beside the served version without blocking the replica's in-flight requests
        await asyncio.get_running_loop().run_in_executor(None, self.server.versions.follow, self.follower.pinned)

    async def chat(self, request: ChatCompletionRequest):
        async for event in self.server.chat(request):
            yield event

    async def models(self) -> list[dict]:
        return self.server.models_listing()

    async def ready(self) -> dict:
        current = self.server.versions.current
        if current is None:
            raise RuntimeError("no version loaded")
        return {"version": current.version, "models": self.server.model_ids()}

    async def stats(self) -> dict:
        return self.server.stats()

    def check_health(self) -> None:
        current = self.server.versions.current
        if current is None or not current.engine.alive:
            raise RuntimeError("the engine's step loop is not running")

    def __del__(self):
        follower = getattr(self, "follower", None)
        if follower is not None:
            follower.stop()
        self.server.shutdown()
