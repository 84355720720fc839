"""Names for the weight sets a version defines (DESIGN.md, "The method, exactly").

    base          theta_pre
    hat:<id>      theta_hat_i = theta_pre + m_i * tau*            (retention of model i)
    bar           theta_bar = theta_pre + mean_i(m_i) * tau*      (text tokens; all models)
    mean:<a>+<b>  theta_pre + mean_{i in S}(m_i) * tau*           (a subset S of the models)
    star          theta* = theta_pre + alpha * tau*                (the merged model)

A ``WeightSet`` is small, hashable and has a string form, so a routing plan can name one per
token group and a Ray payload can carry it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmer_dist.errors import InvalidInputError

KINDS = ("base", "hat", "bar", "mean", "star")


@dataclass(frozen=True, order=True)
class WeightSet:
    kind: str
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidInputError(f"unknown weight set kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        wants = {"hat": (1, 1), "mean": (1, None)}.get(self.kind, (0, 0))
        if len(self.models) < wants[0] or (wants[1] is not None and len(self.models) > wants[1]):
            raise InvalidInputError(f"weight set {self.kind!r} takes {wants} model ids, got {list(self.models)}")
        if len(set(self.models)) != len(self.models):
            raise InvalidInputError(f"weight set {self.kind!r} names a model twice: {list(self.models)}")

    @classmethod
    def base(cls) -> WeightSet:
        return cls("base")

    @classmethod
    def bar(cls) -> WeightSet:
        return cls("bar")

    @classmethod
    def star(cls) -> WeightSet:
        return cls("star")

    @classmethod
    def hat(cls, model_id: str) -> WeightSet:
        return cls("hat", (model_id,))

    @classmethod
    def mean(cls, models: Sequence[str]) -> WeightSet:
        return cls("mean", tuple(models))

    @classmethod
    def parse(cls, text: str) -> WeightSet:
        kind, _, rest = text.partition(":")
        return cls(kind, tuple(rest.split("+")) if rest else ())

    def __str__(self) -> str:
        return self.kind + (":" + "+".join(self.models) if self.models else "")
