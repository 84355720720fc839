"""Which waiting requests join the running batch at a step: fair across models, none starving.

The engine runs every admitted request at every step (continuous batching), so the scheduler's
one decision is admission, when a running request has left room. A step's cost stays bounded
whatever models it mixes: every resident tensor is read at most once per step (a model without
a slot costs one bit per parameter more, ``masked_linear``), at most ``max_running`` requests
decode and at most ``max_step_tokens`` prompt tokens prefill (a longer prompt runs alone).

Order of admission, one request at a time, each model's requests in arrival order:
1. among the models whose oldest waiting request has waited ``max_wait_s`` or more, the one whose
   oldest request is oldest (the starvation bound: a model that fairness would pass over, because
   it had much service lately, still gets a request in once its head is overdue, and overdue
   models take turns, so no model's flood shuts out another's overdue request);
2. otherwise the model that has received the least service lately (tokens admitted and
   generated, decayed by half every ``half_life`` steps; service granted in this admission
   counts; ties: the oldest request), so under skewed traffic a model with a trickle of requests
   is not queued behind another model's flood, and admissions are max-min fair across models.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from mmer_dist.model.slots import Demand


@dataclass
class EngineLimits:
    max_running: int = 64  # requests decoding at once
    max_step_tokens: int = 8192  # prompt tokens admitted per step (a longer prompt runs alone)
    max_wait_s: float = 2.0  # a request waiting this long is admitted before any fairness order


@dataclass(frozen=True)
class Candidate:
    """What the scheduler needs of a waiting request."""

    model: str
    prompt_tokens: int
    arrived: float


class Scheduler:
    def __init__(self, limits: EngineLimits, half_life: float = 64.0):
        self.limits = limits
        self.service = Demand(half_life)  # model -> tokens served lately

    def record(self, served: Mapping[str, int]) -> None:
        """A step's tokens per model (prompt tokens of admitted requests, generated tokens)."""
        self.service.add_step(dict(served))

    def admit(self, waiting: Mapping[str, Candidate], running: int, now: float) -> list[str]:
        """Ids of the waiting requests to admit now (``waiting`` in arrival order)."""
        room = self.limits.max_running - running
        budget = self.limits.max_step_tokens
        queues: dict[str, deque[str]] = {}
        for rid, c in waiting.items():
            queues.setdefault(c.model, deque()).append(rid)
        given: dict[str, float] = {}  # service granted by this admission, so that picks rotate
        admitted: list[str] = []
        while room > 0 and queues:
            model = self._next_model(queues, waiting, given, now)
            rid = queues[model][0]
            c = waiting[rid]
            if admitted and c.prompt_tokens > budget:
                break
            queues[model].popleft()
            if not queues[model]:
                del queues[model]
            admitted.append(rid)
            room -= 1
            budget -= c.prompt_tokens
            given[model] = given.get(model, 0.0) + c.prompt_tokens
        return admitted

    def _next_model(self, queues: dict[str, deque[str]], waiting: Mapping[str, Candidate], given: dict[str, float],
                    now: float) -> str:
        def head_arrived(m: str) -> float:
            return waiting[queues[m][0]].arrived

        overdue = [m for m in queues if now - head_arrived(m) >= self.limits.max_wait_s]
        if overdue:
            return min(overdue, key=head_arrived)
        return min(queues, key=lambda m: (self.service[m] + given.get(m, 0.0), head_arrived(m)))
