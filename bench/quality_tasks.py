"""Synthetic "modality" tasks and really fine-tuned tiny Llamas for the retention benchmark.

The shape of the setup follows the paper's: one base LLM, four MLLMs fine-tuned from it, each with
its own modality component, and the LLM weights merged.

- **Base language** ("text"): sequences over a text alphabet of ``text_tokens`` symbols drawn from
  a shared random (peaked) transition matrix P, where x[t+1] ~ P(. | x[t-lag]) and the lag (0..4)
  is announced by a style token after BOS. Pre-training on it gives the base the generic circuits
  a real LLM has before multimodal fine-tuning (next-token statistics, look-back heads at several
  offsets), so a fine-tune adapts them instead of building a model from scratch.
- **Modality tokens**: every fine-tuned model adds ``1 + modality_tokens`` vocabulary rows of its
  own (its ``<image>``/``<audio>``/... prefix and its modality "frames"), at the same ids in every
  model. These rows play the part of the paper's encoder + connector: model-specific, never merged
  (mmer-dist keeps extra vocabulary rows per model; every method below is evaluated with model i's
  own rows attached, exactly as NaiveMC keeps each MLLM's encoder).
- **Tasks**: after ``<bos> <style> [0..preamble text tokens] <prefix_i>`` comes a stream of pairs
  (m_1 y_1 m_2 y_2 ...), m_t a random modality token of model i, y_t a text token fixed by the
  task's rule. Answer positions are the y_t the rule determines; accuracy is next-token argmax
  accuracy there. The four rules are different kinds of skill over the *shared* text alphabet:

  ========  =====================================  ==========================================
  image     y_t = g_image(m_t)                      lookup ("caption the current frame")
  audio     y_t = g_audio(m_{t-1})                  delayed lookup (attend 2 tokens back)
  video     y_1 = g_video(m_1), y_t = pi(y_{t-1})    task-specific deterministic text chain
  point     y_t = g_point(m_{t-2})                  long-delay lookup (attend 4 tokens back)
  ========  =====================================  ==========================================

  g_* are random maps frames -> text tokens, pi a random permutation of the text alphabet; the
  video chain overrides the base language's own statistics, the most conflicting of the four.

Everything is seeded; training runs in float32 from the bf16-rounded base, checkpoints are saved
in bf16. bf16 keeps the fine-tunes: at these learning rates ~1% of the deltas round to exactly 0
and accuracy moves by <= 0.1 point (measured at build time, kept in the cache's ``meta.json``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TASKS = ("image", "audio", "video", "point")
RULES = {
    "image": "y_t = g(m_t): lookup",
    "audio": "y_t = g(m_{t-1}): delayed lookup",
    "video": "y_t = pi(y_{t-1}): task text chain",
    "point": "y_t = g(m_{t-2}): long-delay lookup",
}
PAD, BOS, EOS = 0, 1, 2
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Size:
    """Model, data and training sizes; ``quick()`` is the toy size of the smoke test."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    text_tokens: int = 64
    modality_tokens: int = 16
    lags: int = 5  # style tokens: base-language lags 0..lags-1 (the tasks need 0, 1, 2, 4)
    pretrain_steps: int = 1000
    pretrain_lr: float = 2e-3
    pretrain_len: int = 32
    finetune_steps: int = 400
    finetune_lr: float = 6e-4
    batch: int = 32
    pairs: int = 16  # (m, y) pairs per task sequence
    preamble: int = 4  # up to this many base-language tokens before the task prefix
    eval_sequences: int = 512
    val_sequences: int = 256

    @classmethod
    def quick(cls) -> Size:
        return cls(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, text_tokens=32, modality_tokens=8,
                   pretrain_steps=120, pretrain_lr=5e-3, finetune_steps=150, finetune_lr=2e-3, batch=16, pairs=8,
                   eval_sequences=128, val_sequences=64)


@dataclass(frozen=True)
class Vocab:
    """Token ids: specials, style tokens, text alphabet (the base vocabulary), then per model its
    extra rows: its prefix token followed by its modality tokens."""

    text_tokens: int
    modality_tokens: int
    lags: int

    @property
    def style0(self) -> int:
        return 3

    @property
    def text0(self) -> int:
        return 3 + self.lags

    @property
    def base_size(self) -> int:
        return self.text0 + self.text_tokens

    @property
    def extra_rows(self) -> int:
        return 1 + self.modality_tokens

    @property
    def model_size(self) -> int:
        return self.base_size + self.extra_rows

    def prefix(self, slot: int = 0) -> int:
        """Id of a model's prefix token; ``slot`` > 0 places model ``slot``'s extra rows after the
        others' (the combined vocabulary of the mixed prompts)."""
        return self.base_size + slot * self.extra_rows

    def modality0(self, slot: int = 0) -> int:
        return self.prefix(slot) + 1


