"""The oracle: MMER over whole models in memory, written as plainly as the papers state it.

Nothing here is streamed or fused, and it does not reuse the step functions it checks, so tests
can hold every other path (streaming, compiled, Ray) against it. It follows Yadav et al.'s TIES
reference (``topk_values_mask``, ``resolve_sign``, ``disjoint_merge``) on one flattened vector
per selection group, with DESIGN.md's rules for ties: keep |tau| >= the k-th smallest,
k = d - int(d*K); zero sign sums take the group's majority sign (a tied majority counts +1);
sums over models run in model order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mmer_dist.method import baselines, validate
from mmer_dist.method.neuro import canonical_signs, check_neuron_rank
from mmer_dist.method.settings import MergeSettings


@dataclass
class ReferenceResult:
    tau_star: dict[str, torch.Tensor]
    masks: list[dict[str, torch.Tensor]]  # one dict per model, bool tensors shaped like the base
    thresholds: dict[str, list[float]]  # per selection group, per model
    majority: dict[str, float]


def _groups(names: Sequence[str], scope: str) -> dict[str, list[str]]:
    if scope == "global":
        return {"*": list(names)}
    return {n: [n] for n in names}


def reference_task_vectors(base, models, settings: MergeSettings, model_ids):
    taus = []
    for mid, model in zip(model_ids, models):
        tau = {}
        for name, b in base.items():
            t = model[name].to(torch.float32) - b.to(torch.float32)
            if settings.dare_rate > 0:
                t = baselines.dare(t.unsqueeze(0), settings.dare_rate, settings.dare_seed,
                                   (baselines.stable_key(mid),), baselines.stable_key(name), 0)[0]
            tau[name] = t
        taus.append(tau)
    return taus


def reference_merge(base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]],
                    settings: MergeSettings, model_ids: Sequence[str]) -> ReferenceResult:
    settings.validated(list(model_ids))
    validate.check_models(base, models, list(model_ids))
    names = sorted(base)
    taus = reference_task_vectors(base, models, settings, model_ids)
    n = len(models)
    tau_star: dict[str, torch.Tensor] = {}
    thresholds: dict[str, list[float]] = {}
    majority: dict[str, float] = {}
    for group, members in _groups(names, settings.scope).items():
        # one row per model: the whole group flattened
        M = torch.stack([torch.cat([tau[m].reshape(-1) for m in members]) for tau in taus])
        d = M.shape[1]
        if settings.method in ("ties", "neuro"):
            k = d - int(d * settings.topk)
            if k > 0:
                kth = torch.kthvalue(M.abs(), k, dim=1, keepdim=True).values
            else:
                kth = torch.zeros(n, 1)
            thresholds[group] = kth.reshape(-1).tolist()
            trimmed = M * (M.abs() >= kth)
            total = trimmed[0].clone()
            for i in range(1, n):
                total += trimmed[i]
            sign = torch.sign(total)
            # NeuroMerging elects per parameter only on its 1-D weights, so only they vote
            voters = torch.cat([torch.full((base[m].numel(),), settings.method == "ties" or base[m].dim() <= 1)
                                for m in members])
            maj = 1.0 if int((sign[voters] > 0).sum()) >= int((sign[voters] < 0).sum()) else -1.0
            majority[group] = maj
            sign[sign == 0] = maj
            agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
            num = torch.zeros(d)
            cnt = torch.zeros(d)
            for i in range(n):
                num += trimmed[i] * agree[i]
                cnt += agree[i].float()
            merged = num / torch.clamp(cnt, min=1.0)
            if settings.method == "neuro":
                for m in members:
                    check_neuron_rank(m, base[m].dim())
                merged = merged.clone()
                offset = 0
                for m in members:
                    numel = base[m].numel()
                    if base[m].dim() == 2:
                        rows = trimmed[:, offset:offset + numel].reshape((n,) + tuple(base[m].shape))
                        merged[offset:offset + numel] = reference_neuro_rows(rows, base[m], settings).reshape(-1)
                    offset += numel
        else:
            total = torch.zeros(d)
            for i in range(n):
                total += M[i]
            merged = total if settings.method == "ta" else total / float(n)
        offset = 0
        for m in members:
            numel = base[m].numel()
            tau_star[m] = merged[offset:offset + numel].reshape(base[m].shape)
            offset += numel
    masks = [{} for _ in range(n)]
    for i in range(n):
        lam = torch.tensor(settings.lams[i], dtype=torch.float32)
        for name in names:
            t, ts = taus[i][name], tau_star[name]
            if settings.mask_rule == "tall":
                m = t.abs() >= lam * (ts - t).abs()
            else:
                half = torch.tensor(0.5 * settings.lams[i], dtype=torch.float32)
                m = ts != 0
                if settings.mask_rule != "mmer-no-sign":
                    m = m & (torch.sign(t) == torch.sign(ts))
                if settings.mask_rule != "mmer-no-magnitude":
                    m = m & (t.abs() >= half * ts.abs())
            masks[i][name] = m
    return ReferenceResult(tau_star, masks, thresholds, majority)


def _elect_mean(c: torch.Tensor) -> torch.Tensor:
    s = torch.sign(c.sum())
    s = s if s != 0 else torch.tensor(1.0, dtype=c.dtype)
    agree = torch.sign(c) == s
    return c[agree].sum() / max(1, int(agree.sum()))


def reference_neuro_rows(trimmed: torch.Tensor, weight: torch.Tensor, settings: MergeSettings) -> torch.Tensor:
    """NeuroMerging of one 2-D weight, row by row, with a plain SVD per row (float64)."""
    n_models, rows, cols = trimmed.shape
    out = torch.zeros(rows, cols, dtype=torch.float64)
    for r in range(rows):
        w = weight[r].double()
        tau = trimmed[:, r].double()
        parallel = tau @ w / (w @ w) if float(w @ w) > 0 else torch.zeros(n_models, dtype=torch.float64)
        ortho = tau - parallel[:, None] * w
        u, s, vh = torch.linalg.svd(ortho, full_matrices=False)
        vh = vh * canonical_signs(u, dim=0).unsqueeze(1)  # the largest |U_kj| of each direction positive
        coeff = ortho @ vh.T  # c_kj = <o_k, v_j>
        energy = s.pow(2)
        ahead = energy.cumsum(0) - energy
        for j in range(s.numel()):
            if s[j] > 1e-12 * s[0] and ahead[j] < settings.neuro_energy * energy.sum():
                out[r] += _elect_mean(coeff[:, j]) * vh[j]
        if settings.neuro_keep_parallel:
            out[r] += _elect_mean(parallel) * w
    return out.float()


def reference_reconstruct(base, tau_star, mask) -> dict[str, torch.Tensor]:
    """theta_hat_i = theta_pre + m_i * tau* (float32)."""
    return {k: base[k].float() + mask[k].float() * tau_star[k] for k in base}


def reference_text_weights(base, tau_star, masks) -> dict[str, torch.Tensor]:
    """theta_bar = theta_pre + mean_i(m_i) * tau* (float32)."""
    n = len(masks)
    return {k: base[k].float() + tau_star[k] * (sum(m[k].float() for m in masks) / n) for k in base}


def reference_merged(base, tau_star, alpha: float) -> dict[str, torch.Tensor]:
    return {k: base[k].float() + alpha * tau_star[k] for k in base}


def reference_naive_mc(models) -> dict[str, torch.Tensor]:
    """NaiveMC as its paper states it: the plain average of the theta_i."""
    return {k: sum(m[k].float() for m in models) / len(models) for k in models[0]}
