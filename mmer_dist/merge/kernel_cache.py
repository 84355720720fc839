"""Chunk kernels compiled ahead of time (AOTInductor) and kept on disk across processes.

``torch.compile`` traces again in every new process: even with inductor's on-disk caches warm, a
fresh ``mmer merge`` (and every Ray shard actor) spends ~5-10 s in dynamo and ~3 s importing it
before its first chunk, 20-30 s when the caches are cold. Here each kernel is exported once
(``torch.export``, rows and columns dynamic) and compiled into an AOTInductor package; later
processes load the package's shared library in milliseconds, without importing dynamo or
inductor at all, and run it through AOTInductor's C interface with the GIL released
(``GilFreeRunner``), so the merge's reader and writer threads run beside the kernels.

The example inputs of the export are also inductor's size hints: it splits a loop across threads
only where the hint promises enough work, so they have a real chunk's size, and the per-thread
partials of parallel reductions are sized by the thread count at run time (``dynamic_threads``),
so one package serves a 2-CPU process and a 16-CPU Ray actor alike.

Packages live in one directory per user (``MMER_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/mmer/kernels`` or ``~/.cache/mmer/kernels``), independent of any store. The
driver resolves it and sends it to Ray actors in the job, so every process on a node shares the
same packages; a node without them builds them once. The number of models, like the chunk's rows
and columns, is a run-time size: a merge or add of any N loads the same packages. A package's key
names everything baked into it: the kernel, the constants bound into it (merge method, mask rule),
the input dtypes, ranks and device, the example sizes, the torch version and a digest of
``mmer_dist/method``'s source (a code change invalidates old packages). Builders take a file lock
and publish by rename, so concurrent processes never load a half-written package; the library
extracted from a package (``<package>.so`` beside it) is published the same way.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from mmer_dist.method.kernels import FUSED_MAX_MODELS

ENV_VAR = "MMER_KERNEL_CACHE"


def default_cache_dir() -> str:
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mmer", "kernels")


@functools.cache
def _method_source_digest() -> str:
    import mmer_dist.method as method

    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted(Path(method.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


class _Bound(torch.nn.Module):
    """A kernel with its constants bound: what torch.export needs (only tensors go in)."""

    def __init__(self, fn: Callable, consts: dict):
        super().__init__()
        self.fn, self.consts = fn, consts

    def forward(self, *tensors):
        return self.fn(*tensors, **self.consts)


# Example sizes for the dynamic axes when exporting: neither 0 nor 1 (export would specialise
# them). Columns are a multiple of 8 (bit packing then needs no padding, which keeps the final
# kernel fused: 2.5x faster than a general width); chunks of other widths run eagerly. They are
# also inductor's size hints: it splits a loop across threads only where the hint promises enough
# work, so they are a real chunk's size (a 13 x 24 example compiled every loop single-threaded).
# The number of models is a dynamic axis too (kernels sum over it in a reduction, see
# ``task_vectors.model_sum``): one package serves every N up to ``FUSED_MAX_MODELS``.
_EXAMPLE = {"models": 8, "rows": 256, "cols": 4096}
COLS_MULTIPLE = 8


class AotKernel:
    """``fn(*tensors, **consts)`` compiled ahead of time for the dtypes it is first called with.

    ``consts`` holds every non-tensor argument (baked into the package) and ``tag`` describes them
    for the cache key (a stable string). ``dims`` names, per tensor, its dynamic axes ("rows",
    "cols"); every other axis is static and part of the key.
    """

    def __init__(self, name: str, fn: Callable, consts: dict, tag: str, dims: tuple[dict[int, str], ...],
                 cache_dir: str | None = None):
        self.name, self.fn, self.consts, self.tag, self.dims = name, fn, consts, tag, dims
        self.cache_dir = Path(cache_dir or default_cache_dir())
        self._runners: dict[tuple, object] = {}

    def _signature(self, tensors) -> tuple:
        return tuple((t.dtype, t.device.type, tuple(n if d not in spec else spec[d] for d, n in enumerate(t.shape)))
                     for t, spec in zip(tensors, self.dims))

    def __call__(self, *tensors: torch.Tensor):
        # the package assumes the example's dense layout (it does not check strides): a row
        # block of a larger chunk is a strided view, so make every input contiguous
        tensors = tuple(t.contiguous() for t in tensors)
        sig = self._signature(tensors)
        runner = self._runners.get(sig)
        if runner is None:
            runner = self._runners[sig] = self._load(sig)
        return tuple(runner.run(list(tensors)))

    def _load(self, sig: tuple):
        raw = f"{self.name}|{self.tag}|{sig}|{_EXAMPLE}|dynamic-threads|{_method_source_digest()}"
        path = self.cache_dir / f"{self.name}-{hashlib.sha256(raw.encode()).hexdigest()[:24]}.pt2"
        if not path.exists():
            self._build(path, sig)
        # no dynamo or inductor import in the processes that only load
        if all(device == "cpu" for _, device, _ in sig):
            try:
                return GilFreeRunner(path)
            except (OSError, AttributeError, KeyError, ValueError, RuntimeError, zipfile.BadZipFile) as e:
                print(f"mmer: running the {self.name} kernel through torch's loader ({e})", file=sys.stderr)
        return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)

    def _build(self, path: Path, sig: tuple) -> None:
        from filelock import FileLock
        from torch.export import Dim

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if path.exists():  # another process built it while this one waited
                return
            print(f"mmer: compiling the {self.name} kernel into {path.parent} (once; later processes load it)",
                  file=sys.stderr, flush=True)
            axes = {"models": Dim("models", min=1, max=FUSED_MAX_MODELS), "rows": Dim("rows", min=1),
                    "cols": COLS_MULTIPLE * Dim("col_bytes", min=2)}
            examples = tuple(torch.ones([_EXAMPLE.get(n, n) if isinstance(n, str) else n for n in shape],
                                        dtype=dtype, device=device) for dtype, device, shape in sig)
            dynamic = tuple({d: axes[n] for d, n in spec.items()} or None for spec in self.dims)
            exported = torch.export.export(_Bound(self.fn, self.consts), examples, dynamic_shapes={"tensors": dynamic})
            fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
            os.close(fd)
            try:
                # parallel loops size their per-thread partials by the runtime thread count: a
                # package built in a 2-thread process serves a 16-CPU Ray actor too
                with torch._inductor.config.patch({"cpp.dynamic_threads": True}):
                    torch._inductor.aoti_compile_and_package(exported, package_path=tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)


class GilFreeRunner:
    """A package's model run through AOTInductor's C interface, without the GIL.

    torch's Python binding of the package loader holds the GIL for the whole run of the kernel
    (pytorch/pytorch#197516), so while a merge computes, its read-ahead and writer threads cannot
    run a line of Python: reading, checksumming and writing chunks then took turns with the
    kernels instead of overlapping them (measured: a Python thread ran 122 steps during 0.75 s of
    kernels, 9,267 while idle). ctypes releases the GIL for the call. The model's shared library is
    extracted once from the package, beside it (immutable, published by rename).
    """

    def __init__(self, package: Path):
        lib = ctypes.CDLL(str(_extracted_library(package)))
        self._run, self._delete = lib.AOTInductorModelContainerRun, lib.AOTInductorModelContainerDelete
        self._run.restype = self._delete.restype = ctypes.c_int
        self._run.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t,
                              ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p]
        self._error = lib.AOTInductorGetLastError
        self._error.restype, self._error.argtypes = ctypes.c_int, [ctypes.POINTER(ctypes.c_char_p)]
        handle, outputs = ctypes.c_void_p(), ctypes.c_size_t()
        self._check(lib.AOTInductorModelContainerCreateWithDevice(ctypes.byref(handle), ctypes.c_size_t(1),
                                                                  b"cpu", None), "load")
        self._handle = handle
        self._check(lib.AOTInductorModelContainerGetNumOutputs(handle, ctypes.byref(outputs)), "inspect")
        self._outputs = outputs.value
        self._lib = lib

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            message = ctypes.c_char_p()
            self._error(ctypes.byref(message))
            raise RuntimeError(f"AOTInductor could not {what} a kernel: {(message.value or b'').decode()}")

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        # tensor handles travel as capsules; the model steals the inputs' and hands over the outputs'
        handles = [_capsule_pointer(c, None) for c in torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(tensors)]
        inputs = (ctypes.c_void_p * len(handles))(*handles)
        outputs = (ctypes.c_void_p * self._outputs)()
        self._check(self._run(self._handle, inputs, len(handles), outputs, self._outputs, None, None), "run")
        return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs([_capsule(p, None, None) for p in outputs])

    def __del__(self):
        if getattr(self, "_handle", None) is not None:
            self._delete(self._handle)


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
_capsule = ctypes.pythonapi.PyCapsule_New
_capsule.restype, _capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _extracted_library(package: Path) -> Path:
    target = package.with_suffix(".so")
    if target.exists():
        return target
    with zipfile.ZipFile(package) as z:
        (member,) = [n for n in z.namelist() if n.endswith(".wrapper.so")]
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=package.parent)
        try:
            with os.fdopen(fd, "wb") as out, z.open(member) as src:
                shutil.copyfileobj(src, out)
            os.replace(tmp, target)  # concurrent extractions write the same bytes
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def aot_fuser(cache_dir: str | None = None) -> Callable:
    """The ``fuse`` strategy for ``ChunkKernels``: kernels compiled ahead of time, cached on disk."""
    def fuse(name: str, fn: Callable, consts: dict, tag: str, dims) -> AotKernel:
        return AotKernel(name, fn, consts, tag, dims, cache_dir)
    return fuse
