"""``mmer export``: standard HF checkpoints from the store."""

from __future__ import annotations

from mmer_dist.cli.args import size, store_arg
from mmer_dist.errors import InvalidInputError
from mmer_dist.method.trim import SCOPES


def register(sub) -> None:
    p = sub.add_parser("export", help="write a HF checkpoint: a reconstructed model, the merged model, or text weights",
                       description="Export a standard HF checkpoint that from_pretrained loads.")
    store_arg(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", metavar="ID", help="model ID reconstructed: theta_pre + m_i * tau*, with its own "
                      "modality component, in its original format")
    what.add_argument("--merged", action="store_true", help="the merged LLM theta* = theta_pre + alpha * tau*")
    what.add_argument("--text", action="store_true", help="the text-token weights theta_pre + mean(m) * tau*")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--version", type=int, default=None, help="store version (default: latest)")
    p.add_argument("--original", action="store_true", help="with --model: the stored original weights, bit for bit")
    p.add_argument("--method", choices=["ties", "ta", "naive", "dare", "neuro"], default=None,
                   help="with --merged: compute this baseline from the stored models instead of using a version "
                   "(dare = task arithmetic over DARE-dropped task vectors; neuro = NeuroMerging)")
    p.add_argument("--topk", type=float, default=0.8, help="with --method ties|neuro: K (default 0.8)")
    p.add_argument("--scope", choices=SCOPES, default="global", help="with --method ties: trim scope")
    p.add_argument("--alpha", type=float, default=1.0, help="with --method: scale of tau* (default 1.0)")
    p.add_argument("--dare-rate", type=float, default=0.0, help="with --method: DARE drop rate (dare: default 0.5)")
    p.add_argument("--dare-seed", type=int, default=0, help="with --method: DARE seed")
    p.add_argument("--neuro-energy", type=float, default=1.0, help="with --method neuro: rank cut (default 1.0)")
    p.add_argument("--neuro-keep-parallel", action="store_true", help="with --method neuro: keep the parallel part")
    p.add_argument("--max-shard-size", type=size, default="2GB", help="largest safetensors file (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(run=run)


BASELINE_FLAGS = {"topk": 0.8, "scope": "global", "alpha": 1.0, "dare_rate": 0.0, "dare_seed": 0,
                  "neuro_energy": 1.0, "neuro_keep_parallel": False}


def _check_export_flags(args) -> None:
    """Refuse flags that would be silently ignored for what is being exported."""
    if args.original and not args.model:
        raise InvalidInputError("--original goes with --model")
    if args.original and args.version is not None:
        raise InvalidInputError("--original exports the ingested weights, which belong to no version; drop --version")
    if args.method and not args.merged:
        raise InvalidInputError("--method goes with --merged")
    if args.method and args.version is not None:
        raise InvalidInputError("--method computes a baseline from the stored models, not from a version; drop --version")
    if not args.method:
        changed = [f"--{k.replace('_', '-')}" for k, default in BASELINE_FLAGS.items() if getattr(args, k) != default]
        if changed:
            raise InvalidInputError(f"{', '.join(changed)} only apply with --merged --method")


def run(args) -> None:
    from mmer_dist import export
    from mmer_dist.merge.engine import MergeRequest

    _check_export_flags(args)
    common = dict(max_shard_bytes=args.max_shard_size, overwrite=args.overwrite, progress=not args.quiet)
    if args.model:
        out = export.export_model(args.store, args.model, args.out, version=args.version, original=args.original, **common)
    elif args.text:
        out = export.export_text(args.store, args.out, version=args.version, **common)
    else:
        request = MergeRequest(topk=args.topk, scope=args.scope, alpha=args.alpha, dare_rate=args.dare_rate,
                               dare_seed=args.dare_seed, neuro_energy=args.neuro_energy,
                               neuro_keep_parallel=args.neuro_keep_parallel)
        out = export.export_merged(args.store, args.out, version=args.version, method=args.method, request=request,
                                   **common)
    print(f"wrote {out}")
