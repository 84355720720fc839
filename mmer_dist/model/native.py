"""The mask-native linear's CPU kernel (``masked_linear.cpp``), compiled once per machine and loaded
through ctypes.

Why not an AOTInductor package like the merge's kernels (``mmer_dist.merge.kernel_cache``): inductor
writes this op (a reduction whose weight is composed per token from a bit, theta_pre and tau*) as
a loop of partial vector loads and per-element index arithmetic that ran at 0.3 G token-params/s
on one core of the 2-core CI machine; the hand-written loop, which composes each 8-entry weight
tile once in registers and applies it to up to 4 tokens, runs at 3.3-4.5 G (14 at 4 tokens per
model), as fast as a dense bf16 matmul on the same core. What it shares with the merge's kernels:
the cache directory (``kernel_cache.default_cache_dir``: one per user, ``MMER_KERNEL_CACHE``
overrides it, Ray actors of a job see the same one) and the call through ctypes, which releases
the GIL, so a slot build on another thread runs beside a step.

The library's name carries a digest of the source, the compiler flags and the CPU's vector
capability; it is built under a file lock into a temporary file and published by rename, so
concurrent processes never load a half-written library. No compiler, or a failed build: ``load``
returns None once, says why on stderr, and the engine uses the exact plain-torch path instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("masked_linear.cpp")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def can_vectorize() -> bool:
    """Whether this CPU runs the vector path: AVX2 + FMA + F16C (every x86 CPU torch reports as
    AVX2 or better has them)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _flags(vector: bool) -> list[str]:
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off"]
    return flags + (["-mavx2", "-mfma", "-mf16c"] if vector else [])


def _library_path(cache_dir: str | None, vector: bool) -> tuple[Path, list[str]]:
    from mmer_dist.merge.kernel_cache import default_cache_dir

    flags = _flags(vector)
    compiler = os.environ.get("CXX", "g++")
    digest = hashlib.sha256(SOURCE.read_bytes() + repr((compiler, flags)).encode()).hexdigest()[:20]
    return Path(cache_dir or default_cache_dir()) / f"masked_linear-{digest}.so", [compiler, *flags]


def _build(path: Path, command: list[str]) -> None:
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():  # another process built it while this one waited
            return
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            subprocess.run([*command, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


class MaskedLinearLibrary:
    """The loaded library: ``run`` takes tensors, checks nothing (the caller does) and fills ``out``."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        self._fn = lib.mmer_masked_linear
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._fn.argtypes = [p, p, i32, p, i32, p, p, p, p, i64, i64, i64, i32, p, i32]
        self._fn.restype = i32
        self._compose = lib.mmer_compose
        self._compose.argtypes = [p, i32, p, i32, p, i64, i64, i32, p, i32, i32]
        self._compose.restype = i32
        self._dense = lib.mmer_dense_linear
        self._dense.argtypes = [p, p, i32, i64, i64, i64, i64, p, i32]
        self._dense.restype = i32
        self.vectorized = bool(lib.mmer_masked_linear_vectorized())
        self.path = path

    def run(self, x: torch.Tensor, base: torch.Tensor, tau: torch.Tensor, packed: torch.Tensor, starts: torch.Tensor,
            stops: torch.Tensor, models: torch.Tensor, round_to: torch.dtype, out: torch.Tensor) -> None:
        code = self._fn(x.data_ptr(), base.data_ptr(), DTYPE_CODES[base.dtype], tau.data_ptr(), DTYPE_CODES[tau.dtype],
                        packed.data_ptr(), starts.data_ptr(), stops.data_ptr(), models.data_ptr(), models.numel(),
                        base.shape[0], base.shape[1], DTYPE_CODES[round_to], out.data_ptr(), torch.get_num_threads())
        if code != 0:
            raise RuntimeError(f"the masked-linear kernel refused dtypes {base.dtype}, {tau.dtype}, {round_to}")

    def dense(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (T, K) float32 contiguous times W^T, W (O, K) contiguous in any of the dtypes: (T, O) float32."""
        out = torch.empty((x.shape[0], w.shape[0]), dtype=torch.float32)
        code = self._dense(x.data_ptr(), w.data_ptr(), DTYPE_CODES[w.dtype], 0, x.shape[0], w.shape[0], w.shape[1],
                           out.data_ptr(), torch.get_num_threads())
        if code != 0:
            raise RuntimeError(f"the dense kernel refused dtype {w.dtype}")
        return out

    def compose(self, base: torch.Tensor, tau: torch.Tensor, packed_rows: torch.Tensor, round_to: torch.dtype,
                dtype: torch.dtype, threads: int = 1) -> torch.Tensor:
        """theta_pre + m * tau* for one model's (rows, ceil(cols / 8)) mask rows, rounded to
        ``round_to`` and held in ``dtype``: the weights ``run`` multiplies, as a dense tensor."""
        out = torch.empty(base.shape, dtype=dtype)
        code = self._compose(base.data_ptr(), DTYPE_CODES[base.dtype], tau.data_ptr(), DTYPE_CODES[tau.dtype],
                             packed_rows.data_ptr(), base.shape[0], base.shape[1], DTYPE_CODES[round_to],
                             out.data_ptr(), DTYPE_CODES[dtype], threads)
        if code != 0:
            raise RuntimeError(f"the compose kernel refused dtypes {base.dtype}, {tau.dtype}, {round_to}, {dtype}")
        return out


@functools.cache
def load(cache_dir: str | None = None, vector: bool | None = None) -> MaskedLinearLibrary | None:
    """The compiled kernel (built on first use on this machine), or None where it cannot be built.
    ``vector``: the AVX2 path (default: where the CPU has it); False builds the scalar path."""
    path, command = _library_path(cache_dir, can_vectorize() if vector is None else vector and can_vectorize())
    try:
        if not path.exists():
            print(f"mmer: compiling the mask-native linear kernel into {path.parent} (once per machine)",
                  file=sys.stderr, flush=True)
            _build(path, command)
        return MaskedLinearLibrary(path)
    except (OSError, subprocess.CalledProcessError, AttributeError) as e:
        detail = e.stderr.strip().splitlines()[-1:] if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
        print(f"mmer: no compiled mask-native kernel ({detail}); using the plain torch path", file=sys.stderr)
        return None
