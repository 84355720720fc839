"""Media payloads: decoders and encoders round-trip, refuse corrupt or oversized input by name;
content parts; adapters give the images the towers want and round-trip their config."""

from __future__ import annotations

import base64
import io
import json
import wave

import numpy as np
import pytest

from mmer_dist import media
from mmer_dist.errors import FormatError, InvalidInputError
from mmer_dist.media import parts
from mmer_dist.media.adapters import ADAPTER_FILE, PointProjectionAdapter, SpectrogramAdapter

RNG = np.random.default_rng(0)


def _image(h=12, w=20) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_png_round_trip_is_exact_and_grey_becomes_rgb() -> None:
    img = _image()
    assert np.array_equal(media.decode_image(media.encode_png(img)), img)
    grey = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    out = media.decode_image(media.encode_png(grey))
    assert out.shape == (5, 7, 3) and np.array_equal(out[..., 1], grey)


def test_jpeg_is_accepted_other_formats_are_not() -> None:
    from PIL import Image

    ramp = np.linspace(0, 255, 16).astype(np.uint8)
    img = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.full((16, 16), 90, np.uint8)), axis=-1)
    for fmt, ok in (("JPEG", True), ("GIF", False), ("BMP", False)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt)
        if ok:
            out = media.decode_image(buf.getvalue())
            assert out.shape == (16, 16, 3) and np.abs(out.astype(int) - img).mean() < 8
        else:
            with pytest.raises(InvalidInputError, match=f"format {fmt} is not accepted"):
                media.decode_image(buf.getvalue())


