"""Shared pieces of the benchmarks: synthetic Llama-shaped bf16 checkpoints on disk, a streaming
file reader / writer for the merge engine, memory and timing helpers, and result output.

Synthetic checkpoints look like real bf16 fine-tunes: base ~ N(0, base_std) rounded to bf16, and
model_i = bf16(base + N(0, delta_std)). With delta_std around one bf16 step of a typical weight,
many deltas are exactly 0 or a small multiple of a step, which is what drives the tie behaviour
of TIES (sign sums of exactly 0, magnitudes exactly at the trim threshold) and the selection's
one-digit fast path. The default delta_std = 2e-4 (0.01 x base_std) reproduces the tie rates
DESIGN.md reports for real 110M-parameter models (~6% zero sign sums at N = 8, 1-3% of entries at
the threshold); the much smaller 1e-3 x base_std leaves ~78% of deltas exactly 0 and a threshold
of 0, which is not what fine-tunes look like.

On-disk layout (cache dir): ``base.bin`` and ``model_<i>.bin`` hold every tensor in ``Layout``
order, row-major, raw bf16 (little-endian uint16), so a row block of a tensor is one contiguous
byte range in each file; ``meta.json`` records what was generated so a rerun can reuse it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmer_dist.method import ChunkSpec
from mmer_dist.method.masks import packed_width

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
BF16_BYTES = 2
CACHE_FORMAT = 1


# -- model shapes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaShape:
    """A small Llama-family decoder: the LLM parameters a merge touches."""

    hidden: int = 768
    layers: int = 12
    intermediate: int = 832
    vocab: int = 32000

    @classmethod
    def for_params(cls, params: float, layers: int = 12) -> LlamaShape:
        """A shape with about ``params`` parameters: hidden 768 / vocab 32000 at 100M (scaled by
        sqrt(params / 100M) for other sizes), the MLP width solved for the remaining budget."""
        s = math.sqrt(max(params, 1e5) / 100e6)
        hidden = max(64, 64 * round(768 * s / 64))
        vocab = max(256, 128 * round(32000 * s / 128))
        fixed = 2 * vocab * hidden + layers * (4 * hidden * hidden + 2 * hidden) + hidden
        inter = (params - fixed) / (layers * 3 * hidden)
        inter = max(64, 64 * round(inter / 64))
        return cls(hidden, layers, inter, vocab)

    def tensors(self) -> list[tuple[str, tuple[int, int]]]:
        """(name, (rows, cols)) in file order; 1-D norms are one row."""
        h, i = self.hidden, self.intermediate
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            out += [
                (p + "input_layernorm.weight", (1, h)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (h, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (1, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (1, h)), ("lm_head.weight", (self.vocab, h))]
        return out


@dataclass(frozen=True)
class TensorEntry:
    name: str
    rows: int
    cols: int
    offset: int  # in elements, within one model file
    packed_offset: int  # in bytes, within one packed-mask file

    @property
    def numel(self) -> int:
        return self.rows * self.cols


class Layout:
    """Where each tensor lives in the flat per-model files."""

    def __init__(self, shape: LlamaShape):
        self.shape = shape
        self.entries: dict[str, TensorEntry] = {}
        off = poff = 0
        for name, (rows, cols) in shape.tensors():
            self.entries[name] = TensorEntry(name, rows, cols, off, poff)
            off += rows * cols
            poff += rows * packed_width(cols)
        self.numel = off
        self.packed_bytes = poff

    def sizes(self) -> dict[str, int]:
        return {e.name: e.numel for e in self.entries.values()}

    def chunks(self, chunk_elems: int) -> list[ChunkSpec]:
        """Row blocks of about ``chunk_elems`` entries (at least one row), like the store's layout."""
        specs = []
        for e in self.entries.values():
            step = max(1, min(e.rows, chunk_elems // max(1, e.cols)))
            for i, start in enumerate(range(0, e.rows, step)):
                specs.append(ChunkSpec(e.name, i, start, min(e.rows, start + step), e.cols, 1 if e.rows == 1 else 2))
        return specs


# -- the on-disk cache of synthetic checkpoints ---------------------------------------------------


@dataclass(frozen=True)
class CacheSpec:
    shape: LlamaShape
    n_models: int
    seed: int = 0
    base_std: float = 0.02
    delta_std: float = 2e-4
    format: int = CACHE_FORMAT

    def tag(self) -> str:
        """A directory name for this data (not the model count): different sizes get their own cache."""
        s = self.shape
        return (f"h{s.hidden}-l{s.layers}-i{s.intermediate}-v{s.vocab}-seed{self.seed}"
                f"-b{self.base_std:g}-d{self.delta_std:g}-f{self.format}")

    def as_json(self) -> dict:
        return dataclasses.asdict(self)

    def satisfies(self, want: CacheSpec) -> bool:
        """This cache serves ``want`` when everything matches and it has at least as many models
        (model i depends only on the seed and i, so a cache of 8 serves N = 2)."""
        return (self.shape, self.seed, self.base_std, self.delta_std, self.format) == (
            want.shape, want.seed, want.base_std, want.delta_std, want.format) and self.n_models >= want.n_models


def base_path(cache: Path) -> Path:
    return cache / "base.bin"


def model_path(cache: Path, i: int) -> Path:
    return cache / f"model_{i}.bin"


def read_cache_spec(cache: Path) -> CacheSpec | None:
    try:
        meta = json.loads((cache / "meta.json").read_text())
        spec = CacheSpec(LlamaShape(**meta["shape"]), **{k: v for k, v in meta.items() if k != "shape"})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    layout_bytes = Layout(spec.shape).numel * BF16_BYTES
    files = [base_path(cache)] + [model_path(cache, i) for i in range(spec.n_models)]
    if not all(f.exists() and f.stat().st_size == layout_bytes for f in files):
        return None
    return spec


def _bf16_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.int16).numpy()).cast("B")


