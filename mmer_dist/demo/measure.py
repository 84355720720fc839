"""What ``mmer demo`` measures, and how: each number is (right, asked) on named kit questions.

- ``retention``: each model alone (model = its id) on the first ``n`` questions of its report half
  (``mmer_dist.demo.calibration.report_half``: the samples ``bench/kit_quality.py`` reports on),
  asked through the endpoint; beside it, on the same questions, its original fine-tune (theta_i)
  and its own encoder around the base LLM (theta_pre, the floor), both with the kit's reference
  evaluator, and chance (one answer word of the task's, at random).
- ``expansion``: the kit's two-media prompts (``mmer_dist.demo.expansion.mixed``: another model's
  media, then the asked one's, then its question) for every pair of models, both questions, to
  model ``merged`` under each text policy through the endpoint; beside them, on the same prompts,
  reference routings run by the serving engine in-process (a chat request cannot ask for them):
  the originals with no merge at all (each media through its own fine-tune theta_k; the text
  following its media as ``follow-media`` routes it, or through theta_pre as the paper routes
  it), theta* of the store's TIES merge for every token; and chance.

A reply is right when it is exactly the answer word (greedy, the kit evaluator's token budget),
as the kit evaluator and the quality benchmark score it.
"""

from __future__ import annotations

import itertools
import math
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mmer_dist.demo.calibration import report_half
from mmer_dist.demo.expansion import Encoders, Payloads, Served, mixed, request, single, text_through, through
from mmer_dist.demo.kit import Kit, get_task, predict
from mmer_dist.model.policies import TEXT_POLICIES
from mmer_dist.store.weightsets import WeightSet

CONCURRENCY = 16  # requests in flight: the engine batches them
Z95 = 1.96


@dataclass(frozen=True)
class Score:
    """``right`` of ``asked`` questions; ``chance``-only scores have asked 0 and a ``rate``."""

    right: int
    asked: int

    @property
    def rate(self) -> float:
        return self.right / self.asked if self.asked else float("nan")

    def interval(self) -> tuple[float, float]:
        """Wilson's 95% interval of the rate."""
        n, p = self.asked, self.rate
        if not n:
            return (float("nan"), float("nan"))
        centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
        half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / (1 + Z95 ** 2 / n)
        return (max(0.0, centre - half), min(1.0, centre + half))

    @classmethod
    def of(cls, replies: Sequence[str], answers: Sequence[str]) -> Score:
        return cls(sum(r == a for r, a in zip(replies, answers, strict=True)), len(answers))

    def as_dict(self) -> dict:
        lo, hi = self.interval()
        return {"right": self.right, "asked": self.asked, "rate": number(self.rate),
                "interval95": [number(lo), number(hi)]}


def number(x: float) -> float | None:
    """``x`` for JSON: None where it is not a number (a rate of nothing)."""
    return None if math.isnan(x) else x


def total(scores: Sequence[Score]) -> Score:
    return Score(sum(s.right for s in scores), sum(s.asked for s in scores))


@dataclass
class Retention:
    """One model on its questions: served (theta_hat_i), original (theta_i), floor (theta_pre)."""

    model: str
    served: Score
    original: Score
    floor: Score
    chance: float
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (question, reply, answer)

    @property
    def retention(self) -> float:
        return self.served.rate / self.original.rate if self.original.right else float("nan")


@dataclass
class Expansion:
    """Rows (text policies, then the reference routings) x models of the two-media prompts."""

    models: list[str]
    pairs: list[tuple[str, str]]
    per_pair: int  # sample pairs per model pair (each asked both questions)
    rows: dict[str, dict[str, Score]]  # row key -> model asked about -> score
    chance: dict[str, float]  # model -> chance of its question
    example: dict = field(default_factory=dict)  # one request, its right answer, each row's reply

    def overall(self, key: str) -> Score:
        return total(list(self.rows[key].values()))

    @property
    def overall_chance(self) -> float:
        """Chance over all the questions asked (each model is asked as often as every other)."""
        return sum(self.chance.values()) / len(self.chance)

    def best_policy(self) -> str:
        return max((k for k in self.rows if k in TEXT_POLICIES), key=lambda k: self.overall(k).right)


REFERENCES = ("originals-follow-media", "originals-routed", "ties-star")  # in-process, beside the text policies


class Asker:
    """Chat requests to the endpoint through the openai client, ``CONCURRENCY`` at a time;
    ``on_reply`` is called once per answered request (a progress count)."""

    def __init__(self, client, on_reply: Callable[[], None] = lambda: None):
        self.client, self.on_reply = client, on_reply
        self.warm: set[str] = set()  # models whose encoder the endpoint has loaded

    def one(self, req: dict) -> str:
        extra = {"text_policy": req["text_policy"]} if "text_policy" in req else None
        answer = self.client.chat.completions.create(model=req["model"], messages=req["messages"], temperature=0,
                                                     max_tokens=req["max_tokens"], extra_body=extra)
        self.on_reply()
        return (answer.choices[0].message.content or "").strip()

    def all(self, requests: Sequence[dict]) -> list[str]:
        """The replies, in order. A request bringing a model's media for the first time goes alone
        first: the endpoint loads that model's encoder on it, and the requests after it find the
        encoder loaded (the demo's timing then measures answers, not one encoder load per client)."""
        replies: list[str | None] = [None] * len(requests)
        for i, req in enumerate(requests):
            media = {p["model"] for m in req["messages"] for p in m["content"] if p["type"] != "text"}
            if not media <= self.warm:
                replies[i] = self.one(req)
                self.warm |= media
        rest = [i for i, r in enumerate(replies) if r is None]
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            for i, reply in zip(rest, pool.map(self.one, [requests[i] for i in rest])):
                replies[i] = reply
        return replies


