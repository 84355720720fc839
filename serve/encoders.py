"""Modality components: raw media -> embeddings in the LLM's hidden size, each model's own way.

A ``ComponentEncoder`` is one model's encoder + connector, loaded from its component in the store
(``VersionWeights.fetch_files``) with transformers' own classes, and its own processor:

    raw bytes --decode (mmer_dist.media: limits enforced)--> array
              --adapter (mmer_adapter.json: audio -> spectrogram image, points -> projections)-->
              --the model's HF processor--> pixel values --vision tower + projector--> (tokens, hidden)

``ENCODERS`` maps a checkpoint format to its class; a model of another format is refused with a
message naming it. Adding one (an audio tower that is not a vision tower, say) is a subclass with
``load`` and ``embed``; the ``MediaEncoders`` deployment needs no change.

``MediaEncoders`` hosts any model's component, loaded the first time a request needs it and kept
(LRU), so models added to a live endpoint are served with no redeploy. A replica imports what
encoding needs when it starts (transformers imports its classes lazily, and two threads importing
one at once can fail); concurrent first requests for one model build its component once, from
files that are never seen half-written (``serve.component_files``). A request the encoders refuse
is answered with its ``ApiError`` (a 400), not raised: Serve would log a traceback for each.
"""

from __future__ import annotations

import asyncio
import copy
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from mmer_dist.errors import InvalidInputError
from mmer_dist.media.parts import PART_TYPES, MediaLimits
from serve.component_files import component_folder
from serve.errors import ApiError


class ComponentEncoder:
    part_types: tuple[str, ...] = ()
    transformers_class: str = ""  # the checkpoint's model class in transformers

    @classmethod
    def model_class(cls):
        import transformers

        return getattr(transformers, cls.transformers_class)

    def __init__(self, model_id: str, directory: Path):
        self.model_id, self.directory = model_id, directory

    def decode(self, part_type: str, payload: bytes, limits: MediaLimits):
        """A payload -> the image its tower reads: decoded by the part type's decoder, through the
        model's adapter where the part type needs one (an image goes to the processor as it is)."""
        from mmer_dist.media import adapters

        spec = PART_TYPES[part_type]
        if spec.adapter is None:
            return spec.decode(payload, limits)
        adapter = adapters.load_adapter(self.directory)
        if adapter is None or adapter.part_type != part_type:
            raise InvalidInputError(f"model {self.model_id!r} reads images; it has no adapter for {part_type}")
        return adapter(spec.decode(payload, limits))

    def encode(self, part_type: str, payload: bytes, limits: MediaLimits) -> torch.Tensor:
        raise NotImplementedError


