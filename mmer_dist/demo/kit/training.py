"""One small, seeded, deterministic training loop for the base and every fine-tune.

AdamW on the whole model (a full fine-tune: LLM, tower and projector together), linear warm-up
then cosine decay, gradient clipping, batches drawn from a seeded generator over tensors encoded
once up front. It runs on the CPU in float32: the models are tiny, and the same CPU code path
with a fixed thread count (set by the builder) gives bit-identical weights for a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int = 32
    lr: float = 2e-3
    encoder_lr: float = 3e-3  # tower + projector: they start from random weights
    warmup: int = 20
    clip: float = 1.0


def train(model: nn.Module, data: dict[str, torch.Tensor], settings: TrainSettings, seed: int,
          encoder_prefixes: tuple[str, ...] = ()) -> list[float]:
    """Minimise the LM loss on ``data`` (model inputs with ``labels``); returns the loss per step."""
    n = data["input_ids"].shape[0]
    encoder = [p for name, p in model.named_parameters() if name.startswith(encoder_prefixes)] if encoder_prefixes else []
    encoder_ids = {id(p) for p in encoder}
    llm = [p for p in model.parameters() if id(p) not in encoder_ids]
    groups = [{"params": llm, "lr": settings.lr}] + ([{"params": encoder, "lr": settings.encoder_lr}] if encoder else [])
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(settings.steps):
        idx = torch.randint(0, n, (min(settings.batch_size, n),), generator=generator)
        loss = model(**{k: v[idx] for k, v in data.items()}).loss
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _lr_factor(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
