"""Typed merge settings, validated once at the edge and passed down unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmer_dist.errors import InvalidInputError
from mmer_dist.method import validate
from mmer_dist.method.masks import check_mask_rule
from mmer_dist.method.trim import check_scope

MERGE_METHODS = ("ties", "ta", "naive", "neuro")
TRIMMING_METHODS = ("ties", "neuro")


def check_merge_method(method: str) -> None:
    if method not in MERGE_METHODS:
        raise InvalidInputError(f"unknown merge method {method!r}; expected one of {', '.join(MERGE_METHODS)}")


@dataclass(frozen=True)
class MergeSettings:
    """What a merge computes (not where or how fast).

    method:    the merge step producing tau*: ``ties`` (trim, elect, disjoint mean), ``ta``
               (task-arithmetic sum), ``naive`` (mean of task vectors, NaiveMC) or ``neuro``
               (trim, then NeuroMerging per neuron row; ``neuro.py``).
    topk:      K, the fraction of each task vector's entries kept by the trim.
    scope:     ``global`` (threshold over all LLM parameters of a model) or ``per-tensor``.
    alpha:     theta* = theta_pre + alpha * tau* (for ``ta`` this is the task-arithmetic scale).
    mask_rule: ``mmer`` or an ablation / alternative, see ``masks.MASK_RULES``.
    lams:      lam_i per model, in model order.
    dare_rate, dare_seed: DARE applied to every tau_i before the merge step (0 = off).
    neuro_energy: NeuroMerging rank cut, the fraction of singular-value energy kept (1 = all).
    neuro_keep_parallel: NeuroMerging keeps the part parallel to the pre-trained row (merged by
               sign election and disjoint mean) instead of dropping it.
    """

    method: str = "ties"
    topk: float = 0.8
    scope: str = "global"
    alpha: float = 1.0
    mask_rule: str = "mmer"
    lams: tuple[float, ...] = field(default_factory=tuple)
    dare_rate: float = 0.0
    dare_seed: int = 0
    neuro_energy: float = 1.0
    neuro_keep_parallel: bool = False

    @property
    def trims(self) -> bool:
        return self.method in TRIMMING_METHODS and self.topk < 1.0

    @property
    def elects(self) -> bool:
        """Needs the majority sign: TIES everywhere, NeuroMerging for its 1-D weights."""
        return self.method in ("ties", "neuro")

    def validated(self, model_ids: list[str]) -> MergeSettings:
        """Check every field against the models of the merge; returns self for chaining."""
        check_merge_method(self.method)
        validate.check_topk(self.topk)
        check_scope(self.scope)
        validate.check_alpha(self.alpha)
        check_mask_rule(self.mask_rule)
        validate.check_drop_rate(self.dare_rate)
        if not (isinstance(self.neuro_energy, (int, float)) and 0.0 < self.neuro_energy <= 1.0):
            raise InvalidInputError(f"NeuroMerging rank cut (energy kept) must lie in (0, 1], got {self.neuro_energy!r}")
        validate.check_model_count(len(model_ids))
        if len(self.lams) != len(model_ids):
            raise InvalidInputError(f"{len(self.lams)} lambda values for {len(model_ids)} models")
        for model, lam in zip(model_ids, self.lams):
            validate.check_lam(lam, model)
        return self
