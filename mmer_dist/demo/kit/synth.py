"""Seeded synthetic raw media for the kit's tasks: tones, point-cloud shapes, moving-dot videos.

Each generator draws one sample of a given class from a numpy Generator, with enough nuisance
variation (length, loudness, noise, size, pose, speed, colour) that a model has to learn the
class, not a template. Outputs are what a client would send, exactly (``mmer_dist.media.parts``
encodes each losslessly): a mono waveform at 8 kHz on the 16-bit PCM grid, float32 points (N, 3)
or (N, 6), uint8 RGB frames (T, H, W, 3).
"""

from __future__ import annotations

import numpy as np

from mmer_dist.media.decode import Waveform

SAMPLE_RATE = 8000
TONES = ("rising", "falling", "high", "low")
SHAPES = ("cube", "sphere", "cylinder", "cone")
MOTIONS = ("left", "right", "up", "down")
VIDEO_FRAMES, VIDEO_SIZE = 4, 16
TRAIL, TRAIL_DECAY = 6, 0.75  # a moving dot's tail: its last positions, fading


def tone(rng: np.random.Generator, kind: str) -> Waveform:
    """A 0.4-0.8 s tone: a linear chirp from low to high (``rising``) or back (``falling``), or a
    steady ``high`` (2.2-3.6 kHz) or ``low`` (0.2-0.7 kHz) pitch; random loudness, noise, fades."""
    duration = rng.uniform(0.4, 0.8)
    t = np.arange(int(duration * SAMPLE_RATE)) / SAMPLE_RATE
    low, high = rng.uniform(250, 700), rng.uniform(1800, 3500)
    start, end = {"rising": (low, high), "falling": (high, low)}.get(kind, (None, None))
    if kind in ("high", "low"):
        start = end = rng.uniform(2200, 3600) if kind == "high" else rng.uniform(200, 700)
    freq = start + (end - start) * t / duration
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    fade = np.minimum(1.0, np.minimum(t, duration - t) / 0.01)
    samples = rng.uniform(0.2, 0.8) * np.sin(phase) * fade + rng.normal(0, rng.uniform(0.005, 0.05), t.size)
    # on the 16-bit PCM grid, so the WAV a client sends carries exactly the waveform the models
    # were trained and scored on
    pcm = np.clip(np.round(samples * 32768.0), -32768, 32767)
    return Waveform((pcm / 32768.0).astype(np.float32), SAMPLE_RATE)


def shape(rng: np.random.Generator, kind: str) -> np.ndarray:
    """300-800 points on the surface of a cube, sphere, upright cylinder or upright cone (z up),
    turned about z, scaled, moved and jittered; a third of them carry an rgb colour (N, 6)."""
    n = int(rng.integers(300, 801))
    if kind == "sphere":
        p = rng.normal(size=(n, 3))
        p /= np.linalg.norm(p, axis=1, keepdims=True)
    elif kind == "cube":
        p = rng.uniform(-1, 1, size=(n, 3))
        axis = rng.integers(0, 3, n)
        p[np.arange(n), axis] = rng.choice([-1.0, 1.0], n)
    else:
        half = rng.uniform(0.7, 1.3)
        angle = rng.uniform(0, 2 * np.pi, n)
        on_base = rng.random(n) < 0.25
        z = rng.uniform(-half, half, n)
        if kind == "cylinder":
            radius = np.where(on_base, np.sqrt(rng.random(n)), 1.0)
            z = np.where(on_base, rng.choice([-half, half], n), z)
        else:  # cone: apex at +half; the lateral surface's area grows linearly towards the base
            depth = np.sqrt(rng.random(n))
            radius = np.where(on_base, np.sqrt(rng.random(n)), depth)
            z = np.where(on_base, -half, half - 2 * half * depth)
        p = np.stack([radius * np.cos(angle), radius * np.sin(angle), z], axis=1)
    turn = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]])
    scale = rng.uniform(0.5, 2.0)
    p = (p @ rotation.T) * scale + rng.uniform(-1, 1, 3) + rng.normal(0, 0.02 * scale, p.shape)
    if rng.random() < 1 / 3:
        p = np.concatenate([p, rng.uniform(0, 1, (n, 3))], axis=1)
    return p.astype(np.float32)


def motion(rng: np.random.Generator, kind: str) -> np.ndarray:
    """4 frames of 16x16: a soft coloured dot moving ``left``/``right``/``up``/``down`` at 1.5-2
    px per frame (a little drift across) over a noisy background, trailing a fading tail where it
    has been (motion blur, as a long exposure sees it). Without the tail the tiny per-frame tower
    has to learn to compare positions across frames, which did not train in minutes (the loss sat
    at chance for 300 steps); with it, each frame shows which way the dot goes, and the frames agree."""
    speed = rng.uniform(1.5, 2.0)
    travel = speed * (VIDEO_FRAMES - 1)
    t = np.arange(VIDEO_FRAMES)[:, None] - np.arange(TRAIL)[None, :]  # (frame, trail step): time seen
    along = rng.uniform(2.0, VIDEO_SIZE - 2.0 - travel) + speed * t
    if kind in ("left", "up"):
        along = (VIDEO_SIZE - 1) - along
    across = rng.uniform(3, VIDEO_SIZE - 4) + rng.uniform(-0.2, 0.2) * t
    x, y = (along, across) if kind in ("left", "right") else (across, along)
    sigma = rng.uniform(1.0, 1.6)
    yy, xx = np.mgrid[:VIDEO_SIZE, :VIDEO_SIZE]
    blobs = np.exp(-((xx - x[..., None, None]) ** 2 + (yy - y[..., None, None]) ** 2) / (2 * sigma**2))
    dot = (blobs * TRAIL_DECAY ** np.arange(TRAIL)[None, :, None, None]).sum(axis=1)
    colour = rng.uniform(180, 255) * rng.uniform(0.7, 1.0, 3)
    frames = rng.uniform(0, 30) + dot[..., None] * colour + rng.normal(0, 6, (VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE, 3))
    return np.clip(np.round(frames), 0, 255).astype(np.uint8)
