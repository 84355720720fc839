"""``mmer demo``: the README's main job, on really trained small multimodal models."""

from __future__ import annotations

from mmer_dist.cli.args import positive_int

# the kit's sizes (``mmer_dist.demo.kit.build.SIZES``, which tests/test_kit.py checks against):
# named here so that `mmer --help` does not import the kit and transformers
KIT_SIZES = ("demo", "test")
QUESTIONS = 30  # mmer_dist.demo.run.QUESTIONS, named here for the same reason


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="train (or reuse) small multimodal LLMs, merge them on an embedded Ray, serve and query them",
        description="End to end on a kit of small, really trained multimodal LLMs: ingest into a store, MMER merge "
        "on an embedded Ray cluster, serve one OpenAI-compatible endpoint (Ray Serve), ask each model its held-out "
        "questions (retention) and two-media questions to model 'merged' under each text policy (expansion), add a "
        "model for a new task while the endpoint serves, and shut down cleanly; then write report.md (tables and "
        "PNG plots) and report.json in the workdir. The kit is trained on the CPU the first time (a few minutes) "
        "and cached; later runs take it from the cache.")
    p.add_argument("--workdir", default="mmer-demo", help="where the store and the report go (default ./mmer-demo; "
                   "a new or empty directory, or one an earlier demo made, whose store and report are replaced)")
    p.add_argument("--size", choices=KIT_SIZES, default="demo",
                   help="kit size: demo (default), or test (smaller and faster, lower accuracies)")
    p.add_argument("--kit-cache", default=None, metavar="DIR",
                   help="where the trained kit is cached (default $MMER_KIT_CACHE or ~/.cache/mmer-dist/kit)")
    p.add_argument("--questions", type=positive_int, default=QUESTIONS,
                   help=f"held-out questions per model in each section (default {QUESTIONS}; below 20 the "
                   "accuracies are rough: the tables say their 95%% interval)")
    p.add_argument("--workers", type=positive_int, default=2, help="Ray shard actors of the merges (default 2)")
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("--progress", action="store_true", help="show training, ingest and merge progress")
    noise.add_argument("--quiet", action="store_true", help="only the tables (the default)")
    p.set_defaults(run=run)


def run(args) -> None:
    from mmer_dist.demo.run import run_demo

    run_demo(args.workdir, size=args.size, kit_cache=args.kit_cache, questions=args.questions,
             workers=args.workers, progress=args.progress)
