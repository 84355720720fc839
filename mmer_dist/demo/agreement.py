"""Do two greedy paths agree? Answers compared token by token, judged by the reference's logits.

The serving engine and plain transformers compute the same function in float32 but not in the
same order of operations (fused q/k/v, grouped matmuls, batched decode, other kernels), so their
log-probabilities differ by float rounding, and a greedy answer may flip where two tokens are
within that rounding of each other: the trained kit differs in its low bits from machine to
machine, and so do its near-ties. An answer counts as a real difference only where it could not
come from rounding:

- along the common prefix, each token's log-probability on the engine side is within
  ``TOLERANCE`` of the reference's (``max_logprob_diff`` is measured and reported);
- at the first token where the answers part, the reference prefers its own token over the engine's
  by at most ``2 * TOLERANCE`` (each side's values off by at most ``TOLERANCE``): a near-tie;
  anything wider is a difference (``differ``).

``TOLERANCE`` is 1e-3 in log-probability. Measured on the test kit (x86, 2 cores), the engine
stays within 1e-6 of transformers (0 where the float order happens to match); before the kit's
payloads were lossless, the 16-bit WAV rounding of float tones alone moved them by 1.3e-4.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmer_dist.demo.kit_store import GreedyAnswer

TOLERANCE = 1e-3
STOP = -1  # a stop token, whichever one


@dataclass(frozen=True)
class EngineAnswer:
    """A streamed chat reply: its text, the generated token ids before a stop token, whether one
    ended it, and each generated token's log-probability as the endpoint reported it."""

    text: str
    tokens: tuple[int, ...]
    stopped: bool
    logprobs: tuple[float, ...]

    @classmethod
    def from_events(cls, events: Sequence[dict]) -> EngineAnswer:
        entries = [e["logprob"] for e in events if e["type"] == "token" and "logprob" in e]
        text = "".join(e["text"] for e in events if e["type"] == "token").strip()
        return cls(text, tuple(e["id"] for e in entries), events[-1].get("finish_reason") == "stop",
                   tuple(e["logprob"] for e in entries))


def _symbols(tokens: Sequence[int], stopped: bool) -> list[int]:
    return [*tokens, *([STOP] if stopped else [])]


def _logprob(reference: GreedyAnswer, step: int, symbol: int) -> float:
    row = reference.logprobs[step]
    if symbol == STOP:
        return max(float(row[t]) for t in reference.stop_ids)
    return float(row[symbol])


def agreement(answers: Sequence[EngineAnswer], references: Sequence[GreedyAnswer],
              tolerance: float = TOLERANCE) -> dict:
    """``same`` / ``near_ties`` / ``differ`` counts over paired answers and the largest
    log-probability difference on their common prefixes (see the module docstring)."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers against {len(references)} references")
    out = {"n": len(answers), "same": 0, "near_ties": 0, "differ": 0, "max_logprob_diff": 0.0, "tolerance": tolerance}
    for a, r in zip(answers, references):
        mine, theirs = _symbols(a.tokens, a.stopped), _symbols(r.tokens, r.stopped)
        split = next((j for j, (x, y) in enumerate(zip(mine, theirs)) if x != y), min(len(mine), len(theirs)))
        for j in range(min(split, len(a.logprobs))):
            out["max_logprob_diff"] = max(out["max_logprob_diff"], abs(a.logprobs[j] - _logprob(r, j, mine[j])))
        if mine == theirs:
            out["same"] += 1
        elif split < min(len(mine), len(theirs)) and \
                _logprob(r, split, theirs[split]) - _logprob(r, split, mine[split]) <= 2 * tolerance:
            out["near_ties"] += 1
        else:
            out["differ"] += 1
    return out


def holds(result: dict) -> bool:
    """No real difference, and the common prefixes within the tolerance."""
    return result["differ"] == 0 and result["max_logprob_diff"] <= result["tolerance"] and result["n"] > 0


def summary(result: dict) -> str:
    """``12/12 same`` or ``11/12 same, 1 near-tie, max |Δ log p| 3e-06``."""
    text = f"{result['same']}/{result['n']} same"
    if result["near_ties"]:
        text += f", {result['near_ties']} near-tie{'s' if result['near_ties'] > 1 else ''}"
    if result["differ"]:
        text += f", **{result['differ']} differ**"
    return text + f" (max |Δ log p| {result['max_logprob_diff']:.1e})"