def generate_cache(cache: Path, spec: CacheSpec, log=print) -> None:
    """Write base + n_models bf16 checkpoints tensor by tensor (bounded memory)."""
    if cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True)
    layout = Layout(spec.shape)
    t0 = time.perf_counter()
    files = [open(base_path(cache), "wb")] + [open(model_path(cache, i), "wb") for i in range(spec.n_models)]
    try:
        for t_index, e in enumerate(layout.entries.values()):
            g = torch.Generator().manual_seed(spec.seed * 1_000_003 + t_index)
            if "norm" in e.name:  # RMSNorm weights sit near 1
                base = (1.0 + spec.base_std * torch.randn((e.rows, e.cols), generator=g)).bfloat16()
            else:
                base = (spec.base_std * torch.randn((e.rows, e.cols), generator=g)).bfloat16()
            files[0].write(_bf16_bytes(base))
            base32 = base.float()
            for i in range(spec.n_models):
                gi = torch.Generator().manual_seed((spec.seed * 1_000_003 + t_index) * 1009 + i + 1)
                delta = torch.randn((e.rows, e.cols), generator=gi).mul_(spec.delta_std)
                files[i + 1].write(_bf16_bytes(delta.add_(base32).bfloat16()))
    finally:
        for f in files:
            f.close()
    (cache / "meta.json").write_text(json.dumps(spec.as_json(), indent=1))
    gb = (spec.n_models + 1) * layout.numel * BF16_BYTES / 1e9
    log(f"generated {spec.n_models} models + base ({layout.numel / 1e6:.1f}M params, {gb:.2f} GB) "
        f"in {time.perf_counter() - t0:.1f}s at {cache}")


def ensure_cache(cache: Path, want: CacheSpec, regenerate: bool = False, log=print) -> CacheSpec:
    have = None if regenerate else read_cache_spec(cache)
    if have is not None and have.satisfies(want):
        return have
    generate_cache(cache, want, log=log)
    return want


# -- streaming reader / writer over files ---------------------------------------------------------


