"""``mmer demo``: the README's main job on small built-in models."""

from __future__ import annotations

from mmer_dist.cli.args import positive_int


def register(sub) -> None:
    p = sub.add_parser("demo", help="build tiny multimodal models, merge them on an embedded Ray, show retention",
                       description="The whole engine end to end on small built-in models: build, ingest, merge on "
                       "an embedded Ray cluster, export, and compare reconstructed models with the originals.")
    p.add_argument("--workdir", default="mmer-demo", help="where checkpoints, store and exports go (default ./mmer-demo; "
                   "a new or empty directory, or one an earlier demo made, whose demo files are replaced)")
    p.add_argument("--workers", type=positive_int, default=2, help="Ray shard actors (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args) -> None:
    from mmer_dist.demo.run import run_demo

    run_demo(args.workdir, workers=args.workers, progress=not args.quiet)
