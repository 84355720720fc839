"""Choosing the next token: greedy, or temperature + top-p with a per-request seed.

Each request owns its ``torch.Generator``, so its samples depend on its seed alone, never on
which other requests share its steps. Log-probabilities are those of the model's distribution
(softmax of the raw logits, before temperature and top-p), as OpenAI-compatible servers report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mmer_dist.errors import InvalidInputError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # in the request's output vocabulary
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and 0 <= self.temperature <= 100):
            raise InvalidInputError(f"temperature must lie in [0, 100], got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise InvalidInputError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not 0 <= self.top_logprobs <= 20:
            raise InvalidInputError(f"top_logprobs must lie in [0, 20], got {self.top_logprobs!r}")


@dataclass(frozen=True)
class Sample:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Sampler:
    params: SamplingParams
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator()
        seed = self.params.seed if self.params.seed is not None else torch.seed()
        self.generator.manual_seed(int(seed) % (1 << 63))

    def __call__(self, logits: torch.Tensor) -> Sample:
        """``logits``: (vocab,) float32 on the CPU."""
        p = self.params
        logprobs = torch.log_softmax(logits, dim=-1)
        if p.temperature == 0:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / p.temperature, dim=-1)
            if p.top_p < 1:
                probs = _top_p(probs, p.top_p)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        top = ()
        if p.top_logprobs:
            values, ids = torch.topk(logprobs, min(p.top_logprobs, logprobs.numel()))
            top = tuple(zip(ids.tolist(), values.tolist()))
        return Sample(token, float(logprobs[token]), top)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (at least one)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly more likely tokens
    sorted_probs[before >= top_p] = 0
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum()