def questions(kit: Kit, model_id: str, n: int):
    """The first ``n`` questions of the model's report half (all of it if shorter)."""
    return report_half(kit.split(kit.models[model_id].task).test)[:n]


def retention_requests(kit: Kit, model_ids: Sequence[str], n: int, payloads: Payloads) -> list[dict]:
    out = []
    for m in model_ids:
        task = get_task(kit.models[m].task)
        out += [request(single(payloads, task, i, s, m), model=m) for i, s in enumerate(questions(kit, m, n))]
    return out


def retention(kit: Kit, model_ids: Sequence[str], n: int, replies: Sequence[str],
              references: dict[str, tuple[Score, Score]] | None = None) -> list[Retention]:
    """Scores of the endpoint's ``replies`` to ``retention_requests`` (same models, same n); the
    originals' and the floors' scores are computed with the kit evaluator unless given."""
    out, at = [], 0
    for m in model_ids:
        km, samples = kit.models[m], questions(kit, m, n)
        task = get_task(km.task)
        answers = [s.answer for s in samples]
        mine = list(replies[at:at + len(samples)])
        at += len(samples)
        original, floor = (references or {}).get(m) or (
            Score.of(predict(km.path, task, samples), answers),
            Score.of(predict(km.path, task, samples, llm=kit.base), answers))
        out.append(Retention(m, Score.of(mine, answers), original, floor, task.chance,
                             [(task.question, r, a) for r, a in zip(mine[:2], answers[:2])]))
    return out


def expansion_requests(kit: Kit, model_ids: Sequence[str], per_pair: int, payloads: Payloads,
                       policy: str | None) -> tuple[list[dict], list[tuple[str, str]]]:
    """Every pair of the models, ``per_pair`` sample pairs each, both questions (the quality
    benchmark's mixed prompts, fewer of them): requests and (asked model, right answer)."""
    reqs, index = [], []
    for a, b in itertools.combinations(model_ids, 2):
        qa, qb = questions(kit, a, per_pair), questions(kit, b, per_pair)
        for i, (sa, sb) in enumerate(zip(qa, qb)):
            parts = ((get_task(kit.models[a].task), i, sa, a), (get_task(kit.models[b].task), i, sb, b))
            for ask, (m, s) in enumerate(((a, sa), (b, sb))):
                reqs.append(request(mixed(payloads, *parts, ask), "merged", policy))
                index.append((m, s.answer))
    return reqs, index


def score_rows(model_ids: Sequence[str], index: Sequence[tuple[str, str]], replies: Sequence[str]) -> dict[str, Score]:
    return {m: Score.of([r for (k, _), r in zip(index, replies) if k == m], [a for k, a in index if k == m])
            for m in model_ids}


def expansion(kit: Kit, store: str, version: int, model_ids: Sequence[str], per_pair: int, asker: Asker,
              device: str, on_reply: Callable[[], None] = lambda: None) -> Expansion:
    payloads = Payloads()
    pairs = list(itertools.combinations(model_ids, 2))
    rows: dict[str, dict[str, Score]] = {}
    replies_of: dict[str, list[str]] = {}
    for policy in TEXT_POLICIES:
        reqs, index = expansion_requests(kit, model_ids, per_pair, payloads, policy)
        replies_of[policy] = asker.all(reqs)
        rows[policy] = score_rows(model_ids, index, replies_of[policy])
    references = (  # (row, the policy planned, the rewrite of its routing), on a server whose theta_hat_k
        # slots hold the ingested theta_k: the rewrites to theta_pre and theta* never use a theta_hat
        ("originals-follow-media", "follow-media", lambda p: p),
        ("originals-routed", None, lambda p: text_through(p, WeightSet.base())),
        ("ties-star", None, lambda p: through(p, WeightSet.star())))
    with tempfile.TemporaryDirectory(prefix="mmer-demo-encoders-") as tmp:
        served = Served(store, version, Encoders(store, Path(tmp)), device, originals=True)
        try:
            for key, policy, rewrite in references:
                reqs, index = expansion_requests(kit, model_ids, per_pair, payloads, policy)
                replies_of[key] = served.routed(reqs, rewrite)
                for _ in reqs:
                    on_reply()
                rows[key] = score_rows(model_ids, index, replies_of[key])
        finally:
            served.close()
    chance = {m: get_task(kit.models[m].task).chance for m in model_ids}
    # the example: the first request (the second model's media, then the first's and its question)
    reqs, index = expansion_requests(kit, model_ids, per_pair, payloads, None)
    parts = reqs[0]["messages"][0]["content"]
    example = {"media": [p["model"] for p in parts if p["type"] != "text"], "question": parts[-1]["text"],
               "answer": index[0][1], "replies": {k: v[0] for k, v in replies_of.items()}}
    return Expansion(list(model_ids), pairs, per_pair, rows, chance, example)
