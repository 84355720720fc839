"""The kit quality benchmark's expansion runs: chat requests through the serving engine in-process.

``Served`` is ``serve.llm.LLMServer`` over one store version with a ``LocalPipeline``, the real
encoders (``serve.encoders``: each model's component from the store, its processor and adapter) and the real chat templates (``serve.chat``): exactly what the endpoint runs, minus
HTTP and Ray. ``chat`` sends OpenAI-style requests (the kit's samples as base64 content parts)
concurrently, so the engine batches them; replies are the streamed text, stripped.

``routed`` builds the same prompts the server builds for model ``merged`` (same payload decoding,
encoders, ``expansion_parts`` and ``plan_prompt``) and rewrites their routing before they run on
the same engine: the one-weight-set rows (theta* for every token, ``through``) and the
originals-routed reference (``text_through`` theta_pre on a pipeline serving theta_k as
theta_hat_k), which a chat request cannot ask for.

Encoder outputs are memoised by (model, checkpoint digest, part type, payload digest): a sample's
media is encoded once and reused by every version and policy (the encoders do not depend on the
version).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bench.quality_expansion import originals_pipeline
from mmer_dist.demo.kit import Sample, Task
from mmer_dist.demo.kit_store import MAX_NEW_TOKENS
from mmer_dist.media.parts import media_part
from mmer_dist.model import Expansion, GenerationRequest, LocalPipeline, Prompt, SamplingParams, plan_prompt
from mmer_dist.model.batch import expand, run_lengths
from mmer_dist.store.store import Store
from mmer_dist.store.weights import StoreWeights, VersionWeights
from serve.chat import Media, expansion_parts
from serve.config import ServeOptions
from serve.encoders import ENCODERS, ComponentEncoder
from serve.llm import LLMServer, media_payload

SLOT_BUDGET = 1 << 30  # dense weight sets per stage: every kit model's theta_hat fits


class Encoders:
    """The serving encoders (``serve.encoders.ENCODERS``: each model's component class, loaded from
    the store as ``MediaEncoders`` loads it), memoised per media payload and shared by every
    ``Served``. ``MediaEncoders.encode_sync`` re-reads the catalog on every call (so a live
    endpoint sees added models); the bench's store does not change while it encodes, so each
    component is looked up once."""

    def __init__(self, url: str, workdir: Path):
        self.weights = StoreWeights(Store.open(url))
        self.workdir = workdir
        self.components: dict[str, ComponentEncoder] = {}
        self.memo: dict[tuple, torch.Tensor] = {}
        self.calls = 0

    def component(self, model_id: str) -> ComponentEncoder:
        if model_id not in self.components:
            record = self.weights.catalog.model(model_id)
            folder = self.weights.fetch_files(model_id, self.workdir / f"{model_id}-{record.sha256[:12]}")
            self.components[model_id] = ENCODERS[record.format](model_id, folder)
        return self.components[model_id]

    async def encode(self, model_id: str, part_type: str, payload: bytes, limits) -> torch.Tensor:
        key = (model_id, part_type, hashlib.sha256(payload).digest())
        if key not in self.memo:
            self.calls += 1
            encoder = self.component(model_id)
            if part_type not in encoder.part_types:
                raise ValueError(f"model {model_id!r} does not take {part_type} parts")
            self.memo[key] = encoder.encode(part_type, payload, limits)
        return self.memo[key]


class Payloads:
    """Each sample's content part, built once (PNG / WAV / MP4 / NPY, base64)."""

    def __init__(self):
        self._parts: dict[tuple[str, int], dict] = {}

    def part(self, task: Task, index: int, sample: Sample, model_id: str) -> dict:
        key = (task.name, index)
        if key not in self._parts:
            self._parts[key] = media_part(task.part_type, sample.raw)
        return {**self._parts[key], "model": model_id}


