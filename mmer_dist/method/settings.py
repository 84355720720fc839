"""Typed merge settings: one object, validated when it is built, from which the CLI options,
the catalog's version record and what Ray workers receive all derive.

``SETTINGS`` describes every field once (CLI flag, help, which merge methods it applies to);
``cli/merge.py`` and ``cli/export.py`` build their options from it, ``MergeSettings.from_options``
refuses an option given for a method it does not apply to (``--merge ta --topk 0.3``), and
``record`` / ``from_record`` are the version record's columns (a field that does not apply is
recorded as null, never as an unused default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mmer_dist.errors import InvalidInputError
from mmer_dist.method import validate
from mmer_dist.method.masks import MASK_RULES, check_mask_rule
from mmer_dist.method.trim import SCOPES, check_scope

MERGE_METHODS = ("ties", "ta", "naive", "neuro")
TRIMMING_METHODS = ("ties", "neuro")


def check_merge_method(method: str) -> None:
    if method not in MERGE_METHODS:
        raise InvalidInputError(f"unknown merge method {method!r}; expected one of {', '.join(MERGE_METHODS)}")


@dataclass(frozen=True)
class Setting:
    """One field as a command-line option: its flag, help, value type and choices, and the merge
    methods it means something for (None: all)."""

    flag: str
    help: str
    type: Any = None
    choices: tuple | None = None
    methods: tuple[str, ...] | None = None
    switch: bool = False  # a flag without a value (store_true)


SETTINGS: dict[str, Setting] = {
    "method": Setting("--merge", "merge step producing tau* (default ties; ta with --mask tall)", str, MERGE_METHODS),
    "topk": Setting("--topk", "K: fraction of each task vector kept by the trim (default 0.8)", float,
                    methods=TRIMMING_METHODS),
    "scope": Setting("--scope", "trim over all LLM parameters of a model (global, default) or within each tensor",
                     str, SCOPES, methods=TRIMMING_METHODS),
    "alpha": Setting("--alpha", "theta* = theta_pre + alpha * tau* (default 1.0)", float),
    "mask_rule": Setting("--mask", "mask rule (default mmer)", str, MASK_RULES),
    "dare_rate": Setting("--dare-rate", "DARE drop rate applied to every task vector (default 0)", float),
    "dare_seed": Setting("--dare-seed", "DARE seed (default 0; with --dare-rate)", int),
    "neuro_energy": Setting("--neuro-energy", "keep the leading singular directions holding this fraction of each "
                            "row's energy (rank cut; default 1.0 = all)", float, methods=("neuro",)),
    "neuro_keep_parallel": Setting("--neuro-keep-parallel", "keep the task vector's part parallel to the pre-trained "
                                   "row (default: drop)", methods=("neuro",), switch=True),
}


@dataclass(frozen=True)
class MergeSettings:
    """What a merge computes (not where or how fast). Checked when built.

    method:    the merge step producing tau*: ``ties`` (trim, elect, disjoint mean), ``ta``
               (task-arithmetic sum), ``naive`` (mean of task vectors, NaiveMC) or ``neuro``
               (trim, then NeuroMerging per neuron row; ``neuro.py``).
    topk:      K, the fraction of each task vector's entries kept by the trim (ties, neuro).
    scope:     ``global`` (threshold over all LLM parameters of a model) or ``per-tensor``.
    alpha:     theta* = theta_pre + alpha * tau* (for ``ta`` this is the task-arithmetic scale).
    mask_rule: ``mmer`` or an ablation / alternative, see ``masks.MASK_RULES``.
    lams:      lam_i per model, in model order (empty until the models are known).
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

    def __post_init__(self):
        check_merge_method(self.method)
        validate.check_topk(self.topk)
        check_scope(self.scope)
        validate.check_alpha(self.alpha)
        check_mask_rule(self.mask_rule)
        validate.check_drop_rate(self.dare_rate)
        if not (isinstance(self.neuro_energy, (int, float)) and 0.0 < self.neuro_energy <= 1.0):
            raise InvalidInputError(f"NeuroMerging rank cut (energy kept) must lie in (0, 1], got {self.neuro_energy!r}")
        object.__setattr__(self, "lams", tuple(float(x) for x in self.lams))

    @property
    def trims(self) -> bool:
        return self.method in TRIMMING_METHODS and self.topk < 1.0

    @property
    def elects(self) -> bool:
        """Needs the majority sign: TIES everywhere, NeuroMerging for its 1-D weights."""
        return self.method in ("ties", "neuro")

    def applies(self, name: str) -> bool:
        """Whether field ``name`` changes what this merge computes."""
        if name == "dare_seed":
            return self.dare_rate > 0.0
        methods = SETTINGS[name].methods if name in SETTINGS else None
        return methods is None or self.method in methods

    def validated(self, model_ids: list[str]) -> MergeSettings:
        """Check the lambdas against the models of the merge (the fields were checked when the
        object was built); returns self for chaining."""
        validate.check_model_count(len(model_ids))
        if len(self.lams) != len(model_ids):
            raise InvalidInputError(f"{len(self.lams)} lambda values for {len(model_ids)} models")
        for model, lam in zip(model_ids, self.lams):
            validate.check_lam(lam, model)
        return self

    def with_lams(self, lams) -> MergeSettings:
        return dataclasses.replace(self, lams=tuple(lams))

    @classmethod
    def from_options(cls, **given) -> MergeSettings:
        """Settings from the options a user gave (absent or None: the default). An option that
        does not apply to the chosen method is refused, naming its flag."""
        given = {k: v for k, v in given.items() if v is not None}
        unknown = sorted(set(given) - set(SETTINGS))
        if unknown:
            raise ValueError(f"not merge settings: {unknown}")
        settings = cls(**given)
        unused = [SETTINGS[k].flag for k in given if not settings.applies(k) and k != "method"]
        if unused:
            if "dare_seed" in given and not settings.applies("dare_seed"):
                raise InvalidInputError("--dare-seed goes with --dare-rate (it seeds the DARE drop)")
            methods = sorted({m for k in given if not settings.applies(k) for m in (SETTINGS[k].methods or ())})
            raise InvalidInputError(f"{', '.join(unused)} apply to --merge {'|'.join(methods)} only, not "
                                    f"--merge {settings.method}")
        return settings

    def record(self) -> dict[str, Any]:
        """The version record's settings columns: every field, null where it does not apply."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if f.name == "lams" else (value if self.applies(f.name) else None)
        return out

    @classmethod
    def from_record(cls, record) -> MergeSettings:
        """Inverse of ``record`` (from a dict or any object with the same attributes)."""
        get = record.get if isinstance(record, dict) else lambda k: getattr(record, k)
        values = {f.name: get(f.name) for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "lams" else v) for k, v in values.items() if v is not None})
