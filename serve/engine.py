"""The ``LLMEngine`` deployment: one replica is one whole pipeline of a store version.

It wraps ``serve.llm.LLMServer``: the stage actors go into the replica's own placement group
(``app.py`` sizes it: one bundle for the replica, one per stage), media go to the ``MediaEncoders``
deployment, and ``chat`` streams events to the ingress.
"""

from __future__ import annotations

import asyncio
import logging

from ray.util import get_current_placement_group

from serve.config import ServeOptions
from serve.llm import LLMServer
from serve.pipeline import RayPipeline

log = logging.getLogger(__name__)


class LLMEngine:
    async def __init__(self, encoders, options: dict):
        self.options = ServeOptions.from_args(options)
        placement_group = get_current_placement_group()

        async def encode(model_id, part_type, payload, limits):
            return await encoders.encode.remote(model_id, part_type, payload, limits.model_dump())

        self.server = LLMServer(self.options, encode, lambda weights: RayPipeline(weights, self.options, placement_group))
        self.pinned = self.options.version
        await asyncio.get_running_loop().run_in_executor(None, self.server.follow, self.pinned)
        self._follower = asyncio.get_running_loop().create_task(self._follow_forever())

    async def reconfigure(self, user_config: dict) -> None:
        """``user_config: {"version": V}`` pins V (a RayService rollout); ``{"version": null}``
        follows the store's serving pointer again. In-flight requests keep their version."""
        unknown = sorted(set(user_config or {}) - {"version"})
        if unknown:
            raise ValueError(f"LLMEngine user_config takes 'version' only, not {unknown}")
        self.pinned = (user_config or {}).get("version", self.options.version)
        # loads beside the served version without blocking the replica's in-flight requests
        await asyncio.get_running_loop().run_in_executor(None, self.server.follow, self.pinned)

    async def _follow_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.options.follow_interval_s)
            try:
                await loop.run_in_executor(None, self.server.follow, self.pinned)
            except RuntimeError as e:
                if "shutdown" in str(e):  # the replica is going away
                    return
                log.exception("could not switch versions")
            except Exception:  # a bad version (or a store hiccup) must not take the endpoint down
                log.exception("could not switch versions; still serving version %s",
                              self.server.current.version if self.server.current else None)

    async def chat(self, request: dict):
        async for event in self.server.chat(request):
            yield event

    async def models(self) -> list[dict]:
        return self.server.models_listing()

    async def ready(self) -> dict:
        if self.server.current is None:
            raise RuntimeError("no version loaded")
        return {"version": self.server.current.version, "models": self.server.model_ids()}

    async def stats(self) -> dict:
        return self.server.stats()

    def check_health(self) -> None:
        current = self.server.current
        if current is None or not current.engine.alive:
            raise RuntimeError("the engine's step loop is not running")

    def __del__(self):
        follower = getattr(self, "_follower", None)
        if follower is not None:
            follower.cancel()
        self.server.shutdown()
