"""Media adapters: raw audio or point clouds -> the image a model's own HF image processor takes.

A model whose encoder is a vision tower (every kit model is a LLaVA) reads audio and point clouds
as images. The adapter is that model's fixed, parameter-free front end, saved next to its
checkpoint as ``mmer_adapter.json`` (``{"kind": ..., "part_type": ..., <parameters>}``), so
training, the plain-transformers evaluator and the serving endpoint all turn the same raw input
into the same pixels. Images and videos need no adapter: they go to the processor as they are.

The file may also say how the model's prompts carry the part (``placeholder``: the token its
template writes; ``template_type``: the content type its chat template renders as that
placeholder; ``wrap``: two strings around the encoder rows in expansion mode, e.g.
``["<audio_start>", "<audio_end>"]``); a file may hold only those (an image model's). One reader,
:func:`read_adapter_file`, serves the encoders and the chat templates alike.

Interface (:class:`MediaAdapter`): ``kind`` names the implementation, ``part_type`` the content
part it serves (see :mod:`mmer_dist.media.parts`), ``adapter(raw)`` returns an RGB uint8 image
(H, W, 3) of ``image_size``, ``to_config()`` / ``from_config(dict)`` round-trip the parameters.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from mmer_dist.errors import FormatError, InvalidInputError
from mmer_dist.media.decode import Waveform

ADAPTER_FILE = "mmer_adapter.json"


@runtime_checkable
class MediaAdapter(Protocol):
    kind: ClassVar[str]
    part_type: ClassVar[str]

    @property
    def image_size(self) -> tuple[int, int]: ...

    def __call__(self, raw: Any) -> np.ndarray: ...

    def to_config(self) -> dict[str, Any]: ...

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MediaAdapter: ...


@dataclass(frozen=True)
class SpectrogramAdapter:
    """Waveform -> log-power spectrogram image: ``width`` STFT frames spread evenly over the clip
    (any length maps to the same image size), the power averaged into ``height`` linear frequency
    bands over [fmin, fmax], high frequencies at the top row, in dB relative to the loudest cell
    over ``db_range`` dB mapped to 0..255, the grey image repeated on the 3 channels. Input at
    another sample rate is resampled (linear interpolation) to ``sample_rate`` first."""

    kind: ClassVar[str] = "spectrogram"
    part_type: ClassVar[str] = "input_audio"
    sample_rate: int = 8000
    n_fft: int = 256
    height: int = 16
    width: int = 16
    fmin: float = 0.0
    fmax: float = 4000.0
    db_range: float = 60.0

    def __post_init__(self) -> None:
        if not (0 <= self.fmin < self.fmax <= self.sample_rate / 2):
            raise InvalidInputError(f"spectrogram: need 0 <= fmin < fmax <= sample_rate/2, got {self.fmin}, {self.fmax}")
        if min(self.n_fft, self.height, self.width) < 2 or self.db_range <= 0:
            raise InvalidInputError("spectrogram: n_fft, height, width must be >= 2 and db_range > 0")
        if (self._bands().sum(axis=1) == 0).any():
            raise InvalidInputError(f"spectrogram: {self.height} bands over [{self.fmin}, {self.fmax}] Hz are "
                                    f"narrower than one FFT bin of {self.sample_rate / self.n_fft:g} Hz")

    @property
    def image_size(self) -> tuple[int, int]:
        return self.height, self.width

    def _bands(self) -> np.ndarray:
        """(height, bins) averaging matrix: band b averages the FFT bins whose centre lies in it."""
        freqs = np.arange(self.n_fft // 2 + 1) * self.sample_rate / self.n_fft
        edges = np.linspace(self.fmin, self.fmax, self.height + 1)
        upper = np.where(np.arange(self.height) == self.height - 1, np.inf, edges[1:])[:, None]
        return ((freqs >= edges[:-1, None]) & (freqs < upper) & (freqs <= self.fmax)).astype(np.float64)

    def __call__(self, raw: Waveform | tuple[np.ndarray, int]) -> np.ndarray:
        samples, rate = raw
        samples = np.asarray(samples, dtype=np.float64)
        if samples.ndim != 1 or samples.size == 0 or rate <= 0:
            raise InvalidInputError(f"spectrogram: expected a non-empty mono waveform, got shape {samples.shape} at {rate} Hz")
        if rate != self.sample_rate:
            t = np.arange(round(samples.size * self.sample_rate / rate)) / self.sample_rate
            samples = np.interp(t, np.arange(samples.size) / rate, samples)
        if samples.size < self.n_fft:
            samples = np.pad(samples, (0, self.n_fft - samples.size))
        starts = np.linspace(0, samples.size - self.n_fft, self.width).round().astype(np.int64)
        frames = samples[starts[:, None] + np.arange(self.n_fft)] * np.hanning(self.n_fft)
        power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (width, bins)
        bands = self._bands()
        band_power = (bands @ power.T) / bands.sum(axis=1, keepdims=True)  # (height, width)
        db = 10.0 * np.log10(band_power + 1e-12)
        level = np.clip((db - (db.max() - self.db_range)) / self.db_range, 0.0, 1.0)
        grey = np.round(level[::-1] * 255.0).astype(np.uint8)  # row 0 = highest band
        return np.repeat(grey[:, :, None], 3, axis=2)

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "part_type": self.part_type, **dataclasses.asdict(self)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SpectrogramAdapter:
        return cls(**_params(cls, config))


@dataclass(frozen=True)
class PointProjectionAdapter:
    """Points (N, 3) or (N, 6) (only xyz is used) -> three orthogonal projections as the RGB
    channels: R = top view (x, y), G = front view (x, z), B = side view (y, z). The cloud is centred
    on its bounding box and scaled by its largest half-extent (aspect ratio kept) into [-1, 1]^3;
    each view is a ``resolution``^2 histogram of point counts, log-scaled to 0..255 by its own
    maximum, the second coordinate pointing up."""

    kind: ClassVar[str] = "point-projection"
    part_type: ClassVar[str] = "point_cloud"
    resolution: int = 16

    def __post_init__(self) -> None:
        if self.resolution < 2:
            raise InvalidInputError(f"point-projection: resolution must be >= 2, got {self.resolution}")

    @property
    def image_size(self) -> tuple[int, int]:
        return self.resolution, self.resolution

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        points = np.asarray(raw, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] not in (3, 6) or points.shape[0] < 1:
            raise InvalidInputError(f"point-projection: expected (N, 3) or (N, 6) points, got {points.shape}")
        xyz = points[:, :3]
        low, high = xyz.min(axis=0), xyz.max(axis=0)
        scale = max(float((high - low).max()) / 2, 1e-12)
        xyz = (xyz - (low + high) / 2) / scale
        channels = []
        for a, b in ((0, 1), (0, 2), (1, 2)):
            counts, _, _ = np.histogram2d(xyz[:, b], xyz[:, a], bins=self.resolution, range=[[-1, 1], [-1, 1]])
            level = np.log1p(counts[::-1]) / np.log1p(counts.max())  # row 0 = top of the view
            channels.append(np.round(level * 255.0).astype(np.uint8))
        return np.stack(channels, axis=2)

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "part_type": self.part_type, **dataclasses.asdict(self)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PointProjectionAdapter:
        return cls(**_params(cls, config))


ADAPTERS: dict[str, type] = {a.kind: a for a in (SpectrogramAdapter, PointProjectionAdapter)}


def _params(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """The dataclass fields of ``config``; kind/part_type must match and nothing else may appear."""
    if config.get("kind") != cls.kind or config.get("part_type", cls.part_type) != cls.part_type:
        raise InvalidInputError(f"{cls.kind} adapter: config has kind {config.get('kind')!r}, "
                                f"part_type {config.get('part_type')!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - names - {"kind", "part_type"})
    if unknown:
        raise InvalidInputError(f"{cls.kind} adapter: unknown parameters {unknown}; known: {sorted(names)}")
    return {k: v for k, v in config.items() if k in names}


def adapter_from_config(config: dict[str, Any]) -> MediaAdapter:
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind not in ADAPTERS:
        raise InvalidInputError(f"adapter kind {kind!r} unknown; known: {sorted(ADAPTERS)}")
    return ADAPTERS[kind].from_config(config)


def save_adapter(adapter: MediaAdapter, directory: str | Path) -> Path:
    path = Path(directory) / ADAPTER_FILE
    path.write_text(json.dumps(adapter.to_config(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


PROMPT_KEYS = ("placeholder", "template_type", "wrap")


@dataclass(frozen=True)
class AdapterFile:
    """What a checkpoint's ``mmer_adapter.json`` says (see the module docstring)."""

    adapter: MediaAdapter | None  # None: the file only says how prompts carry the part
    part_type: str | None
    placeholder: str | None = None
    template_type: str | None = None
    wrap: tuple[str, str] = ("", "")


