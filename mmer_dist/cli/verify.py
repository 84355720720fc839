"""``mmer verify``: check every chunk, file and catalog snapshot of a store; name what is damaged."""

from __future__ import annotations

import sys

from mmer_dist.errors import StoreError


def register(sub) -> None:
    p = sub.add_parser("verify", help="check the whole store (catalog, every chunk's checksum, every file)",
                       description="Read the whole store and check it: the catalog snapshots, every array chunk "
                       "(present, crc32c checksum) and every stored file (sha256). Prints each damaged item; "
                       "exits non-zero when anything is damaged. Writes nothing.")
    p.add_argument("--store", required=True, help="store location: a local path or an fsspec URL (s3://...)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=run)


def run(args) -> None:
    from mmer_dist.store.verify import verify_store

    def progress(line: str) -> None:
        print(f"\r\033[Kverify {line}", end="", file=sys.stderr, flush=True)

    report = verify_store(args.store, progress=None if args.quiet or not sys.stderr.isatty() else progress)
    if not args.quiet and sys.stderr.isatty():
        print("\r\033[K", end="", file=sys.stderr)
    for problem in report.problems:
        print(f"damaged: {problem}")
    if report.problems:
        raise StoreError(f"store {args.store!r} is damaged: {len(report.problems)} problem(s) listed above "
                         f"({report.summary()})")
    print(f"store {args.store}: OK ({report.summary()})")
