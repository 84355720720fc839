"""The encoders deployment's class in-process (real components of the session's merged store):
concurrent first requests for one cold model build its component once, from files that were
never read half-written, and all get the same rows; a refusal is answered, not raised."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import torch

from mmer_dist.media.parts import MediaLimits, image_part, payload_bytes, part_type
from serve.encoders import MediaEncoders
from serve.errors import ApiError


def png(seed: int) -> bytes:
    part = image_part(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return payload_bytes(part_type("image_url"), part["image_url"]["url"])


def test_concurrent_first_requests_build_a_cold_component_once(merged_store, tmp_path):
    encoders = MediaEncoders(str(merged_store), cache_dir=str(tmp_path))
    payload, results, start = png(0), [None] * 6, threading.Barrier(6)

    def first_request(i: int) -> None:
        start.wait()  # all six at once, before any has built the component
        results[i] = encoders.encode_sync("llava-hf", "image_url", payload, MediaLimits())

    threads = [threading.Thread(target=first_request, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert encoders.builds == 1 and encoders.stats()["loaded"] == ["llava-hf"]
    assert all(torch.equal(r, results[0]) for r in results) and results[0].dim() == 2
    # the component's files: one folder, whole, no temporary left behind
    folders = [p.name for p in tmp_path.iterdir()]
    assert len(folders) == 1 and folders[0].startswith("llava-hf-"), folders
    assert (tmp_path / folders[0] / "component.safetensors").is_file()


def test_a_refused_payload_is_answered_as_an_api_error(merged_store, tmp_path):
    encoders = MediaEncoders(str(merged_store), cache_dir=str(tmp_path))
    refusal = asyncio.run(encoders.encode("llava-hf", "image_url", b"not a png", MediaLimits()))
    assert isinstance(refusal, ApiError) and refusal.status == 400 and "not a readable PNG" in refusal.message
    rows = asyncio.run(encoders.encode("llava-hf", "image_url", png(1), MediaLimits()))
    assert isinstance(rows, torch.Tensor)
