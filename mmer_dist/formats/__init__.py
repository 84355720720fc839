"""Checkpoint formats: key mappings (data, in ``mappings/*.json``), a streaming safetensors reader
and writer, and format detection. Knows bytes and key names; no merge math, no store layout."""

from mmer_dist.formats.checkpoint import CheckpointReader, TensorInfo, read_header
from mmer_dist.formats.detect import detect_format
from mmer_dist.formats.mapping import CANONICAL_LLM_PREFIXES, FormatMapping, SplitKeys, builtin_formats
from mmer_dist.formats.writer import SafetensorsWriter, plan_shards

__all__ = [
    "CANONICAL_LLM_PREFIXES",
    "CheckpointReader",
    "FormatMapping",
    "SafetensorsWriter",
    "SplitKeys",
    "TensorInfo",
    "builtin_formats",
    "detect_format",
    "plan_shards",
    "read_header",
]
