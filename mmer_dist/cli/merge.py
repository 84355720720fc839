"""``mmer merge``: a new version over the store's models, on the local or the Ray backend."""

from __future__ import annotations

import argparse
import dataclasses

from mmer_dist.cli.args import json_object, lam_or_auto, store_arg
from mmer_dist.errors import InvalidInputError
from mmer_dist.method.masks import MASK_RULES
from mmer_dist.method.settings import MERGE_METHODS
from mmer_dist.method.trim import SCOPES


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge the store's models into a new version",
                       description="Compute tau* and the per-model masks over the store's models and publish "
                       "them as a new immutable version.")
    store_arg(p)
    add_merge_options(p)
    p.add_argument("--backend", choices=["local", "ray"], default="local", help="where the passes run (default local)")
    p.add_argument("--address", default=None, help="Ray address for --backend ray: auto, ray://host:10001, or "
                   "'local' for an embedded Ray (default: $RAY_ADDRESS, else local)")
    p.add_argument("--workers", type=int, default=None, help="shards (one Ray actor each); default: one per node "
                   "for ray, 1 for local")
    p.add_argument("--worker-resources", type=json_object, default=None, metavar="JSON",
                   help='with --backend ray: custom Ray resources each shard actor needs, e.g. \'{"merge_node": 1}\' '
                   "to place one actor per node that offers one")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="fuse the per-chunk kernels with torch.compile (default: on for models above 50M parameters)")
    p.add_argument("--device", default="auto", help="torch device for --backend local: auto, cpu, cuda (default auto; "
                   "Ray workers use the GPU Ray assigns them, if any)")
    p.set_defaults(run=run)


def add_merge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--merge", choices=MERGE_METHODS, default=None,
                   help="merge step producing tau* (default ties; ta with --mask tall)")
    p.add_argument("--topk", type=float, default=0.8, help="K: fraction of each task vector kept by the trim (default 0.8)")
    p.add_argument("--scope", choices=SCOPES, default="global", help="trim over all LLM parameters of a model "
                   "(global, default) or within each tensor")
    p.add_argument("--alpha", type=float, default=1.0, help="theta* = theta_pre + alpha * tau* (default 1.0)")
    p.add_argument("--mask", choices=MASK_RULES, default="mmer", help="mask rule (default mmer)")
    p.add_argument("--lam", type=lam_or_auto, action="append", default=[], metavar="ID=VALUE",
                   help="mask lambda of one model (repeatable; default: the model's ingest --lam), or 'auto': "
                   "each model's lambda recorded by `mmer calibrate`")
    p.add_argument("--dare-rate", type=float, default=0.0, help="DARE drop rate applied to every task vector (default 0)")
    p.add_argument("--dare-seed", type=int, default=0, help="DARE seed (default 0)")
    p.add_argument("--neuro-energy", type=float, default=1.0,
                   help="with --merge neuro: keep the leading singular directions holding this fraction of each "
                   "row's energy (rank cut; default 1.0 = all)")
    p.add_argument("--neuro-keep-parallel", action="store_true",
                   help="with --merge neuro: keep the task vector's part parallel to the pre-trained row (default: drop)")
    p.add_argument("--models", nargs="+", metavar="ID", default=None, help="merge only these models (default: all)")


def merge_request(args):
    from mmer_dist.merge.engine import MergeRequest

    method = args.merge or ("ta" if args.mask == "tall" else "ties")
    if method != "neuro" and (args.neuro_energy != 1.0 or args.neuro_keep_parallel):
        raise InvalidInputError("--neuro-energy / --neuro-keep-parallel apply to --merge neuro only")
    return MergeRequest(method=method, topk=args.topk, scope=args.scope, alpha=args.alpha, mask_rule=args.mask,
                        lam=dict(args.lam), dare_rate=args.dare_rate, dare_seed=args.dare_seed,
                        neuro_energy=args.neuro_energy, neuro_keep_parallel=args.neuro_keep_parallel,
                        models=tuple(args.models) if args.models else None)


def run(args) -> None:
    from mmer_dist.merge.engine import merge
    from mmer_dist.merge.options import choose_backend, resolve_compile, resolve_device
    from mmer_dist.store.store import Store

    auto = "auto" in args.lam
    if auto and len(args.lam) > 1:
        raise InvalidInputError("--lam auto takes every model's lambda from the calibration; drop the ID=VALUE ones")
    request = merge_request(argparse.Namespace(**{**vars(args), "lam": [] if auto else args.lam}))
    if auto:
        from mmer_dist.calibrate import auto_lams

        request = dataclasses.replace(request, lam=auto_lams(Store.open(args.store), request))
    if args.backend == "local" and (args.address or args.worker_resources):
        raise InvalidInputError("--address and --worker-resources are for --backend ray")
    if args.backend == "ray" and args.device != "auto":
        raise InvalidInputError("--device is for --backend local; Ray workers use the GPU Ray assigns them, if any")
    store = Store.open(args.store)
    compile = resolve_compile(args.compile, store.catalog())
    device = resolve_device(args.device) if args.backend == "local" else "cpu"
    backend, workers = choose_backend(args.backend, args.address, args.workers, args.worker_resources)
    record = merge(args.store, request, backend, workers=workers, compile=compile, device=device,
                   progress=not args.quiet)
    densities = ", ".join(f"{m}={d:.3f}" for m, d in zip(record.models, record.mask_density))
    print(f"published version {record.version}: {record.method}/{record.mask_rule}, K={record.topk}, "
          f"{len(record.models)} models, mask density {densities}, {record.seconds:.1f}s ({record.backend})")
