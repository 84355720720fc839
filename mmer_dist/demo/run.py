"""``mmer demo``: really trained small multimodal LLMs, merged and served end to end.

    kit (cached) -> ingest -> MMER merge on an embedded Ray -> serve (Ray Serve, HTTP)
    -> questions with the official openai client: retention (each model on its own held-out
       inputs) and expansion (two models' media in one request, model "merged")
    -> a table of questions, answers, right answers, and accuracy per model against its original
    -> a model fine-tuned on a new task of an existing modality is added while the endpoint
       serves; the endpoint switches to the new version and answers its questions too
    -> clean shutdown.

Everything a user would type is real: the kit's checkpoints are ``save_pretrained`` LLaVA /
Video-LLaVA models, the endpoint is ``serve.app:build``, the client is ``openai``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mmer_dist.outputs import prepare_workdir

WORKDIR_ENTRIES = ("store",)  # what a run creates in its workdir (and may replace); the kit is cached elsewhere
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false",
             "RAY_AUTH_MODE": "disabled", "RAY_SERVE_LOG_TO_STDERR": "0", "HF_HUB_OFFLINE": "1"}


@dataclass
class ModelScore:
    model: str
    task: str
    right: int = 0
    asked: int = 0
    original_right: int = 0
    rows: list = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.right / max(1, self.asked)

    @property
    def original(self) -> float:
        return self.original_right / max(1, self.asked)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet() -> None:
    os.environ.update({k: v for k, v in QUIET_ENV.items() if k not in os.environ})
    warnings.filterwarnings("ignore")
    for name in ("ray", "ray.serve", "transformers", "filelock", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def _hush_serve() -> None:
    """Serve configures its driver-side logger at INFO when it starts (and on ``serve.run``): a
    filter on the logger holds whatever level it sets."""
    logger = logging.getLogger("ray.serve")
    if _errors_only not in logger.filters:
        logger.addFilter(_errors_only)


def _first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,!?") if words else ""


def ask(client, model: str, messages: list, max_tokens: int = 4, **extra) -> str:
    answer = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens,
                                            extra_body=extra or None)
    return answer.choices[0].message.content or ""


def retention_round(client, kit, model_id: str, n: int) -> ModelScore:
    """Model ``model_id`` (retention) on ``n`` of its held-out samples, next to its original."""
    from mmer_dist.demo.kit import get_task, predict

    km = kit.models[model_id]
    task = get_task(km.task)
    samples = kit.split(km.task).test[:n]
    originals = predict(km.path, km.task, samples)
    score = ModelScore(model_id, km.task)
    for sample, original in zip(samples, originals):
        reply = ask(client, model_id, task.messages(sample, with_media=True))
        ok = _first_word(reply) == sample.answer
        score.asked += 1
        score.right += ok
        score.original_right += _first_word(original) == sample.answer
        score.rows.append((task.question, reply.strip(), sample.answer, ok))
    return score


EXPANSION_POLICIES = ("mean-mask", "present-mean", "follow-media")  # the paper's text weights, and ours


def expansion_round(client, kit, pairs: list[tuple[str, str]], n: int) -> list[tuple]:
    """Requests to ``merged`` carrying two models' media, asking both questions in turn, under
    each text policy of ``EXPANSION_POLICIES``: rows (media, question, right answer, answers...)."""
    from mmer_dist.demo.kit import get_task
    from mmer_dist.media.parts import media_part

    rows = []
    for a, b in pairs:
        ta, tb = get_task(kit.models[a].task), get_task(kit.models[b].task)
        for sa, sb in list(zip(kit.split(ta.name).test, kit.split(tb.name).test))[:n]:
            for task, sample in ((ta, sa), (tb, sb)):
                content = [media_part(ta.part_type, sa.raw), media_part(tb.part_type, sb.raw),
                           {"type": "text", "text": task.question}]
                replies = [ask(client, "merged", [{"role": "user", "content": content}], text_policy=policy).strip()
                           for policy in EXPANSION_POLICIES]
                rows.append((f"{a}+{b}", task.question, sample.answer, *replies))
    return rows


def _expansion_table(rows: list[tuple], shown: int = 4) -> Table:
    """The first ``shown`` rows of each media pair, and every row's totals per policy."""
    table = Table(title="mixed requests to 'merged' (two media; the question asks about one), per text policy")
    for col in ("media", "question", "right answer", *EXPANSION_POLICIES):
        table.add_column(col)
    for pair in dict.fromkeys(row[0] for row in rows):
        for media, question, right, *replies in [row for row in rows if row[0] == pair][:shown]:
            table.add_row(media, question, right, *(f"{r} {'✓' if _first_word(r) == right else '✗'}" for r in replies))
    hits = [sum(_first_word(row[3 + i]) == row[2] for row in rows) for i in range(len(EXPANSION_POLICIES))]
    table.caption = f"right, of all {len(rows)} questions: " + ", ".join(
        f"{p} {h}" for p, h in zip(EXPANSION_POLICIES, hits)) + \
        " (mean-mask: text through the mean mask, the paper's; present-mean: the mean mask of the models " \
        "whose media are in the request; follow-media: text through the model of the media before it)"
    return table


def _score_table(title: str, scores: list[ModelScore]) -> Table:
    table = Table(title=title)
    for col in ("model", "task", "asked", "served (MMER θ̂_i)", "original fine-tune", "retention"):
        table.add_column(col)
    for s in scores:
        retention = f"{100 * s.accuracy / s.original:.0f}%" if s.original else "-"
        table.add_row(s.model, s.task, str(s.asked), f"{s.accuracy:.2f}", f"{s.original:.2f}", retention)
    return table