def llama_config(size: Size, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=PAD)


class Suite:
    """The base language and the four task rules, drawn from one seed."""

    def __init__(self, size: Size, seed: int = 0):
        self.size = size
        self.vocab = Vocab(size.text_tokens, size.modality_tokens, size.lags)
        g = torch.Generator().manual_seed(seed)
        T, M = size.text_tokens, size.modality_tokens
        self.transition = torch.softmax(torch.randn(T, T, generator=g) * 2.0, -1)
        self.maps = {t: torch.randint(T, (M,), generator=g) for t in TASKS}
        self.chain = torch.randperm(T, generator=g)

    # -- base language ------------------------------------------------------------------------

    def text(self, batch: int, length: int, g: torch.Generator, lag: int | None = None) -> torch.Tensor:
        """(batch, 2 + length): BOS, style token, then base-language text with per-row lags."""
        lags = torch.randint(self.size.lags, (batch,), generator=g) if lag is None else torch.full((batch,), lag)
        x = torch.randint(self.size.text_tokens, (batch, length), generator=g)
        rows = torch.arange(batch)
        for t in range(1, length):
            src = t - 1 - lags
            nxt = torch.multinomial(self.transition[x[rows, src.clamp(min=0)]], 1, generator=g).squeeze(1)
            x[:, t] = torch.where(src >= 0, nxt, x[:, t])
        return torch.cat([torch.full((batch, 1), BOS), (self.vocab.style0 + lags)[:, None], x + self.vocab.text0], 1)

    # -- tasks --------------------------------------------------------------------------------

    def pairs(self, task: str, batch: int, pairs: int, g: torch.Generator, slot: int = 0):
        """(tokens, answer) of shape (batch, 1 + 2*pairs): the prefix and the (m, y) stream, and
        which positions hold a rule-determined y."""
        T, M = self.size.text_tokens, self.size.modality_tokens
        gmap = self.maps[task]
        m = torch.randint(M, (batch, pairs), generator=g)
        y = torch.randint(T, (batch, pairs), generator=g)
        ans = torch.ones(batch, pairs, dtype=torch.bool)
        if task == "image":
            y = gmap[m]
        elif task == "audio":
            y[:, 1:] = gmap[m[:, :-1]]
            ans[:, :1] = False
        elif task == "video":
            y[:, 0] = gmap[m[:, 0]]
            for t in range(1, pairs):
                y[:, t] = self.chain[y[:, t - 1]]
        elif task == "point":
            y[:, 2:] = gmap[m[:, :-2]]
            ans[:, :2] = False
        else:
            raise ValueError(f"unknown task {task!r}")
        stream = torch.stack([m + self.vocab.modality0(slot), y + self.vocab.text0], 2).reshape(batch, -1)
        tokens = torch.cat([torch.full((batch, 1), self.vocab.prefix(slot)), stream], 1)
        answer = torch.zeros_like(tokens, dtype=torch.bool)
        answer[:, 2::2] = ans
        return tokens, answer

    def task(self, task: str, batch: int, g: torch.Generator, pairs: int | None = None):
        """(tokens, answer): ``<bos> <style> [preamble] <prefix> stream``, right-padded with PAD
        (preamble lengths vary); ``answer`` marks the positions scored (PAD never is)."""
        pairs = pairs or self.size.pairs
        n_pre = torch.randint(self.size.preamble + 1, (batch,), generator=g)
        pre = self.text(batch, max(1, self.size.preamble), g)
        body, ans = self.pairs(task, batch, pairs, g)
        return _join([(pre, n_pre + 2, None), (body, None, ans)])

    def mixed(self, batch: int, g: torch.Generator, pairs: int | None = None):
        """Mixed prompts (the expansion table and the single-weights proxy): ``<bos> <style>
        [preamble] seg_a seg_b``, two segments of different tasks, each in its model's slot of the
        combined vocabulary.
        Returns (tokens, answer per task: {task: bool mask})."""
        pairs = pairs or max(2, self.size.pairs // 2)
        n_pre = torch.randint(self.size.preamble + 1, (batch,), generator=g)
        pre = self.text(batch, max(1, self.size.preamble), g)
        first = torch.randint(len(TASKS), (batch,), generator=g)
        second = (first + 1 + torch.randint(len(TASKS) - 1, (batch,), generator=g)) % len(TASKS)
        segs = []
        for which in (first, second):
            tok = torch.zeros(batch, 1 + 2 * pairs, dtype=torch.long)
            owner = torch.zeros(batch, 1 + 2 * pairs, dtype=torch.long)
            ans = torch.zeros(batch, 1 + 2 * pairs, dtype=torch.bool)
            for k, task in enumerate(TASKS):
                rows = which == k
                t, a = self.pairs(task, batch, pairs, g, slot=k)
                tok[rows], ans[rows], owner[rows] = t[rows], a[rows], k
            segs.append((tok, ans, owner))
        tokens, answer = _join([(pre, n_pre + 2, None), (segs[0][0], None, segs[0][1]), (segs[1][0], None, segs[1][1])])
        owner = _join([(torch.full_like(pre, -1), n_pre + 2, None), (segs[0][2], None, None),
                       (segs[1][2], None, None)])[0]
        return tokens, {task: answer & (owner == k) for k, task in enumerate(TASKS)}


def _join(parts):
    """Concatenate per-row variable-length prefixes of token blocks; pad the end with PAD.
    Each part is (tokens, lengths or None for all, answer mask or None)."""
    batch = parts[0][0].shape[0]
    lengths = [p[1] if p[1] is not None else torch.full((batch,), p[0].shape[1]) for p in parts]
    total = int(sum(l.max() for l in lengths))
    tokens = torch.full((batch, total), PAD, dtype=torch.long)
    answer = torch.zeros(batch, total, dtype=torch.bool)
    for r in range(batch):
        at = 0
        for (tok, _, ans), lens in zip(parts, lengths):
            n = int(lens[r])
            tokens[r, at:at + n] = tok[r, :n]
            if ans is not None:
                answer[r, at:at + n] = ans[r, :n]
            at += n
    return tokens, answer


# -- training ---------------------------------------------------------------------------------------


def train(model: LlamaForCausalLM, batches, steps: int, lr: float, log=None, label: str = "") -> float:
    """AdamW (no weight decay), cosine decay to 0; loss on answer positions (all positions when a
    batch has no answer mask). Returns the mean loss of the last 10% of steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    vocab = model.config.vocab_size
    tail, started = [], time.perf_counter()
    model.train()
    for step in range(steps):
        tokens, answer = batches()
        logits = model(tokens, attention_mask=(tokens != PAD).long()).logits[:, :-1]
        target = tokens[:, 1:].clone()
        target[tokens[:, 1:] == PAD] = -100
        if answer is not None:
            target[~answer[:, 1:]] = -100
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
    model.eval()
    mean = sum(tail) / len(tail)
    if log:
        log(f"  trained {label}: {steps} steps in {time.perf_counter() - started:.1f}s, final loss {mean:.3f}")
    return mean


def pretrain_base(suite: Suite, seed: int, log=None) -> LlamaForCausalLM:
    size = suite.size
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config(size, suite.vocab.base_size))
    g = torch.Generator().manual_seed(seed + 1)
    train(model, lambda: (suite.text(size.batch, size.pretrain_len, g), None), size.pretrain_steps,
          size.pretrain_lr, log, "base")
    return round_to_bf16(model)


def finetune(suite: Suite, base: LlamaForCausalLM, task: str, seed: int, log=None,
             to_bf16: bool = True) -> LlamaForCausalLM:
    """A copy of the base with its own extra rows (seeded init), fully fine-tuned on ``task``."""
    size, vocab = suite.size, suite.vocab
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config(size, vocab.model_size))
    state = model.state_dict()
    for name, value in base.state_dict().items():
        if name in VOCAB_TENSORS:
            state[name][: vocab.base_size] = value
        else:
            state[name] = value
    model.load_state_dict(state)
    g = torch.Generator().manual_seed(seed + 1)
    train(model, lambda: suite.task(task, size.batch, g), size.finetune_steps, size.finetune_lr, log, task)
    return round_to_bf16(model) if to_bf16 else model


def _precision_report(model, base_state, base_vocab: int, acc_fp32: float, acc_bf16: float) -> dict:
    """Whether bf16 keeps the fine-tune: accuracy before/after rounding, share of shared-row deltas
    that round to exactly 0, and the task vector's size relative to the base's weights."""
    zero = total = 0
    tau_sq = base_sq = 0.0
    for name, b in base_state.items():
        theta = model.state_dict()[name][:base_vocab] if name in VOCAB_TENSORS else model.state_dict()[name]
        tau = theta.float() - b.float()
        zero += int((tau == 0).sum())
        total += tau.numel()
        tau_sq += float(tau.pow(2).sum())
        base_sq += float(b.float().pow(2).sum())
    return {"accuracy_fp32": round(100 * acc_fp32, 3), "accuracy_bf16": round(100 * acc_bf16, 3),
            "zero_delta_pct": round(100 * zero / total, 3), "relative_delta": round(math.sqrt(tau_sq / base_sq), 4)}


def round_to_bf16(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Round the weights to bf16 (kept in float32): the saved checkpoint is exactly this model."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


# -- evaluation -------------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(model, tokens: torch.Tensor, answer: torch.Tensor, batch: int = 256) -> float:
    """Next-token argmax accuracy of a plain HF model over the positions marked in ``answer``
    (float32 compute); ``bench/quality_expansion.py`` scores the serving engine the same way."""
    hits = total = 0
    for a in range(0, tokens.shape[0], batch):
        tok, ans = tokens[a:a + batch], answer[a:a + batch]
        logits = model(tok, attention_mask=(tok != PAD).long()).logits[:, :-1]
        mask = ans[:, 1:]
        hits += int((logits.argmax(-1)[mask] == tok[:, 1:][mask]).sum())
        total += int(mask.sum())
    return hits / max(1, total)


class Evaluator:
    """Held-out sets (fixed seeds, disjoint from training's) and a reusable model per vocabulary."""

    def __init__(self, suite: Suite, seed: int):
        size = suite.size
        self.suite = suite
        self.test = {t: suite.task(t, size.eval_sequences, torch.Generator().manual_seed(seed + 1000 + i))
                     for i, t in enumerate(TASKS)}
        self.val = {t: suite.task(t, size.val_sequences, torch.Generator().manual_seed(seed + 2000 + i))
                    for i, t in enumerate(TASKS)}
        self.mixed = suite.mixed(size.eval_sequences, torch.Generator().manual_seed(seed + 3000))
        self._models: dict[int, LlamaForCausalLM] = {}

    def model(self, state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
        vocab = state["model.embed_tokens.weight"].shape[0]
        if vocab not in self._models:
            with torch.random.fork_rng():
                self._models[vocab] = LlamaForCausalLM(llama_config(self.suite.size, vocab)).eval()
        model = self._models[vocab]
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model

    def task_accuracy(self, state, task: str, split: str = "test") -> float:
        tokens, answer = (self.test if split == "test" else self.val)[task]
        return accuracy(self.model(state), tokens, answer)

    def mixed_accuracy(self, state) -> dict[str, float]:
        tokens, answers = self.mixed
        model = self.model(state)
        return {t: accuracy(model, tokens, answers[t]) for t in TASKS}


# -- checkpoints ------------------------------------------------------------------------------------


def cache_key(size: Size, seed: int) -> str:
    blob = json.dumps({"size": dataclasses.asdict(size), "seed": seed, "format": CACHE_FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def save(model: LlamaForCausalLM, path: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.to(torch.bfloat16).save_pretrained(path)
    model.float()


def build_checkpoints(suite: Suite, root: Path, seed: int, log=print) -> dict:
    """Pre-train the base and fine-tune one model per task; save all in bf16 under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"training: base ({suite.size.pretrain_steps} steps) and {len(TASKS)} fine-tunes "
        f"({suite.size.finetune_steps} steps each) ...")
    base = pretrain_base(suite, seed, log)
    save(base, root / "base")
    timings, precision = {}, {}
    base_state = base.state_dict()
    for i, task in enumerate(TASKS):
        t0 = time.perf_counter()
        model = finetune(suite, base, task, seed + 100 * (i + 1), log, to_bf16=False)
        check = suite.task(task, suite.size.val_sequences, torch.Generator().manual_seed(seed + 5000 + i))
        fp32 = accuracy(model, *check)
        round_to_bf16(model)
        precision[task] = _precision_report(model, base_state, suite.vocab.base_size, fp32, accuracy(model, *check))
        save(model, root / f"ft-{task}")
        timings[task] = round(time.perf_counter() - t0, 2)
        log(f"    {task}: accuracy fp32 {100 * fp32:.1f}% -> bf16 {precision[task]['accuracy_bf16']:.1f}%, "
            f"{precision[task]['zero_delta_pct']:.1f}% of deltas exactly 0 in bf16, "
            f"|tau|/|theta_pre| = {precision[task]['relative_delta']:.3f}")
    meta = {"size": dataclasses.asdict(suite.size), "seed": seed, "format": CACHE_FORMAT, "dtype": "bfloat16",
            "train_seconds": round(time.perf_counter() - started, 2), "finetune_seconds": timings,
            "finetunes": precision}
    (root / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta
