"""Raw request payloads -> arrays: images, WAV audio, video files, point clouds.

Each decoder takes the payload's bytes and the limits the caller enforces (the endpoint passes its
configured ones), checks what the container's header says *before* decoding the bulk of it, and
raises :class:`~mmer_dist.errors.InvalidInputError` with a message naming the problem for anything
corrupt, of the wrong shape, or over a limit. Knows nothing about models: an adapter or the
model's own processor takes the arrays from here.
"""

from __future__ import annotations

import io
import struct
import tokenize
import wave
from typing import NamedTuple

import numpy as np

from mmer_dist.errors import InvalidInputError

IMAGE_FORMATS = ("PNG", "JPEG")
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_SECONDS = 60.0
DEFAULT_MAX_FRAMES = 10_000  # frames decoded from a video file, before sampling
DEFAULT_MAX_POINTS = 1_000_000


class Waveform(NamedTuple):
    """Mono audio: float32 samples in [-1, 1] and their rate in Hz."""

    samples: np.ndarray
    sample_rate: int


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """PNG or JPEG bytes -> RGB uint8 array (H, W, 3). Grey, palette and alpha images are
    converted to RGB (alpha dropped). The pixel count is checked from the header, before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # PIL's own bound, far above ours: a header naming billions of pixels
        raise InvalidInputError(f"image: its header declares more pixels than the limit of {max_pixels}") from None
    except UnidentifiedImageError:  # PIL's message names only its in-memory buffer object
        raise InvalidInputError(f"image: not a readable PNG or JPEG file ({len(data)} bytes in no image format "
                                "PIL knows)") from None
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"image: not a readable PNG or JPEG file ({e})") from None
    with image:
        if image.format not in IMAGE_FORMATS:
            raise InvalidInputError(f"image: format {image.format} is not accepted; send one of {list(IMAGE_FORMATS)}")
        width, height = image.size
        if width < 1 or height < 1 or width * height > max_pixels:
            raise InvalidInputError(f"image: {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
        try:
            rgb = image.convert("RGB")  # decodes the whole file: a truncated one fails here
        except (OSError, ValueError, SyntaxError) as e:
            raise InvalidInputError(f"image: corrupt {image.format} data ({e})") from None
    return np.asarray(rgb, dtype=np.uint8)


def decode_wav(data: bytes, *, max_seconds: float = DEFAULT_MAX_SECONDS) -> Waveform:
    """PCM WAV bytes (8/16/24/32-bit, any channel count) -> mono float32 waveform and sample rate.
    Channels are averaged. The duration is checked from the header, before reading samples."""
    try:
        with wave.open(io.BytesIO(data), "rb") as f:
            channels, width, rate, count = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            if rate <= 0 or channels <= 0:
                raise InvalidInputError(f"audio: WAV header has {channels} channels at {rate} Hz")
            if count / rate > max_seconds:
                raise InvalidInputError(f"audio: {count / rate:.2f} s long, over the limit of {max_seconds:g} s")
            raw = f.readframes(count)
    except (wave.Error, EOFError, RuntimeError, ValueError, OverflowError, struct.error) as e:
        # wave raises bare RuntimeError / struct.error on some corrupt chunk headers
        raise InvalidInputError(f"audio: not a readable PCM WAV file ({e or type(e).__name__})") from None
    if count == 0:
        raise InvalidInputError("audio: the WAV file has no samples")
    if len(raw) != count * channels * width:
        raise InvalidInputError(f"audio: WAV data is truncated ({len(raw)} of {count * channels * width} bytes)")
    samples = _pcm_to_float(raw, width).reshape(count, channels).mean(axis=1, dtype=np.float32)
    return Waveform(samples.astype(np.float32), rate)


def _pcm_to_float(raw: bytes, width: int) -> np.ndarray:
    if width == 1:  # 8-bit WAV is unsigned
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    if width == 3:  # little-endian 24-bit: widen to int32 by hand
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        values = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        values = np.where(values >= 1 << 23, values - (1 << 24), values)
        return values.astype(np.float32) / float(1 << 23)
    if width == 4:
        return (np.frombuffer(raw, "<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    raise InvalidInputError(f"audio: {8 * width}-bit samples are not supported (8, 16, 24 or 32-bit PCM)")


def decode_video(data: bytes, *, num_frames: int, max_frames: int = DEFAULT_MAX_FRAMES,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A video file's bytes (mp4, webm, avi, mkv, ... whatever FFmpeg reads) -> ``num_frames``
    RGB uint8 frames (T, H, W, 3), sampled uniformly over the whole clip (first and last frame
    included; a clip shorter than ``num_frames`` repeats frames). At most ``max_frames`` frames are
    decoded and each frame may have at most ``max_pixels`` pixels."""
    import av

    if num_frames < 1:
        raise InvalidInputError(f"video: num_frames must be >= 1, got {num_frames}")
    decoded = []
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise InvalidInputError("video: the file has no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > max_pixels:
                raise InvalidInputError(f"video: frames of {width}x{height} pixels, over the limit of {max_pixels}")
            for frame in container.decode(stream):
                if len(decoded) == max_frames:
                    raise InvalidInputError(f"video: more than {max_frames} frames, over the limit")
                if frame.width * frame.height > max_pixels:
                    raise InvalidInputError(f"video: a frame of {frame.width}x{frame.height} pixels, over the limit")
                decoded.append(frame)  # kept in its own (compact) pixel format until sampled
            picked = [decoded[i].to_ndarray(format="rgb24") for i in uniform_indices(len(decoded), num_frames)]
    except av.FFmpegError as e:
        raise InvalidInputError(f"video: not a readable video file ({e})") from None
    except ValueError as e:  # raised by an empty clip in uniform_indices, or by PyAV on odd input
        raise InvalidInputError(f"video: {e}") from None
    return np.stack(picked).astype(np.uint8, copy=False)


def uniform_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over ``total`` frames, first and last included."""
    if total < 1:
        raise ValueError("the file decodes to no frames")
    return [int(i) for i in np.linspace(0, total - 1, count).round()]


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def decode_points(data: bytes, *, max_points: int = DEFAULT_MAX_POINTS) -> np.ndarray:
    """``.npy`` bytes of a float array (N, 3) xyz or (N, 6) xyz + rgb -> float32 array of that
    shape. Pickled objects are refused (``allow_pickle=False``); the shape is checked from the
    header before the data is read; every value must be finite."""
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version not in _NPY_HEADER_READERS:
            raise ValueError(f"format version {version} is not supported")
        shape, _, dtype = _NPY_HEADER_READERS[version](buf)
    except (ValueError, EOFError, SyntaxError, tokenize.TokenError) as e:  # the header is parsed as Python
        raise InvalidInputError(f"point cloud: not a .npy array ({e})") from None
    if len(shape) != 2 or shape[1] not in (3, 6) or shape[0] < 1:
        raise InvalidInputError(f"point cloud: shape {shape}; expected (N, 3) xyz or (N, 6) xyz + rgb with N >= 1")
    if shape[0] > max_points:
        raise InvalidInputError(f"point cloud: {shape[0]} points, over the limit of {max_points}")
    if dtype.kind != "f":
        raise InvalidInputError(f"point cloud: dtype {dtype}; expected float32")
    buf.seek(0)
    try:
        points = np.load(buf, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise InvalidInputError(f"point cloud: corrupt .npy data ({e})") from None
    if not np.isfinite(points).all():
        raise InvalidInputError("point cloud: contains NaN or Inf")
    return points.astype(np.float32, copy=False)
