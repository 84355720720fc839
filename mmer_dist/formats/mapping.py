"""Key mappings as data: which checkpoint keys are the LLM (and under which canonical name), which
are the modality component, and which are ignored.

Every format, built-in or a user's ``generic`` file, is one JSON document with this schema:

    {
      "name": "llava-hf",                       # required, str
      "description": "...",                     # optional, str
      "architectures": ["LlavaForConditionalGeneration"],  # optional, config.json values (detection)
      "model_types": ["llava"],                 # optional, config.json model_type values (detection)
      "llm": [["language_model.model.", "model."], ...],   # required, ordered prefix rules
      "component": ["vision_tower.", ...],      # optional, key prefixes
      "ignore": ["*.rotary_emb.inv_freq"],      # optional, fnmatch patterns (exact keys work too)
      "text_config": "text_config"              # optional, config.json key holding the LLM config
    }

A key is classified by one function (:func:`classify_key`), the same for every format: ignored if
it matches an ``ignore`` pattern; component if it starts with a ``component`` prefix (checked
before the LLM rules because original LLaVA nests its projector under the LLM's ``model.``);
otherwise the first ``llm`` rule whose source prefix it starts with renames that prefix to the
canonical one. Canonical names are the base Llama names (``model.layers.0.self_attn.q_proj.weight``,
``lm_head.weight``); a rename that lands outside them is reported as unknown rather than being
smuggled into the LLM, so a wrong mapping fails at ingest instead of merging junk.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Literal

from mmer_dist.errors import FormatError

# Every base Llama-family key starts with one of these; anything else is not an LLM tensor.
CANONICAL_LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
# what `--format` (and a manifest's `format:`) accepts: the built-in mappings, and `generic` with
# a user's mapping file
FORMAT_NAMES = ("llava-hf", "video-llava-hf", "llava", "llama", "generic")

_SCHEMA_FIELDS = {
    "name", "description", "architectures", "model_types", "llm", "component", "ignore", "text_config",
}


@dataclass(frozen=True)
class SplitKeys:
    """A checkpoint's keys, classified. ``llm`` maps canonical name -> source key."""

    llm: dict[str, str]
    component: list[str]
    ignored: list[str]
    unknown: list[str]


