"""``mmer gc``: remove abandoned staging (interrupted ingests, merges, catalog writes)."""

from __future__ import annotations

from mmer_dist.cli.args import lock_wait_arg


def register(sub) -> None:
    p = sub.add_parser("gc", help="remove abandoned staging, and with --keep K old versions and removed models",
                       description="Remove what no committed catalog snapshot refers to: models and versions "
                       "whose ingest or merge never committed, staging of published versions, uncommitted "
                       "catalog snapshots. Decided under the writer lock, so nothing a live writer holds is "
                       "touched; committed models and versions never are.")
    p.add_argument("--store", required=True, help="store location: a local path or an fsspec URL (s3://...)")
    lock_wait_arg(p)
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    p.add_argument("--keep", type=int, default=None, metavar="K",
                   help="also remove published versions beyond the K newest (never the served one, nor one a "
                   "running server holds) and removed models no kept version holds")
    p.set_defaults(run=run)


def run(args) -> None:
    from mmer_dist.store.gc import collect_garbage

    garbage = collect_garbage(args.store, dry_run=args.dry_run, keep=args.keep)
    verb = "would remove" if args.dry_run else "removed"
    for item in garbage:
        print(f"{verb} {item.path} ({item.bytes:,} bytes): {item.reason}")
    total = sum(item.bytes for item in garbage)
    print(f"{verb} {len(garbage)} item(s), {total:,} bytes" if garbage else "nothing to remove")
