"""``mmer serve``: the OpenAI-compatible endpoint over a store, on an embedded Ray, until Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading

from mmer_dist.errors import StoreError
from mmer_dist.model.policies import DEFAULT_TEXT_POLICY, TEXT_POLICIES


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a store version as one OpenAI-compatible multimodal endpoint",
                       description="Start an embedded Ray, deploy the Serve application (serve.app:build) over the "
                       "store and answer POST /v1/chat/completions until Ctrl-C or SIGTERM. Model 'merged' is "
                       "expansion mode (MMER's routed forward); each model id is retention mode (theta_hat_i).")
    p.add_argument("--store", required=True, help="store location: a local path or an fsspec URL")
    p.add_argument("--version", type=int, default=None, help="serve this version (default: the serving pointer, "
                   "else the latest) and stay on it")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--stages", type=int, default=1, help="pipeline stages (Ray actors, one per range of layers)")
    p.add_argument("--replicas", type=int, default=1, help="LLM engine replicas, each a whole pipeline with its own "
                   "dense slots; each model's requests go to the replica serving it, so replicas add distinct hot "
                   "models (default 1)")
    p.add_argument("--text-policy", choices=TEXT_POLICIES, default=DEFAULT_TEXT_POLICY,
                   help=f"default text policy of model 'merged' (default {DEFAULT_TEXT_POLICY})")
    p.add_argument("--device", default="auto", help="device of the stages: auto, cpu, cuda (default auto)")
    p.add_argument("--slot-budget", default="2GB", help="bytes per stage for dense theta_hat slots (default 2GB)")
    p.add_argument("--api-token-env", default="MMER_API_TOKEN",
                   help="environment variable with the bearer token clients must send (default MMER_API_TOKEN; "
                   "unset: no auth)")
    p.add_argument("--max-completion-tokens", type=int, default=1024, help="largest max_tokens a request may ask")
    p.set_defaults(run=run)


def app_args(args) -> dict:
    return {"store": args.store, "version": args.version, "stages": args.stages, "replicas": args.replicas,
            "text_policy": args.text_policy,
            "device": args.device, "slot_budget": args.slot_budget, "api_token_env": args.api_token_env,
            "limits": {"max_completion_tokens": args.max_completion_tokens}}


def say_slots(stats: dict) -> None:
    """What the slot budget holds: a budget smaller than one model still serves every model."""
    if stats["slot_capacity"] == 0:
        print("the slot budget holds no model's dense weights: every model is served through the mask-native "
              "path (exact up to rounding, slower); raise --slot-budget for dense slots", flush=True)
    else:
        print(f"dense slots for {stats['slot_capacity']} models per stage and replica; the others are served "
              "through the mask-native path", flush=True)


def run(args) -> None:
    from serve.config import ServeOptions

    options = ServeOptions.from_args(app_args(args))
    from mmer_dist.store.store import Store

    Store.open(options.store).catalog().version(options.version)  # refuse a store without that version now
    import ray
    from ray import serve

    from serve.app import build

    stop = threading.Event()
    # logical CPUs: the replicas need little, each stage one (torch threads are set per stage)
    # address="local": its own embedded Ray, never a cluster this machine already runs
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, options.replicas * options.stages + 2), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", configure_logging=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        serve.run(build(app_args(args)), name="mmer", route_prefix="/", blocking=False)
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
            signal.signal(sig, lambda *_: stop.set())
        url = f"http://{args.host}:{args.port}/v1"
        say_slots(serve.get_deployment_handle("LLMEngine", app_name="mmer").stats.remote().result(timeout_s=120))
        print(f"serving {options.store} at {url} (models: GET {url}/models); Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
        print("shutting down", flush=True)
    except (RuntimeError, ValueError) as e:
        raise StoreError(f"the endpoint did not start: {e}") from None
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
