"""Arrays -> the payload bytes the decoders read: PNG, 16-bit PCM WAV, mp4 (H.264), .npy.

The inverse of :mod:`mmer_dist.media.decode`, for clients (the demo's, the tests') that send real
files. PNG, WAV (to 16-bit rounding) and .npy are lossless, and so is mp4 by default: H.264 in
RGB at quantizer 0 (``libx264rgb``), so the server decodes exactly the frames the client had. A
lossy yuv420p encoding (``crf=``) halves the chroma resolution: on the demo kit's 16x16 frames it
moved pixels by up to 31 of 255 and flipped the motion model's answer on 1 of 50 held-out videos,
so served answers could not be compared with the kit's references on raw frames.
"""

from __future__ import annotations

import io
import wave

import numpy as np

from mmer_dist.errors import InvalidInputError


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W) grey or (H, W, 3) RGB -> PNG bytes."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise InvalidInputError(f"encode_png: expected uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def encode_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    """Mono float samples in [-1, 1] (clipped) -> 16-bit PCM WAV bytes."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 1 or samples.size == 0 or sample_rate <= 0:
        raise InvalidInputError(f"encode_wav: expected a non-empty 1-D waveform and a positive rate, "
                                f"got shape {samples.shape} at {sample_rate} Hz")
    pcm = np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2")  # the decoder divides by 32768
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.tobytes())
    return buf.getvalue()


def encode_video(frames: np.ndarray, *, fps: int = 8, crf: int | None = None) -> bytes:
    """uint8 frames (T, H, W, 3) -> mp4 bytes: lossless RGB H.264 by default, or yuv420p at
    quality ``crf`` (what any player reads; H and W must then be even)."""
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or frames.shape[0] < 1:
        raise InvalidInputError(f"encode_video: expected uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if crf is not None and (height % 2 or width % 2):
        raise InvalidInputError(f"encode_video: H.264 in yuv420p needs even frame sizes, got {height}x{width}")
    codec, pix_fmt, options = ("libx264rgb", "rgb24", {"qp": "0"}) if crf is None else \
        ("libx264", "yuv420p", {"crf": str(crf)})
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = options
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush
    return buf.getvalue()


def encode_points(points: np.ndarray) -> bytes:
    """(N, 3) or (N, 6) points -> ``.npy`` bytes of float32."""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] not in (3, 6):
        raise InvalidInputError(f"encode_points: expected (N, 3) or (N, 6), got {points.shape}")
    buf = io.BytesIO()
    np.save(buf, points.astype(np.float32), allow_pickle=False)
    return buf.getvalue()
