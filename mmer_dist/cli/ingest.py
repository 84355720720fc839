"""``mmer ingest``: the base (creates the store), a fine-tuned model, or a manifest of many."""

from __future__ import annotations

from mmer_dist.cli.args import lock_wait_arg, positive_int, store_arg
from mmer_dist.errors import InvalidInputError
from mmer_dist.formats.mapping import FORMAT_NAMES


def register(sub) -> None:
    p = sub.add_parser("ingest", help="add the base LLM (creates the store) or fine-tuned models",
                       description="Ingest a base HF Llama-family checkpoint (--base, creates the store), a "
                       "fine-tuned multimodal model (--model ID --modality M --path PATH), or many of them in "
                       "one process (--manifest FILE: a YAML list of models, optionally with the base; each "
                       "model is checked before the first is written, and models already ingested from the "
                       "same path are skipped, so a re-run continues where an interrupted one stopped).")
    store_arg(p)
    lock_wait_arg(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--base", metavar="PATH", help="base HF Llama-family checkpoint directory")
    what.add_argument("--model", metavar="ID", help="id of the fine-tuned model to add")
    what.add_argument("--manifest", metavar="FILE", help="YAML file: optional 'base: PATH' and 'models:', a list "
                      "of {id, path, modality, format, mapping, lam, task} (paths relative to the file)")
    p.add_argument("--path", help="checkpoint directory of the model (with --model)")
    p.add_argument("--modality", help="modality the model handles: image, video, audio, point, ... (with --model)")
    p.add_argument("--format", choices=FORMAT_NAMES,
                   help="checkpoint format (default: detected from config.json)")
    p.add_argument("--mapping", metavar="FILE", help="key-mapping JSON for --format generic")
    p.add_argument("--lam", type=float, default=1.0, help="default mask lambda of this model (default 1.0)")
    p.add_argument("--chunk-elems", type=positive_int, default=None, help="entries per chunk (with --base; default 4M)")
    p.set_defaults(run=run)


def run(args) -> None:
    from mmer_dist import ingest
    from mmer_dist.store import layout

    if args.manifest:
        from mmer_dist.ingest_manifest import ingest_manifest, load_manifest

        for flag in ("path", "modality", "mapping", "format", "chunk_elems"):
            if getattr(args, flag) is not None:
                raise InvalidInputError(f"--{flag.replace('_', '-')} goes in the manifest's entries, not beside --manifest")
        if args.lam != 1.0:
            raise InvalidInputError("--lam goes in the manifest's entries ('lam:'), not beside --manifest")
        ingest_manifest(args.store, load_manifest(args.manifest), progress=not args.quiet)
        return
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
