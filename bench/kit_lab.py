"""The kit quality benchmark's workbench: one store with the kit ingested, merges, HF retention.

``Lab`` ingests the kit (base + all five models) into a fresh store, publishes each method as a
version of it (``merge``, cached by its full request, so a version several tables need is merged
once; ``register`` adds versions that ``mmer_dist.calibrate`` published), and scores LLM weights
read straight from a version (``mmer_dist.demo.kit_store``: theta_hat_i, theta*, theta_pre,
theta_i composed in float32, never exported) around each model's own encoder + connector with
plain transformers, on the report half of each task's held-out set (the validation half is what
the lambda calibration sees; ``mmer_dist.demo.calibration``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mmer_dist.demo.calibration import report_half, validation_half
from mmer_dist.demo.kit import Kit, Sample, get_task
from mmer_dist.demo.kit_store import (
    GreedyAnswer, KitRunner, State, base_states, hits, llm_states, original_states, version_arrays,
)
from mmer_dist.store.catalog import VersionRecord
from mmer_dist.store.store import Store
from mmer_dist.store.weights import StoreWeights, VersionWeights
from mmer_dist.store.weightsets import WeightSet


@dataclass
class Scores:
    """Greedy answers (with their log-probabilities: ``mmer_dist.demo.agreement`` compares other paths with
    them), replies and accuracy per model on one split."""

    answers: dict[str, list[GreedyAnswer]]
    accuracy: dict[str, float]

    @property
    def replies(self) -> dict[str, list[str]]:
        return {m: [a.text for a in answers] for m, answers in self.answers.items()}


@dataclass
class Lab:
    kit: Kit
    work: Path
    n_test: int | None  # cap on each task's report half (None: all of it)
    seconds: dict[str, float] = field(default_factory=lambda: {"ingest": 0.0, "merge": 0.0, "read": 0.0, "hf": 0.0})

    def __post_init__(self) -> None:
        from mmer_dist.ingest import ingest_base, ingest_model

        self.url = str(self.work / "store")
        t0 = time.perf_counter()
        ingest_base(self.url, self.kit.base, progress=False)
        for m in self.kit.models.values():
            ingest_model(self.url, m.id, m.path, m.modality, fmt=m.format, progress=False)
        self.seconds["ingest"] = time.perf_counter() - t0
        self.store = Store.open(self.url)
        self.held_out = {m: self.kit.split(m).test for m in self.kit.models}
        self.test = {m: report_half(s)[:self.n_test] for m, s in self.held_out.items()}
        self.validation = {m: validation_half(s) for m, s in self.held_out.items()}
        self._versions: dict[str, VersionRecord] = {}
        self._weights: dict[int, VersionWeights] = {}
        self._runners: dict[str, KitRunner] = {}
        self._arrays: tuple[int | None, dict] = (None, {})
        self._originals: dict[str, State] = {}

    # -- versions --------------------------------------------------------------------------------

    def merge(self, models: Sequence[str], **fields) -> VersionRecord:
        """A version over ``models`` with these merge fields (MergeRequest's), merged once."""
        from mmer_dist.merge.engine import merge
        from mmer_dist.merge.local import LocalBackend

        key = _key(models, fields)
        if key not in self._versions:
            t0 = time.perf_counter()
            request = _request(models, fields)
            self._versions[key] = merge(self.url, request, LocalBackend(), workers=1, compile=False, progress=False)
            self.seconds["merge"] += time.perf_counter() - t0
        return self._versions[key]

    def register(self, models: Sequence[str], fields: Mapping, record: VersionRecord) -> None:
        """A version published elsewhere (the calibration's) under the request that made it."""
        self._versions.setdefault(_key(models, fields), record)

    def weights(self, version: int) -> VersionWeights:
        if version not in self._weights:
            self._weights[version] = VersionWeights(self.store, version)
        return self._weights[version]

    # -- LLM states ----------------------------------------------------------------------------------

    def states(self, record: VersionRecord, keys: Mapping[str, WeightSet]) -> dict[str, State]:
        """Weight set ``keys[m]`` of the version as model m's LLM state; the version's arrays are
        read once (the last version read is kept: its states are asked for one after another)."""
        def compose():
            if self._arrays[0] != record.version:
                self._arrays = (record.version, version_arrays(self.weights(record.version)))
            return llm_states(self.weights(record.version), keys, self._arrays[1])

        return self._timed(compose)

    def hats(self, record: VersionRecord) -> dict[str, State]:
        return self.states(record, {m: WeightSet.hat(m) for m in record.models})

    def merged(self, record: VersionRecord, models: Sequence[str]) -> dict[str, State]:
        """theta* of the version for each of ``models`` (its own encoder and extra rows)."""
        return self.states(record, {m: WeightSet.star() for m in models})

    def originals(self, models: Sequence[str]) -> dict[str, State]:
        missing = [m for m in models if m not in self._originals]
        if missing:
            self._originals.update(self._timed(lambda: original_states(StoreWeights(self.store), missing)))
        return {m: self._originals[m] for m in models}

    def bases(self, models: Sequence[str]) -> dict[str, State]:
        return self._timed(lambda: base_states(StoreWeights(self.store), models))

    def _timed(self, fn):
        t0 = time.perf_counter()
        out = fn()
        self.seconds["read"] += time.perf_counter() - t0
        return out

    # -- scoring with plain transformers ---------------------------------------------------------------

    def runner(self, model_id: str) -> KitRunner:
        if model_id not in self._runners:
            self._runners[model_id] = KitRunner(StoreWeights(self.store), model_id, self.work / "components")
        return self._runners[model_id]

    def score(self, states: Mapping[str, State], samples: Mapping[str, list[Sample]] | None = None) -> Scores:
        """Each model's greedy replies with its LLM state on ``samples`` (default: the report half)."""
        samples = samples if samples is not None else self.test
        t0 = time.perf_counter()
        answers, accuracy = {}, {}
        for m, state in states.items():
            runner = self.runner(m)
            runner.set_llm(state)
            answers[m] = runner.answers(get_task(m), samples[m])
            accuracy[m] = hits([a.text for a in answers[m]], samples[m]) / len(samples[m])
        self.seconds["hf"] += time.perf_counter() - t0
        return Scores(answers, accuracy)


def _request(models: Sequence[str], fields: Mapping):
    """The merge request: settings fields (refused where they do not apply to the method, as the
    CLI refuses them), every model's lambda (1 unless given), the models in order."""
    from mmer_dist.merge.engine import MergeRequest
    from mmer_dist.method.settings import MergeSettings

    settings = MergeSettings.from_options(**{k: v for k, v in fields.items() if k != "lam"})
    return MergeRequest(settings, {m: 1.0 for m in models} | dict(fields.get("lam", {})), tuple(models))


def _key(models: Sequence[str], fields: Mapping) -> str:
    return json.dumps(asdict(_request(models, fields)), sort_keys=True, default=list)
