"""A checkpoint's own HF processor, loaded offline: ``load_processor(dir)``; what it takes:
``processor_inputs(dir)``.

LLaVA checkpoints load with ``AutoProcessor`` (``LlavaProcessor`` over the PIL
``CLIPImageProcessor``, which transformers picks when torchvision is absent). Video-LLaVA's
``VideoLlavaProcessor`` cannot be built without torchvision in transformers 5 (its
``VideoLlavaVideoProcessor`` is torchvision-only, and ``VideoLlavaImageProcessor`` no longer takes
videos), so Video-LLaVA checkpoints get :class:`VideoLlavaFrameProcessor`: the same prompt expansion
and output keys as ``VideoLlavaProcessor``, each frame through the checkpoint's own PIL
``VideoLlavaImageProcessor``. It is used on every machine, torchvision or not, so training,
evaluation and serving see the same pixels. The checkpoint still carries the standard
Video-LLaVA-hf processor files, so ``AutoProcessor`` loads it where torchvision is installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, BatchFeature

from mmer_dist.errors import FormatError, InvalidInputError

VIDEO_CONFIG = "video_preprocessor_config.json"
IMAGE_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"


def processor_inputs(directory: str | Path) -> dict[str, str]:
    """The media part types a checkpoint's own processor takes as they are (no adapter), each
    with the placeholder token it expands: ``image_url`` where it has an image processor,
    ``video_url`` where it has a video one (Video-LLaVA)."""
    from mmer_dist.media.parts import PART_TYPES

    directory = Path(directory)
    fields: dict[str, Any] = {}
    for name in (IMAGE_CONFIG, PROCESSOR_CONFIG):  # the processor's own fields win
        if (directory / name).is_file():
            fields.update(_read_json(directory / name))
    takes = {}  # transformers 5 writes the image processor into processor_config.json, older ones beside it
    if (directory / IMAGE_CONFIG).is_file() or "image_processor" in fields or "image_token" in fields:
        takes["image_url"] = fields.get("image_token") or PART_TYPES["image_url"].placeholder
    if (directory / VIDEO_CONFIG).is_file() or "video_processor" in fields or "video_token" in fields:
        takes["video_url"] = fields.get("video_token") or PART_TYPES["video_url"].placeholder
    return takes


def load_processor(directory: str | Path) -> Any:
    """The processor saved with a LLaVA-hf or Video-LLaVA-hf checkpoint (no network)."""
    directory = Path(directory)
    model_type = _read_json(directory / "config.json").get("model_type")
    if model_type == "video_llava":
        return VideoLlavaFrameProcessor.from_pretrained(directory)
    try:
        return AutoProcessor.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(f"{directory}: its processor does not load ({e})") from None


class VideoLlavaFrameProcessor:
    """``VideoLlavaProcessor`` without torchvision: ``processor(text, images=, videos=)`` ->
    ``input_ids``, ``attention_mask``, ``pixel_values`` (images), ``pixel_values_videos``
    (B, T, 3, H, W). In the text, each ``<image>`` becomes (H/p)(W/p) copies (CLS dropped by the
    ``default`` feature selection) and each ``<video>`` T((H/p)(W/p) + 1) copies (video features
    keep CLS), exactly as ``VideoLlavaProcessor`` counts them."""

    def __init__(self, image_processor: Any, tokenizer: Any, *, patch_size: int, num_frames: int,
                 image_token: str = "<image>", video_token: str = "<video>",
                 vision_feature_select_strategy: str = "default", num_additional_image_tokens: int = 1) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.patch_size = patch_size
        self.num_frames = num_frames
        self.image_token, self.video_token = image_token, video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.num_additional_image_tokens = num_additional_image_tokens
        self.chat_template = tokenizer.chat_template

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VideoLlavaFrameProcessor:
        directory = Path(directory)
        fields = _read_json(directory / PROCESSOR_CONFIG)
        video = _read_json(directory / VIDEO_CONFIG)
        try:
            image_processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as e:
            raise FormatError(f"{directory}: image processor or tokenizer does not load ({e})") from None
        return cls(image_processor, tokenizer, patch_size=fields["patch_size"], num_frames=video["num_frames"],
                   image_token=fields.get("image_token", "<image>"), video_token=fields.get("video_token", "<video>"),
                   vision_feature_select_strategy=fields.get("vision_feature_select_strategy", "default"),
                   num_additional_image_tokens=fields.get("num_additional_image_tokens", 1))

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def _pixels(self, images: list[np.ndarray]) -> np.ndarray:
        out = self.image_processor(images=images, return_tensors="np", return_legacy_image_output=False)
        return out["pixel_values"]

    def _tokens_per_frame(self, pixels: np.ndarray) -> int:
        height, width = pixels.shape[-2:]
        return (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens

    def __call__(self, text: str | list[str], images: Any = None, videos: Any = None,
                 return_tensors: str = "pt", **text_kwargs: Any) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        data: dict[str, Any] = {}
        if images is not None:
            images = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
            pixels = self._pixels(images)
            count = self._tokens_per_frame(pixels) - (self.vision_feature_select_strategy == "default")
            texts = _expand(texts, self.image_token, count, len(images))
            data["pixel_values"] = pixels
        if videos is not None:
            videos = [videos] if isinstance(videos, np.ndarray) and videos.ndim == 4 else list(videos)
            clips = np.stack([self._pixels(list(np.asarray(v))) for v in videos])  # (B, T, 3, H, W)
            count = self._tokens_per_frame(clips) * clips.shape[1]
            texts = _expand(texts, self.video_token, count, len(videos))
            data["pixel_values_videos"] = clips
        encoded = self.tokenizer(texts, return_tensors=None, **text_kwargs)
        return BatchFeature({**encoded, **data}, tensor_type=return_tensors)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)


def _expand(texts: list[str], token: str, count: int, n_media: int) -> list[str]:
    found = sum(t.count(token) for t in texts)
    if found != n_media:
        raise InvalidInputError(f"the prompts have {found} {token} placeholders for {n_media} inputs")
    return [t.replace(token, token * count) for t in texts]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
