"""Kit models read back from a store: each model's own encoder + connector around any LLM weights.

The quality benchmark and the kit's calibration hook score a kit model with LLM weights that
exist only in memory (theta_hat_i, theta*, theta_pre, theta_i read from a store version), never
through exports on disk:

- ``llm_states(weights, keys)``: model id -> its LLM state under a weight set, every tensor
  composed in float32 by ``store.weights.compose`` (the one reconstruction path of exports and
  the serving engine), cast to the dtype ``mmer export`` writes it in, plus the model's own extra
  vocabulary rows; ``original_states`` gives the ingested theta_i;
- ``KitRunner``: a model's checkpoint class built from its component in the store (config,
  processor, adapter, ``component.safetensors``), whose LLM is swapped for a given state
  (``set_llm``, every LLM tensor replaced: a missing or extra one is an error), and its greedy
  replies to kit samples, the way ``mmer_dist.demo.kit.evaluate`` scores a checkpoint.

A kit model rebuilt with ``original_states`` gives exactly the kit's recorded accuracy (the bench
checks it): same weights, same processor, same prompts, same generation.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, GenerationConfig

from mmer_dist.demo.kit.encoding import encode, render
from mmer_dist.demo.kit.evaluate import MODEL_CLASSES, quiet_transformers
from mmer_dist.demo.kit.tasks import Sample, Task
from mmer_dist.errors import FormatError
from mmer_dist.formats.mapping import FormatMapping
from mmer_dist.media.adapters import load_adapter
from mmer_dist.media.processor import load_processor
from mmer_dist.store import layout
from mmer_dist.store.weights import StoreWeights, VersionWeights, compose
from mmer_dist.store.weightsets import WeightSet

State = dict[str, torch.Tensor]  # canonical (base) LLM tensor name -> tensor in its own shape
MAX_NEW_TOKENS = 3  # the kit evaluator's: an answer word and EOS


@dataclass(frozen=True)
class GreedyAnswer:
    """A greedy reply and what chose it: ``tokens`` generated before a stop token (``stopped``: one
    ended the reply), ``logprobs[j]`` the log-softmax over the vocabulary at step j, for every
    step taken (the stop token's included), and the stop token ids."""

    text: str
    tokens: tuple[int, ...]
    stopped: bool
    logprobs: torch.Tensor  # (steps, vocab), float32
    stop_ids: frozenset[int]


def version_arrays(weights: VersionWeights) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every tensor's (theta_pre, tau*, packed masks) of a version, to compose many states from."""
    return {name: (weights.base(name), weights.tau_star(name), weights.packed_masks(name)) for name in weights.tensors}


def llm_states(weights: VersionWeights, keys: Mapping[str, WeightSet],
               arrays: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None) -> dict[str, State]:
    """Model id -> the version's weight set ``keys[id]`` as that model's LLM state. Each tensor's
    theta_pre, tau* and packed masks are read once for all the models (or taken from ``arrays``,
    ``version_arrays`` of the same version). theta_hat_i is cast to the model's checkpoint dtype
    (``export model``), other sets to the base's (``export merged``)."""
    states: dict[str, State] = {m: {} for m in keys}
    for name, record in weights.tensors.items():
        base, tau, packed = arrays[name] if arrays is not None else \
            (weights.base(name), weights.tau_star(name), weights.packed_masks(name))
        for m, key in keys.items():
            dtype = layout.torch_dtype(weights.catalog.model(m).dtype) if key.kind == "hat" else weights.dtype
            value = compose(key, base, tau, packed, record.cols, weights.model_index, weights.record.alpha)
            states[m][name] = _with_extra(weights, name, m, weights.as_shape(name, value.to(dtype)))
    return states


def original_states(weights: StoreWeights, model_ids: Sequence[str]) -> dict[str, State]:
    """Model id -> its LLM as ingested (theta_i, bit for bit), extra rows included."""
    return {m: {name: _with_extra(weights, name, m, weights.as_shape(name, weights.original(name, m)))
                for name in weights.tensors} for m in model_ids}


def base_states(weights: StoreWeights, model_ids: Sequence[str]) -> dict[str, State]:
    """Model id -> theta_pre with that model's own extra rows (the floor: the base LLM around its encoder)."""
    base = {name: weights.as_shape(name, weights.base(name)) for name in weights.tensors}
    return {m: {name: _with_extra(weights, name, m, t) for name, t in base.items()} for m in model_ids}


def _with_extra(weights: StoreWeights, name: str, model_id: str, value: torch.Tensor) -> torch.Tensor:
    extra = weights.extra_rows(name, model_id)
    return value if extra is None else torch.cat([value, extra.to(value.dtype)])


class KitRunner:
    """One kit model rebuilt from its component in the store, its LLM swappable (see the module
    docstring). Computes in float32 on the CPU, like the kit's reference evaluator."""

    def __init__(self, weights: StoreWeights, model_id: str, workdir: str | Path | None = None):
        record = weights.catalog.model(model_id)
        self.model_id = model_id
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="mmer-kit-")
        folder = Path(workdir if workdir is not None else self._tmp.name) / f"{model_id}-{record.sha256[:12]}"
        weights.fetch_files(model_id, folder)
        config = AutoConfig.from_pretrained(folder)
        if config.model_type not in MODEL_CLASSES or config.model_type == "llama":
            raise FormatError(f"model {model_id!r}: model_type {config.model_type!r} is not a kit multimodal model")
        with quiet_transformers():
            self.model = MODEL_CLASSES[config.model_type](config).eval()
        self.model.generation_config = GenerationConfig.from_pretrained(folder)
        component = load_file(folder / layout.COMPONENT_WEIGHTS)
        split = FormatMapping.load(record.format).split(self.model.state_dict().keys())
        self._llm_keys = split.llm  # canonical name -> key in the model
        self._load({_in_model_naming(k, self.model.state_dict()): v.float() for k, v in component.items()},
                   expect=set(self.model.state_dict()) - set(split.llm.values()), what="component")
        self.processor = load_processor(folder)
        self.adapter = load_adapter(folder)

    def set_llm(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace every LLM tensor of the model by ``state`` (canonical names), as float32."""
        if set(state) != set(self._llm_keys):
            diff = sorted(set(state) ^ set(self._llm_keys))[:4]
            raise FormatError(f"model {self.model_id!r}: the LLM state's tensors differ from the model's ({diff})")
        self._load({self._llm_keys[k]: v.float() for k, v in state.items()}, expect=set(self._llm_keys.values()),
                   what="LLM")

    def _load(self, state: dict[str, torch.Tensor], expect: set[str], what: str) -> None:
        if set(state) != expect:
            diff = sorted(set(state) ^ expect)[:4]
            raise FormatError(f"model {self.model_id!r}: its {what} tensors do not match the model's ({diff})")
        try:
            self.model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a shape differs
            raise FormatError(f"model {self.model_id!r}: its {what} does not fit the model ({e})") from None

    def replies(self, task: Task, samples: Sequence[Sample], batch_size: int = 128) -> list[str]:
        """Greedy replies (special tokens removed, stripped), as ``mmer_dist.demo.kit.evaluate.predict``."""
        return [a.text for a in self.answers(task, samples, batch_size)]

    @torch.inference_mode()
    def answers(self, task: Task, samples: Sequence[Sample], batch_size: int = 128) -> list[GreedyAnswer]:
        """Greedy answers with the log-probabilities of every step, prompts of one length batched
        together (no padding), as ``mmer_dist.demo.kit.evaluate.predict`` does."""
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        eos = self.model.generation_config.eos_token_id
        stops = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, s in enumerate(samples):
            by_length[len(tokenizer(render(self.processor, task, s, with_answer=False))["input_ids"])].append(i)
        out: dict[int, GreedyAnswer] = {}
        for group in by_length.values():
            for start in range(0, len(group), batch_size):
                idx = group[start:start + batch_size]
                batch = encode(self.processor, task, [samples[i] for i in idx], self.adapter, with_answer=False)
                generated = self.model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                                output_logits=True, return_dict_in_generate=True)
                steps = torch.stack(generated.logits, dim=1).float().log_softmax(-1)  # (batch, steps, vocab)
                for b, (i, row) in enumerate(zip(idx, generated.sequences[:, batch["input_ids"].shape[1]:])):
                    ids = row.tolist()
                    end = next((j for j, t in enumerate(ids) if t in stops), len(ids))
                    out[i] = GreedyAnswer(tokenizer.decode(row, skip_special_tokens=True).strip(), tuple(ids[:end]),
                                          end < len(ids), steps[b, :end + (end < len(ids))].clone(), stops)
        return [out[i] for i in range(len(samples))]

    def accuracy(self, task: Task, samples: Sequence[Sample]) -> float:
        return hits(self.replies(task, samples), samples) / max(1, len(samples))


def hits(replies: Sequence[str], samples: Sequence[Sample]) -> int:
    return sum(r == s.answer for r, s in zip(replies, samples))


def _in_model_naming(key: str, model_keys: Mapping[str, object]) -> str:
    """A component key as the model names it: checkpoints saved in the legacy LLaVA layout say
    ``vision_tower.*`` / ``multi_modal_projector.*`` where the model says ``model.vision_tower.*``."""
    if key in model_keys:
        return key
    if f"model.{key}" in model_keys:
        return f"model.{key}"
    raise FormatError(f"component tensor {key!r} is not a tensor of the model")
