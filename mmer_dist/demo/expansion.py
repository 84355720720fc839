"""Expansion requests on the demo kit: the kit's two-media prompts, and the serving engine in-process.

What ``mmer demo`` and the kit quality benchmark (``bench/kit_quality.py``) both measure:

- the prompts: ``single`` (a sample's media part, then its question: the kit's own prompt) and
  ``mixed`` (two media parts of different models, then the question about the *last* one, right
  before its question as the kit's models learnt "<media> question"); ``request`` wraps content
  parts into an OpenAI chat request to model ``merged`` with a ``text_policy``. A reply is right
  when it is exactly the asked sample's answer word (greedy, ``MAX_NEW_TOKENS``: a word and EOS);
- ``Served``: ``serve.llm.LLMServer`` over one store version with a ``LocalPipeline``, the real
  encoders (``serve.encoders``) and chat templates (``serve.chat``): what the endpoint runs, minus
  HTTP and Ray. ``chat`` sends requests concurrently (the engine batches them); ``routed`` builds
  the prompt the server builds for model ``merged`` and rewrites its routing before it runs:
  the reference rows no chat request can ask for, ``through`` (one weight set for every token,
  e.g. theta* of TIES) and ``text_through`` theta_pre on ``originals_pipeline`` (each model's
  media through its ingested theta_k, text through theta_pre: the routing with no merge at all).

Encoder outputs are memoised per (model, part type, payload digest): a sample's media is encoded
once and reused by every version and rewrite (the encoders do not depend on the version).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mmer_dist.demo.agreement import EngineAnswer
from mmer_dist.demo.kit import Sample, Task
from mmer_dist.demo.kit_store import MAX_NEW_TOKENS
from mmer_dist.media.parts import media_part
from mmer_dist.model import Expansion, GenerationRequest, LocalPipeline, Prompt, Retention, SamplingParams, plan_prompt
from mmer_dist.model.stage import DecoderStage
from mmer_dist.store.store import Store
from mmer_dist.store.weights import StoreWeights, VersionWeights
from mmer_dist.store.weightsets import WeightSet
from mmer_dist.model.prompt import MediaPart
from serve.chat import expansion_parts, retention_parts
from serve.component_files import component_folder
from serve.config import ServeOptions
from serve.encoders import ENCODERS, ComponentEncoder
from serve.llm import LLMServer
from serve.protocol import ChatCompletionRequest
from serve.request import media_payload

SLOT_BUDGET = 1 << 30  # dense weight sets per stage: every kit model's theta_hat fits


# -- prompts --------------------------------------------------------------------------------------


class Payloads:
    """Each sample's content part, built once (PNG / WAV / MP4 / NPY, base64)."""

    def __init__(self):
        self._parts: dict[tuple[str, int], dict] = {}

    def part(self, task: Task, index: int, sample: Sample, model_id: str) -> dict:
        key = (task.name, index)
        if key not in self._parts:
            self._parts[key] = media_part(task.part_type, sample.raw)
        return {**self._parts[key], "model": model_id}


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


# -- routings no chat request can ask for ------------------------------------------------------------


def through(prompt: Prompt, key: WeightSet) -> Prompt:
    """Every token, embedding and the LM head through one weight set (a single-weights row)."""
    n = len(prompt)
    return dataclasses.replace(prompt, route=((key, n),), embed_route=((key, n),), text=key, vocab_model=None)


def text_through(prompt: Prompt, key: WeightSet) -> Prompt:
    """The prompt's text tokens (routing, embedding, LM head) through ``key``; media unchanged."""

    def swap(runs):
        return tuple((key if k == prompt.text else k, n) for k, n in runs)

    return dataclasses.replace(prompt, route=swap(prompt.route), embed_route=swap(prompt.embed_route), text=key,
                               vocab_model=None)


def originals_pipeline(weights: VersionWeights, device: str) -> LocalPipeline:
    """theta_hat_k served as model k's ingested theta_k (``base`` stays theta_pre): the routed
    forward with no merge at all, the expansion tables' reference row; everything else (routing,
    embedding, attention, the base-vocabulary head) is the engine's own."""

    def originals(key: WeightSet):
        if key.kind == "hat":
            return lambda name: weights.original(name, key.models[0]).float()
        return None

    n_layers = int(weights.base_config["num_hidden_layers"])
    return LocalPipeline([DecoderStage(weights, 0, n_layers, device=device, dtype=torch.float32,
                                       slot_budget_bytes=SLOT_BUDGET, fetcher=originals)])


# -- the serving engine in-process ------------------------------------------------------------------


