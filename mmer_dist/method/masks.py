"""Per-model binary masks over the merged task vector, and their 1-bit packing.

Rules (``MASK_RULES``), all with tau_i untrimmed and lam_i >= 0 per model:
- ``mmer``: m_i = [sign(tau_i) = sign(tau*)] and [|tau_i| >= (0.5*lam_i) * |tau*|], and 0 where
  tau* = 0 (MMER, DESIGN.md).
- ``mmer-no-sign`` / ``mmer-no-magnitude``: the paper's ablations (Table 5), dropping one
  condition; still 0 where tau* = 0.
- ``tall``: m_i = [|tau_i| >= lam_i * |tau* - tau_i|] (TALL-masks, Wang et al. 2024; their
  tau_MTL is the task-arithmetic sum, which is what ``--mask tall`` merges by default).
The scalar 0.5*lam_i is formed in float64 and rounded once to float32 on every path.

Packing: the last axis is packed 8 entries per byte, little bit order (bit b of byte j holds
entry 8j+b), padded with zeros; rows stay rows, so packed chunks align with row-block chunks.
"""

from __future__ import annotations

import torch

MASK_RULES = ("mmer", "mmer-no-sign", "mmer-no-magnitude", "tall")


def check_mask_rule(rule: str) -> None:
    from mmer_dist.errors import InvalidInputError

    if rule not in MASK_RULES:
        raise InvalidInputError(f"unknown mask rule {rule!r}; expected one of {', '.join(MASK_RULES)}")


def _per_model(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, torch.float32).reshape((-1,) + (1,) * (like.dim() - 1))


def half_lambdas(lams: list[float]) -> torch.Tensor:
    """(0.5 * lam_i) as float32, the factor the ``mmer`` rules compare against."""
    return torch.tensor([0.5 * float(x) for x in lams], dtype=torch.float32)


def mmer_mask(tau: torch.Tensor, tau_star: torch.Tensor, half_lam: torch.Tensor,
              *, sign_condition: bool = True, magnitude_condition: bool = True) -> torch.Tensor:
    """(N, ...) bool masks of the MMER rule (or an ablation) for (N, ...) tau against tau*."""
    keep = tau_star != 0
    if sign_condition:
        keep = keep & (torch.sign(tau) == torch.sign(tau_star))
    if magnitude_condition:
        keep = keep & (tau.abs() >= _per_model(half_lam, tau) * tau_star.abs())
    return keep


def tall_mask(tau: torch.Tensor, tau_merged: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(N, ...) bool TALL masks: |tau_i| >= lam_i * |tau_merged - tau_i|."""
    return tau.abs() >= _per_model(lam, tau) * (tau_merged - tau).abs()


def compute_masks(rule: str, tau: torch.Tensor, tau_star: torch.Tensor, lams: torch.Tensor) -> torch.Tensor:
    """Dispatch on the rule name; ``lams`` is (N,) of the raw lam_i, float64 so that 0.5*lam_i is
    rounded to float32 once (a float32 lam_i above ~3.4e38 would already be inf)."""
    if rule == "tall":
        return tall_mask(tau, tau_star, lams)
    half = (lams.double() * 0.5).float()
    return mmer_mask(tau, tau_star, half,
                     sign_condition=rule != "mmer-no-sign",
                     magnitude_condition=rule != "mmer-no-magnitude")


def packed_width(n: int) -> int:
    return (n + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor along its last axis into uint8 (little bit order, zero padded).

    Four mask bytes b0..b3 read as one little-endian int32 q = sum b_i 2^(8i); in
    q * 0x01020408 the sixteen partial products land on distinct bits (8i + 24 - 7j), so bits
    24..27 are exactly b0 | b1<<1 | b2<<2 | b3<<3 and nothing overflows int64. Fused by
    torch.compile this is one multiply per 4 entries; a sum over a size-8 axis compiled to a
    horizontal reduction ~30x slower.
    """
    n = mask.shape[-1]
    width = packed_width(n)
    if n == 0:
        return torch.zeros(mask.shape, dtype=torch.uint8, device=mask.device)
    m = mask.to(torch.uint8)
    if width * 8 != n:
        m = torch.nn.functional.pad(m, (0, width * 8 - n))
    nibbles = ((m.contiguous().view(torch.int32).to(torch.int64) * 0x01020408) >> 24) & 0xF
    nibbles = nibbles.reshape(nibbles.shape[:-1] + (width, 2))
    return (nibbles[..., 0] | (nibbles[..., 1] << 4)).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: bool tensor whose last axis has ``n`` entries."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[:-1] + (packed.shape[-1] * 8,))[..., :n].bool()


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def popcount(packed: torch.Tensor) -> torch.Tensor:
    """Number of set bits per leading index of a packed (N, ...) mask: shape (N,)."""
    table = _POPCOUNT.to(packed.device)
    return table[packed.reshape(packed.shape[0], -1).long()].sum(-1)


def density(packed: torch.Tensor, n_entries: int) -> torch.Tensor:
    """Fraction of set entries per model, float64 (N,)."""
    return popcount(packed).double() / max(1, n_entries)


def set_packed_bits(packed: torch.Tensor, cols: int, entries: torch.Tensor, values: torch.Tensor) -> None:
    """Set, in place, entries of packed (N, rows, ceil(cols/8)) masks (contiguous): ``entries``
    are flat indices into (rows, cols), ``values`` (N, k) bool their new bits. Only the bytes
    holding those entries are unpacked (several entries may share one)."""
    n = packed.shape[0]
    flat = packed.view(n, -1)
    byte = (entries // cols) * packed_width(cols) + (entries % cols) // 8
    touched, which = torch.unique(byte, return_inverse=True)
    bits = unpack_bits(flat[:, touched].unsqueeze(-1), 8)
    bits[:, which, entries % cols % 8] = values
    flat[:, touched] = pack_bits(bits).squeeze(-1)