def test_image_refuses_corrupt_truncated_and_oversized() -> None:
    png = media.encode_png(_image(40, 40))
    with pytest.raises(InvalidInputError, match="not a readable PNG or JPEG"):
        media.decode_image(b"definitely not an image")
    with pytest.raises(InvalidInputError, match="corrupt PNG"):
        media.decode_image(png[: len(png) // 2])
    with pytest.raises(InvalidInputError, match="1600 pixels, over the limit of 1000"):
        media.decode_image(png, max_pixels=1000)


def test_wav_round_trip_and_pcm_widths() -> None:
    samples = (0.8 * np.sin(np.arange(4000) / 8000 * 2 * np.pi * 440)).astype(np.float32)
    out = media.decode_wav(media.encode_wav(samples, 8000))
    assert out.sample_rate == 8000 and out.samples.dtype == np.float32
    assert np.abs(out.samples - samples).max() < 1 / 32767
    # 8-bit unsigned and 24-bit stereo, written by hand with the stdlib, decode to the same mono signal
    for width in (1, 3):
        buf = io.BytesIO()
        with wave.open(buf, "wb") as f:
            f.setnchannels(2)
            f.setsampwidth(width)
            f.setframerate(16000)
            if width == 1:
                pcm = np.round(samples * 127 + 128).astype(np.uint8)
                f.writeframes(np.stack([pcm, pcm], axis=1).tobytes())
            else:
                ints = np.round(samples * (2**23 - 1)).astype("<i4")
                b = ints.view(np.uint8).reshape(-1, 4)[:, :3]
                f.writeframes(np.concatenate([b, b], axis=1).tobytes())
        out = media.decode_wav(buf.getvalue())
        assert out.sample_rate == 16000 and np.abs(out.samples - samples).max() < (1 / 100 if width == 1 else 1e-6)


def test_wav_refuses_bad_input() -> None:
    wav = media.encode_wav(np.zeros(8000, np.float32), 8000)
    with pytest.raises(InvalidInputError, match="not a readable PCM WAV"):
        media.decode_wav(b"RIFF\x00\x00garbage")
    with pytest.raises(InvalidInputError, match="truncated"):
        media.decode_wav(wav[:2000])
    with pytest.raises(InvalidInputError, match=r"1.00 s long, over the limit of 0.5 s"):
        media.decode_wav(wav, max_seconds=0.5)


def _frames(t=10) -> np.ndarray:
    """A bright square moving right: each frame is identifiable after lossy coding."""
    frames = np.full((t, 16, 16, 3), 20, np.uint8)
    for i in range(t):
        frames[i, 4:10, i:i + 6] = 230
    return frames


def test_video_round_trip_samples_uniformly() -> None:
    frames = _frames(10)
    out = media.decode_video(media.encode_video(frames), num_frames=4)
    assert out.shape == (4, 16, 16, 3) and out.dtype == np.uint8
    picked = [0, 3, 6, 9]  # linspace(0, 9, 4) rounded: first and last included
    assert np.array_equal(out, frames[picked])  # lossless by default: the frames the client had
    lossy = media.decode_video(media.encode_video(frames, crf=18), num_frames=4)
    assert 0 < np.abs(lossy.astype(int) - frames[picked]).mean() < 6
    assert media.decode_video(media.encode_video(frames[:2]), num_frames=4).shape == (4, 16, 16, 3)


def test_video_refuses_bad_input() -> None:
    mp4 = media.encode_video(_frames(10))
    with pytest.raises(InvalidInputError, match="not a readable video"):
        media.decode_video(b"\x00\x00\x00\x18ftypmp42 broken", num_frames=4)
    with pytest.raises(InvalidInputError, match="more than 5 frames"):
        media.decode_video(mp4, num_frames=4, max_frames=5)
    with pytest.raises(InvalidInputError, match="over the limit of 100"):
        media.decode_video(mp4, num_frames=4, max_pixels=100)
    with pytest.raises(InvalidInputError, match="yuv420p needs even frame sizes"):
        media.encode_video(np.zeros((2, 15, 16, 3), np.uint8), crf=18)
    odd = RNG.integers(0, 256, (2, 15, 17, 3), dtype=np.uint8)  # lossless RGB takes any size
    assert np.array_equal(media.decode_video(media.encode_video(odd), num_frames=2), odd)


def test_points_round_trip_and_refusals() -> None:
    for cols in (3, 6):
        pts = RNG.normal(size=(50, cols)).astype(np.float32)
        assert np.array_equal(media.decode_points(media.encode_points(pts)), pts)
    npy = lambda a: (lambda b: (np.save(b, a, allow_pickle=True), b.getvalue())[1])(io.BytesIO())  # noqa: E731
    with pytest.raises(InvalidInputError, match=r"shape \(50, 4\)"):
        media.decode_points(npy(np.zeros((50, 4), np.float32)))
    with pytest.raises(InvalidInputError, match="dtype int64"):
        media.decode_points(npy(np.zeros((5, 3), np.int64)))
    with pytest.raises(InvalidInputError, match="over the limit of 10"):
        media.decode_points(npy(np.zeros((11, 3), np.float32)), max_points=10)
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        media.decode_points(npy(np.array([[0, np.nan, 1]], np.float32)))
    with pytest.raises(InvalidInputError, match="not a .npy array"):
        media.decode_points(b"not npy")
    with pytest.raises(InvalidInputError, match="shape"):  # pickled objects never reach np.load
        media.decode_points(npy(np.array([{"a": 1}], dtype=object)))
    with pytest.raises(InvalidInputError, match="corrupt .npy"):
        media.decode_points(npy(np.zeros((50, 3), np.float32))[:-40])


def test_content_parts_round_trip() -> None:
    img, pts = _image(8, 8), RNG.normal(size=(20, 3)).astype(np.float32)
    wav = media.Waveform(np.zeros(800, np.float32), 8000)
    assert np.array_equal(media.decode_part(media.media_part("image_url", img)), img)
    assert np.array_equal(media.decode_part(media.media_part("point_cloud", pts)), pts)
    assert media.decode_part(media.media_part("input_audio", wav)).sample_rate == 8000
    video = media.decode_part(media.media_part("video_url", _frames(6)), num_frames=3)
    assert video.shape == (3, 16, 16, 3)
    part = media.media_part("image_url", img)
    assert part["image_url"]["url"].startswith("data:image/png;base64,")
    assert np.array_equal(media.decode_part({**part, "model": "digits"}), img)  # routing key ignored


@pytest.mark.parametrize("part, message", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "only data: URLs"),
    ({"type": "image_url", "image_url": {"url": "data:image/png,abc"}}, "expected 'data:<mime type>;base64"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "invalid base64"),
    ({"type": "image_url"}, "expected an object under 'image_url'"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}}, "only 'wav'"),
    ({"type": "point_cloud", "point_cloud": {"data": ""}}, "non-empty base64"),
    ({"type": "sticker", "sticker": {}}, "not a media type"),
    ("image_url", "expected an object"),
])
def test_bad_content_parts_are_named(part, message) -> None:
    with pytest.raises(InvalidInputError, match=message):
        media.decode_part(part)


