"""The ``LLMEngine`` deployment: one replica is one whole pipeline of a store version.

It wraps ``serve.llm.LLMServer``: the stage actors go into the replica's own placement group
(``app.py`` sizes it: one bundle for the replica, one per stage), media go to the ``MediaEncoders``
deployment, and ``chat`` streams events to the ingress.
"""

from __future__ import annotations

from ray.util import get_current_placement_group

from serve.config import ServeOptions
from serve.llm import LLMServer
from serve.pipeline import RayPipeline


class LLMEngine:
    def __init__(self, encoders, options: dict):
        self.options = ServeOptions.from_args(options)
        placement_group = get_current_placement_group()

        async def encode(model_id, part_type, payload, limits):
            return await encoders.encode.remote(model_id, part_type, payload, limits.model_dump())

        self.server = LLMServer(self.options, encode, lambda weights: RayPipeline(weights, self.options, placement_group))
        self.server.switch_to(self.server.load(self.options.version))

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
        self.server.shutdown()
