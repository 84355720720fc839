"""The kit's word-level tokenizer and chat template, shared by the base and every fine-tune.

One vocabulary for all tasks (question words, every task's answer words, the base's text facts),
so the models' LM heads and embeddings are the same rows and their task vectors meet on them.
Each media modality has its own placeholder token (``<image>``, ``<audio>``, ``<video>``,
``<point>``); a model's processor expands its placeholder to as many tokens as its encoder
yields, so in a mixed prompt every media token says which modality it belongs to.

BOS comes from the chat template alone (the tokenizer adds no special tokens when encoding), so
``tokenizer.apply_chat_template(..., tokenize=True)``, ``processor(text=rendered)`` and
``processor.apply_chat_template`` all give exactly one ``<s>``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mmer_dist.errors import InvalidInputError

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
MEDIA_TOKENS = {"image": "<image>", "audio": "<audio>", "video": "<video>", "point": "<point>"}
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = (
    *NUMBERS,
    "even", "odd", "left", "right", "up", "down", "rising", "falling", "high", "low",
    "cube", "sphere", "cylinder", "cone",
    "what", "which", "is", "this", "the", "a", "an", "of", "or", "does", "do", "it", "way", "shape",
    "digit", "number", "comes", "after", "before", "opposite", "pitch", "tone", "sound", "move", "moving",
    "thing", "ball", "box", "can", "funnel", "dot", "video", "picture", "point", "cloud",
    "?", ",", ".",
)
VOCAB_SIZE = 96  # all of the above, padded with <reserved_i> to a round size
PAD_ID, BOS_ID, EOS_ID = 3, 1, 2

# Renders string content or OpenAI-style content parts (HF-style "image"/"video"/"audio" parts
# too); a media part becomes its modality's placeholder. Each message ends with "</s>" (the
# Zephyr layout), so a reply ends with EOS and generation stops there.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ ' ' + part['text'] }}"
    "{% elif part['type'] in ('image_url', 'image') %}{{ ' <image>' }}"
    "{% elif part['type'] in ('input_audio', 'audio') %}{{ ' <audio>' }}"
    "{% elif part['type'] in ('video_url', 'video') %}{{ ' <video>' }}"
    "{% elif part['type'] == 'point_cloud' %}{{ ' <point>' }}"
    "{% else %}{{ raise_exception('unknown content part type: ' + part['type']) }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ ' </s> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def vocabulary() -> list[str]:
    fixed = [*SPECIAL_TOKENS, *MEDIA_TOKENS.values(), *ROLE_TOKENS]
    words = fixed + list(WORDS)
    if len(set(words)) != len(words) or len(words) > VOCAB_SIZE:
        raise RuntimeError(f"kit vocabulary: {len(words)} tokens (duplicates or over {VOCAB_SIZE})")
    return words + [f"<reserved_{i}>" for i in range(len(words), VOCAB_SIZE)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over :func:`vocabulary`, whitespace + punctuation pre-tokenizer,
    the special, media and role tokens matched whole, and :data:`CHAT_TEMPLATE`."""
    vocab = vocabulary()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([*SPECIAL_TOKENS, *MEDIA_TOKENS.values(), *ROLE_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    return tokenizer


def check_words(text: str) -> None:
    """Every word of a task's text is in the vocabulary (no silent ``<unk>``)."""
    known = set(WORDS)
    unknown = [w for w in pre_tokenizers.Whitespace().pre_tokenize_str(text) if w[0] not in known]
    if unknown:
        raise InvalidInputError(f"kit text {text!r} has words outside the vocabulary: {[w[0] for w in unknown]}")
