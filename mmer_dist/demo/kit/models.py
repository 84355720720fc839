"""The kit's model shapes and how each checkpoint is assembled and saved.

Base: a ``LlamaForCausalLM`` (hidden 64, 4 layers, 4 heads over 2 KV heads: GQA; untied LM head,
like Vicuna). Each fine-tune is a ``LlavaForConditionalGeneration`` (``VideoLlavaForConditionalGeneration``
for video) whose language model starts as the base and whose tiny CLIP tower + projector are
new; it is saved with ``save_pretrained`` together with its tokenizer, chat template, processor
and (audio, point clouds) its media adapter, so ``from_pretrained`` + ``AutoProcessor`` load it offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import (
    CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration,
    LlavaProcessor, PreTrainedTokenizerFast, VideoLlavaConfig, VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
)

from mmer_dist.demo.kit import synth
from mmer_dist.demo.kit.tokenizer import BOS_ID, CHAT_TEMPLATE, EOS_ID, MEDIA_TOKENS, PAD_ID, VOCAB_SIZE
from mmer_dist.media.adapters import MediaAdapter, PointProjectionAdapter, SpectrogramAdapter, save_adapter
from mmer_dist.media.processor import PROCESSOR_CONFIG, VIDEO_CONFIG

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class ModelSpec:
    """One fine-tune's encoder: the tower's input size and patch, its placeholder, its adapter."""

    fmt: str  # "llava-hf" or "video-llava-hf"
    image_size: int
    patch_size: int
    placeholder: str  # the media token its processor expands
    adapter: MediaAdapter | None = None

    @property
    def tokens_per_image(self) -> int:  # "default" feature selection drops CLS
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_video(self) -> int:  # video features keep CLS
        return synth.VIDEO_FRAMES * ((self.image_size // self.patch_size) ** 2 + 1)


SPECS: dict[str, ModelSpec] = {
    "digits": ModelSpec("llava-hf", 8, 2, MEDIA_TOKENS["image"]),
    "parity": ModelSpec("llava-hf", 8, 2, MEDIA_TOKENS["image"]),
    "tones": ModelSpec("llava-hf", 16, 4, MEDIA_TOKENS["audio"], SpectrogramAdapter(sample_rate=synth.SAMPLE_RATE)),
    "shapes": ModelSpec("llava-hf", 16, 4, MEDIA_TOKENS["point"], PointProjectionAdapter(resolution=16)),
    "motion": ModelSpec("video-llava-hf", synth.VIDEO_SIZE, 4, MEDIA_TOKENS["video"]),
}


def text_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )


def vision_config(spec: ModelSpec) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=32)


def new_base() -> LlamaForCausalLM:
    return LlamaForCausalLM(text_config())


def new_finetune(spec: ModelSpec, base: LlamaForCausalLM,
                 tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration | VideoLlavaForConditionalGeneration:
    """A fresh tower + projector (seeded by the caller) around a copy of the base's LLM."""
    common = dict(vision_config=vision_config(spec), text_config=base.config, vision_feature_layer=-1,
                  vision_feature_select_strategy="default")
    if spec.fmt == "video-llava-hf":
        config = VideoLlavaConfig(**common, image_token_index=tokenizer.convert_tokens_to_ids(MEDIA_TOKENS["image"]),
                                  video_token_index=tokenizer.convert_tokens_to_ids(spec.placeholder),
                                  image_seq_length=spec.tokens_per_image, video_seq_length=spec.tokens_per_video)
        model = VideoLlavaForConditionalGeneration(config)
    else:
        config = LlavaConfig(**common, image_token_index=tokenizer.convert_tokens_to_ids(spec.placeholder),
                             image_seq_length=spec.tokens_per_image)
        model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(base.model.state_dict())
    model.lm_head.load_state_dict(base.lm_head.state_dict())
    return model


def save_base(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    save_model(model, path)
    tokenizer.save_pretrained(path)


def save_processor(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    """The tokenizer, chat template, processor files and adapter of a fine-tune (written before
    training, so training encodes its data with the processor loaded back from these files)."""
    path.mkdir(parents=True, exist_ok=True)
    size = spec.image_size
    image = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_resize=True,
                 do_center_crop=True, do_rescale=True, do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                 do_convert_rgb=True, resample=3)
    if spec.fmt == "llava-hf":
        LlavaProcessor(image_processor=CLIPImageProcessorPil(**image), tokenizer=tokenizer, patch_size=spec.patch_size,
                       vision_feature_select_strategy="default", image_token=spec.placeholder,
                       num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE).save_pretrained(path)
    else:  # the standard Video-LLaVA-hf files, written as data (see mmer_dist.media.processor)
        tokenizer.save_pretrained(path)
        VideoLlavaImageProcessor(**image).save_pretrained(path)
        _write_json(path / PROCESSOR_CONFIG, {
            "processor_class": "VideoLlavaProcessor", "patch_size": spec.patch_size, "image_token": MEDIA_TOKENS["image"],
            "video_token": spec.placeholder, "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1})
        _write_json(path / VIDEO_CONFIG, {
            "video_processor_type": "VideoLlavaVideoProcessor", **image, "num_frames": synth.VIDEO_FRAMES,
            "do_sample_frames": False})
    if spec.adapter is not None:
        save_adapter(spec.adapter, path)


def save_model(model, path: Path) -> None:
    _generation_defaults(model)
    model.save_pretrained(path)


def _generation_defaults(model) -> None:
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
