"""Read a HuggingFace-style checkpoint directory tensor by tensor (or row block by row block).

Knows files, headers and bytes; knows nothing about which keys are the LLM (that is
``mapping.py``). Every safetensors header is parsed and checked when the reader opens, so a
corrupt or inconsistent checkpoint fails before ingest has written anything, with a message
naming the file. Tensor data is read lazily with positioned reads of just the bytes asked for, so a 7B
checkpoint streams in bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmer_dist.errors import CorruptCheckpointError, FormatError

INDEX_NAME = "model.safetensors.index.json"
# Weight files in any format; everything else in the directory is an auxiliary file (config,
# tokenizer, processor, chat template) that a model needs next to its weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from the header alone (no data read)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = 0  # byte offset of the tensor's data in ``file``

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_header(path: Path) -> dict[str, Any]:
    """Parse and check one safetensors file's header: the JSON parses, every tensor's
    ``data_offsets`` match its shape and dtype and lie inside the file (a truncated download
    fails here). Returns the header without ``__metadata__``."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptCheckpointError(f"{path}: not a safetensors file ({size} bytes, no header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise CorruptCheckpointError(f"{path}: header length {header_len} does not fit a {size}-byte file (corrupt or truncated)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: safetensors header does not parse ({e})") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    spans = sorted(_check_entry(path, key, entry, data_size) for key, entry in header.items())
    # Like safetensors itself: the tensors tile the data section exactly, no gaps or overlaps.
    position = 0
    for begin, end, key in spans:
        if begin != position:
            raise CorruptCheckpointError(f"{path}: tensor {key!r} starts at data byte {begin}, expected {position} (overlap or gap)")
        position = end
    if position != data_size:
        raise CorruptCheckpointError(f"{path}: tensors cover {position} data bytes but the file holds {data_size}")
    return header


def _check_entry(path: Path, key: str, entry: Any, data_size: int) -> tuple[int, int, str]:
    try:
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        shape = [int(d) for d in entry["shape"]]
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: header entry for {key!r} is malformed or has an unsupported dtype ({entry!r})") from e
    numel = 1
    for d in shape:
        numel *= d
    if end - begin != numel * dtype.itemsize or begin < 0:
        raise CorruptCheckpointError(f"{path}: tensor {key!r} data_offsets {[begin, end]} do not match shape {shape} {entry['dtype']}")
    if end > data_size:
        raise CorruptCheckpointError(f"{path}: tensor {key!r} ends at byte {end} but the file holds {data_size} data bytes (truncated)")
    return begin, end, key


class CheckpointReader:
    """A checkpoint directory: ``config.json`` (optional) plus ``model.safetensors`` or shards
    listed in ``model.safetensors.index.json``. Picklable (file handles reopen lazily), so a Ray
    task can receive one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FormatError(f"checkpoint {self.path}: not a directory")
        self.config: dict[str, Any] = self._load_config()
        self._infos: dict[str, TensorInfo] = self._scan_weights()
        self._handles: dict[Path, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def __del__(self) -> None:
        if getattr(self, "_handles", None):
            self.close()

    def _load_config(self) -> dict[str, Any]:
        config_path = self.path / "config.json"
        if not config_path.is_file():
            return {}
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise FormatError(f"{config_path}: not valid JSON ({e})") from e
        if not isinstance(config, dict):
            raise FormatError(f"{config_path}: top level must be a JSON object")
        return config

    def _scan_weights(self) -> dict[str, TensorInfo]:
        files = sorted(p for p in self.path.glob("*.safetensors") if p.is_file())
        index_path = self.path / INDEX_NAME
        if index_path.is_file():
            return self._scan_sharded(index_path)
        if not files:
            pickles = sorted(p.name for p in self.path.iterdir() if p.name.endswith((".bin", ".pt", ".pth", ".ckpt")))
            if pickles:
                raise FormatError(
                    f"checkpoint {self.path}: has pickle weights {pickles}; only safetensors checkpoints are "
                    f"supported (load it with transformers and `save_pretrained` it again)"
                )
            raise FormatError(f"checkpoint {self.path}: no *.safetensors weight files")
        if len(files) > 1:
            raise FormatError(
                f"checkpoint {self.path}: {len(files)} safetensors files {[p.name for p in files]} but no {INDEX_NAME}"
            )
        header = read_header(files[0])
        start = _data_start(files[0])
        return {key: _info(entry, files[0], start) for key, entry in header.items()}

    def _scan_sharded(self, index_path: Path) -> dict[str, TensorInfo]:
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise FormatError(f"{index_path}: not valid JSON ({e})") from e
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) and "/" not in v for v in weight_map.values())):
            raise FormatError(f"{index_path}: not a safetensors index (needs 'weight_map': key -> shard file name)")
        infos: dict[str, TensorInfo] = {}
        for shard_name in sorted(set(weight_map.values())):
            shard = self.path / shard_name
            if not shard.is_file():
                raise FormatError(f"{index_path}: names shard {shard_name!r}, which is missing from {self.path}")
            start = _data_start(shard)
            for key, entry in read_header(shard).items():
                if key in infos:
                    first = infos[key].file.name
                    raise FormatError(f"checkpoint {self.path}: key {key!r} is in both {first} and {shard_name}")
                infos[key] = _info(entry, shard, start)
        for key, shard_name in weight_map.items():
            if key not in infos or infos[key].file.name != shard_name:
                shard = self.path / shard_name
                raise FormatError(f"{shard}: key {key!r} listed in {index_path.name} is absent from the shard")
        for key, info in infos.items():
            if key not in weight_map:
                raise FormatError(f"{info.file}: holds key {key!r}, which {index_path.name} does not list")
        return infos

    def keys(self) -> list[str]:
        """Every tensor key, in sorted order."""
        return sorted(self._infos)

    def info(self, key: str) -> TensorInfo:
        if key not in self._infos:
            raise FormatError(f"checkpoint {self.path}: no tensor {key!r}")
        return self._infos[key]

    def read(self, key: str) -> torch.Tensor:
        """The whole tensor (use :meth:`read_rows` for large ones)."""
        info = self.info(key)
        return self._pread(info, info.offset, info.nbytes).reshape(info.shape)

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` along dim 0. Positioned reads into a fresh buffer, not a memory
        map: only those bytes are read, and a long ingest's RSS does not grow with the file."""
        info = self.info(key)
        if not info.shape:
            raise FormatError(f"checkpoint {self.path}: tensor {key!r} is a scalar and has no rows")
        if not 0 <= start <= stop <= info.shape[0]:
            raise FormatError(f"checkpoint {self.path}: rows {start}:{stop} out of range for {key!r} of shape {info.shape}")
        row_bytes = math.prod(info.shape[1:]) * info.dtype.itemsize
        block = self._pread(info, info.offset + start * row_bytes, (stop - start) * row_bytes)
        return block.reshape((stop - start,) + tuple(info.shape[1:]))

    def _pread(self, info: TensorInfo, offset: int, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, done = buf.numpy(), 0
        fd = self._fd(info.file)
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise CorruptCheckpointError(f"{info.file}: ends early (truncated while being read?)")
            done += got
        return buf.view(info.dtype)

    def _fd(self, file: Path) -> int:
        if file not in self._handles:
            self._handles[file] = os.open(file, os.O_RDONLY)
        return self._handles[file]

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def files(self) -> list[Path]:
        """Every file of the checkpoint (weights and auxiliary), sorted by relative path. Hidden
        files and folders (``.git``, ``.cache``) are not part of a checkpoint."""
        relative = {p.relative_to(self.path).as_posix(): p for p in self.path.rglob("*") if p.is_file()}
        return [relative[r] for r in sorted(relative) if not any(part.startswith(".") for part in r.split("/"))]

    def aux_files(self) -> list[Path]:
        """Every non-weight file: config, generation config, tokenizer, processor, chat template."""
        return [p for p in self.files() if not _is_weight_file(p.name)]

    def sha256(self) -> str:
        """A digest of the whole checkpoint: for each file in sorted relative-path order, its path,
        its size and its bytes (so renaming or moving bytes between files changes the digest)."""
        digest = hashlib.sha256()
        for p in self.files():
            rel = p.relative_to(self.path).as_posix().encode("utf-8")
            digest.update(struct.pack("<Q", len(rel)) + rel + struct.pack("<Q", p.stat().st_size))
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
        return digest.hexdigest()


def _is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith((".safetensors.index.json", ".bin.index.json"))


def _info(entry: dict[str, Any], file: Path, data_start: int) -> TensorInfo:
    return TensorInfo(shape=tuple(int(d) for d in entry["shape"]), dtype=SAFETENSORS_DTYPES[entry["dtype"]], file=file,
                      offset=data_start + int(entry["data_offsets"][0]))


def _data_start(path: Path) -> int:
    """Byte offset of a safetensors file's data section (after the 8-byte length and header)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return 8 + header_len
