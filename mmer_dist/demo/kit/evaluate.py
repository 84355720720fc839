"""The plain-transformers reference evaluator: held-out accuracy of a checkpoint on a kit task.

``evaluate(checkpoint_dir, task)`` loads the checkpoint with ``from_pretrained``, its own processor
(:func:`mmer_dist.media.processor.load_processor`) and adapter (``mmer_adapter.json``), builds each
prompt with the chat template, generates greedily and scores an exact match of the reply with the
answer word. It works the same on a kit checkpoint and on one written by ``mmer export`` (same
format, same files). ``llm=`` swaps in the LLM weights of another Llama checkpoint (the base,
a merged θ*, ...) around the checkpoint's own encoder, which is how a merged LLM is scored on
each modality.
"""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration, VideoLlavaForConditionalGeneration

from mmer_dist.demo.kit.encoding import encode, render
from mmer_dist.demo.kit.tasks import Sample, Split, Task, get_task
from mmer_dist.errors import FormatError, InvalidInputError
from mmer_dist.formats.mapping import FormatMapping
from mmer_dist.media.adapters import load_adapter
from mmer_dist.media.processor import load_processor

KIT_META = "mmer_kit.json"  # saved in each kit checkpoint: its task and how its data was split
MODEL_CLASSES = {"llama": LlamaForCausalLM, "llava": LlavaForConditionalGeneration,
                 "video_llava": VideoLlavaForConditionalGeneration}
FORMATS = {"llama": "llama", "llava": "llava-hf", "video_llava": "video-llava-hf"}


def evaluate(checkpoint_dir: str | Path, task: str | Task | None = None, split: str = "test", n: int | None = None,
             *, llm: str | Path | None = None, batch_size: int = 128, device: str = "cpu") -> float:
    """Accuracy (0..1) of greedy generation on the first ``n`` samples (all if None) of ``split``.
    ``task`` defaults to the one recorded in the checkpoint's ``mmer_kit.json``. The default device
    is the CPU, so the reference number is the same on every machine (the models are tiny)."""
    samples, task = _samples(checkpoint_dir, task, split, n)
    answers = predict(checkpoint_dir, task, samples, llm=llm, batch_size=batch_size, device=device)
    return sum(a == s.answer for a, s in zip(answers, samples)) / len(samples)


def predict(checkpoint_dir: str | Path, task: str | Task, samples: list[Sample], *, llm: str | Path | None = None,
            batch_size: int = 128, device: str = "cpu") -> list[str]:
    """The checkpoint's greedy reply (special tokens removed, stripped) to each sample's prompt."""
    task = get_task(task) if isinstance(task, str) else task
    model, processor, adapter = load_checkpoint(checkpoint_dir, llm=llm)
    model.to(device)
    replies: dict[int, str] = {}
    tokenizer = getattr(processor, "tokenizer", processor)
    by_length = defaultdict(list)  # prompts of the same token count batch without padding
    for i, s in enumerate(samples):
        by_length[len(tokenizer(render(processor, task, s, with_answer=False))["input_ids"])].append(i)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            idx = group[start:start + batch_size]
            batch = encode(processor, task, [samples[i] for i in idx], adapter, with_answer=False)
            with torch.no_grad():
                out = model.generate(**{k: v.to(device) for k, v in batch.items()}, max_new_tokens=3, do_sample=False)
            for i, row in zip(idx, out[:, batch["input_ids"].shape[1]:].cpu()):
                replies[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return [replies[i] for i in range(len(samples))]


def load_checkpoint(checkpoint_dir: str | Path, *, llm: str | Path | None = None) -> tuple[Any, Any, Any]:
    """(model in eval mode, its processor or tokenizer, its adapter or None)."""
    checkpoint_dir = Path(checkpoint_dir)
    model_type = _json(checkpoint_dir / "config.json").get("model_type")
    if model_type not in MODEL_CLASSES:
        raise FormatError(f"{checkpoint_dir}: model_type {model_type!r}; the evaluator reads {sorted(MODEL_CLASSES)}")
    with quiet_transformers():
        model = MODEL_CLASSES[model_type].from_pretrained(checkpoint_dir, dtype=torch.float32).eval()
    if llm is not None:
        _swap_llm(model, FORMATS[model_type], Path(llm))
    if model_type == "llama":
        processor = AutoTokenizer.from_pretrained(checkpoint_dir, local_files_only=True)
    else:
        processor = load_processor(checkpoint_dir)
    return model, processor, load_adapter(checkpoint_dir)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars (weights loading, shards writing) inside; as before after."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _swap_llm(model: torch.nn.Module, fmt: str, llm_dir: Path) -> None:
    """Load a Llama checkpoint's weights into the model's language model and LM head."""
    tensors = {}
    for f in sorted(llm_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    if not tensors:
        raise FormatError(f"{llm_dir}: no safetensors files (expected a Llama checkpoint for llm=)")
    source_of = FormatMapping.load(fmt).split(model.state_dict().keys()).llm  # canonical -> key in the model
    canonical = FormatMapping.load("llama").split(tensors.keys()).llm  # canonical -> key in the file
    if set(canonical) != set(source_of):
        raise FormatError(f"{llm_dir}: its LLM tensors {sorted(set(canonical) ^ set(source_of))[:4]} do not "
                          f"match the model's")
    state = {source_of[k]: tensors[canonical[k]].float() for k in source_of}
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ: another architecture or vocabulary
        raise FormatError(f"{llm_dir}: its LLM does not fit the model ({e})") from None


def _samples(checkpoint_dir: str | Path, task: str | Task | None, split: str, n: int | None) -> tuple[list[Sample], Task]:
    """The kit split recorded in the checkpoint's ``mmer_kit.json`` (seed and sizes of every task)."""
    meta_path = Path(checkpoint_dir) / KIT_META
    if not meta_path.is_file():
        raise InvalidInputError(f"{checkpoint_dir}: no {KIT_META}, so not a kit checkpoint; call predict() with samples")
    meta = _json(meta_path)
    task = get_task(task if task is not None else meta["task"]) if not isinstance(task, Task) else task
    if task.name not in meta["splits"]:
        raise InvalidInputError(f"{meta_path}: no split recorded for task {task.name!r}")
    sizes = meta["splits"][task.name]
    samples = cached_split(task.name, meta["seed"], sizes["n_train"], sizes["n_test"]).get(split)
    if n is not None:
        if n < 1:
            raise InvalidInputError(f"n must be >= 1, got {n}")
        samples = samples[:n]
    return samples, task


@lru_cache(maxsize=16)
def cached_split(task: str, seed: int, n_train: int, n_test: int) -> Split:
    return get_task(task).split(seed, n_train, n_test)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
