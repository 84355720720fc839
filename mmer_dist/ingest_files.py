"""Which files of a checkpoint directory a model needs next to its weights, copied by ingest.

Only the files ``from_pretrained`` / ``AutoProcessor`` read are taken: configs (model,
generation, processor, preprocessor), tokenizer files, chat templates and remote-code modules,
at the top level of the checkpoint (plus ``additional_chat_templates/``). Training leftovers,
logs and nested folders such as ``checkpoint-500/`` or ``runs/`` are left out, so a store and
its exports never carry them. A file that is a symbolic link must point inside the checkpoint
(or, for a HuggingFace hub cache snapshot, into that repository's ``blobs/``): a link out of it
would copy a file from elsewhere on the machine into a shared store.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from mmer_dist.errors import FormatError
from mmer_dist.formats.checkpoint import CheckpointReader

NEEDED = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py")
NESTED = ("additional_chat_templates/*.jinja",)
# top-level files matching NEEDED that are training state, not part of the model
TRAINING_STATE = ("trainer_state.json", "training_args.json", "all_results.json", "train_results.json",
                  "eval_results.json", "optimizer*.json", "scheduler*.json", "rng_state*.json")


@dataclass(frozen=True)
class CheckpointFiles:
    needed: list[tuple[str, Path]]  # (relative name, path)
    left_out: list[str]  # top-level entries not copied (folders shown with a trailing '/')


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _inside(path: Path, root: Path) -> bool:
    target = path.resolve()
    if target.is_relative_to(root.resolve()):
        return True
    # a hub cache snapshot: <repo>/snapshots/<rev>/<file> -> <repo>/blobs/<sha>
    return root.parent.name == "snapshots" and target.is_relative_to((root.parent.parent / "blobs").resolve())


def needed_files(reader: CheckpointReader) -> CheckpointFiles:
    root = reader.path
    weights = {p.resolve() for p in reader.files() if p not in reader.aux_files()}
    needed, left_out = [], []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            nested = [p for p in sorted(entry.rglob("*")) if p.is_file()
                      and _matches(p.relative_to(root).as_posix(), NESTED)]
            needed += [(p.relative_to(root).as_posix(), p) for p in nested]
            if not nested:
                left_out.append(entry.name + "/")
            continue
        if entry.resolve() in weights or entry.name.endswith(".index.json"):
            continue  # weights are read tensor by tensor, not copied
        if not _matches(entry.name, NEEDED) or _matches(entry.name, TRAINING_STATE):
            left_out.append(entry.name)
            continue
        needed.append((entry.name, entry))
    for name, path in needed:
        if path.is_symlink() and not _inside(path, root):
            raise FormatError(f"checkpoint {root}: {name} is a link to {path.resolve()}, outside the checkpoint; "
                              "copy the file itself into the checkpoint (ingest never follows a link out of it)")
        if not path.is_file():
            raise FormatError(f"checkpoint {root}: {name} is not a regular file (a broken link?)")
    return CheckpointFiles(needed, left_out)
