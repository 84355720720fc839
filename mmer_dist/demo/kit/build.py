"""Build the demo kit (train the base and every fine-tune), cached by (kit code, size, seed).

``build_kit()`` returns the cached kit when one is complete for this code version, size and seed,
else trains one: the base on the ``facts`` text task, then each model fully fine-tuned from it,
each saved with ``save_pretrained`` and its processor, each scored with the reference evaluator.
A kit is built in a temporary directory beside the cache entry and renamed into place only when
every file and the manifest (``kit.json``) are written, under a file lock, so a crash or a
concurrent build never leaves a partial entry that a later call takes as complete.

Bit-identical for a seed: numpy generators and torch generators are seeded per model, training
runs on the CPU with one intra-op thread (fixed reduction order on any machine; also the fastest
for ops this small, measured), and the cache key includes the torch / transformers versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from filelock import FileLock

from mmer_dist.demo.kit import encoding, models, training
from mmer_dist.demo.kit.evaluate import KIT_META, cached_split, evaluate, quiet_transformers
from mmer_dist.demo.kit.tasks import Split, get_task
from mmer_dist.demo.kit.tokenizer import build_tokenizer
from mmer_dist.errors import InvalidInputError, StoreError
from mmer_dist.media.processor import load_processor

KIT_FORMAT = 1  # bump when the manifest's layout changes
MANIFEST = "kit.json"
ENCODER_PREFIXES = ("model.vision_tower.", "model.video_tower.", "model.image_tower.", "model.multi_modal_projector.")


@dataclass(frozen=True)
class KitSize:
    """How much data and training a kit gets; ``steps`` per model, samples per task."""

    base_steps: int
    steps: dict[str, int]
    n_train: dict[str, int]
    n_test: dict[str, int]
    batch_size: int = 32


SIZES: dict[str, KitSize] = {
    "demo": KitSize(
        base_steps=300,
        steps={"digits": 450, "tones": 120, "shapes": 120, "motion": 150, "parity": 250},
        n_train={"digits": 1437, "tones": 1500, "shapes": 1500, "motion": 1500, "parity": 1437},
        n_test={"digits": 360, "tones": 300, "shapes": 300, "motion": 300, "parity": 360}),
    "test": KitSize(
        base_steps=150,
        steps={"digits": 100, "tones": 40, "shapes": 40, "motion": 60, "parity": 90},
        n_train={"digits": 400, "tones": 400, "shapes": 400, "motion": 400, "parity": 400},
        n_test={"digits": 100, "tones": 100, "shapes": 100, "motion": 100, "parity": 100}),
}
# (model id = task name, added later?) in the order they are built and ingested
MODELS = (("digits", False), ("tones", False), ("shapes", False), ("motion", False), ("parity", True))


@dataclass(frozen=True)
class KitModel:
    id: str  # also its task's name
    task: str
    format: str  # "llava-hf" or "video-llava-hf" (mmer ingest --format)
    modality: str  # mmer ingest --modality
    part_type: str  # the content part its media comes in
    path: Path
    added: bool  # the model `mmer add` brings in later (a new task of an existing modality)
    accuracy: float  # held-out, measured when the kit was built
    base_accuracy: float  # the same encoder around the base LLM
    chance: float
    parameters: int
    bytes: int


@dataclass(frozen=True)
class Kit:
    root: Path
    size: str
    seed: int
    base: Path
    base_facts_accuracy: float
    models: dict[str, KitModel]
    build_seconds: float
    sha256: dict[str, str] = field(repr=False)

    @property
    def initial(self) -> list[KitModel]:
        return [m for m in self.models.values() if not m.added]

    @property
    def added(self) -> list[KitModel]:
        return [m for m in self.models.values() if m.added]

    def split(self, task: str) -> Split:
        """The seeded train / held-out samples the kit used for ``task``."""
        sizes = SIZES[self.size]
        if task == "facts":
            return cached_split("facts", self.seed, 0, 0)
        return cached_split(task, self.seed, sizes.n_train[task], sizes.n_test[task])


def default_cache_dir() -> Path:
    return Path(os.environ.get("MMER_KIT_CACHE") or Path.home() / ".cache" / "mmer-dist" / "kit")


def build_kit(cache_dir: str | Path | None = None, size: str = "demo", seed: int = 0,
              log: Callable[[str], None] | None = None, progress: Callable[[int, int, str], None] | None = None) -> Kit:
    """The kit for (this code, ``size``, ``seed``): from the cache if complete, else built there.
    ``log`` gets a line per trained model; ``progress(done, total, now)`` is called only when the
    kit is trained, before each of its ``total`` models (``now``: the one training) and at the end."""
    if size not in SIZES:
        raise InvalidInputError(f"kit size {size!r} unknown; choose from {sorted(SIZES)}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    name = f"{size}-seed{seed}-{cache_key(size, seed)[:16]}"
    final = root / name
    with FileLock(str(root / f"{name}.lock")):  # one builder per entry; the check is under the lock
        if (final / MANIFEST).is_file():
            return load_kit(final)
        for stale in root.glob(f".{name}.tmp-*"):  # left by a build that died (we hold the lock)
            shutil.rmtree(stale)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            _build(tmp, size, seed, log or (lambda message: None), progress or (lambda done, total, now: None))
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 is for while it is being written
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return load_kit(final)


def cache_key(size: str, seed: int) -> str:
    """Digest of what determines the weights: the kit's and media's source, library versions, size, seed."""
    import sklearn
    import transformers

    here = Path(__file__).resolve().parent
    digest = hashlib.sha256(json.dumps({
        "format": KIT_FORMAT, "size": size, "seed": seed, "torch": torch.__version__,
        "transformers": transformers.__version__, "numpy": np.__version__, "sklearn": sklearn.__version__,
    }, sort_keys=True).encode())
    for source in sorted([*here.glob("*.py"), *(here.parent.parent / "media").glob("*.py")]):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


def load_kit(path: str | Path) -> Kit:
    """A built kit from its directory; each checkpoint's files must match the manifest's digest."""
    path = Path(path)
    try:
        doc = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: not a complete kit ({e})") from None
    digests = {name: checkpoint_sha256(path / name) for name in doc["sha256"]}
    changed = sorted(k for k, v in digests.items() if v != doc["sha256"][k])
    if changed:
        raise StoreError(f"kit {path}: checkpoints {changed} differ from when it was built; delete {path} to rebuild")
    kit_models = {m["id"]: KitModel(**{**m, "path": path / m["path"]}) for m in doc["models"]}
    return Kit(root=path, size=doc["size"], seed=doc["seed"], base=path / "base",
               base_facts_accuracy=doc["base_facts_accuracy"], models=kit_models,
               build_seconds=doc["build_seconds"], sha256=doc["sha256"])


def checkpoint_sha256(directory: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    if not files:
        raise StoreError(f"kit checkpoint {directory} is missing or empty")
    for p in files:
        digest.update(p.relative_to(directory).as_posix().encode() + b"\0" + p.read_bytes())
    return digest.hexdigest()


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


@contextmanager
def _build_environment() -> Iterator[None]:
    """One intra-op thread and no progress bars while building; the caller's settings after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with quiet_transformers():
            yield
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, size: str, seed: int, log: Callable[[str], None],
           progress: Callable[[int, int, str], None]) -> None:
    sizes = SIZES[size]
    start = time.perf_counter()
    steps = 1 + len(MODELS)  # the base, then each fine-tune
    progress(0, steps, "base")
    with _build_environment():
        tokenizer = build_tokenizer()
        with torch.random.fork_rng():
            torch.manual_seed(_seed(seed, "base"))
            base = models.new_base()
        facts = get_task("facts")
        data = encoding.encode(tokenizer, facts, facts.split(seed, 0, 0).train, None, with_answer=True)
        base.set_attn_implementation("eager")  # faster than SDPA on CPU at these sizes; not saved
        training.train(base, data, training.TrainSettings(steps=sizes.base_steps, batch_size=sizes.batch_size, lr=3e-3),
                       seed=_seed(seed, "base/batches"))
        models.save_base(base, tokenizer, out / "base")
        _write_meta(out / "base", "facts", seed, sizes)
        base_facts = evaluate(out / "base")
        log(f"base: facts {base_facts:.3f}  ({time.perf_counter() - start:.1f} s)")
        entries = []
        for done, (model_id, added) in enumerate(MODELS, start=1):
            progress(done, steps, model_id)
            entries.append(_build_finetune(out, model_id, added, base, tokenizer, seed, sizes, log))
        progress(steps, steps, "")
    manifest = {
        "format": KIT_FORMAT, "size": size, "seed": seed, "key": cache_key(size, seed), "base_facts_accuracy": base_facts,
        "models": entries, "build_seconds": round(time.perf_counter() - start, 2),
        "sha256": {name: checkpoint_sha256(out / name) for name in ["base", *(m for m, _ in MODELS)]},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _build_finetune(out: Path, model_id: str, added: bool, base, tokenizer, seed: int, sizes: KitSize,
                    log: Callable[[str], None]) -> dict:
    t0 = time.perf_counter()
    task, spec, path = get_task(model_id), models.SPECS[model_id], out / model_id
    with torch.random.fork_rng():
        torch.manual_seed(_seed(seed, model_id))
        model = models.new_finetune(spec, base, tokenizer)
    model.config.save_pretrained(path)  # the processor loader reads the model type
    models.save_processor(spec, tokenizer, path)
    _write_meta(path, model_id, seed, sizes)
    split = cached_split(model_id, seed, sizes.n_train[model_id], sizes.n_test[model_id])
    data = encoding.encode(load_processor(path), task, split.train, spec.adapter, with_answer=True)
    model.set_attn_implementation("eager")
    training.train(model, data, training.TrainSettings(steps=sizes.steps[model_id], batch_size=sizes.batch_size),
                   seed=_seed(seed, f"{model_id}/batches"), encoder_prefixes=ENCODER_PREFIXES)
    models.save_model(model, path)
    accuracy, base_accuracy = evaluate(path), evaluate(path, llm=out / "base")
    log(f"{model_id}: held-out accuracy {accuracy:.3f} (base LLM {base_accuracy:.3f}, chance {task.chance:.3f}) "
        f"({time.perf_counter() - t0:.1f} s)")
    return {"id": model_id, "task": model_id, "format": spec.fmt, "modality": task.modality, "part_type": task.part_type,
            "path": model_id, "added": added, "accuracy": accuracy, "base_accuracy": base_accuracy,
            "chance": task.chance, "parameters": sum(p.numel() for p in model.parameters()),
            "bytes": sum(p.stat().st_size for p in path.iterdir())}


def _write_meta(path: Path, task: str, seed: int, sizes: KitSize) -> None:
    splits = {t: {"n_train": sizes.n_train[t], "n_test": sizes.n_test[t]} for t in sizes.n_train}
    splits["facts"] = {"n_train": 0, "n_test": 0}
    doc = {"task": task, "seed": seed, "splits": splits}
    (path / KIT_META).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
