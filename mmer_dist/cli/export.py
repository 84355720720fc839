"""``mmer export model|original|merged|text``: standard HF checkpoints from the store.

Each kind is its own subcommand with only the options that mean something for it, so there
are no flag combinations to refuse: ``model`` (theta_pre + m_i * tau* of a version), ``original``
(the ingested weights, bit for bit), ``merged`` (theta* of a version, or a baseline computed now
with ``--method`` and the merge settings it takes), ``text`` (theta_pre + mean(m) * tau*).
"""

from __future__ import annotations

from mmer_dist.cli.args import size, store_arg
from mmer_dist.cli.merge import add_settings_options, settings_from_args
from mmer_dist.errors import InvalidInputError

BASELINES = ("ties", "ta", "naive", "dare", "neuro")


def register(sub) -> None:
    p = sub.add_parser("export", help="write a HF checkpoint: a reconstructed or original model, the merged model, "
                       "or the text weights", description="Export a standard HF checkpoint that from_pretrained loads.")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")

    k = _kind(kinds, "model", "model ID reconstructed from a version: theta_pre + m_i * tau*, with its own modality "
              "component, in its original format", run_model)
    k.add_argument("--model", required=True, metavar="ID", help="the model to export")
    _version(k)

    k = _kind(kinds, "original", "model ID's ingested weights, bit for bit, with its component and files", run_original)
    k.add_argument("--model", required=True, metavar="ID", help="the model to export")

    k = _kind(kinds, "merged", "the merged LLM theta* = theta_pre + alpha * tau* of a version, or a baseline computed "
              "now from the stored models (--method)", run_merged)
    which = k.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, default=None, help="store version (default: latest)")
    which.add_argument("--method", choices=BASELINES, default=None,
                       help="compute this baseline from the stored models instead of reading a version (dare = task "
                       "arithmetic over DARE-dropped task vectors, default rate 0.5; neuro = NeuroMerging)")
    add_settings_options(k, exclude=("method", "mask_rule"))

    k = _kind(kinds, "text", "the text-token weights theta_pre + mean(m) * tau* of a version", run_text)
    _version(k)


def _kind(kinds, name: str, help: str, run):
    k = kinds.add_parser(name, help=help, description=help)
    store_arg(k)
    k.add_argument("--out", required=True, help="output directory (must be new or empty)")
    k.add_argument("--max-shard-size", type=size, default="2GB", help="largest safetensors file (default 2GB)")
    k.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    k.set_defaults(run=run)
    return k


def _version(k) -> None:
    k.add_argument("--version", type=int, default=None, help="store version (default: latest)")


def _common(args) -> dict:
    return dict(max_shard_bytes=args.max_shard_size, overwrite=args.overwrite, progress=not args.quiet)


def run_model(args) -> None:
    from mmer_dist import export

    print(f"wrote {export.export_model(args.store, args.model, args.out, version=args.version, **_common(args))}")


def run_original(args) -> None:
    from mmer_dist import export

    print(f"wrote {export.export_model(args.store, args.model, args.out, original=True, **_common(args))}")


def run_text(args) -> None:
    from mmer_dist import export

    print(f"wrote {export.export_text(args.store, args.out, version=args.version, **_common(args))}")


def run_merged(args) -> None:
    from mmer_dist import export
    from mmer_dist.merge.engine import MergeRequest
    from mmer_dist.method.settings import SETTINGS

    if args.method is None:
        given = [SETTINGS[name].flag for name in SETTINGS if getattr(args, name, None) is not None]
        if given:
            raise InvalidInputError(f"{', '.join(given)} set how a baseline is computed; they go with --method")
        out = export.export_merged(args.store, args.out, version=args.version, **_common(args))
    else:
        fixed = {"method": "ta", "dare_rate": args.dare_rate or 0.5} if args.method == "dare" else {"method": args.method}
        request = MergeRequest(settings_from_args(args, **fixed))
        out = export.export_merged(args.store, args.out, method=args.method, request=request, **_common(args))
    print(f"wrote {out}")
