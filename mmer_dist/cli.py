"""The ``mmer`` command line: parse, build typed config, call one library function per command."""

from __future__ import annotations

import argparse
import sys

from mmer_dist.errors import InvalidInputError, MmerError
from mmer_dist.method.masks import MASK_RULES
from mmer_dist.method.settings import MERGE_METHODS
from mmer_dist.method.trim import SCOPES


def _lam_pair(text: str) -> tuple[str, float]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected ID=VALUE, got {text!r}")
    model, value = text.rsplit("=", 1)
    try:
        return model, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"lambda of {model!r} is not a number: {value!r}") from None


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB)") from None


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
        raise argparse.ArgumentTypeError(f"expected a JSON object of resource amounts, got {text!r}")
    return value


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="store location: a local path or an fsspec URL (s3://...)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmer", description="Merge fine-tuned multimodal LLMs with MMER into a "
                                     "versioned store, and export or serve the result.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="add the base LLM (creates the store) or a fine-tuned model",
                       description="Ingest a base HF Llama-family checkpoint (--base, creates the store) or a "
                       "fine-tuned multimodal model (--model ID --modality M --path PATH).")
    _store_arg(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--base", metavar="PATH", help="base HF Llama-family checkpoint directory")
    what.add_argument("--model", metavar="ID", help="id of the fine-tuned model to add")
    p.add_argument("--path", help="checkpoint directory of the model (with --model)")
    p.add_argument("--modality", help="modality the model handles: image, video, audio, point, ... (with --model)")
    p.add_argument("--format", choices=["llava-hf", "video-llava-hf", "llava", "llama", "generic"],
                   help="checkpoint format (default: detected from config.json)")
    p.add_argument("--mapping", metavar="FILE", help="key-mapping JSON for --format generic")
    p.add_argument("--lam", type=float, default=1.0, help="default mask lambda of this model (default 1.0)")
    p.add_argument("--chunk-elems", type=int, default=None, help="entries per chunk (with --base; default 4M)")

    p = sub.add_parser("merge", help="merge the store's models into a new version",
                       description="Compute tau* and the per-model masks over the store's models and publish "
                       "them as a new immutable version.")
    _store_arg(p)
    add_merge_options(p)
    p.add_argument("--backend", choices=["local", "ray"], default="local", help="where the passes run (default local)")
    p.add_argument("--address", default=None, help="Ray address for --backend ray: auto, ray://host:10001, or "
                   "'local' for an embedded Ray (default: $RAY_ADDRESS, else local)")
    p.add_argument("--workers", type=int, default=None, help="shards (one Ray actor each); default: one per node "
                   "for ray, 1 for local")
    p.add_argument("--worker-resources", type=_json_object, default=None, metavar="JSON",
                   help='with --backend ray: custom Ray resources each shard actor needs, e.g. \'{"merge_node": 1}\' '
                   "to place one actor per node that offers one")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="fuse the per-chunk kernels with torch.compile (default: on for models above 50M parameters)")
    p.add_argument("--device", default="auto", help="torch device for --backend local: auto, cpu, cuda (default auto; "
                   "Ray workers use the GPU Ray assigns them, if any)")

    p = sub.add_parser("export", help="write a HF checkpoint: a reconstructed model, the merged model, or text weights",
                       description="Export a standard HF checkpoint that from_pretrained loads.")
    _store_arg(p)
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
    p.add_argument("--max-shard-size", type=_size, default="2GB", help="largest safetensors file (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")

    p = sub.add_parser("demo", help="build tiny multimodal models, merge them on an embedded Ray, show retention",
                       description="The whole engine end to end on small built-in models: build, ingest, merge on "
                       "an embedded Ray cluster, export, and compare reconstructed models with the originals.")
    p.add_argument("--workdir", default="mmer-demo", help="where checkpoints, store and exports go (default ./mmer-demo; "
                   "replaced on each run)")
    p.add_argument("--workers", type=int, default=2, help="Ray shard actors (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("status", help="show the store's base, models and versions",
                       description="Print the store's catalog as tables (or JSON).")
    p.add_argument("--store", required=True, help="store location")
    p.add_argument("--json", action="store_true", help="machine-readable JSON")
    return parser


def add_merge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--merge", choices=MERGE_METHODS, default=None,
                   help="merge step producing tau* (default ties; ta with --mask tall)")
    p.add_argument("--topk", type=float, default=0.8, help="K: fraction of each task vector kept by the trim (default 0.8)")
    p.add_argument("--scope", choices=SCOPES, default="global", help="trim over all LLM parameters of a model "
                   "(global, default) or within each tensor")
    p.add_argument("--alpha", type=float, default=1.0, help="theta* = theta_pre + alpha * tau* (default 1.0)")
    p.add_argument("--mask", choices=MASK_RULES, default="mmer", help="mask rule (default mmer)")
    p.add_argument("--lam", type=_lam_pair, action="append", default=[], metavar="ID=VALUE",
                   help="mask lambda of one model (repeatable; default: the model's ingest --lam)")
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


def cmd_ingest(args) -> None:
    from mmer_dist.store import ingest, layout

    if args.base:
        for flag in ("path", "modality", "mapping", "format"):
            if getattr(args, flag):
                raise InvalidInputError(f"--{flag} is for --model, not --base")
        if args.lam != 1.0:
            raise InvalidInputError("--lam is for --model, not --base")
        ingest.ingest_base(args.store, args.base, chunk_elems=args.chunk_elems or layout.DEFAULT_CHUNK_ELEMS,
                           progress=not args.quiet)
        return
    if not args.path or not args.modality:
        raise InvalidInputError("--model needs --path PATH and --modality M")
    if args.chunk_elems is not None:
        raise InvalidInputError("--chunk-elems is fixed by the base (the store's chunk grid); it goes with --base")
    ingest.ingest_model(args.store, args.model, args.path, args.modality, fmt=args.format,
                        mapping_file=args.mapping, lam=args.lam, progress=not args.quiet)


def cmd_merge(args) -> None:
    from mmer_dist.merge.engine import merge
    from mmer_dist.merge.options import choose_backend, resolve_compile, resolve_device
    from mmer_dist.store.store import Store

    request = merge_request(args)
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


def cmd_export(args) -> None:
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


def cmd_status(args) -> None:
    from mmer_dist.status import print_status

    print_status(args.store, as_json=args.json)


def cmd_demo(args) -> None:
    from mmer_dist.demo import run_demo

    run_demo(args.workdir, workers=args.workers, progress=not args.quiet)


COMMANDS = {"demo": cmd_demo, "ingest": cmd_ingest, "merge": cmd_merge, "export": cmd_export, "status": cmd_status}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except MmerError as e:
        print(f"mmer {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