def test_part_size_limit_is_checked_before_decoding() -> None:
    part = media.media_part("image_url", _image(32, 32))
    size = len(part["image_url"]["url"].partition(",")[2])
    with pytest.raises(InvalidInputError, match=f"{size} bytes of base64, over the limit of 100"):
        media.decode_part(part, limits=parts.MediaLimits(max_part_bytes=100))


def test_spectrogram_shows_rising_and_steady_tones() -> None:
    rate, t = 8000, np.arange(6000) / 8000
    adapter = SpectrogramAdapter(sample_rate=rate, height=16, width=16)
    steady = adapter(media.Waveform(np.sin(2 * np.pi * 1000 * t).astype(np.float32), rate))
    assert steady.shape == (16, 16, 3) and steady.dtype == np.uint8
    # 1 kHz lies in band 4 of 16 over 0-4 kHz (250 Hz each); the image's row 0 is the top band
    assert (steady[:, :, 0].argmax(axis=0) == 15 - 4).all()
    freq = 300 + 3400 * t / t[-1]
    chirp = adapter(media.Waveform(np.sin(2 * np.pi * np.cumsum(freq) / rate).astype(np.float32), rate))
    peak_rows = chirp[:, :, 0].argmax(axis=0)
    assert peak_rows[0] > peak_rows[-1] and (np.diff(peak_rows) <= 0).all()  # moves up the image
    # another sample rate is resampled first: the same tone gives the same picture
    t16 = np.arange(12000) / 16000
    resampled = adapter(media.Waveform(np.sin(2 * np.pi * 1000 * t16).astype(np.float32), 16000))
    assert (resampled[:, :, 0].argmax(axis=0) == 15 - 4).all()
    assert adapter(media.Waveform(np.zeros(10, np.float32), rate)).shape == (16, 16, 3)  # shorter than n_fft


def test_point_projection_views() -> None:
    adapter = PointProjectionAdapter(resolution=8)
    # a flat square in the x-y plane at z = 0: full top view, a line in the front and side views
    xy = np.stack(np.meshgrid(np.linspace(-1, 1, 40), np.linspace(-1, 1, 40)), axis=-1).reshape(-1, 2)
    points = np.concatenate([xy, np.zeros((len(xy), 1)), np.ones((len(xy), 3))], axis=1).astype(np.float32)
    image = adapter(points * 3 + 5)  # position and scale are normalised away
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert (image[:, :, 0] > 0).all()
    for channel in (1, 2):
        assert (image[:, :, channel] > 0).sum(axis=1).tolist() == [0, 0, 0, 8, 0, 0, 0, 0] or \
               (image[:, :, channel] > 0).sum(axis=1).tolist() == [0, 0, 0, 0, 8, 0, 0, 0]
    with pytest.raises(InvalidInputError, match=r"expected \(N, 3\) or \(N, 6\)"):
        adapter(np.zeros((5, 2)))


def test_adapter_config_round_trip_and_bad_files(tmp_path) -> None:
    assert media.load_adapter(tmp_path) is None  # image and video models have none
    for adapter in (SpectrogramAdapter(n_fft=128, width=20), PointProjectionAdapter(resolution=12)):
        media.save_adapter(adapter, tmp_path)
        loaded = media.load_adapter(tmp_path)
        assert loaded == adapter and isinstance(loaded, media.MediaAdapter)
        assert json.loads((tmp_path / ADAPTER_FILE).read_text())["part_type"] == adapter.part_type
    for doc, message in (({"kind": "wavelet"}, "kind 'wavelet' unknown"),
                         ({"kind": "spectrogram", "hop": 3}, r"unknown parameters \['hop'\]"),
                         ({"kind": "spectrogram", "fmax": 9000.0}, "fmax <= sample_rate/2"),
                         ({"kind": "point-projection", "part_type": "input_audio"}, "part_type")):
        (tmp_path / ADAPTER_FILE).write_text(json.dumps(doc))
        with pytest.raises(FormatError, match=message):
            media.load_adapter(tmp_path)
    (tmp_path / ADAPTER_FILE).write_text("{not json")
    with pytest.raises(FormatError, match="not a valid media adapter config"):
        media.load_adapter(tmp_path)


def test_b64_payload_helpers_are_plain_base64() -> None:
    part = media.media_part("point_cloud", np.zeros((3, 3), np.float32))
    raw = base64.b64decode(part["point_cloud"]["data"])
    assert raw.startswith(b"\x93NUMPY")
