"""A pipeline of stage actors: what one LLM engine replica runs a version on.

Implements ``mmer_dist.model.engine.Pipeline`` over Ray actors: a step's ``StepBatch`` is put in
the object store once and every stage reads it from there; each stage's hidden states go to the
next stage as an object reference, so a step costs one actor call per stage and one ``ray.get``
at the end (DESIGN.md: ~1.7 ms per actor call on a 2-core machine, ~10 ms per Serve handle hop).
"""

from __future__ import annotations

from collections.abc import Sequence

import ray
from ray.exceptions import GetTimeoutError, RayError

from mmer_dist.model.config import DecoderConfig
from mmer_dist.model.engine import StageLostError, split_layers
from mmer_dist.store.weights import VersionWeights
from serve.config import ServeOptions
from serve.errors import UNAVAILABLE, root_cause
from serve.stage import StagePool

class RayPipeline:
    """A version's stage actors. A stage whose process died (or a step past ``step_timeout_s``)
    is ``StageLostError``: the engine ends its requests and the version is rebuilt (``serve.versions``);
    a pipeline that fails to start kills the stages it already placed."""

    def __init__(self, weights: VersionWeights, options: ServeOptions, pool: StagePool):
        config = DecoderConfig.from_base_config(weights.base_config)
        self.version = weights.version
        self.vocabulary = weights.vocabulary
        self.max_positions = config.max_positions
        self.step_timeout_s = options.step_timeout_s
        self.actors = []
        try:
            loads = []
            for i, (first, stop) in enumerate(split_layers(config.n_layers, options.stages)):
                self.actors.append(pool.take(i))
                loads.append(self.actors[-1].load.remote(
                    weights.store.url, weights.version, first, stop, device=options.device, dtype=options.dtype,
                    slot_budget_bytes=options.slot_budget))
            self._capacity = min(self._get(loads))  # a stage's load error surfaces here
        except BaseException:
            self.shutdown()
            raise
        pool.refill()

    def _get(self, refs, timeout: float | None = None):
        try:
            return ray.get(refs, timeout=timeout)
        except GetTimeoutError:
            raise StageLostError(f"a stage of version {self.version} did not answer within {timeout:g} s") from None
        except RayError as e:
            if isinstance(cause := root_cause(e), UNAVAILABLE):
                raise StageLostError(f"a stage actor of version {self.version} is gone ({type(cause).__name__})") \
                    from None
            raise

    def forward(self, batch):
        batch_ref = ray.put(batch)
        hidden = None
        for actor in self.actors[:-1]:
            hidden = actor.forward.remote(batch_ref, hidden)
        return self._get(self.actors[-1].forward.remote(batch_ref, hidden), timeout=self.step_timeout_s)

    def release(self, request_ids: Sequence[str]) -> None:
        self._get([a.release.remote(list(request_ids)) for a in self.actors], timeout=self.step_timeout_s)

    def slot_capacity(self) -> int:
        return self._capacity

    def stats(self) -> list[dict]:
        return self._get([a.stats.remote() for a in self.actors], timeout=self.step_timeout_s)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)  # a dead one is killed already: Ray says nothing
        self.actors = []
