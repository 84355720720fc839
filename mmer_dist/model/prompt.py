"""From a request's parts to the engine's per-token routing: modes and text-token policies.

A request is a list of parts in prompt order: ``TextPart`` (token ids from some model's or the
base's tokenizer) and ``MediaPart`` (a model's encoder output, one row per media token). Its
mode says which weights each token runs through (DESIGN.md, "Routed forward"):

- ``Retention(model)``: theta_hat of that model for every token, its embedding and LM head, and
  its own vocabulary (extra rows included) — the reconstructed model, alone.
- ``Expansion(policy)``: each media token through its model's theta_hat; text, template wrapper
  tokens (routed as text, embedded with their model's own rows) and generated tokens through
  the policy's text weights:
    ``mean-mask``        theta_bar = theta_pre + mean_i(m_i) * tau* over all N models (the paper);
    ``request-modality`` when the media of exactly one model are present, that model's theta_hat
                         for every token (single-modality expansion then equals retention on the
                         same tokens exactly); otherwise theta_bar;
    ``present-mean``     theta_pre + mean_{i in S}(m_i) * tau* over the set S of models whose media
                         are in the request (ours): absent models' task vectors no longer dilute
                         the text weights, and it equals theta_hat_k when S = {k} and theta_bar
                         when every model is present;
    ``follow-media``     text after a media part through that part's model's theta_hat (and
                         embedded with its rows, wrapper tokens keeping their own model's), text
                         before the first media part through theta_bar, generated tokens through
                         the last media part's model (ours; best on mixed two-media prompts).
  Expansion answers in the base vocabulary (theta's LM head rows [0, V)), except under
  ``request-modality`` with one model present, which answers as that model.

``plan_prompt`` turns parts + mode into a ``Prompt``: global token ids (``VocabularyLayout``), -1
where encoder rows go, and run-length encoded weight sets for routing and for embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmer_dist.errors import InvalidInputError
from mmer_dist.model.batch import RunLengths, run_lengths
from mmer_dist.store.weights import VocabularyLayout
from mmer_dist.store.weightsets import WeightSet

from mmer_dist.model.policies import DEFAULT_TEXT_POLICY, TEXT_POLICIES  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class TextPart:
    ids: tuple[int, ...]
    tokenizer: str | None = None  # the model whose tokenizer made ``ids`` (None: the base's)
    embed_model: str | None = None  # wrapper tokens of this model's template: its own embedding rows


@dataclass(frozen=True)
class MediaPart:
    model: str
    embeds: torch.Tensor  # (tokens, hidden), from the model's encoder + connector


@dataclass(frozen=True)
class Retention:
    model: str


@dataclass(frozen=True)
class Expansion:
    text_policy: str = DEFAULT_TEXT_POLICY

    def __post_init__(self) -> None:
        check_text_policy(self.text_policy)


Mode = Retention | Expansion


def check_text_policy(policy: str) -> None:
    if policy not in TEXT_POLICIES:
        raise InvalidInputError(f"unknown text_policy {policy!r}; expected one of {', '.join(TEXT_POLICIES)}")


@dataclass(frozen=True)
class Prompt:
    token_ids: torch.Tensor  # (T,) int64 global ids, -1 at media positions
    embeds: torch.Tensor | None  # (media tokens, hidden), in prompt order
    route: RunLengths  # weight set of every prompt token in the decoder layers
    embed_route: RunLengths  # weight set whose embedding rows each id is looked up in
    text: WeightSet  # generated tokens: routing, embedding and the LM head
    vocab_model: str | None  # output vocabulary: the base's plus this model's extra rows

    def __len__(self) -> int:
        return int(self.token_ids.numel())

    @property
    def weight_sets(self) -> set[WeightSet]:
        return {k for k, _ in self.route} | {k for k, _ in self.embed_route} | {self.text}


def text_weights_for(mode: Mode, media_models: Sequence[str], version_models: Sequence[str]) -> WeightSet:
    """The weight set of a request's text and generated tokens (see the module docstring)."""
    if isinstance(mode, Retention):
        return WeightSet.hat(mode.model)
    present = [m for m in version_models if m in set(media_models)]
    if mode.text_policy == "request-modality" and len(present) == 1:
        return WeightSet.hat(present[0])
    if mode.text_policy == "present-mean" and present:
        if len(present) == 1:
            return WeightSet.hat(present[0])
        return WeightSet.bar() if len(present) == len(version_models) else WeightSet.mean(present)
    if mode.text_policy == "follow-media" and media_models:
        return WeightSet.hat(media_models[-1])  # generated tokens follow the last media part
    return WeightSet.bar()


def plan_prompt(parts: Sequence[TextPart | MediaPart], mode: Mode, vocabulary: VocabularyLayout) -> Prompt:
    if not parts:
        raise InvalidInputError("a request needs at least one prompt token")
    models = vocabulary.models
    for p in parts:
        for m in (p.model,) if isinstance(p, MediaPart) else (p.tokenizer, p.embed_model):
            if m is not None and m not in models:
                raise InvalidInputError(f"model {m!r} is not part of the served version (models: {', '.join(models)})")
    if isinstance(mode, Retention):
        if mode.model not in models:
            raise InvalidInputError(f"model {mode.model!r} is not part of the served version "
                                    f"(models: {', '.join(models)})")
        if others := sorted({p.model for p in parts if isinstance(p, MediaPart)} - {mode.model}):
            raise InvalidInputError(f"a request to model {mode.model!r} (retention) carries media of {others}; "
                                    "send it to the merged model for several models' media")
    media_models = [p.model for p in parts if isinstance(p, MediaPart)]
    text = text_weights_for(mode, media_models, models)
    vocab_model = text.models[0] if text.kind == "hat" and (isinstance(mode, Retention)
                                                           or mode.text_policy == "request-modality") else None
    follows = isinstance(mode, Expansion) and mode.text_policy == "follow-media"
    part_text = WeightSet.bar() if follows else text  # follow-media: text before the first media part
    ids, route, embed, embeds = [], [], [], []
    for p in parts:
        if isinstance(p, MediaPart):
            if follows:
                part_text = WeightSet.hat(p.model)  # the text after it follows it
            if p.embeds.dim() != 2 or p.embeds.shape[0] == 0:
                raise InvalidInputError(f"media of model {p.model!r}: expected (tokens, hidden) embeddings, "
                                        f"got shape {tuple(p.embeds.shape)}")
            n = p.embeds.shape[0]
            ids += [-1] * n
            route += [WeightSet.hat(p.model)] * n
            embed += [WeightSet.hat(p.model)] * n
            embeds.append(p.embeds)
            continue
        owner = p.tokenizer
        if isinstance(mode, Retention) and owner not in (None, mode.model):
            raise InvalidInputError(f"text of a request to model {mode.model!r} is tokenized for {owner!r}")
        ids += vocabulary.to_global(owner, torch.tensor(p.ids, dtype=torch.int64)).tolist()
        route += [part_text] * len(p.ids)
        if isinstance(mode, Expansion) and p.embed_model is not None and part_text != WeightSet.hat(p.embed_model):
            embed += [WeightSet.hat(p.embed_model)] * len(p.ids)
        else:
            embed += [part_text] * len(p.ids)
    if not ids:
        raise InvalidInputError("a request needs at least one prompt token")
    return Prompt(torch.tensor(ids, dtype=torch.int64), torch.cat(embeds) if embeds else None,
                  run_lengths(route), run_lengths(embed), text, vocab_model)
