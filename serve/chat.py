"""Chat messages -> the engine's prompt parts, the way each model was trained to see them.

Retention (``model`` = one model id): that model's own tokenizer and chat template, as saved with
its checkpoint, render the conversation; each media part becomes the content item its template
renders (``{"type": "image"}`` for LLaVA), which the template turns into the model's placeholder
token; each placeholder is then filled with that media part's encoder rows (however many the
encoder gives, e.g. 576 for LLaVA-1.5). The BOS token is added once: by the template when it
writes it, else by the tokenizer.

Expansion (``model`` = ``merged``): the base's template renders the text, with each media part
replaced by a sentinel; at each sentinel go the part's model's wrapper tokens (``wrap`` in its
``mmer_adapter.json``, read by ``mmer_dist.media.adapters.read_adapter_file``, e.g. ``<audio_start>`` / ``<audio_end>``; none by default: LLaVA puts only
``<image>``), tokenized by that model's tokenizer and embedded with its own rows, and between
them the encoder rows. A checkpoint without a chat template gets ``DEFAULT_CHAT_TEMPLATE``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmer_dist.errors import InvalidInputError
from mmer_dist.media.adapters import read_adapter_file
from mmer_dist.media.parts import MODALITY_PART_TYPES, PART_TYPES
from mmer_dist.media.processor import processor_inputs
from mmer_dist.model.prompt import MediaPart, TextPart
from serve.protocol import Message, TextContentPart

SENTINEL = "\u0000mmer-media-{}\u0000"
# Used only for a checkpoint that has no chat template: role markers and media placeholders.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}{{ '<' + part['type'] + '>' }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class PartPrompt:
    """How one media part type shows in a model's prompts: the content type its chat template
    renders, and the placeholder token the template writes for it."""

    template_type: str
    placeholder: str


@dataclass(frozen=True)
class MediaSpec:
    """How a model takes media: its own part type (its modality's, or its adapter's: what
    expansion routes to it), every part type it takes alone (retention: what its processor takes,
    and its adapter's), and its expansion-mode wrapper text."""

    part_type: str
    prompts: dict[str, PartPrompt]
    wrap: tuple[str, str] = ("", "")

    def takes(self, part_type: str) -> bool:
        return part_type in self.prompts


@dataclass
class ChatAssets:
    """One model's (or the base's, ``model_id`` None) tokenizer, template and media spec."""

    model_id: str | None
    tokenizer: object
    chat_template: str
    stop_token_ids: tuple[int, ...]
    media: MediaSpec | None = None

    @classmethod
    def load(cls, directory: str | Path, model_id: str | None, modality: str | None) -> ChatAssets:
        from transformers import AutoTokenizer

        directory = Path(directory)
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except Exception as e:
            who = f"model {model_id!r}" if model_id else "the base"
            raise InvalidInputError(f"{who} has no tokenizer the server can load ({type(e).__name__}: {e})") from None
        template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        return cls(model_id, tokenizer, template, _stop_ids(directory, tokenizer),
                   _media_spec(directory, model_id, modality, tokenizer, template) if model_id else None)

    def encode(self, text: str, first: bool) -> list[int]:
        """Token ids of rendered text; the BOS token only at the start and only once."""
        bos = getattr(self.tokenizer, "bos_token", None)
        special = first and not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def render(self, conversation: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(int(token)) or ""


def _stop_ids(directory: Path, tokenizer) -> tuple[int, ...]:
    ids = set()
    gen = directory / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(int(i) for i in ids))


def _media_spec(directory: Path, model_id: str, modality: str | None, tokenizer, template: str) -> MediaSpec | None:
    """How model ``model_id`` takes media: what its processor takes as it is (images, videos),
    what its adapter turns into an image (``mmer_adapter.json``, which may also name the
    placeholder, the template's content type and the wrapper text), each with its placeholder
    token; the content type is the one its chat template turns into that placeholder (HF templates
    read ``{"type": "image"}``, some the OpenAI part type)."""
    adapter = read_adapter_file(directory)
    placeholders = processor_inputs(directory)
    if adapter is not None and adapter.adapter is not None:  # its part becomes an image for the processor
        placeholders[adapter.part_type] = placeholders.get("image_url", PART_TYPES[adapter.part_type].placeholder)
    part_type = (adapter.part_type if adapter else None) or MODALITY_PART_TYPES.get(modality or "")
    if part_type is None:
        return None
    if part_type not in placeholders and PART_TYPES[part_type].adapter is None:  # no processor files to say
        placeholders[part_type] = PART_TYPES[part_type].placeholder
    if adapter is not None and adapter.placeholder and part_type in placeholders:
        placeholders[part_type] = adapter.placeholder
    prompts = {}
    for kind, placeholder in placeholders.items():
        if tokenizer.convert_tokens_to_ids(placeholder) in (None, tokenizer.unk_token_id):
            raise InvalidInputError(f"model {model_id!r}: its {kind} placeholder {placeholder!r} is not a token "
                                    "of its tokenizer")
        given = adapter.template_type if adapter is not None and kind == part_type else None
        prompts[kind] = PartPrompt(given or _template_type(tokenizer, template, placeholder, kind), placeholder)
    return MediaSpec(part_type, prompts, adapter.wrap if adapter else ("", ""))


def _template_type(tokenizer, template: str, placeholder: str, part_type: str) -> str:
    # a LLaVA reading spectrograms or projections renders its media as an image
    for candidate in dict.fromkeys((PART_TYPES[part_type].content_type, part_type, "image", "video")):
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": candidate}]}], tokenize=False,
                                                 chat_template=template)
        except Exception:  # a template that refuses this content type
            continue
        if placeholder in text:
            return candidate
    return PART_TYPES[part_type].content_type


