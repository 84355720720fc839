"""A live endpoint across versions: ``mmer add``, ``mmer rollback`` and a version that does not
load, while clients keep asking.

Real Serve on loopback with the official ``openai`` client; eight clients send requests all the
while, and none may fail. The endpoint follows the store's serving pointer: after the add it
lists and answers the new model (as plain transformers does on its export), after the rollback
the old models answer exactly as before the add; a promoted version whose load fails leaves the
old one serving and says why in /readyz until the store is fixed. A request admitted on one
version gets every token from that version (pinned at admission; checked in-process,
deterministically). How fast a promoted version is served is bench/serve_ops.py's to measure.
"""

from __future__ import annotations

import asyncio
import threading
import time

from pathlib import Path

import httpx
import openai
import pytest
import torch
from ray_helpers import free_port
from serve_helpers import (TOKEN, app_args, build_store, chat_events, image, in_process_server, serve_app, tone,
                           wait_for)
from test_serve import ASK, hf_generate

from mmer_dist.demo import tiny_models
from mmer_dist.export import export_model
from mmer_dist.media import parts as media_parts
from mmer_dist.merge.incremental import add_model
from mmer_dist.merge.local import LocalBackend
from mmer_dist.store import layout
from mmer_dist.store.serving import promote, rollback
from serve.protocol import ChatCompletionRequest

pytestmark = pytest.mark.slow


class Clients:
    """``n`` clients asking ``probes`` in turn until stopped; each answer's version (its
    system_fingerprint) and time are kept, and every failure."""

    def __init__(self, ask, probes: dict, n: int):
        self.answered, self.failures, self._stop = [], [], threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(ask, list(probes.items()), i)) for i in range(n)]
        for t in self._threads:
            t.start()

    def _run(self, ask, probes, i) -> None:
        while not self._stop.is_set():
            model, content = probes[i % len(probes)]
            start = time.time()
            try:
                self.answered.append((start, ask(model, content)[1]))
            except Exception as e:  # noqa: BLE001 - any failure is what the test counts
                self.failures.append(repr(e))
            i += 1

    def answered_from(self, version: int, since: float) -> bool:
        return any(fp == f"mmer-v{version}" and t >= since for t, fp in self.answered)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def test_versions_follow_the_store_under_load_without_a_failed_request(tmp_path):
    """Eight clients all the while: an add (served as plain transformers serves its export), a
    rollback (the old answers again), and a promoted version that does not load (its component
    files gone): the old one keeps serving, /readyz says why, and the fixed store is picked up."""
    store, _ = build_store(tmp_path)
    base = tmp_path / "checkpoints" / "base"
    newcomers = {m: tiny_models.save_finetuned(base, tmp_path / "checkpoints" / m, "llava-hf", dtype=torch.bfloat16,
                                               seed=seed) for m, seed in (("vision2", 41), ("vision3", 43))}
    with serve_app({"/": app_args(store, follow_interval_s=0.5)}, port=free_port()) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=120)

        def ask(model, content):
            r = client.chat.completions.create(model=model, temperature=0, max_tokens=6,
                                               messages=[{"role": "user", "content": content}])
            return r.choices[0].message.content, r.system_fingerprint

        def ready() -> tuple[int, str]:
            r = httpx.get(f"{url}/readyz", timeout=30)
            return r.status_code, r.json()["status"]

        probes = {"vision": [media_parts.image_part(image(1)), ASK], "audio": [media_parts.audio_part(*tone(500)), ASK],
                  "merged": [media_parts.image_part(image(2)), media_parts.audio_part(*tone(300)), ASK]}
        before = {m: ask(m, c) for m, c in probes.items()}
        assert {fp for _, fp in before.values()} == {"mmer-v1"}
        clients = Clients(ask, probes, 8)
        try:
            add_model(store, "vision2", str(newcomers["vision2"]), "image", LocalBackend(), task="second-look",
                      progress=False)
            added = time.time()
            wait_for(lambda: clients.answered_from(2, added), what="the clients to be answered by version 2")
            assert "vision2" in {m.id for m in client.models.list().data}
            content = [media_parts.image_part(image(5)), ASK]
            reply = client.chat.completions.create(model="vision2", temperature=0, max_tokens=8, logprobs=True,
                                                   messages=[{"role": "user", "content": content}])
            exported = export_model(store, "vision2", tmp_path / "export-vision2", progress=False)
            want_text, want_lp = hf_generate(exported, content, 8)
            assert reply.choices[0].message.content == want_text and reply.system_fingerprint == "mmer-v2"
            assert max(abs(t.logprob - w) for t, w in zip(reply.choices[0].logprobs.content, want_lp)) < 1e-4

            rollback(store)
            rolled = time.time()
            wait_for(lambda: clients.answered_from(1, rolled), what="the clients to be answered by version 1 again")
            with pytest.raises(openai.NotFoundError, match="vision2"):  # a model the served version lacks
                ask("vision2", content)
            after = {m: ask(m, c) for m, c in probes.items()}

            broken = add_model(store, "vision3", str(newcomers["vision3"]), "image", LocalBackend(), task="third-look",
                               progress=False, promote=False).record.version
            files = Path(store) / layout.model_component("vision3") / "files"
            away = files.rename(files.with_name("files.away"))
            promote(store, broken)
            wait_for(lambda: "does not load" in ready()[1], what="/readyz to say why version 3 is not served")
            status, why = ready()
            assert status == 200 and why.startswith(f"degraded: version {broken} does not load: ") \
                and "missing" in why and why.endswith("; serving v1"), why
            assert ask("vision", probes["vision"])[1] == "mmer-v1"  # the old version keeps serving
            away.rename(files)  # fixed: picked up at the next try
            wait_for(lambda: ready() == (200, f"serving v{broken}"), what="the fixed version to be served")
            fixed = time.time()
            wait_for(lambda: clients.answered_from(broken, fixed), what="the clients to be answered by version 3")
        finally:
            clients.stop()
    assert not clients.failures, clients.failures[:3]
    assert after == before  # version 1 again: the same weights, the same answers


def test_a_request_keeps_the_version_it_was_admitted_on(tmp_path):
    store, _ = build_store(tmp_path)
    newcomer = tiny_models.save_finetuned(tmp_path / "checkpoints" / "base", tmp_path / "checkpoints" / "vision2",
                                          "llava-hf", dtype=torch.bfloat16, seed=42)
    add_model(store, "vision2", str(newcomer), "image", LocalBackend(), progress=False, promote=False)
    server = in_process_server(store)
    request = {"model": "merged", "temperature": 0, "max_tokens": 12, "logprobs": True,
               "messages": [{"role": "user", "content": "hi"}]}

    versions = server.versions

    async def run():
        v1 = versions.load(1)
        versions.switch_to(v1)
        alone = await chat_events(server, request)
        stream = server.chat(ChatCompletionRequest.model_validate(request))
        first = [await stream.__anext__() for _ in range(3)]
        versions.switch_to(versions.load(2))  # a promote, seen by the follower: new requests go to 2
        rest = [e async for e in stream]
        newer = await chat_events(server, request)
        return alone, first + rest, newer, v1

    try:
        alone, pinned, newer, v1 = asyncio.run(run())
        assert pinned[0]["version"] == 1 and newer[0]["version"] == 2
        strip = lambda events: [(e.get("text"), e.get("logprob", {}).get("logprob")) for e in events[1:]]  # noqa: E731
        assert strip(pinned) == strip(alone)  # every token of the admitted request from version 1
        assert v1.engine.alive is False  # dropped after its last request
    finally:
        server.shutdown()
