"""Versions of a live system: ``mmer add`` / ``remove`` a model, ``promote`` / ``rollback`` the served version."""

from __future__ import annotations

from mmer_dist.cli.args import lock_wait_arg, store_arg
from mmer_dist.cli.merge import add_run_options, describe_version, run_options
from mmer_dist.formats.mapping import FORMAT_NAMES


def register(sub) -> None:
    p = sub.add_parser("add", help="ingest a model and publish a version over the served one's models plus it",
                       description="Ingest a fine-tuned model, then merge it into a new version over the served "
                       "version's models with the served version's settings (K, scope, merge step, mask rule, "
                       "each model's lambda), reusing what that version knows: only the new model's trim "
                       "threshold is computed, then one final pass. The result equals a from-scratch merge of the "
                       "same models. The new version is served unless --no-promote; a running `mmer serve` "
                       "switches to it within seconds. Its models are decided under the store's writer lock from the "
                       "version served at that moment: if another command (add, remove, promote, rollback) promoted "
                       "one since this add started, the new version is derived from that one, so adds at once never "
                       "undo each other; if the model is in it by then, the add is refused (exit 2) and nothing is "
                       "published. An interrupted add leaves the served version as it was; run it again to finish "
                       "it.")
    store_arg(p)
    lock_wait_arg(p)
    p.add_argument("--model", required=True, metavar="ID", help="id of the new model")
    p.add_argument("--modality", required=True, help="its modality: image, video, audio, point, ...")
    p.add_argument("--path", required=True, help="its checkpoint directory")
    p.add_argument("--format", choices=FORMAT_NAMES,
                   help="checkpoint format (default: detected)")
    p.add_argument("--mapping", metavar="FILE", help="key-mapping JSON for --format generic")
    p.add_argument("--lam", type=float, default=1.0, help="its mask lambda (default 1.0)")
    p.add_argument("--task", default=None, help="what it was fine-tuned for (e.g. a new task of an existing modality)")
    p.add_argument("--no-promote", action="store_true", help="publish the version without serving it")
    add_run_options(p)
    p.set_defaults(run=run_add)

    p = sub.add_parser("remove", help="publish a version over the served one's models without one of them",
                       description="A new version without MODEL, with the served version's settings (equal to a "
                       "from-scratch merge of the rest). The version and the model's removal are one catalog "
                       "commit: an interrupted remove leaves the store as it was, and running it again finishes it. "
                       "Decided under the store's writer lock from the version served at that moment (a version "
                       "another command promoted meanwhile keeps its changes). Refused (exit 2, nothing changed) for "
                       "an unknown id, a model not in the served version, or its last model. The model's data stays "
                       "for the versions that hold it; `mmer gc --keep K` removes it once none does.")
    store_arg(p)
    lock_wait_arg(p)
    p.add_argument("--model", required=True, metavar="ID", help="the model to leave out")
    p.add_argument("--no-promote", action="store_true", help="publish the version without serving it")
    add_run_options(p)
    p.set_defaults(run=run_remove)

    p = sub.add_parser("promote", help="serve a published version",
                       description="Make VERSION the served version (one catalog commit, decided under the store's "
                       "writer lock); running servers follow.")
    store_arg(p, quiet=False)
    lock_wait_arg(p)
    p.add_argument("--version", type=int, required=True, help="the published version to serve")
    p.set_defaults(run=run_promote)

    p = sub.add_parser("rollback", help="serve the version served before the current one",
                       description="Undo the last promotion: serve the version that was served before it (as the "
                       "serving log stands under the store's writer lock, after any promotion that ran first).")
    store_arg(p, quiet=False)
    lock_wait_arg(p)
    p.set_defaults(run=run_rollback)


def _report(derived, served: bool) -> None:
    print(describe_version(derived.record, served))
    how = "reused the served version's thresholds and majority sign" if derived.reused else "merged from scratch"
    print(f"  {how}; " + ", ".join(f"{k} {v:.1f}s" for k, v in derived.seconds.items()))


def run_add(args) -> None:
    from mmer_dist.merge.incremental import add_model

    options = run_options(args, args.store)
    derived = add_model(args.store, args.model, args.path, args.modality, options.pop("backend"), fmt=args.format,
                        mapping_file=args.mapping, lam=args.lam, task=args.task, promote=not args.no_promote,
                        progress=not args.quiet, **options)
    _report(derived, not args.no_promote)


def run_remove(args) -> None:
    from mmer_dist.merge.incremental import remove_model

    options = run_options(args, args.store)
    derived = remove_model(args.store, args.model, options.pop("backend"), promote=not args.no_promote,
                           progress=not args.quiet, **options)
    _report(derived, not args.no_promote)


def run_promote(args) -> None:
    from mmer_dist.store.serving import promote

    promote(args.store, args.version)
    print(f"version {args.version} is the served version")


def run_rollback(args) -> None:
    from mmer_dist.store.serving import rollback

    old, new = rollback(args.store)
    print(f"rolled back: version {new} is served again (was {old})")
