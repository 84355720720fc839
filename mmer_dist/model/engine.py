"""Continuous batching over a pipeline of stages: requests join and leave between steps.

Each ``step`` runs every admitted request forward by one token (decode), together with the new
requests' whole prompts (prefill), samples each request's next token and retires the ones that
stopped. The engine knows nothing of HTTP or tokenizers (prompts arrive as ``Prompt``), nor of
where stages live: a ``Pipeline`` is in-process stages (``LocalPipeline``) or Ray actors (the
serving layer), the engine cannot tell.

Every running request runs in every step, whatever models they ask for: a stage serves a model
without a dense slot through the mask-native path, so a step never splits or waits for a build.
Which waiting requests are admitted, and when, is the ``Scheduler``'s (fair across models, with a
waiting-time bound).

A pipeline that loses a stage (``StageLostError``: its process died, with every request's KV
caches) ends the step's requests with finish reason ``unavailable`` and sets ``lost``: the engine
then takes no more steps on it (``fail_all`` ends the rest), and its owner builds a new pipeline.
A step that fails otherwise ends only its own requests (``error``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

from mmer_dist.errors import InvalidInputError, MmerError
from mmer_dist.model.batch import RequestSlice, StepBatch, run_lengths
from mmer_dist.model.prompt import Prompt
from mmer_dist.model.sampling import Sample, Sampler, SamplingParams
from mmer_dist.model.scheduler import Candidate, EngineLimits, Scheduler
from mmer_dist.model.stage import DecoderStage
from mmer_dist.store.weights import VersionWeights, VocabularyLayout

log = logging.getLogger(__name__)


class StageLostError(MmerError):
    """A stage of the pipeline is gone (its process died or stopped answering), and with it the
    KV caches of every request on it."""


class Pipeline(Protocol):
    """``forward`` and ``release`` raise ``StageLostError`` when a stage is gone."""

    version: int
    vocabulary: VocabularyLayout
    max_positions: int

    def forward(self, batch: StepBatch) -> list[torch.Tensor | None]: ...

    def release(self, request_ids: Sequence[str]) -> None: ...

    def slot_capacity(self) -> int: ...

    def stats(self) -> list[dict]: ...


def split_layers(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Consecutive layer ranges of near-equal size, one per stage."""
    if not 1 <= n_stages <= n_layers:
        raise InvalidInputError(f"--stages must lie in [1, {n_layers}] (the model's layers), got {n_stages}")
    per, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for i in range(n_stages):
        stop = start + per + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class LocalPipeline:
    """Stages in this process, run one after the other."""

    def __init__(self, stages: Sequence[DecoderStage]):
        if not stages or not stages[0].has_embed or not stages[-1].has_head:
            raise InvalidInputError("a pipeline's stages must cover the decoder from the embedding to the LM head")
        self.stages = list(stages)
        self.version = stages[0].version
        self.vocabulary = stages[0].vocabulary
        self.max_positions = stages[0].config.max_positions

    @classmethod
    def build(cls, weights: VersionWeights, n_stages: int = 1, **stage_options) -> LocalPipeline:
        n_layers = int(weights.base_config["num_hidden_layers"])
        return cls([DecoderStage(weights, a, b, **stage_options) for a, b in split_layers(n_layers, n_stages)])

    def forward(self, batch: StepBatch) -> list[torch.Tensor | None]:
        hidden = None
        for stage in self.stages[:-1]:
            hidden = stage.forward(batch, hidden)
        return self.stages[-1].forward(batch, hidden)

    def release(self, request_ids: Sequence[str]) -> None:
        for stage in self.stages:
            stage.release(request_ids)

    def slot_capacity(self) -> int:
        return min(s.slot_capacity for s in self.stages)

    def stats(self) -> list[dict]:
        return [s.stats() for s in self.stages]


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: Prompt
    sampling: SamplingParams = SamplingParams()
    model: str | None = None  # the model id the client named, for fairness and the counters (default: see label)

    @property
    def label(self) -> str:
        """The model this request counts for: ``model``, else its text weights' model, else merged."""
        if self.model is not None:
            return self.model
        text = self.prompt.text
        return text.models[0] if text.kind == "hat" else "merged"


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of a request, or its end. ``token`` is in the request's output
    vocabulary (the base's, or its retention model's own with extra rows)."""

    request_id: str
    token: int | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None  # None while running; stop | length | abort | error | unavailable
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Running:
    request: GenerationRequest
    sampler: Sampler
    arrived: float = 0.0  # engine clock at ``add``
    past: int = 0  # tokens in the KV caches
    next_id: int | None = None  # global id of the last sampled token, fed at the next step
    generated: int = 0
    started: bool = False

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.request.label, len(self.request.prompt), self.arrived)


@dataclass
class ModelCounters:
    """Per model (``GenerationRequest.label``): requests admitted and finished, tokens in and out."""

    requests: int = 0
    finished: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Engine:
    pipeline: Pipeline
    limits: EngineLimits = field(default_factory=EngineLimits)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.vocabulary = self.pipeline.vocabulary
        self.waiting: OrderedDict[str, _Running] = OrderedDict()
        self.running: OrderedDict[str, _Running] = OrderedDict()
        self.steps = 0
        self.lost: StageLostError | None = None  # set once a stage is gone: no more steps
        self.scheduler = Scheduler(self.limits)
        self.counters: dict[str, ModelCounters] = {}

    # -- requests --------------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        """Everything that can be checked before a request runs (thread-safe: reads no state)."""
        prompt, sampling = request.prompt, request.sampling
        total = len(prompt) + sampling.max_tokens
        if total > self.pipeline.max_positions:
            raise InvalidInputError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({sampling.max_tokens}) is "
                                    f"{total} tokens; the model's context is {self.pipeline.max_positions}")
        for key in prompt.weight_sets:
            for m in key.models:
                if m not in self.vocabulary.models:
                    raise InvalidInputError(f"model {m!r} is not part of version {self.pipeline.version}")
        limit = self.vocabulary.base + (self.vocabulary.extra_of(prompt.vocab_model) if prompt.vocab_model else 0)
        if bad := [t for t in sampling.stop_token_ids if not 0 <= t < limit]:
            raise InvalidInputError(f"stop token ids {bad} are outside the output vocabulary ({limit} tokens)")

    def add(self, request: GenerationRequest) -> None:
        self.validate(request)
        self.enqueue(request)

    def enqueue(self, request: GenerationRequest) -> None:
        """``add`` for a request ``validate`` has passed already (``AsyncEngine`` checks it in
        the caller's thread, so the loop does not check it twice)."""
        if request.request_id in self.waiting or request.request_id in self.running:
            raise InvalidInputError(f"request id {request.request_id!r} is already in use")
        self.waiting[request.request_id] = _Running(request, Sampler(request.sampling), self.clock())

    def abort(self, request_id: str) -> TokenEvent | None:
        entry = self.waiting.pop(request_id, None)
        if entry is None and (entry := self.running.pop(request_id, None)) is not None:
            self._release([request_id])
        if entry is None:
            return None
        return self._end(entry, "abort")

    def fail_all(self, reason: str, error: str) -> list[TokenEvent]:
        """End every waiting and running request without a step (the pipeline is gone)."""
        entries = [*self.waiting.values(), *self.running.values()]
        self.waiting.clear()
        self.running.clear()
        return [self._end(e, reason, error=error) for e in entries]

    def _release(self, request_ids: list[str]) -> None:
        """Free requests' caches; a stage that is gone has freed them already."""
        try:
            self.pipeline.release(request_ids)
        except StageLostError as e:
            self.lost = e
        except Exception:  # noqa: BLE001 - a stage that cannot free caches must not end the others
            log.exception("could not release requests %s", request_ids)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict:
        """Plain data for metrics: requests waiting and running, steps, per model (the request's
        label) requests, finished requests, prompt and completion tokens, and each stage's stats
        (memory by part, slot residency and builds, tokens per path, per model)."""
        # copied first (each list() is one step under the GIL): the step loop may change them meanwhile
        waiting = Counter(e.request.label for e in list(self.waiting.values()))
        running = Counter(e.request.label for e in list(self.running.values()))
        models = {m: {**asdict(c), "waiting": waiting[m], "running": running[m]}
                  for m, c in list(self.counters.items())}
        for m in (waiting | running).keys() - models.keys():
            models[m] = {**asdict(ModelCounters()), "waiting": waiting[m], "running": running[m]}
        return {"running": len(self.running), "waiting": len(self.waiting), "steps": self.steps, "models": models,
                "stages": self.pipeline.stats()}

    # -- one step ------------------------------------------------------------------------------

    def _admit(self) -> list[_Running]:
        if not self.waiting or len(self.running) >= self.limits.max_running:
            return []
        ids = self.scheduler.admit({rid: e.candidate for rid, e in self.waiting.items()}, len(self.running),
                                   self.clock())
        return [self.waiting.pop(rid) for rid in ids]

    def step(self) -> list[TokenEvent]:
        """Admit what fits, run one forward over every active request, sample; returns events."""
        served: Counter[str] = Counter()
        for entry in self._admit():
            self.running[entry.request.request_id] = entry
            counters = self.counters.setdefault(entry.request.label, ModelCounters())
            counters.requests += 1
            counters.prompt_tokens += len(entry.request.prompt)
            served[entry.request.label] += len(entry.request.prompt)
        if not self.running:
            return []
        self.steps += 1
        labels = {rid: e.request.label for rid, e in self.running.items()}
        events = self._run(list(self.running.values()))
        for event in events:
            label = labels.get(event.request_id)
            if label is not None and event.token is not None:
                served[label] += 1
                self.counters[label].completion_tokens += 1
            if label is not None and event.finish_reason is not None:
                self.counters[label].finished += 1
        self.scheduler.record(served)
        return events

    def _slice(self, entry: _Running) -> tuple[RequestSlice, list[int], tuple, torch.Tensor | None]:
        prompt, rid = entry.request.prompt, entry.request.request_id
        if not entry.started:
            reserve = len(prompt) + entry.request.sampling.max_tokens
            return (RequestSlice(rid, 0, prompt.route, prompt.text, prompt.vocab_model, reserve=reserve),
                    prompt.token_ids.tolist(), prompt.embed_route, prompt.embeds)
        one = ((prompt.text, 1),)
        return RequestSlice(rid, entry.past, one, prompt.text, prompt.vocab_model), [entry.next_id], one, None

    def _run(self, entries: list[_Running]) -> list[TokenEvent]:
        slices, ids, embed_route, embeds = [], [], [], []
        for entry in entries:
            s, i, e, m = self._slice(entry)
            slices.append(s)
            ids += i
            embed_route += list(e)
            if m is not None:
                embeds.append(m)
        batch = StepBatch(tuple(slices), torch.tensor(ids, dtype=torch.int64),
                          run_lengths([k for k, n in embed_route for _ in range(n)]),
                          torch.cat(embeds) if embeds else None)
        try:
            logits = self.pipeline.forward(batch)
        except Exception as e:  # a stage refused the step or broke: those requests end, the rest go on
            ids = [s.request_id for s in slices]
            if isinstance(e, StageLostError):
                self.lost, reason = e, "unavailable"
                log.error("step %d lost a stage (%s); requests %s end", self.steps, e, ids)
            else:
                reason = "error"
                log.exception("step %d failed for requests %s", self.steps, ids)
                self._release(ids)
            for entry in entries:
                self.running.pop(entry.request.request_id, None)
            return [self._end(entry, reason, error=f"{type(e).__name__}: {e}") for entry in entries]
        events = []
        for entry, s, row in zip(entries, slices, logits):
            entry.past += s.n_new
            entry.started = True
            sample = entry.sampler(row[-1])
            events.append(self._advance(entry, sample))
        return events

    def _advance(self, entry: _Running, sample: Sample) -> TokenEvent:
        request = entry.request
        entry.generated += 1
        entry.next_id = int(self.vocabulary.to_global(request.prompt.vocab_model, torch.tensor([sample.token]))[0])
        reason = None
        if sample.token in request.sampling.stop_token_ids:
            reason = "stop"
        elif entry.generated >= request.sampling.max_tokens:
            reason = "length"
        if reason is not None:
            self.running.pop(request.request_id, None)
            self._release([request.request_id])
        return TokenEvent(request.request_id, sample.token, sample.logprob, sample.top, reason,
                          prompt_tokens=len(request.prompt), completion_tokens=entry.generated)

    def _end(self, entry: _Running, reason: str, error: str | None = None) -> TokenEvent:
        return TokenEvent(entry.request.request_id, finish_reason=reason, error=error,
                          prompt_tokens=len(entry.request.prompt), completion_tokens=entry.generated)

    # -- a synchronous driver (tests, benchmarks, the quality tables) ---------------------------------

    def generate(self, requests: Iterable[GenerationRequest]) -> dict[str, list[TokenEvent]]:
        """Run ``requests`` to completion together; each request's events in order."""
        out: dict[str, list[TokenEvent]] = {}
        for r in requests:
            self.add(r)
            out[r.request_id] = []
        for _ in itertools.count():
            if not self.has_work:
                break
            for event in self.step():
                out.setdefault(event.request_id, []).append(event)
        return out
