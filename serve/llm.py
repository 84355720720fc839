"""The LLM server: the store versions it holds (``serve.versions``) and the chat requests it
answers on them (``serve.request``).

``LLMServer`` is a plain class (the ``LLMDeployment`` wraps it; tests and benchmarks build it
without Serve). ``chat`` pins the current version for the request's whole life, admits the
request on it (prompt, media, sampling: every check, once), submits it to that version's engine
and streams events back: ``accepted`` (once the prompt is built), ``token`` per text delta, and
``done`` (finish reason, usage). Errors before ``accepted`` raise ``ApiError``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from mmer_dist.model.engine import Pipeline
from mmer_dist.store.weights import VersionWeights
from serve.config import ServeOptions
from serve.protocol import ChatCompletionRequest
from serve.request import MERGED, Encode, admit, detokenize, model_ids
from serve.versions import Versions


class LLMServer:
    def __init__(self, options: ServeOptions, encode: Encode, pipeline_factory: Callable[[VersionWeights], Pipeline],
                 cache_dir: str | Path | None = None):
        """``encode(model_id, part_type, payload, limits) -> awaitable tensor`` embeds media;
        ``pipeline_factory(weights)`` places a version's stages."""
        self.options = options
        self._encode = encode
        self.versions = Versions(options, pipeline_factory, cache_dir)

    async def chat(self, request: ChatCompletionRequest, request_id: str | None = None) -> AsyncIterator[dict]:
        with self.versions.pinned() as served:  # the version is pinned here, for the request's whole life
            admitted = await admit(served, request, self.options, self._encode, request_id or uuid.uuid4().hex)
            tokens = served.engine.generate(admitted.generation)  # checks the context length now
            yield {"type": "accepted", "version": served.version, "prompt_tokens": len(admitted.generation.prompt),
                   "model": request.model}
            try:
                async for event in detokenize(tokens, admitted.assets, admitted.stops):
                    yield event
            finally:
                await tokens.aclose()  # a stop string or a gone client ends the request: its caches go

    def model_ids(self) -> list[str]:
        current = self.versions.current
        return model_ids(current) if current else []

    def models_listing(self, residency: dict[str, str] | None = None, replica: str | None = None) -> list[dict]:
        """``/v1/models``: ``merged`` and each model of the current version; with ``residency``
        (model -> ``slot`` | ``building`` | ``mask-native`` on this server, ``serve.metrics``),
        each model's entry says how ``replica`` serves it now."""
        v = self.versions.current
        if v is None:
            return []

        def where(m: str) -> dict:
            return {} if residency is None else {"residency": {"path": residency.get(m, "mask-native"),
                                                               "replica": replica}}

        return [{"id": MERGED, "object": "model", "created": v.created, "owned_by": "mmer",
                 "mmer": {"mode": "expansion", "version": v.version}}] + [
            {"id": m, "object": "model", "created": v.created, "owned_by": "mmer",
             "mmer": {"mode": "retention", "modality": v.modalities[m], "task": v.tasks.get(m), "version": v.version,
                      "part_type": a.media.part_type if a.media else None,
                      "part_types": list(a.media.prompts) if a.media else [], **where(m)}}
            for m, a in v.models.items()]

    def stats(self) -> dict:
        current = self.versions.current
        return {"version": current.version if current else None,
                "retiring": [v.version for v in self.versions.held() if v is not current],
                "slot_capacity": current.pipeline.slot_capacity() if current else None,
                "engine": current.engine.stats() if current else None}

    def shutdown(self) -> None:
        self.versions.shutdown()
