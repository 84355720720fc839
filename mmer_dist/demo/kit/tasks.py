"""The kit's tasks: seeded train / held-out splits of raw samples, the question, the answer word.

Every task asks one question in the same chat style and is answered with one word of the shared
vocabulary (:mod:`mmer_dist.demo.kit.tokenizer`). The prompt is an OpenAI-style chat message
whose content parts are exactly what the endpoint receives, so a model trains on the prompts that
serving builds with ``tokenizer.apply_chat_template``:

    [{"role": "user", "content": [{"type": "image_url", ...}, {"type": "text", "text": "what digit is this ?"}]}]
    -> "<s><|user|> <image> what digit is this ? </s> <|assistant|>"   (answer: "seven </s>")

Tasks: ``digits`` (scikit-learn's 8x8 handwritten digits, zero..nine), ``tones`` (chirps and
steady tones: rising / falling / high / low), ``shapes`` (point clouds: cube / sphere / cylinder /
cone), ``motion`` (8-frame videos of a dot moving left / right / up / down), ``parity`` (the
digits again: even / odd, the task added later), and ``facts``: the base's text-only pre-training
task (number order, parity and opposites of the answer words, shapes of things).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, Callable

import numpy as np

from mmer_dist.demo.kit import synth
from mmer_dist.demo.kit.tokenizer import NUMBERS, check_words
from mmer_dist.errors import InvalidInputError
from mmer_dist.media.parts import media_part


@dataclass(frozen=True)
class Sample:
    raw: Any  # what the content part carries, decoded: image, Waveform, frames, points; None for text
    answer: str
    text: str | None = None  # the question, where it varies per sample (text tasks)


@dataclass(frozen=True)
class Split:
    train: list[Sample]
    test: list[Sample]

    def get(self, name: str) -> list[Sample]:
        if name not in ("train", "test"):
            raise InvalidInputError(f"split {name!r} unknown; choose 'train' or 'test'")
        return self.train if name == "train" else self.test


@dataclass(frozen=True)
class Task:
    name: str
    modality: str  # the store's modality of the model trained on it
    part_type: str | None  # content part of its media; None: text only
    question: str
    answers: tuple[str, ...]
    make_split: Callable[[int, int, int], Split]  # (seed, n_train, n_test)

    @property
    def chance(self) -> float:
        return 1.0 / len(self.answers)

    def split(self, seed: int, n_train: int, n_test: int) -> Split:
        return self.make_split(seed, n_train, n_test)

    def messages(self, sample: Sample | None = None, *, with_media: bool = False,
                 with_answer: bool = False) -> list[dict[str, Any]]:
        """The chat for one sample. The media part carries its payload only ``with_media`` (what a
        client sends); the chat template needs just its type. ``with_answer`` adds the reply."""
        text = sample.text if sample is not None and sample.text is not None else self.question
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if self.part_type is not None:
            part = media_part(self.part_type, sample.raw) if with_media else {"type": self.part_type}
            content.insert(0, part)
        chat = [{"role": "user", "content": content}]
        if with_answer:
            chat.append({"role": "assistant", "content": sample.answer})
        return chat


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, *name.encode()])


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16) as RGB uint8 and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    grey = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=3), data.target.astype(np.int64)


def _digit_split(label_words: Callable[[int], str]) -> Callable[[int, int, int], Split]:
    """Train / test from one seeded permutation of the digits, the same for every digit task."""

    def make(seed: int, n_train: int, n_test: int) -> Split:
        images, labels = _digits()
        order = _rng(seed, "digits").permutation(len(labels))
        if n_train + n_test > len(order):
            raise InvalidInputError(f"digits: {n_train} + {n_test} samples asked, {len(order)} exist")
        def pick(idx: np.ndarray) -> list[Sample]:
            return [Sample(images[i], label_words(int(labels[i]))) for i in idx]

        return Split(pick(order[n_test:n_test + n_train]), pick(order[:n_test]))

    return make


def _synthetic_split(name: str, classes: tuple[str, ...], draw: Callable) -> Callable[[int, int, int], Split]:
    """Balanced classes in a seeded order; test samples come from their own stream, so the test
    set does not change with ``n_train``."""

    def samples(rng: np.random.Generator, n: int) -> list[Sample]:
        kinds = rng.permutation(np.resize(np.arange(len(classes)), n))
        return [Sample(draw(rng, classes[k]), classes[k]) for k in kinds]

    def make(seed: int, n_train: int, n_test: int) -> Split:
        return Split(samples(_rng(seed, f"{name}/train"), n_train), samples(_rng(seed, f"{name}/test"), n_test))

    return make


def _facts() -> list[Sample]:
    facts = [(f"what number comes after {a} ?", b) for a, b in zip(NUMBERS, NUMBERS[1:])]
    facts += [(f"what number comes before {b} ?", a) for a, b in zip(NUMBERS, NUMBERS[1:])]
    facts += [(f"is {n} even or odd ?", "odd" if i % 2 else "even") for i, n in enumerate(NUMBERS)]
    pairs = (("left", "right"), ("up", "down"), ("rising", "falling"), ("high", "low"), ("even", "odd"))
    facts += [(f"what is the opposite of {a} ?", b) for x, y in pairs for a, b in ((x, y), (y, x))]
    things = (("ball", "sphere"), ("box", "cube"), ("can", "cylinder"), ("funnel", "cone"))
    facts += [(f"what shape is a {thing} ?", word) for thing, word in things]
    return [Sample(None, answer, text) for text, answer in facts]


def _facts_split(seed: int, n_train: int, n_test: int) -> Split:
    """All facts in both splits: the base memorises them (a prompt-style task, not generalisation)."""
    facts = _facts()
    return Split(facts, facts)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("digits", "image", "image_url", "what digit is this ?", NUMBERS, _digit_split(lambda d: NUMBERS[d])),
    Task("tones", "audio", "input_audio", "what is the pitch of this tone ?", synth.TONES,
         _synthetic_split("tones", synth.TONES, synth.tone)),
    Task("shapes", "point", "point_cloud", "what shape is this point cloud ?", synth.SHAPES,
         _synthetic_split("shapes", synth.SHAPES, synth.shape)),
    Task("motion", "video", "video_url", "which way does the dot move ?", synth.MOTIONS,
         _synthetic_split("motion", synth.MOTIONS, synth.motion)),
    Task("parity", "image", "image_url", "is this digit even or odd ?", ("even", "odd"),
         _digit_split(lambda d: "odd" if d % 2 else "even")),
    Task("facts", "text", None, "", tuple(sorted({s.answer for s in _facts()})), _facts_split),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise InvalidInputError(f"kit task {name!r} unknown; choose from {sorted(TASKS)}")
    return TASKS[name]


for _task in TASKS.values():
    check_words(" ".join([_task.question, *_task.answers]))
for _fact in _facts():
    check_words(_fact.text)
