"""Processes die under load and the endpoint recovers: real Serve on loopback, real HTTP, four
clients asking all the while, a process killed with SIGKILL in the middle of their requests.

For a stage actor (of ``--stages 2``), the LLM engine replica and the encoder replica: every
request in flight ends with a 503 in the OpenAI error body (a stream with an error event, then
``[DONE]``), none runs past its deadline (``request_timeout_s``), and the endpoint answers again,
the same answers as before the kill (how soon is ``bench/serve_ops.py``'s to measure: a speed
target, not a test's). One application for all three kills.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
from ray_helpers import free_port
from serve_helpers import TOKEN, app_args, build_store, image, serve_app, wait_for

from mmer_dist.media import parts as media_parts

pytestmark = pytest.mark.slow
REQUEST_TIMEOUT_S = 60
RECOVERY_BOUND_S = 300  # bounds a hang only: how fast it recovers is bench/serve_ops.py's (target 30 s)
ASK = {"type": "text", "text": "what is this ?"}
PROBES = {  # one request per path: text only, through the encoders, expansion through both
    "merged-text": {"model": "merged", "messages": [{"role": "user", "content": "hi"}]},
    "vision": {"model": "vision", "messages": [{"role": "user", "content": [media_parts.image_part(image(1)), ASK]}]},
    "merged-image": {"model": "merged", "messages": [{"role": "user", "content": [media_parts.image_part(image(2)),
                                                                                   ASK]}]},
}


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    store, _ = build_store(tmp_path_factory.mktemp("faults"))
    args = app_args(store, stages=2, follow_interval_s=0.5, request_timeout_s=REQUEST_TIMEOUT_S)
    with serve_app({"/": args}, port=free_port()) as url:
        before = {name: ask(url, body) for name, body in PROBES.items()}
        assert all(status == 200 for status, _ in before.values()), before
        yield url, before


def ask(url: str, body: dict, stream: bool = False) -> tuple[int, str]:
    """(status, answer text) of one greedy request; a stream that ends in an error event gives
    that error's status (503 for service_unavailable) and message."""
    body = {**body, "temperature": 0, "max_tokens": 12, "stream": stream}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(timeout=REQUEST_TIMEOUT_S + 30) as http:
        if not stream:
            r = http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            if r.status_code != 200:
                return r.status_code, _error(r.json())
            return 200, r.json()["choices"][0]["message"]["content"]
        text, lines = [], []
        with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                return r.status_code, _error(json.loads(r.read()))
            lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]", lines[-3:]
        for line in lines[:-1]:
            event = json.loads(line)
            if "error" in event:
                assert line is lines[-2], "an error event is the stream's last"
                return {"service_unavailable": 503}.get(event["error"]["type"], 500), _error(event)
            if event["choices"]:
                text.append(event["choices"][0]["delta"].get("content") or "")
        return 200, "".join(text)


def _error(body: dict) -> str:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, body
    return f"{err['type']}: {err['message']}"


class Clients:
    """``n`` clients asking the probes in turn (every other request streamed) until stopped;
    every outcome is kept with its duration."""

    def __init__(self, url: str, n: int):
        self.url, self.outcomes, self._stop = url, [], threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        names = list(PROBES)
        k = i
        while not self._stop.is_set():
            name, stream = names[k % len(names)], k % 2 == 0
            start = time.time()
            status, text = ask(self.url, PROBES[name], stream)
            self.outcomes.append((name, status, text, start, time.time() - start))
            k += 1

    def answered_since(self, t: float) -> int:
        return sum(1 for _, status, _, start, _ in self.outcomes if status == 200 and start >= t)

    def stop(self) -> list:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=REQUEST_TIMEOUT_S + 60)
        assert not any(t.is_alive() for t in self._threads), "a client hangs"
        return self.outcomes


def victim_pid(victim: str) -> int:
    from ray import serve

    if victim == "encoder replica":
        return serve.get_deployment_handle("MediaEncoders", app_name="app0").stats.remote().result(timeout_s=60)["pid"]
    stats = serve.get_deployment_handle("LLMEngine", app_name="app0").stats.remote().result(timeout_s=60)
    return stats["engine"]["stages"][1]["pid"] if victim == "stage actor" else stats["pid"]


@pytest.mark.parametrize("victim", ["stage actor", "engine replica", "encoder replica"])
def test_a_process_killed_under_load_fails_its_requests_with_503_and_the_endpoint_recovers(endpoint, victim):
    url, before = endpoint
    clients = Clients(url, 4)
    try:
        started = time.time()
        wait_for(lambda: clients.answered_since(started) >= 4, 120, "the clients to be answered")
        pid = victim_pid(victim)
        os.kill(pid, signal.SIGKILL)
        # recovered: the probe that needs the killed process answers as before the kill
        probe = "merged-text" if victim != "encoder replica" else "vision"
        recovered = wait_for(lambda: ask(url, PROBES[probe]) == before[probe], RECOVERY_BOUND_S, "the recovery")
        wait_for(lambda: clients.answered_since(recovered) >= 4, 120, "the clients to be answered again")
        assert {n: ask(url, PROBES[n]) for n in PROBES} == before
    finally:
        outcomes = clients.stop()
    assert victim_pid(victim) != pid
    failed = [(name, status, text) for name, status, text, start, _ in outcomes if status != 200]
    assert all(status == 503 for _, status, _ in failed), failed[:5]  # a 503 with the OpenAI body, or its event
    wrong = [(name, answer) for name, status, answer, *_ in outcomes
             if status == 200 and answer != before[name][1]]
    assert not wrong, (wrong[:3], before)
    assert max(took for *_, took in outcomes) < REQUEST_TIMEOUT_S + 15, "a request ran past its deadline"