def _qa_table(title: str, rows: list[tuple], first: str = "model") -> Table:
    table = Table(title=title)
    for col in (first, "question", "answer", "right answer", ""):
        table.add_column(col)
    for row in rows:
        *cells, ok = row
        table.add_row(*map(str, cells), "✓" if ok else "✗")
    return table


def run_demo(workdir: str | Path = "mmer-demo", *, size: str = "demo", kit_cache: str | Path | None = None,
             workers: int = 2, questions: int = 6, progress: bool = False, console: Console | None = None) -> dict:
    """The demo with its store in ``workdir``; returns the scores (tests read them)."""
    workdir = prepare_workdir(workdir, WORKDIR_ENTRIES)  # refuses a directory an earlier demo did not make
    _quiet()
    import openai
    import ray
    from ray import serve

    from mmer_dist.demo.kit import build_kit
    from mmer_dist.ingest import ingest_base, ingest_model
    from mmer_dist.merge.engine import MergeRequest, merge
    from mmer_dist.merge.incremental import add_model
    from mmer_dist.merge.ray_backend import RayBackend
    from serve.app import build

    console = console or Console()
    started = time.perf_counter()
    console.rule("1. the demo kit: a Llama base and really trained multimodal fine-tunes")
    kit = build_kit(kit_cache, size=size, log=console.print if progress else None)
    table = Table(title=f"kit ({size} size, cached in {kit.root})")
    for col in ("model", "task", "format", "part type", "held-out accuracy", "base LLM + its encoder"):
        table.add_column(col)
    for m in kit.models.values():
        table.add_row(m.id + (" (added later)" if m.added else ""), m.task, m.format, m.part_type,
                      f"{m.accuracy:.3f}", f"{m.base_accuracy:.3f}")
    console.print(table)

    console.rule("2. ingest into a store, MMER merge on an embedded Ray cluster")
    store = str(workdir / "store")
    ingest_base(store, kit.base, progress=progress)
    for m in kit.initial:
        ingest_model(store, m.id, m.path, m.modality, progress=progress)
    # logical CPUs, not cores: the endpoint's deployments and the live add's shard actors share them
    # address="local": its own embedded Ray, never a cluster this machine already runs
    ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", configure_logging=False)
    try:
        record = merge(store, MergeRequest(), RayBackend("local"), workers=workers, progress=progress)
        console.print(f"version {record.version}: {len(record.models)} models, mask density "
                      + ", ".join(f"{m} {d:.2f}" for m, d in zip(record.models, record.mask_density))
                      + f" ({record.seconds:.1f} s)")

        console.rule("3. one endpoint: Ray Serve, OpenAI-compatible, on loopback")
        port = _free_port()
        _hush_serve()
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    logging_config={"log_level": "ERROR", "enable_access_log": False})
        _hush_serve()
        serve.run(build({"store": store, "api_token_env": None, "follow_interval_s": 1.0}), name="mmer-demo",
                  route_prefix="/")
        _hush_serve()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo", max_retries=2, timeout=300)
        console.print(f"serving at http://127.0.0.1:{port}/v1: " + ", ".join(m.id for m in client.models.list().data))

        console.rule("4. retention: each model on its own held-out inputs")
        scores = [retention_round(client, kit, m.id, questions) for m in kit.initial]
        console.print(_qa_table("questions and answers (first two per model)",
                                [(s.model, *r) for s in scores for r in s.rows[:2]]))
        console.print(_score_table("accuracy per model, served vs its original", scores))

        console.rule("5. expansion: one request, two models' media, model 'merged'")
        ids = [m.id for m in kit.initial]
        pairs = [(ids[0], ids[1]), (ids[2], ids[3])]
        mixed = expansion_round(client, kit, pairs, questions)
        console.print(_expansion_table(mixed))

        console.rule("6. a model for a new task joins the live endpoint")
        added = kit.added[0]
        before = client.models.list().data
        t0 = time.perf_counter()
        derived = add_model(store, added.id, str(added.path), added.modality, RayBackend("local"), task=added.task,
                            workers=workers, progress=progress)
        added_at = time.perf_counter()
        while added.id not in {m.id for m in client.models.list().data}:
            time.sleep(0.25)
        switch_s = time.perf_counter() - added_at
        console.print(f"`mmer add` of {added.id!r} ({added.task}, {added.modality}) made version "
                      f"{derived.record.version} in {added_at - t0:.1f} s; the endpoint "
                      f"served it {switch_s:.1f} s later ({len(before)} -> {len(client.models.list().data)} models), "
                      "no restart")
        new_score = retention_round(client, kit, added.id, questions)
        after = [retention_round(client, kit, m.id, max(2, questions // 2)) for m in kit.initial]
        console.print(_score_table("after the add: the new model, and the earlier ones (no forgetting)",
                                   [new_score, *after]))
    finally:
        try:
            # the app drains and stops; then the embedded cluster goes with everything on it
            # (serve.shutdown would also work, but Ray reports its controller's kill on stdout)
            with contextlib.suppress(Exception):
                serve.delete("mmer-demo")
        finally:
            ray.shutdown()
    seconds = time.perf_counter() - started
    console.rule(f"done in {seconds:.0f} s")
    console.print(f"the store is in {store}; try: mmer status --store {store}", soft_wrap=True)
    return {"scores": {s.model: (s.accuracy, s.original) for s in scores}, "mixed": mixed,
            "added": (new_score.accuracy, new_score.original), "after": {s.model: s.accuracy for s in after},
            "switch_seconds": switch_s, "seconds": seconds, "store": store}

