"""The endpoint under operations: how long it takes to answer again after a process is killed, and
how long a promoted version takes to answer, with clients keeping it busy.

    python bench/serve_ops.py                  # the defaults below: ~10 min on 2 busy cores
    python bench/serve_ops.py --kills stage --busy 0,8

Builds (once, cached under bench/out/serve-ops/) a store of a tiny bf16 Llama base and two tiny
LLaVA fine-tunes (image), merged, plus an unpromoted version with a third model. Then serves it
(``serve.app:build`` on an embedded Ray, ``--stages`` stages) and measures:

- recovery: with ``--clients`` clients asking all the while (text and image requests), one
  process is killed with SIGKILL (a stage actor, the LLM engine replica, the encoder replica);
  the time from the kill to the first correct answer of a request sent after it, the requests
  that failed meanwhile (503s) and the slowest request (nothing may hang past the deadline);
- promotion: ``mmer promote`` (``promote()``) of the other version while ``--busy`` clients keep
  the endpoint busy; the time from promote's return to the first answer from the new version
  (``system_fingerprint``), and the requests that failed (none should).

Targets (issue 25): answering again within 30 s of a kill; a promoted version answering within 10 s.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench`, `mmer_dist` and `serve` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import OUT_DIR, environment, write_json  # noqa: E402

CACHE = OUT_DIR / "serve-ops"
KILLS = {"stage": "stage actor", "engine": "LLM engine replica", "encoder": "encoder replica"}
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stages", type=int, default=2, help="pipeline stages of the served LLM")
    p.add_argument("--clients", type=int, default=4, help="busy clients while a process is killed")
    p.add_argument("--kills", default="stage,engine,encoder", help=f"which processes to kill: {', '.join(KILLS)}")
    p.add_argument("--busy", default="0,8,32", help="busy clients while a version is promoted")
    p.add_argument("--repeats", type=int, default=1, help="measurements per row (the median is shown)")
    p.add_argument("--follow-interval", type=float, default=2.0, help="how often the endpoint polls the store")
    p.add_argument("--json", type=Path, default=OUT_DIR / "serve_ops.json")
    return p.parse_args(argv)


# -- the store ----------------------------------------------------------------------------------


def build_store() -> tuple[str, int, int]:
    """(store, promoted version, the unpromoted version beside it); built once."""
    import torch

    from mmer_dist.demo import tiny_models
    from mmer_dist.ingest import ingest_base, ingest_model
    from mmer_dist.merge.engine import MergeRequest, merge
    from mmer_dist.merge.incremental import add_model
    from mmer_dist.merge.local import LocalBackend
    from mmer_dist.store.store import Store

    store = CACHE / "store"
    if (CACHE / "built").exists():
        catalog = Store.open(str(store)).catalog()
        return str(store), catalog.serving_version(), max(v.version for v in catalog.versions)
    import shutil

    shutil.rmtree(CACHE, ignore_errors=True)
    base = tiny_models.save_base(CACHE / "checkpoints" / "base", dtype=torch.bfloat16, seed=0)
    paths = {m: tiny_models.save_finetuned(base, CACHE / "checkpoints" / m, "llava-hf", dtype=torch.bfloat16, seed=seed)
             for m, seed in (("vision", 31), ("vision-b", 32), ("vision-c", 33))}
    ingest_base(str(store), base, progress=False)
    for model in ("vision", "vision-b"):
        ingest_model(str(store), model, paths[model], "image", fmt="llava-hf", progress=False)
    merge(str(store), MergeRequest(), LocalBackend(), workers=1, progress=False)  # version 1
    other = add_model(str(store), "vision-c", str(paths["vision-c"]), "image", LocalBackend(), task="third",
                      promote=False, progress=False).record.version
    (CACHE / "built").write_text("ok")
    return str(store), 1, other


# -- clients ------------------------------------------------------------------------------------


def probe_bodies() -> list[dict]:
    import numpy as np

    from mmer_dist.media.parts import image_part

    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    ask = {"type": "text", "text": "what is this ?"}
    return [{"model": "merged", "messages": [{"role": "user", "content": "hi"}]},
            {"model": "merged", "messages": [{"role": "user", "content": [
                {**image_part(img), "model": "vision"}, ask]}]},
            {"model": "vision", "messages": [{"role": "user", "content": [image_part(img), ask]}]}]


def ask(http, url: str, body: dict) -> tuple[int, str, str]:
    """(status, answer text, system_fingerprint) of one greedy request."""
    r = http.post(f"{url}/v1/chat/completions", json={**body, "temperature": 0, "max_tokens": 8})
    if r.status_code != 200:
        return r.status_code, r.text[:200], ""
    data = r.json()
    return 200, data["choices"][0]["message"]["content"], data["system_fingerprint"]


class Clients:
    """``n`` clients asking in turn until stopped; each outcome (start, end, status, text, fingerprint)."""

    def __init__(self, url: str, n: int, bodies: list[dict]):
        self.url, self.bodies, self.outcomes, self._stop = url, bodies, [], threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        import httpx

        with httpx.Client(timeout=600) as http:
            while not self._stop.is_set():
                body = self.bodies[i % len(self.bodies)]
                start = time.time()
                status, text, fingerprint = ask(http, self.url, body)
                self.outcomes.append((start, time.time(), status, text, fingerprint, i % len(self.bodies)))
                i += 1

    def wait_answered(self, count: int, since: float, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while sum(1 for o in self.outcomes if o[2] == 200 and o[0] >= since) < count:
            if time.time() > deadline:
                raise RuntimeError("the clients are not answered")
            time.sleep(0.2)

    def stop(self) -> list:
        self._stop.set()
        for t in self._threads:
            t.join()
        return self.outcomes


# -- the measurements ---------------------------------------------------------------------------


def victim_pid(kind: str) -> int:
    from ray import serve

    if kind == "encoder":
        return serve.get_deployment_handle("MediaEncoders", app_name="ops").stats.remote().result(timeout_s=120)["pid"]
    stats = serve.get_deployment_handle("LLMEngine", app_name="ops").stats.remote().result(timeout_s=120)
    return stats["engine"]["stages"][-1]["pid"] if kind == "stage" else stats["pid"]


def recovery(url: str, kind: str, clients: int, bodies: list[dict], want: list[str]) -> dict:
    """Kill one process under load; the first correct answer of a request sent after the kill."""
    busy = Clients(url, clients, bodies)
    try:
        busy.wait_answered(clients, time.time())
        pid = victim_pid(kind)
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        probe = 1 if kind == "encoder" else 0  # a request that needs the killed process, asked in a loop
        probes = Clients(url, 1, [bodies[probe]])
        deadline = time.time() + 600
        while not any(o[2] == 200 and o[3] == want[probe] for o in probes.outcomes) and time.time() < deadline:
            time.sleep(0.1)
        first = min(o[1] for o in probes.stop() if o[2] == 200 and o[3] == want[probe])
        busy.wait_answered(1, first)  # the clients too are answered again
    finally:
        outcomes = busy.stop()
    after = [o for o in outcomes if o[1] >= killed]
    return {"seconds": first - killed, "failed_503": sum(1 for o in after if o[2] == 503),
            "failed_other": sum(1 for o in after if o[2] not in (200, 503)),
            "wrong_answers": sum(1 for o in after if o[2] == 200 and o[3] != want[o[5]]),
            "slowest_request_s": max(o[1] - o[0] for o in after)}


def promotion(url: str, store: str, version: int, busy_clients: int, bodies: list[dict]) -> dict:
    """Promote ``version`` with ``busy_clients`` asking; the first answer from it."""
    from mmer_dist.store.serving import promote

    busy = Clients(url, max(busy_clients, 1), bodies)  # with 0 busy clients, one client asks in turn
    try:
        busy.wait_answered(max(busy_clients, 1), time.time())
        promote(store, version)
        promoted = time.time()
        deadline = time.time() + 600
        while not any(o[4] == f"mmer-v{version}" for o in busy.outcomes) and time.time() < deadline:
            time.sleep(0.05)
        first = min(o[1] for o in busy.outcomes if o[4] == f"mmer-v{version}")
    finally:
        outcomes = busy.stop()
    after = [o for o in outcomes if o[1] >= promoted]
    return {"seconds": first - promoted, "failed": sum(1 for o in after if o[2] != 200),
            "requests": len(after), "slowest_request_s": max(o[1] - o[0] for o in after)}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.update(RAY_ENV)
    store, served, other = build_store()
    import httpx
    import ray
    from ray import serve

    from bench.serve_bench import free_port
    from mmer_dist.store.serving import promote
    from serve.app import build as build_app

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        from mmer_dist.store.store import Store

        if Store.open(store).catalog().serving_version() != served:
            promote(store, served)
        serve.run(build_app({"store": store, "stages": args.stages, "api_token_env": None,
                             "follow_interval_s": args.follow_interval}), name="ops", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        bodies = probe_bodies()
        with httpx.Client(timeout=600) as http:
            want = [ask(http, url, b)[1] for b in bodies]
        for kind in [k for k in args.kills.split(",") if k]:
            runs = [recovery(url, kind, args.clients, bodies, want) for _ in range(args.repeats)]
            rows.append({"what": f"answering again after a {KILLS[kind]} is killed", "clients": args.clients,
                         **_median(runs), "runs": runs})
            print(rows[-1], flush=True)
        versions = [other, served]
        for i, busy in enumerate(int(b) for b in args.busy.split(",") if b):
            runs = []
            for r in range(args.repeats):
                runs.append(promotion(url, store, versions[(i * args.repeats + r) % 2], busy, bodies))
            rows.append({"what": "promote -> first answer from the new version", "clients": busy,
                         **_median(runs), "runs": runs})
            print(rows[-1], flush=True)
        if Store.open(store).catalog().serving_version() != served:
            promote(store, served)
    finally:
        serve.shutdown()
        ray.shutdown()
    write_json(args.json, {"rows": rows, "settings": vars(args) | {"json": str(args.json)},
                           "environment": environment()})
    print(f"\nserving under operations: {args.stages} stages, tiny bf16 models on CPU, follow interval "
          f"{args.follow_interval:g} s, median of {args.repeats}")
    print("| what | busy clients | seconds | failed requests | slowest request s |")
    print("|---|---|---|---|---|")
    for r in rows:
        failed = r.get("failed", r.get("failed_503", 0) + r.get("failed_other", 0))
        note = f" (503s: {r['failed_503']}, other: {r['failed_other']}, wrong: {r['wrong_answers']})" \
            if "failed_503" in r else ""
        print(f"| {r['what']} | {r['clients']} | {r['seconds']:.1f} | {failed}{note} | {r['slowest_request_s']:.1f} |")
    print(f"results in {args.json}")
    return 0


def _median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


if __name__ == "__main__":
    sys.exit(main())