def read_adapter_file(directory: str | Path) -> AdapterFile | None:
    """The checkpoint's ``mmer_adapter.json``, or None when it has none (image and video models).
    A malformed file is a FormatError naming it and the problem."""
    from mmer_dist.media.parts import MEDIA_PART_TYPES

    path = Path(directory) / ADAPTER_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise InvalidInputError(f"expected a JSON object, got {type(config).__name__}")
        prompt = {k: config.pop(k) for k in PROMPT_KEYS if k in config}
        adapter = adapter_from_config(config) if "kind" in config else None
        part_type = config.get("part_type") if adapter is None else adapter.part_type
        if adapter is None and (unknown := sorted(set(config) - {"part_type"})):
            raise InvalidInputError(f"unknown keys {unknown} without an adapter 'kind'")
        if part_type is not None and part_type not in MEDIA_PART_TYPES:
            raise InvalidInputError(f"part_type {part_type!r}; expected one of {list(MEDIA_PART_TYPES)}")
        wrap = prompt.get("wrap", ("", ""))
        if not (isinstance(wrap, (list, tuple)) and len(wrap) == 2 and all(isinstance(w, str) for w in wrap)):
            raise InvalidInputError(f"wrap must be two strings, got {wrap!r}")
        for key in ("placeholder", "template_type"):
            if not isinstance(prompt.get(key, ""), str):
                raise InvalidInputError(f"{key} must be a string, got {prompt[key]!r}")
    except (json.JSONDecodeError, UnicodeDecodeError, InvalidInputError, TypeError) as e:
        raise FormatError(f"{path}: not a valid media adapter config ({e})") from None
    return AdapterFile(adapter, part_type, prompt.get("placeholder") or None, prompt.get("template_type") or None,
                       (wrap[0], wrap[1]))


def load_adapter(directory: str | Path) -> MediaAdapter | None:
    """The adapter saved in a checkpoint (or a store component's files) directory, or None if it
    has none (image and video models). A malformed file is a FormatError naming it."""
    found = read_adapter_file(directory)
    return found.adapter if found is not None else None
