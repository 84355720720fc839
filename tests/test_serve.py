"""The endpoint as users reach it: real Ray Serve on loopback, real HTTP, the official ``openai``
client, three tiny multimodal models in a merged store (``serve_helpers``).

References: retention answers must equal plain transformers ``generate`` on ``mmer export
model`` with the model's own processor and chat template; expansion answers must equal the same
server code run in-process (``LLMServer`` over a ``LocalPipeline``) on the same request.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import re
import select
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from ray_helpers import free_port
from serve_helpers import (TOKEN, ReplicaLogs, app_args, build_store, chat_events, image, in_process_chat,
                           in_process_server, replica_process, serve_app, tone, video)

from mmer_dist.demo import tiny_models
from mmer_dist.media import parts as media_parts
from serve.errors import ApiError

pytestmark = pytest.mark.slow
ASK = {"type": "text", "text": "what is this ?"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    store, exports = build_store(root)
    long_answers = {**app_args(store)["limits"], "max_completion_tokens": 200}  # a stream to cut short
    apps = {"/": app_args(store, limits=long_answers),
            "/tight": app_args(store, max_ongoing_requests=1, max_queued_requests=1, retry_after_s=2)}
    with serve_app(apps, port=free_port()) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=120)
        yield type("Served", (), {"url": url, "store": store, "exports": exports, "client": client})


def chat(served, model, content, **kw):
    kw = {"temperature": 0, "max_tokens": 8, **kw}
    return served.client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def hf_generate(export_dir, content, n_tokens):
    """Plain transformers on the export: the model's own processor and template, greedy."""
    from transformers import AutoConfig, LlavaForConditionalGeneration, VideoLlavaForConditionalGeneration

    from mmer_dist.media import adapters
    from mmer_dist.media.processor import load_processor

    cls = {"llava": LlavaForConditionalGeneration, "video_llava": VideoLlavaForConditionalGeneration}[
        AutoConfig.from_pretrained(export_dir).model_type]
    model = cls.from_pretrained(export_dir, dtype=torch.float32).eval()
    processor = load_processor(export_dir)
    items, images, videos = [], [], []
    for part in content:
        if part["type"] == "text":
            items.append({"type": "text", "text": part["text"]})
            continue
        raw = media_parts.decode_part(part)
        if part["type"] == "video_url":
            items.append({"type": "video"})
            videos.append(raw)
        else:
            adapter = adapters.load_adapter(export_dir)
            images.append(adapter(raw) if adapter else raw)
            items.append({"type": "image"})
    prompt = processor.tokenizer.apply_chat_template([{"role": "user", "content": items}], tokenize=False,
                                                     add_generation_prompt=True)
    inputs = processor(text=prompt, images=images or None, videos=videos or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    new = out.sequences[0, inputs["input_ids"].shape[1]:]
    logprobs = [float(torch.log_softmax(s[0], -1)[t]) for s, t in zip(out.logits, new)]
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    keep = len(new) if not (eos & set(new.tolist())) else new.tolist().index(next(iter(eos & set(new.tolist()))))
    return processor.tokenizer.decode(new[:keep], skip_special_tokens=True), logprobs[:keep]


@pytest.mark.parametrize("model, part", [("vision", lambda: media_parts.image_part(image(1))),
                                         ("video", lambda: media_parts.video_part(video(2))),
                                         ("audio", lambda: media_parts.audio_part(*tone(660)))])
def test_retention_equals_transformers_on_the_export(served, model, part):
    content = [part(), ASK]
    answer = chat(served, model, content, logprobs=True, max_tokens=10)
    want_text, want_logprobs = hf_generate(served.exports[model], content, 10)
    assert answer.choices[0].message.content == want_text
    got = [t.logprob for t in answer.choices[0].logprobs.content]
    assert len(got) == len(want_logprobs)
    assert max(abs(a - b) for a, b in zip(got, want_logprobs)) < 1e-4
    assert answer.usage.completion_tokens >= len(got) and answer.usage.prompt_tokens > 4


def test_expansion_equals_the_server_in_process(served):
    content = [{"type": "text", "text": "look"}, media_parts.image_part(image(3)), {"type": "text", "text": "and"},
               media_parts.audio_part(*tone(300)), ASK]
    request = {"model": "merged", "messages": [{"role": "user", "content": content}], "temperature": 0,
               "max_tokens": 8, "logprobs": True}
    events = in_process_chat(served.store, request)
    want = "".join(e["text"] for e in events if e["type"] == "token")
    answer = served.client.chat.completions.create(**request)
    assert answer.choices[0].message.content == want
    want_lp = [e["logprob"]["logprob"] for e in events if e["type"] == "token" and "logprob" in e]
    assert [round(t.logprob, 4) for t in answer.choices[0].logprobs.content] == [round(x, 4) for x in want_lp]


def test_text_policy_per_request(served):
    content = [media_parts.image_part(image(4)), ASK]
    base = chat(served, "merged", content, logprobs=True)
    same = chat(served, "merged", content, logprobs=True, extra_body={"text_policy": "request-modality"})
    alone = chat(served, "vision", content, logprobs=True)
    # one model's media under request-modality: every token through theta_hat of that model, so on
    # the same prompt tokens (the tiny models share the base's template) it is that model alone
    lp = lambda answer: [t.logprob for t in answer.choices[0].logprobs.content]  # noqa: E731
    assert same.usage.prompt_tokens == alone.usage.prompt_tokens
    assert lp(same) == lp(alone) and same.choices[0].message.content == alone.choices[0].message.content
    assert lp(same) != lp(base)  # the mean mask's text weights answer otherwise
    with pytest.raises(openai.BadRequestError, match="text_policy"):
        chat(served, "merged", content, extra_body={"text_policy": "nonsense"})


def test_retention_takes_what_the_models_processor_takes(served, tmp_path):
    """A model labelled audio whose checkpoint has an image processor and no audio adapter takes
    images alone (as transformers does on its export), and no audio; the error names what it takes.
    Added to the served store unpromoted: the endpoint keeps serving version 1."""
    from mmer_dist.export import export_model
    from mmer_dist.merge.incremental import add_model
    from mmer_dist.merge.local import LocalBackend

    checkpoint = tiny_models.save_finetuned(Path(served.store).parent / "checkpoints" / "base", tmp_path / "listener",
                                            "llava-hf", dtype=torch.bfloat16, seed=51)
    version = add_model(served.store, "listener", str(checkpoint), "audio", LocalBackend(), progress=False,
                        promote=False).record.version
    content = [media_parts.image_part(image(8)), ASK]
    request = {"model": "listener", "messages": [{"role": "user", "content": content}], "temperature": 0,
               "max_tokens": 6, "logprobs": True}
    server = in_process_server(served.store)
    server.versions.switch_to(server.versions.load(version))
    try:
        events = asyncio.run(chat_events(server, request))
        with pytest.raises(ApiError, match=r"model 'listener' takes image_url parts, not input_audio"):
            asyncio.run(chat_events(server, {**request, "messages": [
                {"role": "user", "content": [media_parts.audio_part(*tone()), ASK]}]}))
    finally:
        server.shutdown()
    want_text, want_lp = hf_generate(export_model(served.store, "listener", tmp_path / "export", version=version,
                                                  progress=False), content, 6)
    assert "".join(e["text"] for e in events if e["type"] == "token") == want_text
    got = [e["logprob"]["logprob"] for e in events if e["type"] == "token" and "logprob" in e]
    assert len(got) == len(want_lp) and max(abs(a - b) for a, b in zip(got, want_lp)) < 1e-4
    assert httpx.get(f"{served.url}/readyz").json()["status"] == "serving v1"


def test_streaming_returns_what_non_streaming_does(served):
    content = [media_parts.image_part(image(5)), ASK]
    whole = chat(served, "vision", content, max_tokens=12)
    stream = chat(served, "vision", content, max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_concurrent_requests_each_get_what_they_get_alone(served):
    requests = [("vision", [media_parts.image_part(image(i)), ASK]) for i in range(3)]
    requests += [("audio", [media_parts.audio_part(*tone(200 + 100 * i)), ASK]) for i in range(2)]
    requests += [("merged", [media_parts.image_part(image(7)), media_parts.audio_part(*tone(500)), ASK])]
    requests += [("video", [media_parts.video_part(video(9)), ASK]), ("merged", [ASK])]
    alone = [chat(served, m, c).choices[0].message.content for m, c in requests]
    results = [None] * len(requests)

    def worker(i):
        results[i] = chat(served, *requests[i]).choices[0].message.content

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


def test_models_health_and_auth(served):
    listed = {m.id for m in served.client.models.list().data}
    assert listed == {"merged", "vision", "video", "audio"}
    assert httpx.get(f"{served.url}/healthz").status_code == 200
    assert httpx.get(f"{served.url}/readyz").json()["status"] == "serving v1"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + TOKEN}):
        r = httpx.post(f"{served.url}/v1/chat/completions", headers=headers,
                       json={"model": "merged", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (a decompression bomb's first bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _riff_wave_of_noise() -> bytes:
    """A valid RIFF/WAVE header, then random bytes (stdlib wave raised a bare RuntimeError on it)."""
    return b"RIFF" + struct.pack("<I", 1000) + b"WAVE" + np.random.default_rng(0).integers(0, 256, 64, np.uint8).tobytes()


BAD = [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "merged"}, 400, "messages"),
    ({"model": "merged", "messages": "hi"}, 400, "messages"),
    ({"model": "../../x", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ({"model": "merged", "messages": [{"role": "user", "content": [{"type": "hologram"}]}]}, 400, "hologram"),
    ({"model": "vision", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, "not a readable png"),
    ({"model": "merged", "messages": [{"role": "user", "content": [  # through the engine to the encoders
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, ASK]}]}, 400, "not a readable png"),
    ({"model": "vision", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]}, 400, "base64"),
    ({"model": "vision", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, 400, "remote"),
    ({"model": "vision", "messages": [{"role": "user", "content": [
        media_parts.image_part(image(0).repeat(16, 0).repeat(16, 1))]}]}, 400, "pixels"),
    ({"model": "vision", "messages": [{"role": "user", "content": [media_parts.audio_part(*tone())]}]}, 400,
     "takes image_url parts"),
    ({"model": "merged", "messages": [{"role": "user", "content": [
        {**media_parts.image_part(image(0)), "model": "audio"}]}]}, 400, "candidates"),
    ({"model": "merged", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "merged", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400, "limit"),
    ({"model": "merged", "messages": [{"role": "user", "content": "hi " * 300}]}, 400, "context"),
    ({"model": "merged", "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n=3"),
    ({"model": "merged", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "merged", "messages": [{"role": "user", "content": [{"type": "point_cloud", "point_cloud": "zz"}]}]},
     400, "messages.0.content.0.point_cloud"),
    (b"x" * (5 << 20), 413, "body"),
    # hostile input: each once a 500
    (b'{"model": "merged", "messages": ' + b"[" * 990 + b"]" * 990 + b"}", 400, "nests deeper"),
    ({"model": "merged", "messages": [{"role": "user", "content": "\ud800 hi"}]}, 400, "lone UTF-16 surrogate"),
    ({"model": "vision", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(_png_header(20_000, 20_000))}}]}]},
     400, "more pixels than the limit"),
    ({"model": "audio", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": _b64(_riff_wave_of_noise())}}]}]}, 400, "not a readable pcm wav"),
    ({"model": "merged", "messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, 400, "temperature"),
    ({"model": "merged", "messages": [{"role": "user", "content": "hi"}], "seed": 1 << 70}, 400, "seed"),
]


def _post_all(served, bodies, headers) -> list[httpx.Response]:
    with httpx.Client(timeout=60) as http:
        return [http.post(f"{served.url}/v1/chat/completions", headers=headers,
                          content=body if isinstance(body, bytes) else json.dumps(body).encode()) for body in bodies]


def test_a_burst_of_bad_requests_leaves_the_server_answering_exactly(served):
    content = [media_parts.image_part(image(6)), ASK]
    before = chat(served, "vision", content, logprobs=True)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    logs = ReplicaLogs("app0")
    for (body, status, words), r in zip(BAD, _post_all(served, [b for b, _, _ in BAD], headers)):
        assert r.status_code == status, (body if isinstance(body, dict) else body[:40], r.text[:300])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and words.lower() in err["message"].lower(), err
        # one line, no internals: no traceback, Ray task names, Python object reprs or pydantic type labels
        assert not any(w in err["message"] for w in ("Traceback", "ray::", "object at 0x", "tagged-union")), err
    written = logs.new()
    assert "Traceback" not in written, written[written.index("Traceback") - 2000:][:4000]
    assert len(re.findall(r"-> 4\d\d ", written)) == len(BAD)  # one line each, in the ingress's log
    after = chat(served, "vision", content, logprobs=True)
    assert after.choices[0].message.content == before.choices[0].message.content
    assert [t.logprob for t in after.choices[0].logprobs.content] == [t.logprob for t in before.choices[0].logprobs.content]


def test_the_ingress_memory_stays_flat_over_a_thousand_bad_requests(served):
    bodies = [json.dumps(b).encode() if isinstance(b, dict) else b for b, _, _ in BAD]
    bodies = [b for b in bodies if len(b) < (1 << 20)]  # not 1,000 uploads of the 5 MiB body
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    ingress = replica_process("app0", "OpenAIIngress")
    _post_all(served, bodies * 8, headers)  # warm: every path through the code has run
    rss = [ingress.memory_info().rss]
    for _ in range(4):
        rounds = [bodies[i % len(bodies)] for i in range(250)]
        assert {r.status_code for r in _post_all(served, rounds, headers)} <= {400, 404}
        rss.append(ingress.memory_info().rss)
    mib = [round(x / 2**20) for x in rss]
    assert rss[-1] - rss[0] < 16 * 2**20, f"the ingress grew over 1,000 bad requests: {mib} MiB"


def _engine_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("LLMEngine", app_name="app0").stats.remote().result(timeout_s=60)["engine"]


def test_a_client_that_disconnects_mid_stream_stops_its_request(served):
    before = _engine_stats()["finished"]
    body = {"model": "merged", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True,
            "temperature": 0}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{served.url}/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
    deadline = time.time() + 60  # bounds a hang only
    while _engine_stats()["finished"].get("abort", 0) == before.get("abort", 0) and time.time() < deadline:
        time.sleep(0.2)
    stats = _engine_stats()
    # aborted, not run to its 200 tokens (nor stopped by a stop token): the engine stopped it early
    assert stats["finished"].get("abort", 0) == before.get("abort", 0) + 1
    assert {k: v for k, v in stats["finished"].items() if k != "abort"} == \
        {k: v for k, v in before.items() if k != "abort"}
    assert sum(s["requests"] for s in stats["stages"]) == 0  # and its KV caches are gone


def _stalled_request(url: str, path: str) -> socket.socket:
    """A request whose headers are sent and whose body never comes: it holds its place in the ingress."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    sock = socket.create_connection((host, port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode())
    return sock


def test_overload_is_a_429_with_retry_after_and_the_openai_body(served):
    # /tight: one request in flight, one queued. Requests that never finish their body take those
    # places for good, so one of the next is refused, however slow the machine: no timing luck
    sockets, refused = [], None
    try:
        while refused is None and len(sockets) < 20:
            sockets.append(_stalled_request(served.url, "/tight/v1/chat/completions"))
            if select.select([sockets[-1]], [], [], 3.0)[0]:  # answered at once: refused
                refused = http.client.HTTPResponse(sockets[-1])
                refused.begin()
        assert refused is not None and len(sockets) >= 3, "the ingress never refused a request"
        assert refused.status == 429 and refused.getheader("retry-after") == "2"
        err = json.loads(refused.read())["error"]
        assert err["type"] == "rate_limit_error" and "busy" in err["message"]
    finally:
        for sock in sockets:
            sock.close()
    # the places held by the gone clients are free again
    body = {"model": "merged", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(f"{served.url}/tight/v1/chat/completions", json=body, timeout=120,
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
