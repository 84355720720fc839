"""Which waiting requests join the running batch at a step: fair across models, none starving.

The engine runs every admitted request at every step (continuous batching), so the scheduler's
one decision is admission, when a running request has left room. A step's cost stays bounded
whatever models it mixes: every resident tensor is read at most once per step (a model without
a slot costs one bit per parameter more, ``masked_linear``), at most ``max_running`` requests
decode and at most ``max_step_tokens`` prompt tokens prefill (a longer prompt runs alone).

Order of admission:
1. requests that have waited ``max_wait_s`` or more, oldest first (the starvation bound: under
   any traffic a request is admitted once it is the oldest overdue one and room frees);
2. then one request at a time from the model that has received the least service lately (tokens
   admitted and generated, decayed by half every ``half_life`` steps; ties: the oldest request),
   so under skewed traffic a model with a trickle of requests is not queued behind another
   model's flood, and each model's share of admissions is max-min fair;
3. within a model, arrival order.
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
        overdue = deque(rid for rid, c in waiting.items() if now - c.arrived >= self.limits.max_wait_s)
        given: dict[str, float] = {}  # service granted by this admission, so that picks rotate
        admitted: list[str] = []
        taken: set[str] = set()
        while room > 0 and len(taken) < len(waiting):
            while overdue and overdue[0] in taken:
                overdue.popleft()
            rid = overdue[0] if overdue else self._fairest(queues, taken, waiting, given)
            c = waiting[rid]
            if admitted and c.prompt_tokens > budget:
                break
            taken.add(rid)
            admitted.append(rid)
            room -= 1
            budget -= c.prompt_tokens
            given[c.model] = given.get(c.model, 0.0) + c.prompt_tokens
        return admitted

    def _fairest(self, queues: dict[str, deque[str]], taken: set[str], waiting: Mapping[str, Candidate],
                 given: dict[str, float]) -> str:
        """The oldest request of the least served model with requests left."""
        for q in queues.values():
            while q and q[0] in taken:
                q.popleft()
        model = min((m for m, q in queues.items() if q),
                    key=lambda m: (self.service[m] + given.get(m, 0.0), waiting[queues[m][0]].arrived))
        return queues[model][0]