def _tower_model(model_class, directory: Path):
    """The checkpoint's class with only its encoders and connector loaded: the text model is shrunk
    to nothing (its weights live in the store, merged), so a 7B LLaVA does not allocate its LLM."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    config = copy.deepcopy(config)
    config.text_config.num_hidden_layers = 0
    config.text_config.vocab_size = 1
    config.text_config.pad_token_id = None
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the shrunk text model's weights are missing on purpose
    try:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "model.safetensors").symlink_to((directory / "component.safetensors").resolve())
            config.save_pretrained(tmp)
            model = model_class.from_pretrained(tmp, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()


class LlavaEncoder(ComponentEncoder):
    """``LlavaForConditionalGeneration``: CLIP tower, feature layer / selection, projector."""

    part_types = ("image_url", "input_audio", "point_cloud")
    transformers_class = "LlavaForConditionalGeneration"

    def __init__(self, model_id: str, directory: Path):
        from mmer_dist.media.processor import load_processor

        super().__init__(model_id, directory)
        self.model = _tower_model(self.model_class(), directory)
        self.processor = load_processor(directory)

    @torch.inference_mode()
    def encode(self, part_type: str, payload: bytes, limits: MediaLimits) -> torch.Tensor:
        image = self.decode(part_type, payload, limits)
        pixels = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        cfg = self.model.config
        out = self.model.model.get_image_features(pixels, vision_feature_layer=cfg.vision_feature_layer,
                                                  vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return torch.cat(list(out.pooler_output)).float()


class VideoLlavaEncoder(ComponentEncoder):
    """``VideoLlavaForConditionalGeneration``: videos through the video tower (frames sampled to
    the processor's count), images through the image tower."""

    part_types = ("video_url", "image_url")
    transformers_class = "VideoLlavaForConditionalGeneration"

    def __init__(self, model_id: str, directory: Path):
        from mmer_dist.media.processor import load_processor

        super().__init__(model_id, directory)
        self.model = _tower_model(self.model_class(), directory)
        self.processor = load_processor(directory)

    @torch.inference_mode()
    def encode(self, part_type: str, payload: bytes, limits: MediaLimits) -> torch.Tensor:
        cfg = self.model.config
        if part_type == "video_url":
            frames = PART_TYPES[part_type].decode(payload, limits, num_frames=self.processor.num_frames)
            pixels = self.processor(text=self.processor.video_token, videos=[frames],
                                    return_tensors="pt")["pixel_values_videos"]
            out = self.model.model.get_video_features(pixels, vision_feature_layer=cfg.vision_feature_layer)
            return out.pooler_output.reshape(-1, out.pooler_output.shape[-1]).float()
        image = self.decode(part_type, payload, limits)
        pixels = self.processor(text=self.processor.image_token, images=[image],
                                return_tensors="pt")["pixel_values_images"]
        out = self.model.model.get_image_features(pixels, vision_feature_layer=cfg.vision_feature_layer,
                                                  vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return torch.cat(list(out.pooler_output)).float()


ENCODERS: dict[str, type[ComponentEncoder]] = {"llava-hf": LlavaEncoder, "video-llava-hf": VideoLlavaEncoder}


def preload() -> None:
    """Import what building and running any encoder needs, once, on one thread."""
    import av  # noqa: F401  (video decoding)
    import transformers
    from PIL import Image  # noqa: F401

    from mmer_dist.media import processor  # noqa: F401  (AutoProcessor, AutoImageProcessor, AutoTokenizer)

    for cls in ENCODERS.values():
        cls.model_class()
    for name in ("AutoConfig", "LlavaProcessor", "CLIPImageProcessor", "VideoLlavaImageProcessor"):
        getattr(transformers, name)


class MediaEncoders:
    """Every model's component, loaded on demand from the store (the deployment class)."""

    def __init__(self, store: str, max_loaded: int = 16, cache_dir: str | None = None):
        preload()
        self.store_url = store
        self.max_loaded = max_loaded
        self._cache = Path(cache_dir or tempfile.mkdtemp(prefix="mmer-encoders-"))
        self._loaded: OrderedDict[tuple[str, str], ComponentEncoder] = OrderedDict()
        self._lock = threading.Lock()  # the LRU
        self._building = threading.Lock()  # one component built at a time, each once
        self.builds = 0

    def _component(self, model_id: str) -> ComponentEncoder:
        from mmer_dist.store.store import Store
        from mmer_dist.store.weights import StoreWeights

        weights = StoreWeights(Store.open(self.store_url))
        record = weights.catalog.model(model_id)
        key = (model_id, record.sha256)
        with self._building:
            with self._lock:
                if key in self._loaded:
                    self._loaded.move_to_end(key)
                    return self._loaded[key]
            cls = ENCODERS.get(record.format)
            if cls is None:
                raise InvalidInputError(f"model {model_id!r} is in format {record.format!r}; the server runs the "
                                        f"components of {', '.join(ENCODERS)} checkpoints")
            encoder = cls(model_id, component_folder(weights, model_id, self._cache, with_weights=True))
            self.builds += 1
            with self._lock:
                self._loaded[key] = encoder
                while len(self._loaded) > self.max_loaded:
                    self._loaded.popitem(last=False)
            return encoder

    def stats(self) -> dict:
        with self._lock:
            return {"pid": os.getpid(), "loaded": [m for m, _ in self._loaded], "builds": self.builds}

    def encode_sync(self, model_id: str, part_type: str, payload: bytes, limits: MediaLimits) -> torch.Tensor:
        encoder = self._component(model_id)
        if part_type not in encoder.part_types:
            raise InvalidInputError(f"model {model_id!r} does not take {part_type} parts")
        return encoder.encode(part_type, payload, limits)

    async def encode(self, model_id: str, part_type: str, payload: bytes, limits: MediaLimits) -> torch.Tensor | ApiError:
        """The part's rows, or the ApiError that refuses it (see the module docstring)."""
        try:  # decoding and the towers are CPU/GPU work: off the replica's event loop
            return await asyncio.get_running_loop().run_in_executor(None, self.encode_sync, model_id, part_type,
                                                                    payload, limits)
        except InvalidInputError as e:
            return ApiError(400, str(e), param="messages")
