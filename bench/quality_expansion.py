"""The quality benchmark's expansion tables, run through the serving engine (``mmer_dist.model``).

A benchmark sequence is token ids of the bench's vocabulary (``quality_tasks.Vocab``): the base
vocabulary [0, V), then model k's extra rows -- its prefix token and its modality tokens, the
stand-in for its encoder + connector -- in slot k, ids [V + k*E, V + (k+1)*E) with E = 1 +
modality tokens (mixed prompts put model ``TASKS[k]`` in slot k; a single-model sequence has its
model in slot 0). For the engine, each run of model-k ids becomes ``MediaPart(k, embeds)`` with
embeds = model k's own extra embedding rows, read from the store (``StoreWeights.extra_rows``):
media tokens, routed through theta_hat_k. Each run of base ids becomes a ``TextPart``, routed by
the request's text policy (``mmer_dist.model.prompt.TEXT_POLICIES``).

Answers are teacher-forced: one prefill per batch of prompts with logits at every position
(``logits="all"``); the prediction for position p is the argmax of position p - 1's logits,
scored on the answer positions only, as ``quality_tasks.accuracy`` scores a plain HF model.

LM head: an expansion request answers in the base vocabulary only (the engine's rule, see
``mmer_dist.model.prompt``), except ``request-modality`` with one model's media present, which
answers as that model (base + its extra rows). The HF models of the retention and proxy tables
score over their whole vocabulary. Answers are base tokens, so the base-only head can only turn a
predicted extra token (always wrong) into a base token; the expansion table's single-weights rows
against the proxy table's (same weights, same prompts) show whether that ever happens.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from mmer_dist.demo.expansion import SLOT_BUDGET
from mmer_dist.model import Expansion, LocalPipeline, MediaPart, Prompt, TextPart, plan_prompt
from mmer_dist.model.batch import RequestSlice, StepBatch
from mmer_dist.model.dense import EMBED
from mmer_dist.store.weights import StoreWeights, VersionWeights

from bench.quality_tasks import PAD, Vocab

STEP_TOKENS = 4096  # prompt tokens per engine step (one prefill of many prompts)


def to_parts(ids: Sequence[int], slots: Sequence[str], rows: dict[str, torch.Tensor],
             vocab: Vocab) -> list[TextPart | MediaPart]:
    """One sequence (no padding) as engine prompt parts: ``slots[k]`` owns the ids of slot k."""

    def owner(i: int) -> str | None:
        return None if i < vocab.base_size else slots[(i - vocab.base_size) // vocab.extra_rows]

    parts: list[TextPart | MediaPart] = []
    for model, run in itertools.groupby(ids, key=owner):
        run = list(run)
        if model is None:
            parts.append(TextPart(tuple(run)))
        else:
            local = [(i - vocab.base_size) % vocab.extra_rows for i in run]
            parts.append(MediaPart(model, rows[model][local]))
    return parts


class Sequences:
    """Benchmark sequences (right-padded (B, L) ids) with answer masks per task, as engine parts."""

    def __init__(self, tokens: torch.Tensor, answers: dict[str, torch.Tensor], slots: Sequence[str],
                 store: StoreWeights, vocab: Vocab):
        self.tokens, self.answers = tokens, answers
        self.lengths = (tokens != PAD).sum(1).tolist()  # PAD only pads the end
        rows = {m: store.extra_rows(EMBED, m) for m in dict.fromkeys(slots)}
        self.parts = [to_parts(row[:n].tolist(), slots, rows, vocab) for row, n in zip(tokens, self.lengths)]

    def expansion(self, policy: str, weights: VersionWeights) -> list[Prompt]:
        return [plan_prompt(p, Expansion(policy), weights.vocabulary) for p in self.parts]

    def accuracy(self, pipeline: LocalPipeline, prompts: Sequence[Prompt]) -> dict[str, float]:
        """Teacher-forced next-token accuracy on each task's answer positions."""
        hits = {t: 0 for t in self.answers}
        total = {t: 0 for t in self.answers}
        for batch in _batches(range(len(prompts)), lambda r: len(prompts[r])):
            for r, logits in zip(batch, prefill(pipeline, [prompts[r] for r in batch])):
                n = self.lengths[r]
                predicted, target = logits[:-1].argmax(-1), self.tokens[r, 1:n]
                for t, mask in self.answers.items():
                    m = mask[r, 1:n]
                    hits[t] += int((predicted[m] == target[m]).sum())
                    total[t] += int(m.sum())
        return {t: hits[t] / max(1, total[t]) for t in self.answers}


def _batches(items: Sequence[int], size: Callable[[int], int]) -> list[list[int]]:
    out, tokens = [[]], 0
    for i in items:
        if out[-1] and tokens + size(i) > STEP_TOKENS:
            out.append([])
            tokens = 0
        out[-1].append(i)
        tokens += size(i)
    return out


def prefill(pipeline: LocalPipeline, prompts: Sequence[Prompt]) -> list[torch.Tensor]:
    """All-position logits of each prompt, the prompts prefilled together in one engine step."""
    slices, ids, embed_route, embeds = [], [], [], []
    for i, p in enumerate(prompts):
        slices.append(RequestSlice(f"q{i}", 0, p.route, p.text, p.vocab_model, reserve=len(p), logits="all"))
        ids.append(p.token_ids)
        embed_route += p.embed_route
        if p.embeds is not None:
            embeds.append(p.embeds)
    batch = StepBatch(tuple(slices), torch.cat(ids), tuple(embed_route), torch.cat(embeds) if embeds else None)
    try:
        return pipeline.forward(batch)
    finally:
        pipeline.release([s.request_id for s in slices])


def pipeline(weights: VersionWeights, device: str) -> LocalPipeline:
    """One stage over every layer, computing in float32 over weights rounded to the checkpoints'
    dtype, as the HF models of the retention table do."""
    return LocalPipeline.build(weights, 1, device=device, dtype=torch.float32, slot_budget_bytes=SLOT_BUDGET)
