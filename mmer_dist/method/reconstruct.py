"""Weights rebuilt from base + masks + tau* (DESIGN.md):

- retention:   theta_hat_i = theta_pre + m_i * tau*
- text tokens: theta_bar   = theta_pre + mean_i(m_i) * tau*, with mean_i(m_i) = count / N
- merged:      theta*      = theta_pre + alpha * tau*
All in float32; callers cast to the checkpoint dtype at the edge.
"""

from __future__ import annotations

import torch

from mmer_dist.method.task_vectors import exact_div


def reconstruct(base: torch.Tensor, mask: torch.Tensor, tau_star: torch.Tensor) -> torch.Tensor:
    return base.float() + torch.where(mask, tau_star, torch.zeros((), dtype=torch.float32, device=tau_star.device))


def text_weights(base: torch.Tensor, mask_count: torch.Tensor, n_models: int, tau_star: torch.Tensor) -> torch.Tensor:
    """``mask_count`` is the number of models whose mask is set, per entry."""
    return base.float() + tau_star * exact_div(mask_count.to(torch.float32), float(n_models))


def merged_weights(base: torch.Tensor, tau_star: torch.Tensor, alpha: float) -> torch.Tensor:
    return base.float() + float(alpha) * tau_star