def conversation(messages: Sequence[Message], media_item) -> list[dict]:
    """The request's messages as the HF conversation a chat template renders; media part k
    becomes ``media_item(k, part)``."""
    out, k = [], 0
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        content = m.content if m.content is not None else ""
        if isinstance(content, list):
            items = []
            for part in content:
                if isinstance(part, TextContentPart):
                    items.append({"type": "text", "text": part.text})
                else:
                    items.append(media_item(k, part))
                    k += 1
            content = items
        out.append({"role": role, "content": content})
    return out


def _check_text(messages: Sequence[Message]) -> None:
    for m in messages:
        texts = [m.content] if isinstance(m.content, str) else \
            [p.text for p in m.content or [] if isinstance(p, TextContentPart)]
        if any("\u0000" in t for t in texts):
            raise InvalidInputError("message text may not contain NUL characters")


def retention_parts(assets: ChatAssets, messages: Sequence[Message], media: Sequence[MediaPart]) -> list:
    """The prompt of a request to one model (see the module docstring)."""
    _check_text(messages)
    spec = assets.media
    if media and spec is None:
        raise InvalidInputError(f"model {assets.model_id!r} takes no media parts")
    kinds = [p.type for m in messages for p in m.media()]
    if unknown := sorted({k for k in kinds if not spec.takes(k)}):
        raise InvalidInputError(f"model {assets.model_id!r} takes {' or '.join(spec.prompts)} parts, not "
                                f"{', '.join(unknown)}")
    rendered = assets.render(conversation(messages, lambda k, part: {"type": spec.prompts[part.type].template_type}))
    ids = assets.encode(rendered, first=True)
    if not media:
        return [TextPart(tuple(ids), tokenizer=assets.model_id)]
    wanted = [assets.tokenizer.convert_tokens_to_ids(spec.prompts[k].placeholder) for k in kinds]
    at = [i for i, t in enumerate(ids) if t in set(wanted)]
    if [ids[i] for i in at] != wanted:
        raise InvalidInputError(f"the chat template of model {assets.model_id!r} placed {len(at)} media placeholders "
                                f"({', '.join(dict.fromkeys(spec.prompts[k].placeholder for k in kinds))}) for "
                                f"{len(media)} media parts")
    parts: list = []
    start = 0
    for i, m in zip(at, media):
        if i > start:
            parts.append(TextPart(tuple(ids[start:i]), tokenizer=assets.model_id))
        parts.append(m)
        start = i + 1
    if start < len(ids):
        parts.append(TextPart(tuple(ids[start:]), tokenizer=assets.model_id))
    return parts


def expansion_parts(base: ChatAssets, models: dict[str, ChatAssets], messages: Sequence[Message],
                    media: Sequence[MediaPart]) -> list:
    """The prompt of a request to the merged model (see the module docstring)."""
    _check_text(messages)
    conv = conversation(messages, lambda k, part: {"type": "text", "text": SENTINEL.format(k)})
    rendered = base.render(conv)
    if media and SENTINEL.format(0) not in rendered:  # a template that reads string content only
        flat = [{**m, "content": "".join(p["text"] for p in m["content"]) if isinstance(m["content"], list)
                 else m["content"]} for m in conv]
        rendered = base.render(flat)
    pieces = [rendered]
    for k in range(len(media)):
        head, sep, tail = pieces[-1].partition(SENTINEL.format(k))
        if not sep:
            raise InvalidInputError("the base's chat template dropped a media part")
        pieces[-1:] = [head, tail]
    parts: list = []
    for k, text in enumerate(pieces):
        if text or k == 0:
            ids = base.encode(text, first=k == 0)
            if ids:
                parts.append(TextPart(tuple(ids)))
        if k < len(media):
            m = media[k]
            before, after = models[m.model].media.wrap
            if before:
                parts.append(TextPart(tuple(models[m.model].encode(before, first=False)), m.model, m.model))
            parts.append(m)
            if after:
                parts.append(TextPart(tuple(models[m.model].encode(after, first=False)), m.model, m.model))
    return parts
