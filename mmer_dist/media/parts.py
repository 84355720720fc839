"""OpenAI-style content parts <-> raw media, the one place that knows their JSON shapes.

``PART_TYPES`` is the registry of media part types (``PartType``: payload key, HF content type,
placeholder, decoder, limit field, adapter kind, catalog modality); the endpoint's wire format,
options, chat templates and encoders all read it, so a new part type is one row here.

What the endpoint does with each part type of a chat message (every payload inline, base64):

- ``text``: ``{"type": "text", "text": "..."}``, rendered by the chat template; nothing to decode.
- ``image_url``: ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` (PNG
  or JPEG) -> RGB uint8 (H, W, 3) -> the model's image processor. No adapter.
- ``input_audio``: ``{"type": "input_audio", "input_audio": {"data": "<base64 WAV>", "format":
  "wav"}}`` -> :class:`~mmer_dist.media.decode.Waveform` -> the model's adapter (``spectrogram``)
  -> an RGB image -> the model's image processor.
- ``video_url``: ``{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}`` (any
  container FFmpeg reads) -> uint8 (T, H, W, 3), T = the model's frame count (its processor's
  ``num_frames``), sampled uniformly -> the model's video processor. No adapter.
- ``point_cloud``: ``{"type": "point_cloud", "point_cloud": {"data": "<base64 .npy>"}}`` (float32,
  (N, 3) xyz or (N, 6) xyz + rgb) -> float32 (N, 3|6) -> the model's adapter (``point-projection``)
  -> an RGB image -> the model's image processor.

In the chat template each media part becomes its placeholder token (``<image>``, ``<audio>``,
``<video>``, ``<point>``), which the model's processor expands to the number of embeddings its
encoder produces. A part may carry ``"model": "<id>"`` to name the model it is for (serving's
routing); this module ignores that key. Remote URLs are never fetched here: only ``data:`` URLs.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmer_dist.errors import InvalidInputError
from mmer_dist.media import decode, encode


@dataclass(frozen=True)
class MediaLimits:
    """What one media part may hold; the endpoint's configured limits (``serve.config.Limits``
    has the same field names)."""

    max_part_bytes: int = 32 * 1024 * 1024  # of the base64 text
    max_image_pixels: int = decode.DEFAULT_MAX_PIXELS
    max_audio_seconds: float = decode.DEFAULT_MAX_SECONDS
    max_video_frames: int = decode.DEFAULT_MAX_FRAMES
    max_points: int = decode.DEFAULT_MAX_POINTS


def image_part(image: np.ndarray) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": _data_url("image/png", encode.encode_png(image))}}


def audio_part(samples: np.ndarray, sample_rate: int) -> dict[str, Any]:
    data = base64.b64encode(encode.encode_wav(samples, sample_rate)).decode("ascii")
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


def video_part(frames: np.ndarray, fps: int = 8) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": _data_url("video/mp4", encode.encode_video(frames, fps=fps))}}


def point_cloud_part(points: np.ndarray) -> dict[str, Any]:
    return {"type": "point_cloud", "point_cloud": {"data": base64.b64encode(encode.encode_points(points)).decode("ascii")}}


@dataclass(frozen=True)
class PartType:
    """Everything the layers know about one media content part type, in one row: the request
    (``payload``: where its bytes are), the chat template (``content_type``, ``placeholder``), the
    decoder and the limit it enforces, the catalog modality whose models take it by default, and
    the adapter kind that turns it into an image for a vision tower (None: it needs none)."""

    name: str
    modality: str
    payload: tuple[str, str]  # part[payload[0]][payload[1]] holds the bytes
    data_url: bool  # the payload is a data: URL (else bare base64)
    content_type: str  # the HF chat template's content item {"type": content_type}
    placeholder: str  # the token a template writes for it when the checkpoint names none
    limit: str  # the MediaLimits field that bounds one decoded part
    adapter: str | None
    decoder: Callable[[bytes, MediaLimits, int], Any]  # (bytes, limits, video frames) -> raw media
    builder: Callable[[Any], dict[str, Any]]  # raw media -> a content part (clients, tests)

    def decode(self, data: bytes, limits: MediaLimits = MediaLimits(), num_frames: int = 8) -> Any:
        """The part's bytes -> raw media (``num_frames``: what a video is sampled to)."""
        return self.decoder(data, limits, num_frames)


