"""Helpers for the store, ingest, export and CLI tests: run the CLI, load checkpoints the plain
way (``safetensors.torch.load_file``), compare tensors bit for bit, and snapshot a store's visible
state so a failed command can be shown to have changed nothing.

Nothing here reimplements the code under test: checkpoints are read with safetensors directly,
references come from ``mmer_dist.method.reference``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmer_dist.cli import main as cli_main
from mmer_dist.formats import FormatMapping
from mmer_dist.method import MergeSettings
from mmer_dist.method.reference import ReferenceResult, reference_merge
from mmer_dist.store.store import Store
from mmer_dist.demo.tiny_models import GENERIC_MAPPING_FILE

# the ``mmer`` console script of the running interpreter's environment (else ``python -m``)
_SCRIPT = Path(sys.executable).parent / "mmer"
MMER = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "mmer_dist.cli"]
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")

# -- running the CLI ---------------------------------------------------------------------------


@dataclass
class CliResult:
    rc: int
    out: str
    err: str


def run_cli(*args: str | os.PathLike, ok: bool = True) -> CliResult:
    """``mmer ARGS`` in this process (the real argument parser and commands, no subprocess
    start-up). ``ok=True`` asserts exit status 0; ``ok=False`` asserts a failure."""
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli_main(argv)
        except SystemExit as e:  # argparse errors
            rc = int(e.code) if isinstance(e.code, int) else 2
    result = CliResult(rc, out.getvalue(), err.getvalue())
    if ok:
        assert rc == 0, f"mmer {' '.join(argv)} failed ({rc}):\n{result.err}\n{result.out}"
    else:
        assert rc != 0, f"mmer {' '.join(argv)} should have failed:\n{result.out}"
    return result


def _as_from_a_terminal() -> None:
    """In the child before exec: Ctrl-C and SIGTERM with their default actions and unblocked, as
    a shell in a terminal starts a command. A child inherits ignored signals, and something in
    a long test session (a library's handler set-up) can leave SIGINT ignored in this process:
    Python then installs no KeyboardInterrupt handler and a test's Ctrl-C is silently lost."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])


def mmer_subprocess(*args: str | os.PathLike, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """``mmer ARGS`` as a separate process (for kill and Ctrl-C tests), ``env`` added to ours."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.Popen([*MMER, *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_as_from_a_terminal, **popen)


# -- checkpoints, read the plain way -------------------------------------------------------------


def load_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or shards), by key."""
    out: dict[str, torch.Tensor] = {}
    files = sorted(Path(path).glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    for f in files:
        part = load_file(f)
        assert not set(part) & set(out), f"duplicate keys across shards in {path}"
        out.update(part)
    return out


def mapping_of(path: str | Path, fmt: str) -> FormatMapping:
    return FormatMapping.load(Path(path) / GENERIC_MAPPING_FILE if fmt == "generic" else fmt)


def split_checkpoint(path: str | Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LLM tensors by canonical base name, component tensors by source key)."""
    tensors = load_dir(path)
    split = mapping_of(path, fmt).split(tensors.keys())
    assert not split.unknown, split.unknown
    return {c: tensors[s] for c, s in split.llm.items()}, {k: tensors[k] for k in split.component}


def aux_files(path: str | Path) -> dict[str, bytes]:
    """Non-weight files of a checkpoint directory, by relative path."""
    root = Path(path)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)
            and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def shared_rows(llm: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rows a model shares with the base (extra vocabulary rows cut off)."""
    return {k: v[: base[k].shape[0]] if k in VOCAB_TENSORS else v for k, v in llm.items()}


# -- comparisons ---------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view)


def assert_identical(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Same dtype, shape and bits (so -0.0 vs 0.0 and NaN payloads count)."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.equal(_bits(got), _bits(want)):
        diff = (_bits(got) != _bits(want))
        raise AssertionError(f"{what}: {int(diff.sum())} of {got.numel()} entries differ "
                             f"(first at flat index {int(diff.reshape(-1).nonzero()[0])})")


def assert_state_dicts_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str = "") -> None:
    assert sorted(got) == sorted(want), (
        f"{what}: keys differ: missing {sorted(set(want) - set(got))[:5]}, extra {sorted(set(got) - set(want))[:5]}")
    for k in want:
        assert_identical(got[k], want[k], f"{what} {k}")


# -- store state -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreState:
    """What a reader can see of a store, plus every file in it (lock file aside)."""

    seq: int
    models: tuple
    versions: tuple
    files: tuple[str, ...]

    @classmethod
    def capture(cls, path: str | Path) -> StoreState:
        """Files exclude the writer lock and the metadata of empty zarr groups (``models/zarr.json``
        that zarr writes for a parent group when the first model's arrays are created)."""
        root = Path(path)

        def counts(p: Path) -> bool:
            if p.name == ".writer.lock":
                return False
            if p.name == "zarr.json" and p.parent != root and [q.name for q in p.parent.iterdir()] == ["zarr.json"]:
                return False
            return True

        files = tuple(sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                             if p.is_file() and counts(p))) if root.exists() else ()
        if (root / "zarr.json").exists():
            try:
                catalog = Store.open(str(root)).catalog()
                return cls(catalog.seq, catalog.models, catalog.versions, files)
            except Exception:  # not one of ours: files only
                pass
        return cls(-1, (), (), files)

    def model_ids(self) -> list[str]:
        return [m.id for m in self.models]


def status_json(store: str | Path) -> dict:
    return json.loads(run_cli("status", "--store", store, "--json").out)


# -- reference merges --------------------------------------------------------------------------------


def reference_for_version(version: dict, base: dict[str, torch.Tensor],
                          models: dict[str, dict[str, torch.Tensor]]) -> ReferenceResult:
    """``reference_merge`` with a published version's settings (from ``mmer status --json``),
    over the source checkpoints' shared rows, models in the version's order."""
    settings = MergeSettings.from_record(version)  # the version record's settings columns
    ids = version["models"]
    return reference_merge(base, [shared_rows(models[m], base) for m in ids], settings, ids)
