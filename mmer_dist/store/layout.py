"""The store's on-disk layout: every path, the chunk grid, and dtype codes live here.

    <root>/zarr.json                          root group; attributes mark an mmer store
    <root>/catalog/commits/<seq>.json         commit records: snapshot seq's directory + file sha256s
    <root>/catalog/snapshots/<seq>-<id>/      immutable catalog snapshots (*.parquet)
    <root>/catalog/CURRENT                    hint: a committed snapshot number (readers look ahead)
    <root>/base/llm/<tensor>                  the base LLM (theta_pre)
    <root>/base/files/                        the base's config, tokenizer, ... (verbatim, + MANIFEST.json)
    <root>/models/<id>/llm/<tensor>           model id's LLM tensors (theta_i), base key names
    <root>/models/<id>/extra/<tensor>         rows beyond the base vocabulary (model-specific)
    <root>/models/<id>/component/             encoder + connector weights and every aux file
    <root>/models/<id>/meta/                  key map and magnitude histograms (for later merges)
    <root>/versions/<v>/tau_star/<tensor>     merged task vector, float32
    <root>/versions/<v>/masks/<tensor>        bit-packed masks of all N models, uint8 (N, rows, ceil(cols/8))
    <root>/versions/<v>/_staging/             plan, pass state and per-shard completion marks
    <root>/calibration.json                   the latest lambda calibration (mmer calibrate), replaced atomically

Every tensor is viewed as 2-D (rows, cols): 1-D tensors as one row, >2-D as (dim0, rest). Its
chunks are blocks of whole rows, the same grid for base, models, tau* and masks, so one chunk
index selects aligned data everywhere, each chunk is its own object (no zarr sharding, so no
read-modify-write between writers), and per-row methods (NeuroMerging) stay chunk-local.

Layout 2 (this one) adds a crc32c checksum to every chunk (zarr's own codec, checked on every
read), writes every chunk (so a missing one is damage, never "all zeros"), and commits the
catalog by exclusive creation. Layout 1 stores are refused with a message saying so: re-ingest.
"""

from __future__ import annotations

import math

import numpy as np
import torch

STORE_LAYOUT_VERSION = 2
STORE_MARKER = "mmer_store"

# zarr has no bfloat16: bf16 is stored as its raw uint16 bits, the logical dtype recorded.
_STORAGE = {
    "float32": (np.dtype("float32"), torch.float32),
    "float16": (np.dtype("float16"), torch.float16),
    "bfloat16": (np.dtype("uint16"), torch.bfloat16),
    "uint8": (np.dtype("uint8"), torch.uint8),
}
_TORCH_NAMES = {v[1]: k for k, v in _STORAGE.items()}

PAGE_BYTES = 4096  # the memory page size of common Linux machines (chunk grids are chosen once, at ingest)
DEFAULT_CHUNK_ELEMS = 1 << 22  # 4M entries: 8 MB bf16, 16 MB float32 per chunk


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _TORCH_NAMES:
        raise ValueError(f"dtype {dtype} cannot be stored (supported: {', '.join(_STORAGE)})")
    return _TORCH_NAMES[dtype]


def storage_dtype(name: str) -> np.dtype:
    return _STORAGE[name][0]


def torch_dtype(name: str) -> torch.dtype:
    return _STORAGE[name][1]


def to_storage(t: torch.Tensor) -> np.ndarray:
    """A tensor as the numpy array zarr stores (bf16 as uint16 bits)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.uint16)
    return t.numpy()


def storage_torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of the stored bits (bf16 as uint16)."""
    return torch.uint16 if name == "bfloat16" else _STORAGE[name][1]


def from_storage_tensor(t: torch.Tensor, name: str) -> torch.Tensor:
    return t.view(torch.bfloat16) if name == "bfloat16" else t


def from_storage(a: np.ndarray, name: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if name == "bfloat16" else t


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D (rows, cols) view of a tensor shape."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def rows_per_chunk(shape: tuple[int, ...], chunk_elems: int = DEFAULT_CHUNK_ELEMS, itemsize: int = 2) -> int:
    """Rows per chunk: about ``chunk_elems`` entries, at least one row, and balanced so that
    the last chunk is not a small remainder (zarr stores edge chunks padded to full size).

    Rounded up to a whole number of memory pages of ``itemsize``-byte entries where that moves
    the count by under 2%: a merge maps such chunks instead of copying them (``store.mapped``).
    """
    rows, cols = matrix_shape(shape)
    n_chunks = -(-rows * cols // max(1, chunk_elems))
    n_chunks = max(1, min(rows, n_chunks))
    per_chunk = -(-rows // n_chunks)
    row_bytes = cols * itemsize
    page_rows = PAGE_BYTES // math.gcd(PAGE_BYTES, row_bytes)  # rows that make whole pages
    if per_chunk < rows and page_rows * 64 <= per_chunk:
        per_chunk = min(rows, -(-per_chunk // page_rows) * page_rows)
    return per_chunk


def packed_cols(cols: int) -> int:
    return (cols + 7) // 8


# -- paths (relative to the store root) --------------------------------------------------------

CATALOG = "catalog"
COMPONENT_WEIGHTS = "component.safetensors"  # a model's encoder + connector tensors, one file
BASE_LLM = "base/llm"
BASE_FILES = "base/files"
CALIBRATION = "calibration.json"  # mmer calibrate's choice of lambda per model (mmer merge --lam auto)


def model_root(model_id: str) -> str:
    return f"models/{model_id}"


def model_llm(model_id: str) -> str:
    return f"models/{model_id}/llm"


def model_extra(model_id: str) -> str:
    return f"models/{model_id}/extra"


def model_component(model_id: str) -> str:
    return f"models/{model_id}/component"


def model_meta(model_id: str) -> str:
    return f"models/{model_id}/meta"


def version_root(version: int) -> str:
    return f"versions/{version:06d}"


def version_tau_star(version: int) -> str:
    return f"{version_root(version)}/tau_star"


def version_masks(version: int) -> str:
    """Per tensor: an (N, rows, ceil(cols/8)) uint8 array, the version's models in catalog order."""
    return f"{version_root(version)}/masks"


def version_staging(version: int) -> str:
    return f"{version_root(version)}/_staging"
