"""Name a checkpoint's format from its config.json, with its keys as the last resort.

The evidence used is the mappings' own ``architectures`` and ``model_types`` lists, so adding a
built-in format is adding a JSON file. Order of evidence, strongest first:

1. ``config.json`` ``architectures``: the class that saved the checkpoint.
2. ``model_type``. Not always decisive: LLaVA-HF and many original LLaVA checkpoints both say
   ``"llava"``, so several candidates may remain.
3. Keys: among the remaining candidates, those whose mapping classifies every key (no unknown
   keys) and finds an embedding. Most component keys wins (original LLaVA over plain Llama when
   ``mm_projector`` keys are present); on a tie, the mapping with fewest component prefixes (plain
   Llama over LLaVA for a text-only checkpoint).

A checkpoint none of them explains needs ``--format generic --mapping FILE``.
"""

from __future__ import annotations

from mmer_dist.errors import FormatError
from mmer_dist.formats.checkpoint import CheckpointReader
from mmer_dist.formats.mapping import FormatMapping, builtin_formats


def detect_format(reader: CheckpointReader) -> str:
    """The built-in format name of the checkpoint behind ``reader``."""
    mappings = [FormatMapping.load(name) for name in builtin_formats()]
    config = reader.config
    architectures = config.get("architectures") or []
    by_arch = [m for m in mappings if set(architectures) & set(m.architectures)]
    if len(by_arch) == 1:
        return by_arch[0].name
    by_type = [m for m in (by_arch or mappings) if config.get("model_type") in m.model_types]
    if len(by_type) == 1:
        return by_type[0].name
    candidates = by_type or by_arch or mappings
    best = _best_by_keys(candidates, reader.keys())
    if best is not None:
        return best.name
    raise FormatError(
        f"checkpoint {reader.path}: cannot tell its format (architectures={architectures}, "
        f"model_type={config.get('model_type')!r}); known formats: {', '.join(builtin_formats())}. "
        f"Name one with --format, or describe the keys in a mapping JSON and pass --format generic --mapping FILE"
    )


def _best_by_keys(candidates: list[FormatMapping], keys: list[str]) -> FormatMapping | None:
    scored = []
    for mapping in candidates:
        try:
            split = mapping.split(keys, where=f"format detection ({mapping.name})")
        except FormatError:  # two keys for one LLM tensor: not this format
            continue
        if not split.unknown and "model.embed_tokens.weight" in split.llm:
            scored.append((-len(split.component), len(mapping.component), mapping.name, mapping))
    return min(scored)[3] if scored else None
