"""What a stage keeps on its device for the whole life of a version: theta_pre, tau* and every
model's packed mask over the stage's tensors, and each model's extra vocabulary rows.

From these any weight set of the version is rebuilt on the device (``compose``, the function the
exports use), so a slot build costs one pass over the stage's tensors and never a store read, and
the mask-native path runs a model's linear layers from them directly.

They are held in blocks laid out as the decoder multiplies: a layer's q/k/v weights as one block
(rows of q, then k, then v), gate/up as one, o and down alone, every other tensor (norms,
biases, embeddings, LM head) alone. A block is theta_pre (stored dtype), tau* (stored float32, or
the serving dtype with ``tau_dtype``: half the bytes of the largest resident tensor; every weight
is then composed from the rounded tau*, and the demo kit's answers stay the export's on every
test sample, tests/test_engine_kit.py) and the
(N, rows, ceil(cols/8)) packed masks, concatenated along rows, so one mask-native call covers
q, k and v; ``fetcher`` still serves each store tensor by name (a row range of its block, no copy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmer_dist.errors import InvalidInputError
from mmer_dist.model.dense import EMBED, HEAD, MATRICES, layer_prefix
from mmer_dist.store.weights import VersionWeights, compose
from mmer_dist.store.weightsets import WeightSet


@dataclass(frozen=True)
class Block:
    base: torch.Tensor  # (rows, cols) theta_pre in the stored dtype
    tau_star: torch.Tensor  # (rows, cols)
    packed: torch.Tensor  # (N, rows, ceil(cols / 8)) uint8
    cols: int


def block_names(names: list[str], layers: range) -> dict[str, list[str]]:
    """Block name -> the store tensors it holds, in row order: ``<layer>.<field>`` for the fused
    matrices of ``MATRICES``, the tensor's own name for the rest."""
    out: dict[str, list[str]] = {}
    fused = {layer_prefix(layer) + n: f"{layer}.{field}" for layer in layers
             for field, members in MATRICES.items() for n in members}
    for layer in layers:
        for field, members in MATRICES.items():
            out[f"{layer}.{field}"] = [layer_prefix(layer) + n for n in members]
    for n in names:
        if n not in fused:
            out[n] = [n]
    return out


class ResidentTensors:
    def __init__(self, weights: VersionWeights, names: list[str], layers: range, device: torch.device,
                 dtype: torch.dtype, tau_dtype: torch.dtype | None = None):
        self.version = weights.version
        self.models = weights.models
        self.alpha = weights.record.alpha
        self._index = {m: i for i, m in enumerate(self.models)}
        self.blocks: dict[str, Block] = {}
        self.where: dict[str, tuple[str, int, int]] = {}  # store tensor -> (block, first row, stop row)
        for block, members in block_names(names, layers).items():
            cols = {weights.tensors[n].cols for n in members}
            if len(cols) != 1:
                raise InvalidInputError(f"tensors {members} differ in width ({sorted(cols)}); the decoder "
                                        "multiplies them by one input")
            row = 0
            for n in members:
                self.where[n] = (block, row, row + weights.tensors[n].rows)
                row += weights.tensors[n].rows
            tau = torch.cat([weights.tau_star(n) for n in members])
            self.blocks[block] = Block(
                base=torch.cat([weights.base(n) for n in members]).to(device),
                tau_star=tau.to(device=device, dtype=tau_dtype or tau.dtype),
                packed=torch.cat([weights.packed_masks(n) for n in members], dim=1).to(device), cols=cols.pop())
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
            block, a, b = self.where[name]
            t = self.blocks[block]
            return compose(key, t.base[a:b], t.tau_star[a:b].float(), t.packed[:, a:b], t.cols, self.model_index,
                           self.alpha)
        return fetch

    def nbytes_by_part(self) -> dict[str, int]:
        """Bytes of theta_pre, tau*, the packed masks (N bits per parameter) and the extra rows."""
        def size(ts):
            return sum(t.numel() * t.element_size() for t in ts)
        return {"base": size(b.base for b in self.blocks.values()),
                "tau_star": size(b.tau_star for b in self.blocks.values()),
                "masks": size(b.packed for b in self.blocks.values()),
                "extra_rows": size(t for rows in self.extra.values() for t in rows.values())}

    @property
    def nbytes(self) -> int:
        return sum(self.nbytes_by_part().values())