@dataclass(frozen=True)
class FormatMapping:
    """One checkpoint format's key mapping, loaded from JSON (see the module docstring)."""

    name: str
    llm: tuple[tuple[str, str], ...]
    component: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    text_config: str | None = None
    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    description: str = ""
    source: str = field(default="", compare=False)  # where it was loaded from, for messages

    @staticmethod
    def load(name_or_path: str | Path) -> FormatMapping:
        """A built-in format by name (``llava-hf``, ...) or a user's mapping JSON file by path."""
        text, source = _read_mapping_text(name_or_path)
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"mapping {source}: not valid JSON ({e})") from e
        return FormatMapping.from_dict(doc, source=source)

    @staticmethod
    def from_dict(doc: Any, source: str = "<dict>") -> FormatMapping:
        """Validate a parsed mapping document; every error names ``source`` and the field."""
        if not isinstance(doc, dict):
            raise FormatError(f"mapping {source}: top level must be a JSON object")
        extra = sorted(set(doc) - _SCHEMA_FIELDS)
        if extra:
            raise FormatError(f"mapping {source}: unknown field(s) {extra}; allowed: {sorted(_SCHEMA_FIELDS)}")
        for required in ("name", "llm"):
            if required not in doc:
                raise FormatError(f"mapping {source}: missing required field {required!r}")
        name = _string(doc["name"], source, "name")
        rules = doc["llm"]
        if not isinstance(rules, list) or not rules:
            raise FormatError(f"mapping {source}: 'llm' must be a non-empty list of [source_prefix, canonical_prefix]")
        llm = []
        for i, rule in enumerate(rules):
            if not (isinstance(rule, list) and len(rule) == 2 and all(isinstance(p, str) for p in rule)):
                raise FormatError(f"mapping {source}: llm[{i}] must be [source_prefix, canonical_prefix], got {rule!r}")
            llm.append((rule[0], rule[1]))
        text_config = doc.get("text_config")
        if text_config is not None:
            text_config = _string(text_config, source, "text_config")
        return FormatMapping(
            name=name,
            llm=tuple(llm),
            component=_strings(doc.get("component", []), source, "component"),
            ignore=_strings(doc.get("ignore", []), source, "ignore"),
            text_config=text_config,
            architectures=_strings(doc.get("architectures", []), source, "architectures"),
            model_types=_strings(doc.get("model_types", []), source, "model_types"),
            description=_string(doc.get("description", ""), source, "description"),
            source=source,
        )

    def classify(self, key: str) -> tuple[Literal["llm", "component", "ignored", "unknown"], str | None]:
        """One key's class, and its canonical name when it is an LLM key."""
        return classify_key(self, key)

    def split(self, keys: Iterable[str], where: str = "checkpoint") -> SplitKeys:
        """Classify every key. Two source keys with one canonical name is a FormatError (e.g. a
        checkpoint holding both the legacy and the new LLaVA-HF layout)."""
        llm: dict[str, str] = {}
        component: list[str] = []
        ignored: list[str] = []
        unknown: list[str] = []
        for key in keys:
            kind, canonical = classify_key(self, key)
            if kind == "llm":
                assert canonical is not None
                if canonical in llm:
                    raise FormatError(
                        f"{where}: keys {llm[canonical]!r} and {key!r} both map to LLM tensor {canonical!r} "
                        f"under format {self.name!r}"
                    )
                llm[canonical] = key
            elif kind == "component":
                component.append(key)
            elif kind == "ignored":
                ignored.append(key)
            else:
                unknown.append(key)
        return SplitKeys(llm=llm, component=component, ignored=ignored, unknown=unknown)

    def llm_config(self, config: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
        """The LLM part of a checkpoint's config.json: the ``text_config`` sub-dict when the
        mapping names one (LLaVA-HF), else the whole config (a Llama config with extra fields)."""
        if self.text_config is None:
            return dict(config)
        sub = config.get(self.text_config)
        if not isinstance(sub, dict):
            raise FormatError(
                f"{where}: format {self.name!r} expects the LLM config under key {self.text_config!r}, "
                f"found {type(sub).__name__}"
            )
        return dict(sub)


def classify_key(mapping: FormatMapping, key: str) -> tuple[Literal["llm", "component", "ignored", "unknown"], str | None]:
    """The whole mapping rule, for every format: ignore, then component, then first LLM rule."""
    if any(fnmatch.fnmatchcase(key, pattern) for pattern in mapping.ignore):
        return "ignored", None
    if any(key.startswith(prefix) for prefix in mapping.component):
        return "component", None
    for source_prefix, canonical_prefix in mapping.llm:
        if key.startswith(source_prefix):
            canonical = canonical_prefix + key[len(source_prefix):]
            if canonical.startswith(CANONICAL_LLM_PREFIXES):
                return "llm", canonical
            return "unknown", None
    return "unknown", None


def builtin_formats() -> list[str]:
    """Names of the mappings shipped in ``mmer_dist/formats/mappings/``."""
    folder = resources.files("mmer_dist.formats") / "mappings"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def _read_mapping_text(name_or_path: str | Path) -> tuple[str, str]:
    as_str = str(name_or_path)
    is_path = isinstance(name_or_path, Path) or as_str.endswith(".json") or "/" in as_str or "\\" in as_str
    if not is_path:
        if as_str == "generic":
            raise FormatError("format 'generic' is described by a mapping JSON file: pass --mapping FILE")
        if as_str not in builtin_formats():
            raise FormatError(
                f"unknown format {as_str!r}; built-in formats: {', '.join(builtin_formats())} "
                f"(or give a mapping JSON file path)"
            )
        resource = resources.files("mmer_dist.formats") / "mappings" / f"{as_str}.json"
        return resource.read_text(encoding="utf-8"), f"built-in {as_str!r}"
    path = Path(name_or_path)
    if not path.is_file():
        raise FormatError(f"mapping file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except UnicodeDecodeError as e:
        raise FormatError(f"mapping file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8 "
                          "JSON") from None


def _string(value: Any, source: str, name: str) -> str:
    if not isinstance(value, str):
        raise FormatError(f"mapping {source}: {name!r} must be a string, got {value!r}")
    return value


def _strings(value: Any, source: str, name: str) -> tuple[str, ...]:
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise FormatError(f"mapping {source}: {name!r} must be a list of strings, got {value!r}")
    return tuple(value)
