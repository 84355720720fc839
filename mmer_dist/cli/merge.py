"""``mmer merge``: a new version over the store's models, on the local or the Ray backend."""

from __future__ import annotations

import argparse
import dataclasses

from mmer_dist.cli.args import json_object, lam_or_auto, lock_wait_arg, positive_int, store_arg
from mmer_dist.errors import InvalidInputError
from mmer_dist.method.settings import SETTINGS


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge the store's models into a new version",
                       description="Compute tau* and the per-model masks over the store's models and publish "
                       "them as a new immutable version.")
    store_arg(p)
    lock_wait_arg(p)
    add_merge_options(p)
    add_run_options(p)
    p.add_argument("--no-promote", action="store_true", help="publish the version without serving it (an ablation, "
                   "a comparison); `mmer promote` serves it later")
    p.set_defaults(run=run)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Where and how a merge runs (merge, add, remove): backend, Ray placement, kernels, device."""
    p.add_argument("--backend", choices=["local", "ray"], default="local", help="where the passes run (default local)")
    p.add_argument("--address", default=None, help="Ray address for --backend ray: auto, ray://host:10001, or "
                   "'local' for an embedded Ray (default: $RAY_ADDRESS, else local)")
    p.add_argument("--workers", type=positive_int, default=None, help="shards (one Ray actor each); default: one per node "
                   "for ray, 1 for local")
    p.add_argument("--worker-resources", type=json_object, default=None, metavar="JSON",
                   help='with --backend ray: custom Ray resources each shard actor needs, e.g. \'{"merge_node": 1}\' '
                   "to place one actor per node that offers one")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="fused per-chunk kernels: compiled once ahead of time and cached on disk on CPU, torch.compile on GPUs "
                   "(default: on for models above 50M parameters)")
    p.add_argument("--device", default="auto", help="torch device for --backend local: auto, cpu, cuda (default auto; "
                   "Ray workers use the GPU Ray assigns them, if any)")


def run_options(args, store_url: str) -> dict:
    """Backend, workers, compile and device from ``add_run_options``' flags, checked."""
    from mmer_dist.merge.options import choose_backend, resolve_compile, resolve_device
    from mmer_dist.store.store import Store

    if args.backend == "local" and (args.address or args.worker_resources):
        raise InvalidInputError("--address and --worker-resources are for --backend ray")
    if args.backend == "ray" and args.device != "auto":
        raise InvalidInputError("--device is for --backend local; Ray workers use the GPU Ray assigns them, if any")
    compile = resolve_compile(args.compile, Store.open(store_url).catalog())
    device = resolve_device(args.device) if args.backend == "local" else "cpu"
    backend, workers = choose_backend(args.backend, args.address, args.workers, args.worker_resources,
                                      progress=not args.quiet)
    return {"backend": backend, "workers": workers, "compile": compile, "device": device}


def add_settings_options(p: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One option per merge setting (``settings.SETTINGS``), default None = not given, so that
    ``settings_from_args`` can refuse options the chosen method does not use."""
    for name, s in SETTINGS.items():
        if name in exclude:
            continue
        if s.switch:
            p.add_argument(s.flag, dest=name, action="store_const", const=True, default=None, help=s.help)
        else:
            p.add_argument(s.flag, dest=name, type=s.type, choices=s.choices, default=None, help=s.help)


def settings_from_args(args, **fixed):
    from mmer_dist.method.settings import MergeSettings

    given = {name: getattr(args, name, None) for name in SETTINGS}
    given.update(fixed)
    if given.get("method") is None and given.get("mask_rule") == "tall":
        given["method"] = "ta"  # TALL-masks are defined over task arithmetic
    return MergeSettings.from_options(**given)


def add_merge_options(p: argparse.ArgumentParser) -> None:
    add_settings_options(p)
    p.add_argument("--lam", type=lam_or_auto, action="append", default=[], metavar="ID=VALUE",
                   help="mask lambda of one model (repeatable; default: the model's ingest --lam), or 'auto': "
                   "each model's lambda recorded by `mmer calibrate`")
    p.add_argument("--models", nargs="+", metavar="ID", default=None, help="merge only these models (default: all)")


def merge_request(args):
    from mmer_dist.merge.engine import MergeRequest

    lams = [m for m, _ in args.lam]
    repeated = sorted({m for m in lams if lams.count(m) > 1})
    if repeated:
        raise InvalidInputError(f"--lam gives model {', '.join(map(repr, repeated))} more than once")
    return MergeRequest(settings_from_args(args), dict(args.lam), tuple(args.models) if args.models else None)


def run(args) -> None:
    from mmer_dist.merge.engine import merge

    auto = "auto" in args.lam
    if auto and len(args.lam) > 1:
        raise InvalidInputError("--lam auto takes every model's lambda from the calibration; drop the ID=VALUE ones")
    request = merge_request(argparse.Namespace(**{**vars(args), "lam": [] if auto else args.lam}))
    if auto:
        from mmer_dist.calibrate import auto_lams
        from mmer_dist.store.store import Store

        request = dataclasses.replace(request, lam=auto_lams(Store.open(args.store), request))
    options = run_options(args, args.store)
    backend = options.pop("backend")
    record = merge(args.store, request, backend, progress=not args.quiet, promote=not args.no_promote, **options)
    print(describe_version(record, served=not args.no_promote))


def describe_version(record, served: bool) -> str:
    densities = ", ".join(f"{m}={d:.3f}" for m, d in zip(record.models, record.mask_density))
    return (f"published version {record.version}{' (served)' if served else ' (not served: --no-promote)'}: "
            f"{record.method}/{record.mask_rule}, K={record.topk}, {len(record.models)} models, mask density "
            f"{densities}, {record.seconds:.1f}s ({record.backend})")
