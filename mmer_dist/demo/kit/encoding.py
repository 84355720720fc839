"""Samples -> model inputs, the way serving builds them: chat template, adapter, the model's processor.

Training and the evaluator both call :func:`encode`, so the tokens and pixels a model trains on
are the ones it is evaluated (and served) on: ``processor.apply_chat_template(messages)`` renders
the prompt (BOS from the template), the adapter (if any) turns the raw media into an image, and the
processor expands the placeholder and preprocesses the pixels.
"""

from __future__ import annotations

from typing import Any

import torch

from mmer_dist.demo.kit.tasks import Sample, Task
from mmer_dist.media.adapters import MediaAdapter

IGNORE = -100  # label of a position that carries no loss


def media_kwargs(task: Task, samples: list[Sample], adapter: MediaAdapter | None) -> dict[str, Any]:
    """The processor's media arguments for these samples (``images=`` or ``videos=``)."""
    if task.part_type is None:
        return {}
    raws = [s.raw for s in samples]
    if task.part_type == "video_url":
        return {"videos": raws}
    return {"images": [adapter(r) for r in raws] if adapter is not None else raws}


def render(processor: Any, task: Task, sample: Sample, with_answer: bool) -> str:
    return processor.apply_chat_template(task.messages(sample, with_answer=with_answer), tokenize=False,
                                         add_generation_prompt=not with_answer)


def encode(processor: Any, task: Task, samples: list[Sample], adapter: MediaAdapter | None,
           with_answer: bool) -> dict[str, torch.Tensor]:
    """Batch of model inputs (right-padded). ``with_answer``: the whole chat, with ``labels`` that
    score only the reply (the answer word and EOS); else the generation prompt."""
    media = media_kwargs(task, samples, adapter)
    prompts = [render(processor, task, s, with_answer=False) for s in samples]
    batch = dict(processor(text=prompts, **media, padding=True, return_tensors="pt"))
    if not with_answer:
        return batch
    full = [render(processor, task, s, with_answer=True) for s in samples]
    chat = dict(processor(text=full, **media, padding=True, return_tensors="pt"))
    prompt_lengths = batch["attention_mask"].sum(dim=1)
    labels = chat["input_ids"].clone()
    for i, n in enumerate(prompt_lengths.tolist()):
        if not torch.equal(chat["input_ids"][i, :n], batch["input_ids"][i, :n]):
            raise RuntimeError(f"{task.name}: the generation prompt is not a prefix of the chat with its answer")
        labels[i, :n] = IGNORE
    labels[chat["attention_mask"] == 0] = IGNORE
    chat["labels"] = labels
    return chat