class FileChunkReader:
    """Reads one chunk of N models + base per call with positioned reads into one reused buffer.

    The tensors it returns are views of that buffer, valid until the next ``read`` (the engine
    consumes a chunk before asking for the next). Counts time and bytes spent reading.
    """

    def __init__(self, cache: Path, layout: Layout, n_models: int, max_chunk_elems: int):
        self.layout, self.n = layout, n_models
        self.fds = [os.open(model_path(cache, i), os.O_RDONLY) for i in range(n_models)]
        self.fds.append(os.open(base_path(cache), os.O_RDONLY))
        self.buffer = torch.empty((n_models + 1) * max_chunk_elems, dtype=torch.bfloat16)
        self._raw = self.buffer.view(torch.int16).numpy().view(np.uint8)
        self.seconds = 0.0
        self.bytes = 0

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def _fill(self, chunk: ChunkSpec) -> int:
        e = self.layout.entries[chunk.tensor]
        numel = chunk.numel
        nbytes = numel * BF16_BYTES
        offset = (e.offset + chunk.row_start * e.cols) * BF16_BYTES
        for slot, fd in enumerate(self.fds):
            view = memoryview(self._raw[slot * nbytes:(slot + 1) * nbytes])
            got = 0
            while got < nbytes:
                n = os.preadv(fd, [view[got:]], offset + got)
                if n <= 0:
                    raise OSError(f"short read of {chunk.tensor} rows {chunk.row_start}:{chunk.row_stop}")
                got += n
        return numel

    def read(self, chunk: ChunkSpec) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        numel = self._fill(chunk)
        self.seconds += time.perf_counter() - t0
        self.bytes += (self.n + 1) * numel * BF16_BYTES
        flat = self.buffer[: (self.n + 1) * numel]
        models = flat[: self.n * numel].view(self.n, chunk.rows, chunk.cols)
        base = flat[self.n * numel:].view(chunk.rows, chunk.cols)
        return models, base

    def read_all(self, chunks: Sequence[ChunkSpec]) -> float:
        """Seconds to read every chunk once into the buffer (no compute): the bytes-read bound."""
        t0 = time.perf_counter()
        for c in chunks:
            self._fill(c)
        return time.perf_counter() - t0


class FileChunkWriter:
    """Writes tau* (float32) and the N packed masks at their final offsets in files of a directory,
    as a store would write its output chunks. Counts time and bytes written."""

    def __init__(self, out_dir: Path, layout: Layout, n_models: int):
        self.layout, self.n = layout, n_models
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tau_fd = os.open(out_dir / "tau_star.f32", os.O_RDWR | os.O_CREAT, 0o644)
        self.mask_fds = [os.open(out_dir / f"mask_{i}.bits", os.O_RDWR | os.O_CREAT, 0o644) for i in range(n_models)]
        self.seconds = 0.0
        self.bytes = 0

    def close(self) -> None:
        for fd in [self.tau_fd, *self.mask_fds]:
            os.close(fd)
        self.mask_fds = []

    def write(self, chunk: ChunkSpec, tau_star: torch.Tensor, packed_masks: torch.Tensor) -> None:
        t0 = time.perf_counter()
        e = self.layout.entries[chunk.tensor]
        tau = tau_star.contiguous().numpy()
        n = os.pwrite(self.tau_fd, memoryview(tau).cast("B"), (e.offset + chunk.row_start * e.cols) * 4)
        pw = packed_width(chunk.cols)
        packed = packed_masks.contiguous().numpy()
        for i, fd in enumerate(self.mask_fds):
            n += os.pwrite(fd, memoryview(packed[i]).cast("B"), e.packed_offset + chunk.row_start * pw)
        self.bytes += n
        self.seconds += time.perf_counter() - t0


def temp_output_dir(prefix: str) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=OUT_DIR))


# -- memory -------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """High-water RSS of this process (since the last ``reset_peak_rss`` where supported)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the high-water mark (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# -- output -------------------------------------------------------------------------------------


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


def environment() -> dict:
    import platform

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }
