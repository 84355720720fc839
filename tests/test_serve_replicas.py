"""Two LLM engine replicas behind one endpoint, and the endpoint's per-model metrics.

Real Serve on loopback (``serve_helpers``), two ``LLMEngine`` replicas whose slot budget holds one
model each. Requests for one model keep landing on one replica and another model's on the other
(Serve's model multiplexing, ``serve.deployment``), every answer equal to the in-process server's;
``/v1/models`` says where each model runs; Ray's Prometheus export carries the per-model metrics
(``serve.metrics``) and answers a scrape while the replicas switch versions.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import Counter

import httpx
import openai
import pytest
import torch
from ray_helpers import free_port
from serve_helpers import (
    TOKEN,
    app_args,
    build_store,
    chat_events,
    in_process_server,
    serve_app,
    wait_for,
)

from mmer_dist.demo import tiny_models
from mmer_dist.merge.incremental import add_model
from mmer_dist.merge.local import LocalBackend
from mmer_dist.model.engine import LocalPipeline
from mmer_dist.store.store import Store
from mmer_dist.store.weights import VersionWeights

pytestmark = pytest.mark.slow
A, B = "vision", "audio"  # two retention models that answer text alone
ASK = [{"role": "user", "content": "what is this ?"}]


def slot_bytes(store: str) -> int:
    """One model's dense weights on a one-stage float32 pipeline, as the replicas compute it."""
    pipeline = LocalPipeline.build(VersionWeights(Store.open(store), None), 1, dtype=torch.float32)
    return pipeline.stages[0].slot_bytes


def references(store: str) -> dict[str, str]:
    """Each model's greedy answer from the endpoint's server code in this process."""
    server = in_process_server(store)
    server.versions.switch_to(server.versions.load(None))
    try:
        out = {}
        for m in (A, B):
            events = asyncio.run(chat_events(server, {"model": m, "messages": ASK, "temperature": 0, "max_tokens": 6}))
            out[m] = "".join(e["text"] for e in events if e["type"] == "token")
        return out
    finally:
        server.shutdown()


def replica_stats() -> dict[str, dict]:
    """Each LLM replica's stats, by replica id (Serve picks a replica per call: ask until both answered)."""
    from ray import serve

    handle = serve.get_deployment_handle("LLMEngine", app_name="app0")
    seen: dict[str, dict] = {}
    for _ in range(200):
        stats = handle.stats.remote().result(timeout_s=60)
        seen[stats["replica"]] = stats
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only replicas {sorted(seen)} answered")


