"""Synthetic Llama-shaped HF checkpoints (safetensors) for the store / merge / mergekit benchmarks,
and cached stores built from them.

    python bench/checkpoints.py                         # base + 8 fine-tunes of ~100M params
    python bench/checkpoints.py --params 500e6 --models 1 --shard-bytes 2e9

The tensors are exactly those of ``bench/common.py``'s raw cache (same shapes, seeds and
generators: base ~ N(0, 0.02) rounded to bf16, model_i = bf16(base + N(0, 2e-4))), so a merge of
these checkpoints sees the same numbers as ``core_throughput.py``. The raw cache is generated
once (``bench/out/core-cache``); each checkpoint is that file's bytes behind a safetensors header,
copied by the kernel (``copy_file_range``), so building them costs one copy.

Layout of a checkpoint set (``bench/out/checkpoints/<shape tag>[-shardN]/``)::

    base/       config.json (transformers.LlamaConfig, architectures ["LlamaForCausalLM"]),
                model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    model_0/    the same layout: a text-only fine-tune, ingested with ``--format llama``
    ...

A checkpoint directory is complete when it holds ``.complete`` (hidden files are not part of a
checkpoint for mmer's reader, and mergekit ignores them).

Stores (``ensure_store``): a store with the base and models ``m0 .. m{N-1}`` ingested, built once
and reused; ``clone_store`` makes a cheap per-run copy (chunk files hard-linked, catalog copied), so
every timed merge starts from the same catalog without re-ingesting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `mmer_dist` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    BF16_BYTES,
    OUT_DIR,
    CacheSpec,
    Layout,
    LlamaShape,
    base_path,
    ensure_cache,
    model_path,
)

CHECKPOINT_DIR = OUT_DIR / "checkpoints"
STORE_DIR = OUT_DIR / "stores"
RAW_CACHE_DIR = OUT_DIR / "core-cache"
DEFAULT_SHARD_BYTES = 2 * 10**9  # HF's usual cut: one file up to 2 GB, sharded with an index beyond
MARKER = ".complete"
MMER = Path(sys.executable).parent / "mmer"


def llama_config(shape: LlamaShape) -> dict:
    """A ``LlamaForCausalLM`` config.json for the synthetic shape (head dim 64, MHA, untied head)."""
    from transformers import LlamaConfig

    heads = max(1, shape.hidden // 64)
    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    d = cfg.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    d["dtype"] = "bfloat16"
    d["torch_dtype"] = "bfloat16"  # transformers < 5 and mergekit's readers look for this name
    return d


def hf_shape(name: str, rows: int, cols: int) -> list[int]:
    """The HF tensor shape of a Layout entry: norms are 1-D."""
    return [cols] if rows == 1 and "norm" in name else [rows, cols]


@dataclass(frozen=True)
class CheckpointSet:
    root: Path
    spec: CacheSpec
    shape: LlamaShape
    n_models: int
    shard_bytes: int

    @property
    def base(self) -> Path:
        return self.root / "base"

    def model(self, i: int) -> Path:
        return self.root / f"model_{i}"

    @property
    def models(self) -> list[Path]:
        return [self.model(i) for i in range(self.n_models)]

    @property
    def params(self) -> int:
        return Layout(self.shape).numel

    @property
    def weight_bytes(self) -> int:
        """bf16 tensor bytes of one checkpoint (headers excluded)."""
        return self.params * BF16_BYTES

    def file_bytes(self, path: Path) -> int:
        """Bytes on disk of one checkpoint directory (weights + headers + config)."""
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def _shard_groups(layout: Layout, shard_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for e in layout.entries.values():
        nbytes = e.numel * BF16_BYTES
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e.name)
        size += nbytes
    return groups


def _copy_range(src_fd: int, dst_fd: int, offset: int, nbytes: int) -> None:
    done = 0
    while done < nbytes:
        try:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, offset + done)
        except OSError:  # a filesystem without it: plain positioned reads
            n = os.write(dst_fd, os.pread(src_fd, min(1 << 24, nbytes - done), offset + done))
        if n <= 0:
            raise OSError(f"short copy at byte {offset + done}")
        done += n


def write_checkpoint(raw: Path, out: Path, layout: Layout, config: dict, shard_bytes: int) -> None:
    """One HF checkpoint directory from one raw cache file (tensors in Layout order)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    groups = _shard_groups(layout, shard_bytes)
    names = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    src = os.open(raw, os.O_RDONLY)
    try:
        for fname, group in zip(names, groups):
            header: dict = {"__metadata__": {"format": "pt"}}
            pos = 0
            for name in group:
                e = layout.entries[name]
                nbytes = e.numel * BF16_BYTES
                header[name] = {"dtype": "BF16", "shape": hf_shape(name, e.rows, e.cols), "data_offsets": [pos, pos + nbytes]}
                pos += nbytes
                weight_map[name] = fname
            raw_header = json.dumps(header, separators=(",", ":")).encode()
            raw_header += b" " * (-len(raw_header) % 8)
            first = layout.entries[group[0]]
            dst = os.open(out / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(dst, len(raw_header).to_bytes(8, "little") + raw_header)
                _copy_range(src, dst, first.offset * BF16_BYTES, pos)  # the group is contiguous in the raw file
            finally:
                os.close(dst)
    finally:
        os.close(src)
    if len(names) > 1:
        index = {"metadata": {"total_size": layout.numel * BF16_BYTES}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (out / MARKER).write_text("")


def checkpoint_set(params: float = 100e6, n_models: int = 8, *, layers: int = 12, seed: int = 0,
                   delta_std: float = 2e-4, shard_bytes: int = DEFAULT_SHARD_BYTES,
                   out_dir: Path = CHECKPOINT_DIR) -> CheckpointSet:
    spec = CacheSpec(LlamaShape.for_params(params, layers), n_models, seed=seed, delta_std=delta_std)
    shape = spec.shape
    weight_bytes = Layout(shape).numel * BF16_BYTES
    tag = spec.tag() + (f"-shard{int(shard_bytes)}" if shard_bytes < weight_bytes else "")
    return CheckpointSet(out_dir / tag, spec, shape, n_models, shard_bytes)


def ensure_checkpoints(params: float = 100e6, n_models: int = 8, *, layers: int = 12, seed: int = 0,
                       delta_std: float = 2e-4, shard_bytes: int = DEFAULT_SHARD_BYTES,
                       out_dir: Path = CHECKPOINT_DIR, raw_cache_dir: Path = RAW_CACHE_DIR,
                       regenerate: bool = False, log=print) -> CheckpointSet:
    """Base + ``n_models`` fine-tunes as HF checkpoints, generated once and reused."""
    cs = checkpoint_set(params, n_models, layers=layers, seed=seed, delta_std=delta_std,
                        shard_bytes=shard_bytes, out_dir=out_dir)
    wanted = [cs.base, *cs.models]
    if not regenerate and all((p / MARKER).exists() for p in wanted):
        return cs
    raw = raw_cache_dir / cs.spec.tag()
    have = ensure_cache(raw, cs.spec, regenerate=regenerate, log=log)
    layout = Layout(cs.shape)
    config = llama_config(cs.shape)
    t0 = time.perf_counter()
    todo = [(base_path(raw), cs.base)] + [(model_path(raw, i), cs.model(i)) for i in range(n_models)]
    for src, dst in todo:
        if regenerate or not (dst / MARKER).exists():
            write_checkpoint(src, dst, layout, config, shard_bytes)
    (cs.root / "meta.json").write_text(json.dumps({"spec": have.as_json(), "shard_bytes": shard_bytes}, indent=1))
    log(f"wrote {len(todo)} HF checkpoints ({layout.numel / 1e6:.1f}M params, {layout.numel * BF16_BYTES / 1e9:.2f} GB "
        f"each) in {time.perf_counter() - t0:.1f}s at {cs.root}")
    return cs


# -- stores built from a checkpoint set ------------------------------------------------------------


def model_id(i: int) -> str:
    return f"m{i}"


def run_mmer(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(MMER), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


# Bumped when ingest lays a store out differently (2: chunk rows rounded to whole memory pages,
# so merges map chunks instead of copying them): older cached stores are rebuilt.
STORE_FORMAT = "2"


def ensure_store(cs: CheckpointSet, n_models: int, *, out_dir: Path = STORE_DIR, log=print) -> Path:
    """A store holding the base and models m0..m{n-1} of ``cs`` (no versions), built once."""
    path = out_dir / f"{cs.root.name}-n{n_models}"
    marker = path / ".bench-complete"
    if marker.exists() and marker.read_text() == STORE_FORMAT:
        return path
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # one process for the base and every model (`mmer ingest --manifest`): 64 models are minutes of
    # interpreter start-ups as one command each
    manifest = {"base": str(cs.base), "models": [{"id": model_id(i), "path": str(cs.model(i)), "modality": "text",
                                                  "format": "llama"} for i in range(n_models)]}
    manifest_path = out_dir / f"{path.name}.manifest.json"
    manifest_path.write_text(json.dumps(manifest))
    run_mmer("ingest", "--store", str(path), "--manifest", str(manifest_path), "--quiet")
    manifest_path.unlink()
    marker.write_text(STORE_FORMAT)
    log(f"built store {path} (base + {n_models} models) in {time.perf_counter() - t0:.1f}s")
    return path


def clone_store(src: Path, dst: Path) -> Path:
    """A copy of a store for one merge: chunk files of base/ and models/ hard-linked (merges never
    write them), everything else (catalog, group metadata) copied."""
    if dst.exists():
        shutil.rmtree(dst)
    shared = {"base", "models"}

    def copy(s, d):
        rel = Path(s).relative_to(src).parts
        if rel and rel[0] in shared:
            os.link(s, d)
        else:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=copy, ignore=shutil.ignore_patterns(".writer.lock", ".bench-complete"))
    return dst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--params", type=float, default=100e6, help="approximate LLM parameters per model")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--models", type=int, default=8, help="fine-tunes besides the base")
    p.add_argument("--shard-bytes", type=float, default=DEFAULT_SHARD_BYTES,
                   help="largest safetensors file; bigger checkpoints get shards + model.safetensors.index.json")
    p.add_argument("--delta-std", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--regenerate", action="store_true")
    args = p.parse_args(argv)
    cs = ensure_checkpoints(args.params, args.models, layers=args.layers, seed=args.seed, delta_std=args.delta_std,
                            shard_bytes=int(args.shard_bytes), regenerate=args.regenerate)
    print(json.dumps({"root": str(cs.root), "shape": dataclasses.asdict(cs.shape), "params": cs.params,
                      "bytes_per_checkpoint": cs.file_bytes(cs.base), "base": str(cs.base),
                      "models": [str(m) for m in cs.models]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