PART_TYPES: dict[str, PartType] = {p.name: p for p in (
    PartType("image_url", "image", ("image_url", "url"), True, "image", "<image>", "max_image_pixels", None,
             lambda data, limits, _: decode.decode_image(data, max_pixels=limits.max_image_pixels), image_part),
    PartType("input_audio", "audio", ("input_audio", "data"), False, "audio", "<audio>", "max_audio_seconds",
             "spectrogram", lambda data, limits, _: decode.decode_wav(data, max_seconds=limits.max_audio_seconds),
             lambda raw: audio_part(*raw)),
    PartType("video_url", "video", ("video_url", "url"), True, "video", "<video>", "max_video_frames", None,
             lambda data, limits, frames: decode.decode_video(data, num_frames=frames, max_frames=limits.max_video_frames,
                                                              max_pixels=limits.max_image_pixels), video_part),
    PartType("point_cloud", "point", ("point_cloud", "data"), False, "point", "<point>", "max_points",
             "point-projection", lambda data, limits, _: decode.decode_points(data, max_points=limits.max_points),
             point_cloud_part),
)}
MEDIA_PART_TYPES = tuple(PART_TYPES)
MODALITY_PART_TYPES = {p.modality: p.name for p in PART_TYPES.values()}


def part_type(name: Any) -> PartType:
    """The registry row of media part type ``name``; anything else is refused by name."""
    if not isinstance(name, str) or name not in PART_TYPES:
        raise InvalidInputError(f"content part type {name!r} is not a media type; expected one of {list(MEDIA_PART_TYPES)}")
    return PART_TYPES[name]


def media_part(kind: str, raw: Any) -> dict[str, Any]:
    """The content part for ``raw`` (what :func:`decode_part` returns for that part type)."""
    return part_type(kind).builder(raw)


def decode_part(part: dict[str, Any], *, num_frames: int = 8, limits: MediaLimits = MediaLimits()) -> Any:
    """A media content part -> its raw media: an RGB image, a :class:`~mmer_dist.media.decode.Waveform`,
    ``num_frames`` video frames, or a point array. Every problem is an InvalidInputError naming the field."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise InvalidInputError("content part: expected an object with a string 'type'")
    spec = part_type(part["type"])
    outer, key = spec.payload
    body = part.get(outer)
    if not isinstance(body, dict):
        raise InvalidInputError(f"{spec.name}: expected an object under {outer!r}")
    if spec.name == "input_audio" and body.get("format", "wav") != "wav":
        raise InvalidInputError(f"input_audio.format {body.get('format')!r}: only 'wav' is accepted")
    return spec.decode(payload_bytes(spec, body.get(key), limits), limits, num_frames)


def payload_bytes(spec: PartType, text: Any, limits: MediaLimits = MediaLimits()) -> bytes:
    """A part's payload text (``part[outer][key]``: a data URL or bare base64, as ``spec`` says)
    -> its bytes, its size checked before decoding. Remote URLs are refused here (the endpoint
    fetches them itself where it allows them)."""
    field = ".".join(spec.payload)
    if spec.data_url:
        if not isinstance(text, str):
            raise InvalidInputError(f"{field}: expected a string")
        head, sep, text = text.partition(",")
        if not head.startswith("data:"):
            raise InvalidInputError(f"{field}: only data: URLs are accepted (remote URLs are not fetched)")
        if not sep or not head.endswith(";base64"):
            raise InvalidInputError(f"{field}: expected 'data:<mime type>;base64,<data>'")
    if not isinstance(text, str) or not text:
        raise InvalidInputError(f"{field}: expected a non-empty base64 string")
    if len(text) > limits.max_part_bytes:
        raise InvalidInputError(f"{field}: {len(text)} bytes of base64, over the limit of {limits.max_part_bytes}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInputError(f"{field}: invalid base64 ({e})") from None


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
