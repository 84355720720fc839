"""One step's weights: for each weight set the step names, dense tensors (a slot, or a pinned set)
or the mask-native path (the model's row of the resident packed masks), decided once per step.

A stage's decoder ops then take, per routing group, either a dense matrix (``grouped_linear``) or
nothing, and the groups on the mask-native path run in one ``masked_linear`` call per layer over
the resident theta_pre / tau* blocks. Norms and biases are small: a mask-native model's are its own,
composed once when the stage loads (``vectors``), so every group has dense vectors.

    worked example: a decode step of three requests, retention of a (slot), b and c (no slot)
    plan.keys     hat:a   hat:b   hat:c        sorted tokens 0 | 1 | 2
    dense         [Da,    None,   None]
    vectors       [Da,    Vb,     Vc]          Vb, Vc: b's and c's norms and biases
    native        MaskGroups([(1, 2, idx(b)), (2, 3, idx(c))])
    each linear:  row 0 = x0 . Da^T;  rows 1, 2 = one kernel call over theta_pre, tau*, masks of b, c
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmer_dist.model import layers as L
from mmer_dist.model.batch import RoutingPlan
from mmer_dist.model.dense import DenseWeights
from mmer_dist.model.masked_linear import MaskGroups, masked_linear
from mmer_dist.model.resident import Block
from mmer_dist.store.weightsets import WeightSet


@dataclass
class StepWeights:
    """Every weight set of a step: ``dense`` for those run dense, ``native`` (set -> model row) for
    those on the mask-native path; ``vectors(key)`` gives any set's norms and biases."""

    dense: dict[WeightSet, DenseWeights]
    native: dict[WeightSet, int]
    model_vectors: list[DenseWeights]  # per model row: its composed vectors

    def vectors(self, key: WeightSet) -> DenseWeights:
        return self.dense[key] if key in self.dense else self.model_vectors[self.native[key]]

    def for_plan(self, plan: RoutingPlan) -> PlanWeights:
        native = [(a, b, self.native[k]) for (a, b), k in zip(plan.segments, plan.keys) if k in self.native]
        return PlanWeights(plan, [self.dense.get(k) for k in plan.keys], [self.vectors(k) for k in plan.keys],
                           MaskGroups.build(native), [g for g, k in enumerate(plan.keys) if k in self.native])


@dataclass
class PlanWeights:
    """A step's weights per group of its routing plan (the decoder layers' view)."""

    plan: RoutingPlan
    dense: list[DenseWeights | None]
    vectors: list[DenseWeights]
    native: MaskGroups
    native_groups: list[int]

    def linear(self, x: torch.Tensor, layer: int, field: str, bias: str, block: Block,
               round_to: torch.dtype) -> torch.Tensor:
        """``x`` (sorted) through matrix ``field`` of ``layer``: dense groups by matmul, the
        mask-native ones by one ``masked_linear`` over ``block`` (that matrix's resident block)."""
        weights = [None if d is None else getattr(d.layers[layer], field) for d in self.dense]
        biases = [getattr(v.layers[layer], bias) for v in self.vectors]
        out = L.grouped_linear(x, self.plan, weights, biases, block.base.shape[0])
        if self.native_groups:
            masked_linear(x, self.native, block.base, block.tau_star, block.packed, round_to, out,
                          [biases[g] for g in self.native_groups])
        return out

    def norm_weights(self, layer: int | None, field: str) -> list[torch.Tensor]:
        """Each group's ``field`` norm of ``layer`` (None: the final norm)."""
        if layer is None:
            return [v.final_norm for v in self.vectors]
        return [getattr(v.layers[layer], field) for v in self.vectors]
