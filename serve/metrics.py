"""Per-model metrics of an LLM engine replica, through Ray Serve's metrics system.

Ray exports them in Prometheus format on each node's metrics port (``ray start
--metrics-export-port``, ``ray.init(_metrics_export_port=...)``) with a ``ray_`` prefix, a
``_total`` suffix on counters, and the tags Serve adds (``application``, ``deployment``,
``replica``). serve/README.md ("Metrics") lists them. Tags here:

- ``model``: the model id a request named (``merged`` for expansion mode);
- ``path``: how this replica serves the model when the observation is made: ``slot`` (a dense
  theta_hat_i on every stage), ``mask-native`` (theta_pre + m_i * tau* per linear, a slot build
  included), ``expansion`` (model ``merged``).

Request metrics are observed from the events the replica streams (``RequestMetrics``); slot
residency, builds and build seconds are the stages' own counts (``DecoderStage.stats``), exported
by ``StatsPoller`` every few seconds, never counted twice.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from serve import log
from serve.protocol import MERGED

PATHS = ("slot", "mask-native")
MODEL_PATH = ("model", "path")
# seconds: a prefill of a short prompt on one GPU is milliseconds, a long one on a loaded CPU seconds
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


def residency(stages: list[dict]) -> dict[str, str]:
    """Each model's path on one replica from its stages' stats: ``slot`` when every stage holds its
    dense weights, ``building`` while a stage builds them (served mask-native meanwhile), else
    ``mask-native``."""
    paths: dict[str, set[str]] = defaultdict(set)
    for stage in stages:
        for model, s in stage["models"].items():
            paths[model].add(s["path"])
    return {m: "slot" if p == {"slot"} else "building" if "building" in p else "mask-native" for m, p in paths.items()}


def metric_path(path: str) -> str:
    """A residency as a ``path`` tag: a model whose slot is still building runs mask-native."""
    return "slot" if path == "slot" else "mask-native"


class ServeMetrics:
    """The metrics of one replica. ``paths`` is each model's residency as last polled."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter("mmer_requests", description="chat requests admitted", tag_keys=MODEL_PATH)
        self.prompt_tokens = Counter("mmer_prompt_tokens", description="prompt tokens admitted (media included)",
                                     tag_keys=MODEL_PATH)
        self.completion_tokens = Counter("mmer_completion_tokens", description="tokens generated",
                                         tag_keys=MODEL_PATH)
        self.ttft = Histogram("mmer_time_to_first_token_seconds", boundaries=TTFT_BUCKETS, tag_keys=MODEL_PATH,
                              description="from the request reaching the replica to its first text delta")
        self.itl = Histogram("mmer_inter_token_latency_seconds", boundaries=ITL_BUCKETS, tag_keys=MODEL_PATH,
                             description="between consecutive text deltas of a request")
        self.residency = Gauge("mmer_model_residency", tag_keys=MODEL_PATH,
                               description="1 for the path this replica serves the model on now, 0 for the other")
        self.slot_builds = Counter("mmer_slot_builds", tag_keys=("model",),
                                   description="dense theta_hat slot builds, summed over the replica's stages")
        self.slot_build_seconds = Counter("mmer_slot_build_seconds", tag_keys=("model",),
                                          description="seconds spent building slots, summed over the stages")
        self.paths: dict[str, str] = {}
        self._seen: dict[tuple[int, int, str], tuple[int, float]] = {}  # the stages' cumulative counts

    def path(self, model: str) -> str:
        return "expansion" if model == MERGED else metric_path(self.paths.get(model, "mask-native"))

    def request(self, model: str) -> RequestMetrics:
        return RequestMetrics(self, model)

    def export_stages(self, version: int, stages: list[dict]) -> None:
        """Residency, slot builds and build seconds from one poll of a version's stage stats
        (cumulative per stage process: the increase since the last poll is what is added)."""
        paths = residency(stages)
        for model in self.paths.keys() - paths.keys():  # gone with the version it was in
            for p in PATHS:
                self.residency.set(0, tags={"model": model, "path": p})
        self.paths = paths
        for model, path in paths.items():
            for p in PATHS:
                self.residency.set(1 if metric_path(path) == p else 0, tags={"model": model, "path": p})
        seen = {}
        for i, stage in enumerate(stages):
            for model, s in stage["models"].items():
                key = (version, i, model)
                builds, seconds = self._seen.get(key, (0, 0.0))
                if s["builds"] > builds:
                    self.slot_builds.inc(s["builds"] - builds, tags={"model": model})
                if s["build_seconds"] > seconds:
                    self.slot_build_seconds.inc(s["build_seconds"] - seconds, tags={"model": model})
                seen[key] = (s["builds"], s["build_seconds"])
        self._seen = seen  # a dropped version's stages are not seen again


class RequestMetrics:
    """One request's observations, fed its events in order (``accepted``, ``token``..., ``done``)."""

    def __init__(self, metrics: ServeMetrics, model: str):
        self.metrics, self.model = metrics, model
        self.start = self.last = time.perf_counter()
        self.tokens = 0

    def observe(self, event: dict) -> None:
        m, kind = self.metrics, event["type"]
        tags = {"model": self.model, "path": m.path(self.model)}
        if kind == "accepted":
            m.requests.inc(tags=tags)
            if event["prompt_tokens"] > 0:
                m.prompt_tokens.inc(event["prompt_tokens"], tags=tags)
        elif kind == "token":
            now = time.perf_counter()
            (m.itl if self.tokens else m.ttft).observe(now - (self.last if self.tokens else self.start), tags=tags)
            self.last, self.tokens = now, self.tokens + 1
        elif kind == "done" and (n := event["usage"]["completion_tokens"]) > 0:
            m.completion_tokens.inc(n, tags=tags)


class StatsPoller:
    """Exports the served version's stage stats every ``interval_s`` from its own thread (the stats
    are actor calls: never on the replica's event loop). A poll that fails (a stage being
    replaced, a version switching) is skipped: the next one tries again."""

    def __init__(self, versions, metrics: ServeMetrics, interval_s: float):
        self.versions, self.metrics, self.interval_s = versions, metrics, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mmer-metrics", daemon=True)
        self._thread.start()

    def poll(self) -> None:
        current = self.versions.current
        if current is None or current.failure is not None or current.closed:
            return
        self.metrics.export_stages(current.version, current.engine.stats()["stages"])

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - metrics never take the replica down
                log.debug("metrics poll skipped: %s", e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
