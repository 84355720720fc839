"""``mmer demo``: really trained small multimodal LLMs, merged and served end to end.

    kit (trained once, cached) -> ingest -> MMER merge on an embedded Ray -> serve (Ray Serve, HTTP)
    -> retention: each model alone on its held-out questions, through the endpoint, beside its
       original fine-tune, the base LLM around its encoder, and chance
    -> expansion: two models' media in one request to model "merged", under every text policy,
       beside the original fine-tunes routed with no merge, TIES theta* and chance
    -> a model fine-tuned on a new task of an existing modality is added while the endpoint
       serves; the endpoint switches to the new version; every model is asked again
    -> clean shutdown; ``report.md`` (tables and PNG plots) and ``report.json`` in the workdir.

Everything a user would type is real: the kit's checkpoints are ``save_pretrained`` LLaVA /
Video-LLaVA models, the endpoint is ``serve.app:build``, the client is ``openai``. What is
measured, and on which questions: ``mmer_dist.demo.measure``; the tables and the report:
``mmer_dist.demo.report``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mmer_dist.demo import report
from mmer_dist.demo.report import Grid
from mmer_dist.model.policies import DEFAULT_TEXT_POLICY
from mmer_dist.outputs import prepare_workdir

# what a run creates in its workdir (and may replace); the kit is cached elsewhere
WORKDIR_ENTRIES = ("store", report.REPORT, report.REPORT_JSON, *report.PLOTS.values())
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false",
             "RAY_AUTH_MODE": "disabled", "RAY_SERVE_LOG_TO_STDERR": "0", "HF_HUB_OFFLINE": "1"}
QUESTIONS = 30  # per model in every section: a 95% interval of about ±15 points at worst


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


def mmer_command() -> str:
    """``mmer`` as this user can type it: the bare name when it is on PATH, else the path of this
    environment's script (``.venv/bin/mmer`` after README's set-up)."""
    script = Path(sys.executable).parent / "mmer"
    on_path = shutil.which("mmer")
    if on_path and script.exists() and Path(on_path).resolve() == script.resolve():
        return "mmer"
    if not script.exists():
        return f"{sys.executable} -m mmer_dist.cli"
    return _shown(script)


def _shown(path: str | Path) -> str:
    """A path as short as it reads right from the current directory."""
    relative = os.path.relpath(path)
    if not relative.startswith(".."):
        return relative
    absolute, home = Path(path).resolve(), Path.home().resolve()
    return f"~/{absolute.relative_to(home)}" if absolute.is_relative_to(home) else str(absolute)


def _bar(console: Console, label: str, unit: str, transient: bool) -> Progress:
    return Progress(TextColumn(label), BarColumn(bar_width=30), MofNCompleteColumn(), TextColumn(unit),
                    TimeElapsedColumn(), TextColumn("{task.description}"), console=console, transient=transient)


@contextlib.contextmanager
def _counting(console: Console, total: int, what: str):
    """A transient count on a terminal (nothing when piped): yields the call that counts one."""
    if not console.is_terminal:
        yield lambda: None
        return
    with _bar(console, "  asking", what, transient=True) as bar:
        task = bar.add_task("", total=total)
        yield lambda: bar.advance(task)


def _kit(console: Console, cache, size: str, progress: bool):
    """The kit, and how long it trained here (None: it came from the cache). Training shows one
    line with a bar on a terminal (a count line per model when the output is not a terminal),
    with or without ``--progress``."""
    from mmer_dist.demo.kit import build_kit, default_cache_dir

    state: dict = {}

    def on_step(done: int, total: int, now: str) -> None:
        if "t0" not in state:
            console.print("training the kit on the CPU: the first run only, then it is cached "
                          f"in {_shown(cache or default_cache_dir())}")
            state["t0"] = time.perf_counter()
            if console.is_terminal:
                state["bar"] = _bar(console, "  training", "models", transient=False)
                state["bar"].start()
                state["task"] = state["bar"].add_task("", total=total)
        if "bar" in state:
            state["bar"].update(state["task"], completed=done, description=f"now: {now}" if now else "done")
        else:
            elapsed = time.perf_counter() - state["t0"]
            console.print(f"  training {done}/{total} models, {elapsed:.0f} s: " + (f"now {now}" if now else "done"))

    log = (lambda message: console.print(f"  {message}")) if progress else None
    try:
        kit = build_kit(cache, size=size, log=log, progress=on_step)
    finally:
        if "bar" in state:
            state["bar"].stop()
    return kit, (time.perf_counter() - state["t0"]) if "t0" in state else None


def run_demo(workdir: str | Path = "mmer-demo", *, size: str = "demo", kit_cache: str | Path | None = None,
             workers: int = 2, questions: int = QUESTIONS, progress: bool = False,
             console: Console | None = None) -> dict:
    """The demo with its store and report in ``workdir``; returns ``report.json``'s content."""
    workdir = prepare_workdir(workdir, WORKDIR_ENTRIES)  # refuses a directory an earlier demo did not make
    _quiet()
    import openai
    import ray
    import torch
    from ray import serve

    from mmer_dist.demo import measure
    from mmer_dist.demo.expansion import Payloads
    from mmer_dist.ingest import ingest_base, ingest_model
    from mmer_dist.merge.engine import MergeRequest, merge
    from mmer_dist.merge.incremental import add_model
    from mmer_dist.merge.ray_backend import RayBackend
    from serve.app import build

    console = console or report.demo_console()
    started = time.perf_counter()
    sections: list[tuple[str, list]] = []
    begun: list[float] = []  # when each section began

    def section(title: str) -> list:
        begun.append(time.perf_counter())
        console.rule(title)
        sections.append((title, []))
        return sections[-1][1]

    def show(items: list, *things) -> None:
        for thing in things:
            console.print(thing.rich() if isinstance(thing, Grid) else thing)
            items.append(thing)

    out = section("1. the demo kit: a Llama base and really trained multimodal fine-tunes")
    kit, trained = _kit(console, kit_cache, size, progress)
    where = (f"trained in {trained:.0f} s and cached" if trained is not None
             else f"from the cache (trained in {kit.build_seconds:.0f} s when first built)")
    show(out, report.kit_grid(kit, where), f"kit: {_shown(kit.root)}")
    initial = [m.id for m in kit.initial]
    added = kit.added[0]

    out = section("2. ingest into a store, MMER merge on an embedded Ray cluster")
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
        density = ", ".join(f"{m} {d:.2f}" for m, d in zip(record.models, record.mask_density))
        show(out, f"version {record.version}: {len(record.models)} models ({', '.join(record.models)}) merged in "
                  f"{record.seconds:.1f} s: θ_pre, τ* ({record.method.upper()}, K = {record.topk:g}) and one mask "
                  f"per model (density {density})")

        out = section("3. one endpoint: Ray Serve, OpenAI-compatible, on loopback")
        port = _free_port()
        _hush_serve()
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    logging_config={"log_level": "ERROR", "enable_access_log": False})
        _hush_serve()
        serve.run(build({"store": store, "api_token_env": None, "follow_interval_s": 1.0}), name="mmer-demo",
                  route_prefix="/")
        _hush_serve()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo", max_retries=2, timeout=300)
        served = [m.id for m in client.models.list().data if m.id != "merged"]
        show(out, f"serving at http://127.0.0.1:{port}/v1: {len(served)} models ({', '.join(served)}), each "
                  "alone by its id, and 'merged': any models' media in one request")

        out = section("4. retention: each model on its own held-out questions")
        payloads = Payloads()
        reqs = measure.retention_requests(kit, initial, questions, payloads)
        with _counting(console, len(reqs), "questions") as tick:
            asker = measure.Asker(client, tick)
            replies = asker.all(reqs)
        before = measure.retention(kit, initial, questions, replies)
        show(out, report.examples_grid(before), report.retention_grid(before))

        out = section("5. expansion: one request, two models' media, model 'merged'")
        per_pair = -(-questions // (len(initial) - 1))  # each model is in len - 1 pairs
        per_pair = min(len(measure.questions(kit, m, per_pair)) for m in initial)  # as many as the kit holds
        n_rows = (len(measure.TEXT_POLICIES) + len(measure.REFERENCES)) * per_pair * len(initial) * (len(initial) - 1)
        with _counting(console, n_rows, "questions") as tick:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            asker.on_reply = tick
            exp = measure.expansion(kit, store, record.version, initial, per_pair, asker, device, tick)
        show(out, _expansion_intro(kit, exp), report.expansion_grid(exp))

        out = section("6. a model for a new task joins the live endpoint")
        t0 = time.perf_counter()
        derived = add_model(store, added.id, str(added.path), added.modality, RayBackend("local"), task=added.task,
                            workers=workers, progress=progress)
        added_at = time.perf_counter()
        while added.id not in {m.id for m in client.models.list().data}:
            time.sleep(0.25)
        switch_s = time.perf_counter() - added_at
        now = [m.id for m in client.models.list().data if m.id != "merged"]
        references = {s.model: (s.original, s.floor) for s in before}
        every = [*initial, added.id]
        reqs = measure.retention_requests(kit, every, questions, payloads)
        with _counting(console, len(reqs), "questions") as tick:
            asker.on_reply = tick
            replies = asker.all(reqs)
        after = measure.retention(kit, every, questions, replies, references)
        show(out, f"`mmer add` of {added.id!r} ({added.task}, {added.modality}) made version "
                  f"{derived.record.version} in {added_at - t0:.1f} s; the endpoint served it {switch_s:.1f} s later "
                  f"({len(served)} -> {len(now)} models, and 'merged'), no restart",
             report.add_grid(before, after, added.id))
    finally:
        try:
            # the app drains and stops; then the embedded cluster goes with everything on it
            # (serve.shutdown would also work, but Ray reports its controller's kill on stdout)
            with contextlib.suppress(Exception):
                serve.delete("mmer-demo")
        finally:
            ray.shutdown()

    seconds = time.perf_counter() - started
    out = section(f"done in {seconds:.0f} s")
    timings = {title: round(end - start, 2) for (title, _), start, end in zip(sections, begun, begun[1:])}
    summary = _summary(before, exp, after, added.id, switch_s)
    grids = [g for _, items in sections for g in items if isinstance(g, Grid)]
    result = report.result_json(
        {"size": kit.size, "root": str(kit.root), "trained_seconds": trained, "build_seconds": kit.build_seconds},
        before, exp, {"model": added.id, "version": derived.record.version, "add_seconds": added_at - t0,
                      "switch_seconds": switch_s, "models_before": served, "models_after": now},
        after, grids, {"questions": questions, "seconds": seconds, "section_seconds": timings, "store": store,
                       "summary": summary})
    path, note = report.write(workdir, result, sections[:-1], summary)
    show(out, *summary)
    if note:
        console.print(note)
    mmer = mmer_command()
    console.print(f"report: {_shown(path)} (tables and plots; the numbers in {_shown(workdir / report.REPORT_JSON)})")
    console.print(f"the store: {_shown(store)}; look inside it, or serve it yourself:")
    for command in ("status", "serve"):
        console.print(f"  {mmer} {command} --store {_shown(store)}", soft_wrap=True)  # whole, to copy
    return result


def _expansion_intro(kit, exp) -> str:
    ex = exp.example
    other, asked = (kit.models[m] for m in ex["media"])
    shown = dict.fromkeys([DEFAULT_TEXT_POLICY, "mean-mask"])  # the default, and the paper's if another
    replies = ", ".join(f"{k} answered {ex['replies'][k]!r}" for k in shown)
    return (f"Each request carries two models' media, then the question about the last one; a reply is right "
            f"when it is that media's answer word. E.g. the media of {other.id} ({other.modality}), then of "
            f"{asked.id} ({asked.modality}), then {ex['question']!r}: right answer {ex['answer']!r}; {replies}. "
            "Media tokens go through their model's θ̂_i; the text policy (a request's `text_policy`) picks the "
            "weights of the text. Chance: a random answer word of the task asked about.")


def _summary(before, exp, after, added: str, switch_s: float) -> list[str]:
    from mmer_dist.demo.report import pct

    served = sum(s.served.rate for s in before) / len(before)
    original = sum(s.original.rate for s in before) / len(before)
    best = exp.best_policy()
    old = {s.model: s.served.rate for s in before}
    moved = max(abs(s.served.rate - old[s.model]) for s in after if s.model in old)
    new = next(s for s in after if s.model == added)
    return [
        f"retention: served from one store, the {len(before)} models answer {pct(served)} of their questions right "
        f"(mean), their original fine-tunes {pct(original)}.",
        f"expansion: with two models' media in one request, 'merged' answers {pct(exp.overall(best).rate)} right "
        f"under {best}{' (the default)' if best == DEFAULT_TEXT_POLICY else ''}; follow-media's routing over the "
        f"unmerged originals {pct(exp.overall('originals-follow-media').rate)}; mean-mask (θ̄, the paper's) "
        f"{pct(exp.overall('mean-mask').rate)}; TIES θ* {pct(exp.overall('ties-star').rate)}; chance "
        f"{pct(exp.overall_chance)}.",
        f"the add: {added} answers {pct(new.served.rate)} right, served {switch_s:.1f} s after `mmer add`; "
        f"the other models moved by at most {100 * moved:.0f} points.",
    ]
