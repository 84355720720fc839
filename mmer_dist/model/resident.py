"""What a stage keeps on its device for the whole life of a version: theta_pre, tau* and every
model's packed mask over the stage's tensors, and each model's extra vocabulary rows.

From these any weight set of the version is rebuilt on the device (``compose``, the function the
exports use), so a slot miss costs one pass over the stage's tensors and never a store read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mmer_dist.errors import InvalidInputError
from mmer_dist.model.dense import EMBED, HEAD
from mmer_dist.store.weights import VersionWeights, compose
from mmer_dist.store.weightsets import WeightSet


class ResidentTensors:
    def __init__(self, weights: VersionWeights, names: list[str], device: torch.device, dtype: torch.dtype):
        self.version = weights.version
        self.models = weights.models
        self.alpha = weights.record.alpha
        self.cols = {n: weights.tensors[n].cols for n in names}
        self.shapes = {n: tuple(weights.tensors[n].shape) for n in names}
        self._index = {m: i for i, m in enumerate(self.models)}
        self.base = {n: weights.base(n).to(device) for n in names}
        self.tau_star = {n: weights.tau_star(n).to(device) for n in names}
        self.packed = {n: weights.packed_masks(n).to(device) for n in names}
        # extra vocabulary rows, already in the serving dtype: model -> tensor name -> (extra, hidden)
        self.extra: dict[str, dict[str, torch.Tensor]] = {}
        for m in self.models:
            rows = {n: weights.extra_rows(n, m) for n in names if n in (EMBED, HEAD)}
            self.extra[m] = {n: r.to(device=device, dtype=dtype) for n, r in rows.items() if r is not None}

    def model_index(self, model_id: str) -> int:
        if model_id not in self._index:
            raise InvalidInputError(f"model {model_id!r} is not part of version {self.version} "
                                    f"(models: {', '.join(self.models)})")
        return self._index[model_id]

    def check(self, key: WeightSet) -> None:
        for m in key.models:
            self.model_index(m)

    def fetcher(self, key: WeightSet) -> Callable[[str], torch.Tensor]:
        """name -> tensor ``name`` of weight set ``key`` in float32 (2-D store view)."""
        self.check(key)

        def fetch(name: str) -> torch.Tensor:
            return compose(key, self.base[name], self.tau_star[name], self.packed[name], self.cols[name],
                           self.model_index, self.alpha)
        return fetch

    @property
    def nbytes(self) -> int:
        groups = (self.base, self.tau_star, self.packed, *self.extra.values())
        return sum(t.numel() * t.element_size() for g in groups for t in g.values())
