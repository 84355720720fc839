"""Tiny real checkpoints, built from configs in code (no hub access), for tests and ``mmer demo``.

A base is a real ``LlamaForCausalLM``; a fine-tuned model is that base plus a seeded random delta
on every LLM weight, saved in one of the formats ``mmer`` ingests:

- ``llava-hf``: a real ``LlavaForConditionalGeneration`` (tiny CLIP tower), ``save_pretrained``.
- ``video-llava-hf``: a real ``VideoLlavaForConditionalGeneration``, ``save_pretrained``.
- ``llava``: the original LLaVA repository's layout, written key by key: Llama keys plus
  ``model.mm_projector.{0,2}.*`` and ``model.vision_tower.vision_tower.vision_model.*``, and a
  Llama config with ``mm_*`` fields. The tiny tower's CLIP config is stored under
  ``mm_vision_tower_config`` (the real ones name a hub model in ``mm_vision_tower`` instead).
- ``generic``: a made-up "audio (or point-cloud) LLM": ``llm.model.*``, ``llm.lm_head.weight``,
  ``<modality>_encoder.*``, ``<modality>_projector.*`` (a :class:`TinyMediaEncoder`), with the
  mapping JSON that describes it saved next to it as ``mmer_mapping.json``.

Every checkpoint carries a tokenizer built in code (word-level, a chat template) whose base
vocabulary fills the model's exactly, with ``<image>``/``<video>``/``<audio>``/``<point>`` among
it, so ``extra_vocab=k`` adds k real tokens at the ids of the k new embedding rows. Image
processor configs are written as JSON (this environment has neither PIL nor torchvision, which
transformers needs to instantiate them).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlavaConfig,
    LlavaForConditionalGeneration, PreTrainedTokenizerFast, VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)

from mmer_dist.errors import InvalidInputError
from mmer_dist.formats.checkpoint import CheckpointReader
from mmer_dist.formats.mapping import FormatMapping
from mmer_dist.formats.writer import SafetensorsWriter

GENERIC_MAPPING_FILE = "mmer_mapping.json"
FORMAT_MODALITIES = {
    "llava-hf": ("image",), "video-llava-hf": ("video", "image"), "llava": ("image",), "generic": ("audio", "point"),
}
MEDIA_TOKENS = {"image": "<image>", "video": "<video>", "audio": "<audio>", "point": "<point>"}
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
WORDS = (
    "the a an is are was be to of and in on at for with what which who how this that it describe "
    "image video audio sound picture frame cat dog car tree house sky red blue green big small one "
    "two three yes no there here left right up down , . ? ! : ' hello world please answer"
).split()
# Renders string content or OpenAI-style content parts; a media part becomes its placeholder token.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ ' ' + part['text'] }}{% else %}{{ ' <' + part['type'] + '>' }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
_IMAGE_SIZE, _PATCH = 8, 4  # 2x2 patches (+ CLS): four image tokens after "default" selection
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def tiny_text_config(vocab_size: int = 256, num_hidden_layers: int = 4) -> LlamaConfig:
    """The tiny Llama: hidden 32, 4 heads / 2 KV heads (exercises GQA), MLP 64, untied head."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=num_hidden_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )


def tiny_vision_config() -> CLIPVisionConfig:
    """A two-layer CLIP vision tower over 8x8 images (hidden 16); LLaVA reads layer -2."""
    return CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        image_size=_IMAGE_SIZE, patch_size=_PATCH, projection_dim=16,
    )


