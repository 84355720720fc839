"""``mmer status``: the catalog as tables (or JSON)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("status", help="show the store's base, models and versions",
                       description="Print the store's catalog as tables (or JSON).")
    p.add_argument("--store", required=True, help="store location")
    p.add_argument("--json", action="store_true", help="machine-readable JSON")
    p.set_defaults(run=run)


def run(args) -> None:
    from mmer_dist.status import print_status

    print_status(args.store, as_json=args.json)
