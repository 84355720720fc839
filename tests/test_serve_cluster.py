"""Two pipeline stages on a real two-node ``ray.cluster_utils.Cluster`` answer what one stage does.

Each node offers one ``llm_stage`` resource and each stage bundle asks for one, so the LLM
engine's placement group puts one stage actor on each node; hidden states cross between them by
Ray actor calls. The reference is the same server code in-process with one stage.
"""

from __future__ import annotations

import os

import openai
import pytest
from ray_helpers import free_port
from serve_helpers import RAY_ENV, TOKEN, app_args, build_store, image, in_process_chat, serve_app

from mmer_dist.media import parts as media_parts

pytestmark = pytest.mark.slow


def test_two_stages_on_two_nodes_equal_one_stage(tmp_path, monkeypatch):
    from ray import serve
    from ray.cluster_utils import Cluster

    for k, v in RAY_ENV.items():
        monkeypatch.setenv(k, v)
    store, _ = build_store(tmp_path)
    request = {"model": "merged", "temperature": 0, "max_tokens": 8, "logprobs": True, "messages": [
        {"role": "user", "content": [media_parts.image_part(image(11)), {"type": "text", "text": "what is this ?"}]}]}
    want = in_process_chat(store, request)
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=3, resources={"llm_stage": 1},
                                                                include_dashboard=False))
    try:
        cluster.add_node(num_cpus=2, resources={"llm_stage": 1})
        cluster.wait_for_nodes()
        args = app_args(store, stages=2, stage_resources={"llm_stage": 1})
        with serve_app({"/": args}, port=free_port(), ray_init={"address": cluster.address}) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=120)
            got = client.chat.completions.create(**request)
            stats = serve.get_deployment_handle("LLMEngine", app_name="app0").stats.remote().result(timeout_s=60)
    finally:
        cluster.shutdown()
    stages = stats["engine"]["stages"]
    assert [s["layers"] for s in stages] == [[0, 2], [2, 4]]
    assert len({s["node"] for s in stages}) == 2, "the two stages should run on different nodes"
    assert got.choices[0].message.content == "".join(e["text"] for e in want if e["type"] == "token")
    want_lp = [e["logprob"]["logprob"] for e in want if e["type"] == "token" and "logprob" in e]
    assert max(abs(t.logprob - w) for t, w in zip(got.choices[0].logprobs.content, want_lp)) < 1e-5
    assert os.environ.get("RAY_ADDRESS") is None