class Served:
    """LLMServer in-process over one version (see the module docstring)."""

    def __init__(self, url: str, version: int, encoders: Encoders, device: str, originals: bool = False,
                 slot_budget: int = SLOT_BUDGET, tau_dtype: torch.dtype | None = None):
        options = ServeOptions.from_args({
            "store": url, "version": version, "dtype": "float32", "slot_budget": SLOT_BUDGET, "api_token_env": None,
            "max_running": 256, "max_step_tokens": 1 << 16, "max_queued_requests": -1})

        def pipeline(weights: VersionWeights):
            if originals:
                return originals_pipeline(weights, device)
            return LocalPipeline.build(weights, 1, device=device, dtype=torch.float32, slot_budget_bytes=slot_budget,
                                       tau_dtype=tau_dtype)

        self.encoders = encoders
        self.server = LLMServer(options, encoders.encode, pipeline)
        self.server.switch_to(self.server.load(version))
        self._ids = itertools.count()

    def close(self) -> None:
        self.server.shutdown()

    def chat(self, requests: Sequence[dict]) -> list[str]:
        async def one(request: dict) -> str:
            events = [e async for e in self.server.chat(request)]
            done = events[-1]
            if done.get("finish_reason") == "error":
                raise RuntimeError(f"the engine failed a request: {done.get('error')}")
            return "".join(e["text"] for e in events if e["type"] == "token").strip()

        return _gather([one(r) for r in requests])

    def routed(self, requests: Sequence[dict], rewrite: Callable[[Prompt], Prompt]) -> list[str]:
        served = self.server.current
        limits = self.server.options.limits

        async def one(request: dict) -> str:
            messages = request["messages"]
            parts = [p for m in messages for p in m["content"] if p["type"] != "text"]
            media = [Media(p["model"], await self.encoders.encode(p["model"], p["type"], media_payload(p, False), limits))
                     for p in parts]
            prompt = plan_prompt(expansion_parts(served.base, served.models, messages, media),
                                 Expansion(request.get("text_policy", "mean-mask")), served.weights.vocabulary)
            sampling = SamplingParams(max_tokens=MAX_NEW_TOKENS, stop_token_ids=served.base.stop_token_ids)
            generation = GenerationRequest(f"routed-{next(self._ids)}", rewrite(prompt), sampling)
            tokens = [e.token async for e in served.engine.generate(generation)
                      if e.token is not None and e.finish_reason != "stop"]
            return served.base.decode(tokens).strip()

        return _gather([one(r) for r in requests])


def follow_media(prompt: Prompt) -> Prompt:
    """Text after a media part through that part's model's theta_hat (its embedding rows too), and
    the generated tokens through the last media part's: a bench-only routing, not an engine policy
    (issue 14 names it as a candidate), measured to show where the text weights matter. Text
    before the first media part keeps the prompt's text weights."""
    route, embed = expand(prompt.route), expand(prompt.embed_route)
    current = None
    for i, token in enumerate(prompt.token_ids.tolist()):
        if token == -1:  # a media position: routed through its model's theta_hat already
            current = route[i]
        elif current is not None and route[i] == prompt.text:
            route[i] = current
            if embed[i] == prompt.text:
                embed[i] = current
    text = current if current is not None else prompt.text
    return dataclasses.replace(prompt, route=run_lengths(route), embed_route=run_lengths(embed), text=text,
                               vocab_model=None)


def _gather(coroutines) -> list:
    async def run():
        return await asyncio.gather(*coroutines)

    return asyncio.run(run())


# -- requests -------------------------------------------------------------------------------------


def request(content: list[dict], model: str = "merged", policy: str | None = None) -> dict:
    out = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
           "max_tokens": MAX_NEW_TOKENS}
    if policy is not None:
        out["text_policy"] = policy
    return out


def single(payloads: Payloads, task: Task, index: int, sample: Sample, model_id: str) -> list[dict]:
    """The kit's own prompt for one sample: its media part (naming its model), then the question."""
    return [payloads.part(task, index, sample, model_id), {"type": "text", "text": task.question}]


def mixed(payloads: Payloads, a: tuple[Task, int, Sample, str], b: tuple[Task, int, Sample, str],
          ask: int) -> list[dict]:
    """Two media parts of different models and the question about one of them (``ask`` 0: a, 1: b),
    that media last, right before its question (the kit's models learnt "<media> question"), the
    other one before it: the same two media asked both questions, one request per question."""
    other, asked = (b, a) if ask == 0 else (a, b)
    return [payloads.part(*other), payloads.part(*asked), {"type": "text", "text": asked[0].question}]
