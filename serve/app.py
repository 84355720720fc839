"""The only place that binds: ``build(args)`` is the Serve application (``serve.app:build``).

    OpenAIIngress --handle--> LLMEngine (LLMDeployment; a placement group: the replica + one bundle per stage)
                                  |-- StageActor x stages (Ray actor calls, never Serve hops)
                                  '--handle--> MediaEncoders (every model's modality component)
"""

from __future__ import annotations

from ray import serve
from ray.serve.config import BackpressureConfig

from serve.config import ServeOptions
from serve.encoders import MediaEncoders
from serve.deployment import LLMDeployment
from serve.ingress import OpenAIIngress
from serve.stage import stage_bundle

REPLICA_CPUS = 0.25  # the engine replica only schedules and tokenizes; the stages compute
INGRESS_HEADROOM = 16  # /readyz, /v1/models and 429 answers beside the admitted and queued chats
HEALTH_CHECK_PERIOD_S = 2.0  # a dead replica is found (and replaced) within this
VERSIONS_AT_ONCE = 2  # a switch runs the new version's requests beside the old one's last ones


def build(args: dict):
    options = ServeOptions.from_args(args)
    config = options.model_dump()
    queued = max(options.max_queued_requests, 0)
    encoders = serve.deployment(MediaEncoders, name="MediaEncoders", ray_actor_options={"num_cpus": 0.5},
                                max_ongoing_requests=32, health_check_period_s=HEALTH_CHECK_PERIOD_S,
                                ).bind(options.store)
    bundles = [{"CPU": REPLICA_CPUS}] + [stage_bundle(options) for _ in range(options.stages)]
    # "LLMEngine": the name operators' configs use (serve/config.yaml, k8s/rayservice.yaml)
    llm = serve.deployment(
        LLMDeployment, name="LLMEngine", num_replicas=options.replicas, ray_actor_options={"num_cpus": REPLICA_CPUS},
        placement_group_bundles=bundles, placement_group_strategy="PACK",
        max_ongoing_requests=options.max_running * VERSIONS_AT_ONCE + queued,
        health_check_period_s=HEALTH_CHECK_PERIOD_S, graceful_shutdown_timeout_s=30,
    ).bind(encoders, config)
    # the ingress queues and refuses (429, OpenAI's error body) itself (ingress.Gate); Serve's own
    # queue in front of it is the last resort, past what the gate lets in
    ingress = serve.deployment(
        serve.ingress()(OpenAIIngress), name="OpenAIIngress", ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=options.max_ongoing_requests + queued + INGRESS_HEADROOM,
        max_queued_requests=options.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=options.retry_after_s),
    ).bind(llm, config)
    return ingress
