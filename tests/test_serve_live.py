"""A live endpoint across versions: ``mmer add`` and ``mmer rollback`` while clients keep asking.

Real Serve on loopback with the official ``openai`` client; four clients send requests all the
while, and none may fail. The endpoint follows the store's serving pointer: after the add it
lists and answers the new model (as plain transformers does on its export), after the rollback
the old models answer exactly as before the add, and a request admitted on one version gets
every token from that version (pinned at admission; checked in-process, deterministically).
"""

from __future__ import annotations

import asyncio
import threading
import time

import openai
import pytest
import torch
from ray_helpers import free_port
from serve_helpers import TOKEN, app_args, build_store, chat_events, image, in_process_server, serve_app, tone
from test_serve import ASK, hf_generate

from mmer_dist.demo import tiny_models
from mmer_dist.export import export_model
from mmer_dist.media import parts as media_parts
from mmer_dist.merge.incremental import add_model
from mmer_dist.merge.local import LocalBackend
from mmer_dist.store.serving import rollback
from serve.protocol import ChatCompletionRequest

pytestmark = pytest.mark.slow


def wait_for(predicate, timeout=120.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return time.time()
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_add_and_rollback_under_load_without_a_failed_request(tmp_path):
    store, _ = build_store(tmp_path)
    newcomer = tiny_models.save_finetuned(tmp_path / "checkpoints" / "base", tmp_path / "checkpoints" / "vision2",
                                          "llava-hf", dtype=torch.bfloat16, seed=41)
    with serve_app({"/": app_args(store, follow_interval_s=0.5)}, port=free_port()) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=120)

        def ask(model, content):
            r = client.chat.completions.create(model=model, temperature=0, max_tokens=6,
                                               messages=[{"role": "user", "content": content}])
            return r.choices[0].message.content, r.system_fingerprint

        probes = {"vision": [media_parts.image_part(image(1)), ASK], "audio": [media_parts.audio_part(*tone(500)), ASK],
                  "merged": [media_parts.image_part(image(2)), media_parts.audio_part(*tone(300)), ASK]}
        before = {m: ask(m, c) for m, c in probes.items()}
        assert {fp for _, fp in before.values()} == {"mmer-v1"}
        failures, answered, stop = [], [], threading.Event()

        def load(i):
            model, content = list(probes.items())[i % len(probes)]
            while not stop.is_set():
                try:
                    answered.append(ask(model, content)[1])
                except Exception as e:  # noqa: BLE001 - any failure is what the test counts
                    failures.append(repr(e))

        clients = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for t in clients:
            t.start()
        try:
            add_model(store, "vision2", str(newcomer), "image", LocalBackend(), task="second-look", progress=False)
            added = time.time()
            switched = wait_for(lambda: "vision2" in {m.id for m in client.models.list().data}, what="the add")
            content = [media_parts.image_part(image(5)), ASK]
            reply = client.chat.completions.create(model="vision2", temperature=0, max_tokens=8, logprobs=True,
                                                   messages=[{"role": "user", "content": content}])
            exported = export_model(store, "vision2", tmp_path / "export-vision2", progress=False)
            want_text, want_lp = hf_generate(exported, content, 8)
            assert reply.choices[0].message.content == want_text and reply.system_fingerprint == "mmer-v2"
            assert max(abs(t.logprob - w) for t, w in zip(reply.choices[0].logprobs.content, want_lp)) < 1e-4
            rollback(store)
            wait_for(lambda: "vision2" not in {m.id for m in client.models.list().data}, what="the rollback")
            with pytest.raises(openai.NotFoundError, match="vision2"):  # a model the served version lacks
                ask("vision2", content)
            time.sleep(1.0)
        finally:
            stop.set()
            for t in clients:
                t.join()
        after = {m: ask(m, c) for m, c in probes.items()}
    assert not failures, failures[:3]
    assert {"mmer-v1", "mmer-v2"} <= set(answered) and len(answered) > 8
    assert after == before  # version 1 again: the same weights, the same answers
    assert switched - added < 30


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