def requests_by_replica(stats: dict[str, dict]) -> dict[str, Counter]:
    return {r: Counter({m: c["requests"] for m, c in s["engine"]["models"].items()}) for r, s in stats.items()}


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of metric ``name`` in a Prometheus text page."""
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            out.append((dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return out


def test_replicas_take_distinct_models_and_the_metrics_say_so(tmp_path, monkeypatch):
    store, _ = build_store(tmp_path)
    want = references(store)
    budget = slot_bytes(store) * 3 // 2  # one model's dense slot per replica
    monkeypatch.setenv("RAY_metrics_report_interval_ms", "500")
    metrics_port = free_port()
    ray_init = {"address": "local", "num_cpus": 8, "include_dashboard": False, "_metrics_export_port": metrics_port}
    args = app_args(store, replicas=2, slot_budget=budget, metrics_interval_s=0.5, follow_interval_s=0.5)
    with serve_app({"/": args}, port=free_port(), ray_init=ray_init) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=120)
        headers = {"Authorization": f"Bearer {TOKEN}"}

        def ask(model: str) -> str:
            answer = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=6)
            assert answer.choices[0].message.content == want[model], model
            return answer.system_fingerprint

        stats = replica_stats()
        assert {s["max_models_held"] for s in stats.values()} == {1}  # sized from the slot capacity
        assert len({s["pid"] for s in stats.values()}) == 2

        # the first request for each model picks a replica holding no model; Serve learns which
        def settled() -> bool:
            ask(A)
            ask(B)
            held = sorted(tuple(s["models_held"]) for s in replica_stats().values())
            return held == [(B,), (A,)] or held == [(A,), (B,)]
        wait_for(settled, what="each replica to hold one of the two models")

        # from now on: A's requests on A's replica, B's on the other, every answer exact
        before = replica_stats()
        home = {s["models_held"][0]: r for r, s in before.items()}
        for _ in range(3):
            ask(A)
            ask(B)
        after = replica_stats()
        for r in after:
            grew = requests_by_replica(after)[r] - requests_by_replica(before)[r]
            mine = next(m for m, rr in home.items() if rr == r)
            assert grew == Counter({mine: 3}), (r, grew)

        # a model outside the served version: a 404 naming it, held by no replica
        r = httpx.post(f"{url}/v1/chat/completions", headers=headers, json={"model": "nope", "messages": ASK})
        assert r.status_code == 404 and "'nope'" in r.json()["error"]["message"]

        # /v1/models: each model's residency on the replica that answered; A gets its slot on its replica
        def a_has_its_slot() -> bool:
            ask(A)  # a finished slot build is installed between steps
            listing = httpx.get(f"{url}/v1/models", headers=headers).json()["data"]
            where = {m["id"]: m["mmer"].get("residency") for m in listing}
            assert where["merged"] is None and {w["replica"] for m, w in where.items() if m != "merged"} <= set(home.values())
            assert {w["path"] for m, w in where.items() if m != "merged"} <= {"slot", "building", "mask-native"}
            return where[A]["replica"] == home[A] and where[A]["path"] == "slot"
        wait_for(a_has_its_slot, what=f"/v1/models to show {A} in a slot on its replica")

        # Ray's Prometheus export: per model and path, each model's requests on its own replica
        def scrape() -> str:
            return httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text

        def exported() -> bool:
            text = scrape()
            counted = {m: sum(v for lab, v in samples(text, "ray_mmer_requests_total") if lab["model"] == m)
                       for m in (A, B)}
            admitted = {m: sum(s["engine"]["models"].get(m, {}).get("requests", 0) for s in replica_stats().values())
                        for m in (A, B)}
            resident = any(lab["model"] == A and lab["path"] == "slot" and v == 1
                           for lab, v in samples(text, "ray_mmer_model_residency"))
            return counted == admitted and resident
        wait_for(exported, what="the metrics of every request so far")
        text = scrape()
        for m in (A, B):
            replicas = {lab["replica"] for lab, _ in samples(text, "ray_mmer_requests_total") if lab["model"] == m}
            assert len(replicas) == 1, (m, replicas)
            assert {lab["path"] for lab, _ in samples(text, "ray_mmer_requests_total") if lab["model"] == m} <= \
                {"slot", "mask-native"}
            for name in ("ray_mmer_prompt_tokens_total", "ray_mmer_completion_tokens_total",
                         "ray_mmer_time_to_first_token_seconds_count", "ray_mmer_inter_token_latency_seconds_count"):
                assert sum(v for lab, v in samples(text, name) if lab["model"] == m) > 0, (name, m)
        assert sum(v for lab, v in samples(text, "ray_mmer_slot_builds_total") if lab["model"] == A) >= 1
        assert sum(v for lab, v in samples(text, "ray_mmer_slot_build_seconds_total") if lab["model"] == A) > 0

        # a version switch (a model added) while a scraper keeps asking: every scrape answers
        answers, stop = [], threading.Event()

        def scraper():
            while not stop.is_set():
                answers.append(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).status_code)
                time.sleep(0.1)
        thread = threading.Thread(target=scraper)
        thread.start()
        try:
            newcomer = tiny_models.save_finetuned(tmp_path / "checkpoints" / "base", tmp_path / "checkpoints" / "v2",
                                                  "llava-hf", dtype=torch.bfloat16, seed=45)
            add_model(store, "vision2", str(newcomer), "image", LocalBackend(), progress=False)
            wait_for(lambda: {s["version"] for s in replica_stats().values()} == {2}, what="both replicas on v2")
        finally:
            stop.set()
            thread.join()
        assert answers and set(answers) == {200}
        assert ask(A) == "mmer-v2"