class Encoders:
    """The serving encoders (``serve.encoders.ENCODERS``: each model's component class, loaded from
    the store as ``MediaEncoders`` loads it), memoised per media payload and shared by every
    ``Served``. ``MediaEncoders.encode_sync`` re-reads the catalog on every call (so a live
    endpoint sees added models); a store that does not change while it encodes needs each
    component looked up once."""

    def __init__(self, url: str, workdir: Path):
        self.weights = StoreWeights(Store.open(url))
        self.workdir = workdir
        self.components: dict[str, ComponentEncoder] = {}
        self.memo: dict[tuple, torch.Tensor] = {}
        self.calls = 0

    def component(self, model_id: str) -> ComponentEncoder:
        if model_id not in self.components:
            record = self.weights.catalog.model(model_id)
            folder = component_folder(self.weights, model_id, self.workdir, with_weights=True)
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


class Served:
    """LLMServer in-process over one version (see the module docstring); ``originals``: its
    theta_hat_k slots hold the ingested theta_k (``originals_pipeline``)."""

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
        self.server.versions.switch_to(self.server.versions.load(version))
        self._ids = itertools.count()

    def close(self) -> None:
        self.server.shutdown()

    def chat(self, requests: Sequence[dict]) -> list[str]:
        return [a.text for a in self.answers(requests)]

    def answers(self, requests: Sequence[dict]) -> list[EngineAnswer]:
        """Each request's streamed reply, with the log-probability of every generated token."""
        async def one(request: dict) -> EngineAnswer:
            events = [e async for e in self.server.chat(ChatCompletionRequest.model_validate({**request, "logprobs": True}))]
            done = events[-1]
            if done.get("finish_reason") == "error":
                raise RuntimeError(f"the engine failed a request: {done.get('error')}")
            return EngineAnswer.from_events(events)

        return _gather([one(r) for r in requests])

    async def _prompt(self, request: dict, mode: str) -> Prompt:
        """The prompt the server builds for ``request`` (its payloads, encoders and chat templates)
        in ``mode``: ``retention`` (the model's own template) or ``expansion`` (model ``merged``,
        the base's template, the request's text policy)."""
        served, limits = self.server.versions.current, self.server.options.limits.media()
        chat = ChatCompletionRequest.model_validate(request)
        messages, parts = chat.messages, chat.media()
        media = [MediaPart(p.model, await self.encoders.encode(p.model, p.type, media_payload(p, False), limits))
                 for p in parts]
        if mode == "retention":
            model = parts[0].model
            return plan_prompt(retention_parts(served.models[model], messages, media), Retention(model),
                               served.weights.vocabulary)
        # mean-mask unless asked: the rewrites (``through``, ``text_through``) find the text tokens
        # as the runs routed through the prompt's text weights
        return plan_prompt(expansion_parts(served.base, served.models, messages, media),
                           Expansion(chat.text_policy or "mean-mask"), served.weights.vocabulary)

    def same_prompt_as_retention(self, requests: Sequence[dict]) -> list[int]:
        """[same, n]: single-media expansion requests whose prompt (token ids, routes, encoder rows,
        vocabulary) equals the retention prompt of the media's model. True by design for the kit,
        whose models keep the base's chat template; a model with a template of its own would
        render other text in retention mode than the base's template does in expansion mode."""
        async def one(request: dict) -> bool:
            a, b = await self._prompt(request, "expansion"), await self._prompt(request, "retention")
            return (a.token_ids.tolist() == b.token_ids.tolist() and a.route == b.route
                    and a.embed_route == b.embed_route and a.text == b.text and a.vocab_model == b.vocab_model
                    and torch.equal(a.embeds, b.embeds))

        return [sum(_gather([one(r) for r in requests])), len(requests)]

    def routed(self, requests: Sequence[dict], rewrite: Callable[[Prompt], Prompt]) -> list[str]:
        served = self.server.versions.current

        async def one(request: dict) -> str:
            prompt = await self._prompt(request, "expansion")
            sampling = SamplingParams(max_tokens=MAX_NEW_TOKENS, stop_token_ids=served.base.stop_token_ids)
            generation = GenerationRequest(f"routed-{next(self._ids)}", rewrite(prompt), sampling)
            tokens = [e.token async for e in served.engine.generate(generation)
                      if e.token is not None and e.finish_reason != "stop"]
            return served.base.decode(tokens).strip()

        return _gather([one(r) for r in requests])


def _gather(coroutines) -> list:
    async def run():
        return await asyncio.gather(*coroutines)

    return asyncio.run(run())