class TinyMediaEncoder(nn.Module):
    """The ``generic`` format's component: features (frames x in_features) -> LLM hidden states.
    ``encoder``: Linear -> GELU -> Linear -> LayerNorm; ``projector``: Linear to the LLM width."""

    def __init__(self, in_features: int = 8, hidden: int = 16, llm_hidden: int = 32) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({
            "proj": nn.Linear(in_features, hidden), "layer": nn.Linear(hidden, hidden), "norm": nn.LayerNorm(hidden),
        })
        self.projector = nn.Linear(hidden, llm_hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.encoder["layer"](nn.functional.gelu(self.encoder["proj"](features)))
        return self.projector(self.encoder["norm"](h))


def build_tokenizer(vocab_size: int = 256, extra_vocab: int = 0) -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose vocabulary is exactly ``vocab_size`` (padded with
    ``<reserved_i>``), plus ``extra_vocab`` added special tokens ``<extra_i>`` after it."""
    fixed = [*SPECIAL_TOKENS, *MEDIA_TOKENS.values(), *ROLE_TOKENS]
    words = fixed + WORDS
    if len(words) > vocab_size:
        raise InvalidInputError(f"tiny tokenizer needs vocab_size >= {len(words)}, got {vocab_size}")
    words += [f"<reserved_{i}>" for i in range(len(words), vocab_size)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(fixed)  # matched whole, before pre-tokenization, keeping their ids
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    if extra_vocab:
        tok.add_tokens([f"<extra_{i}>" for i in range(extra_vocab)], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_base(path: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0,
              max_shard_size: int | None = None, num_hidden_layers: int = 4) -> Path:
    """A tiny ``LlamaForCausalLM`` (transformers' own init, seeded) and its tokenizer.
    ``max_shard_size`` (bytes) writes sharded safetensors with an index."""
    path = Path(path)
    with torch.random.fork_rng():  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_text_config(num_hidden_layers=num_hidden_layers))
    model.to(dtype).save_pretrained(path, **_shard_kwargs(max_shard_size))
    build_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


def save_finetuned(base_path: str | Path, path: str | Path, fmt: str, modality: str | None = None,
                   dtype: torch.dtype = torch.bfloat16, seed: int = 1, delta_scale: float = 0.05,
                   extra_vocab: int = 0, max_shard_size: int | None = None) -> Path:
    """A fine-tuned variant of the base at ``base_path``, saved in format ``fmt``.

    Every LLM tensor gets ``delta_scale * rms(W) * N(0, 1)`` (seeded by ``seed``), so deltas are a
    few bf16 steps, not rounded away. ``extra_vocab=k`` appends k rows to the embedding and LM head
    (and k tokens to the tokenizer). Component weights are seeded by ``seed`` too. ``modality``
    defaults to the format's first (see ``FORMAT_MODALITIES``)."""
    if fmt not in FORMAT_MODALITIES:
        raise InvalidInputError(f"tiny model format {fmt!r} unknown; choose from {sorted(FORMAT_MODALITIES)}")
    modality = modality or FORMAT_MODALITIES[fmt][0]
    if modality not in FORMAT_MODALITIES[fmt]:
        raise InvalidInputError(f"format {fmt!r} takes modality {FORMAT_MODALITIES[fmt]}, got {modality!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    base = CheckpointReader(base_path)
    text_config = LlamaConfig.from_dict(base.config)
    tokenizer = build_tokenizer(text_config.vocab_size, extra_vocab)
    llm = finetuned_llm_weights(base, seed, delta_scale, extra_vocab)
    text_config.vocab_size += extra_vocab
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        _SAVERS[fmt](path, llm, text_config, tokenizer, modality, dtype, max_shard_size)
    return path


def finetuned_llm_weights(base: CheckpointReader, seed: int, delta_scale: float,
                          extra_vocab: int) -> dict[str, torch.Tensor]:
    """Base weights (float32) plus the seeded delta, with ``extra_vocab`` rows appended."""
    generator = torch.Generator().manual_seed(seed)
    llm = {}
    for key in base.keys():  # sorted, so the random stream is assigned deterministically
        w = base.read(key).float()
        rms = w.pow(2).mean().sqrt()
        llm[key] = w + delta_scale * rms * torch.randn(w.shape, generator=generator)
        if extra_vocab and key in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = rms * torch.randn((extra_vocab, w.shape[1]), generator=generator)
            llm[key] = torch.cat([llm[key], rows])
    return llm


def _save_hf_multimodal(path: Path, llm: dict[str, torch.Tensor], text_config: LlamaConfig,
                        tokenizer: PreTrainedTokenizerFast, modality: str, dtype: torch.dtype,
                        max_shard_size: int | None, fmt: str) -> None:
    """Build the real transformers class, put the LLM weights in through the format's own mapping
    (runtime names such as ``model.language_model.*`` are one of its layouts), save_pretrained."""
    ids = {m: tokenizer.convert_tokens_to_ids(t) for m, t in MEDIA_TOKENS.items()}
    common = dict(vision_config=tiny_vision_config(), text_config=text_config, vision_feature_layer=-2,
                  vision_feature_select_strategy="default", image_token_index=ids["image"], image_seq_length=4)
    if fmt == "llava-hf":
        model = LlavaForConditionalGeneration(LlavaConfig(**common))
    else:
        model = VideoLlavaForConditionalGeneration(
            VideoLlavaConfig(**common, video_token_index=ids["video"], video_seq_length=8 * 5))
    mapping = FormatMapping.load(fmt)
    state = model.state_dict()
    split = mapping.split(state.keys(), where=f"tiny {fmt} model")
    if set(split.llm) != set(llm) or split.unknown:
        wrong = sorted(set(split.llm) ^ set(llm))
        raise RuntimeError(f"tiny {fmt}: mapping mismatches LLM keys {wrong}, unknown {split.unknown}")
    model.load_state_dict({**state, **{source: llm[canonical] for canonical, source in split.llm.items()}})
    model.to(dtype).save_pretrained(path, **_shard_kwargs(max_shard_size))
    tokenizer.save_pretrained(path)
    processor = {"processor_class": "LlavaProcessor" if fmt == "llava-hf" else "VideoLlavaProcessor",
                 "patch_size": _PATCH, "vision_feature_select_strategy": "default", "image_token": "<image>",
                 "num_additional_image_tokens": 1}
    if fmt == "video-llava-hf":
        processor["video_token"] = "<video>"
        video = {**_image_processor("VideoLlavaVideoProcessor"), "video_processor_type": "VideoLlavaVideoProcessor"}
        _write_json(path / "video_preprocessor_config.json", {**video, "num_frames": 8})
    _write_json(path / "processor_config.json", processor)
    image_kind = "CLIPImageProcessor" if fmt == "llava-hf" else "VideoLlavaImageProcessor"
    _write_json(path / "preprocessor_config.json", _image_processor(image_kind))


def _save_llava_original(path: Path, llm: dict[str, torch.Tensor], text_config: LlamaConfig,
                         tokenizer: PreTrainedTokenizerFast, modality: str, dtype: torch.dtype,
                         max_shard_size: int | None) -> None:
    vision_config = tiny_vision_config()
    tower = CLIPVisionModel(vision_config)
    hidden, mm_hidden = text_config.hidden_size, vision_config.hidden_size
    projector = nn.Sequential(nn.Linear(mm_hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    tensors = dict(llm)
    tensors.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    # transformers 5 drops CLIPVisionModel's "vision_model." prefix; original LLaVA checkpoints have it.
    tensors.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in tower.state_dict().items()})
    _write_tensors(path, tensors, dtype, max_shard_size)
    config = _llama_fields(text_config, dtype)
    config.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", mm_vision_tower="tiny-clip-vision",
                  mm_vision_tower_config=vision_config.to_dict(), mm_hidden_size=mm_hidden, mm_projector_type="mlp2x_gelu",
                  mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_use_im_start_end=False,
                  mm_use_im_patch_token=False, image_aspect_ratio="pad")
    _write_json(path / "config.json", config)
    _write_json(path / "preprocessor_config.json", _image_processor("CLIPImageProcessor"))
    tokenizer.save_pretrained(path)


def _save_generic(path: Path, llm: dict[str, torch.Tensor], text_config: LlamaConfig,
                  tokenizer: PreTrainedTokenizerFast, modality: str, dtype: torch.dtype,
                  max_shard_size: int | None) -> None:
    encoder = TinyMediaEncoder(llm_hidden=text_config.hidden_size)
    tensors = {f"llm.{k}": v for k, v in llm.items()}
    tensors.update({f"{modality}_{k}": v for k, v in encoder.state_dict().items()})
    _write_tensors(path, tensors, dtype, max_shard_size)
    _write_json(path / "config.json", {
        "architectures": [f"Tiny{modality.title()}LlmForCausalLM"], "model_type": f"tiny_{modality}_llm",
        "text_config": _llama_fields(text_config, dtype), f"{modality}_config": {"in_features": 8, "hidden_size": 16},
        "media_token_index": tokenizer.convert_tokens_to_ids(MEDIA_TOKENS[modality]),
    })
    _write_json(path / GENERIC_MAPPING_FILE, {
        "name": f"tiny-{modality}-llm",
        "description": f"Tiny {modality} LLM from mmer_dist.tiny_models: Llama under llm.*, a TinyMediaEncoder.",
        "llm": [["llm.model.", "model."], ["llm.lm_head.", "lm_head."]],
        "component": [f"{modality}_encoder.", f"{modality}_projector."],
        "ignore": [], "text_config": "text_config",
    })
    tokenizer.save_pretrained(path)


_SAVERS = {
    "llava-hf": partial(_save_hf_multimodal, fmt="llava-hf"),
    "video-llava-hf": partial(_save_hf_multimodal, fmt="video-llava-hf"),
    "llava": _save_llava_original,
    "generic": _save_generic,
}


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype, max_shard_size: int | None) -> None:
    """Through our own streaming writer, as export will (sorted keys, like save_pretrained)."""
    entries = [(k, tuple(tensors[k].shape), dtype) for k in sorted(tensors)]
    limit = {"max_shard_bytes": max_shard_size} if max_shard_size else {}
    with SafetensorsWriter(path, entries, **limit) as writer:
        for key, _, _ in entries:
            writer.write(key, 0, tensors[key].detach().to(dtype).contiguous())


def _llama_fields(text_config: LlamaConfig, dtype: torch.dtype) -> dict[str, object]:
    """The Llama config as the checkpoint's own dict (no class or version stamps)."""
    fields = {k: v for k, v in text_config.to_dict().items() if k not in ("architectures", "transformers_version")}
    fields["dtype"] = str(dtype).removeprefix("torch.")
    return fields


def _shard_kwargs(max_shard_size: int | None) -> dict[str, int]:
    return {"max_shard_size": max_shard_size} if max_shard_size else {}


def _image_processor(kind: str) -> dict[str, object]:
    return {
        "image_processor_type": kind, "do_resize": True, "size": {"shortest_edge": _IMAGE_SIZE},
        "do_center_crop": True, "crop_size": {"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD,
        "do_convert_rgb": True, "resample": 3,
    }


def _write_json(path: Path, doc: dict[str, object]) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
