"""The mask-native linear: the tokens of many models through one layer, without their dense weights.

A model without a dense slot is still served (DESIGN.md, "Many models in one endpoint"): each of
its linear layers runs from what the stage holds for every model anyway, theta_pre, tau* and the
model's packed mask, composing its weight tile by tile inside the kernel. One call serves every
model of the step, so a step reads each row of theta_pre and tau* once, plus one bit per parameter
per model in it, however many models that is.

Semantics (the plain loop every path equals, up to float32 summation order):

    for g, (start, stop, i) in enumerate(groups):  # tokens [start, stop) belong to model i
        W = theta_pre.float() + where(unpack_bits(packed[i], K), tau_star.float(), 0)   # (O, K)
        W = W.to(round_to).float()                 # the checkpoint dtype: the export's theta_hat_i
        out[start:stop] = x[start:stop].float() @ W.T + (biases[g] if biases else 0)

``W`` before rounding is ``compose`` of ``hat:<i>`` (``mmer_dist.store.weights``), the function
exports are written with, so a token on this path multiplies exactly the weights of the exported
theta_hat_i (and of a dense slot): its logits differ from a slot's by summation order only
(measured on the demo kit's models, float32 stage: at most 4.3e-6 in any logit, every greedy
answer the export's; tests/test_engine_kit.py). Not rounding W would save about a quarter of the
kernel's time but move the logits by up to 8e-4 on the tests' models and change greedy answers
there, so the rounding stays. Rows of ``out`` outside the groups are left as they are.
``masked_linear_reference`` is that loop; tests hold every path to it (tests/test_masked_linear.py).

Paths (``masked_linear`` picks one):
- CPU: the compiled kernel of ``masked_linear.cpp`` (``native.load``): for every weight row, every
  group, 4 tokens at a time, the row's 8-entry tiles composed in registers from the mask bits;
- CUDA: the same semantics written as one fused expression and compiled by ``torch.compile``
  (inductor emits one Triton reduction; not run on this project's CI, which has no GPU);
- the reference loop itself (a group with many tokens, a prefill, is faster composed once per
  row block and multiplied as a matrix; and where no kernel could be built).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmer_dist.method.masks import unpack_bits
from mmer_dist.method.reconstruct import reconstruct
from mmer_dist.model import native

# A group with at least this many tokens is composed once per row block and multiplied as a matrix
# (the reference loop): measured on 2 CPU cores, faster than the kernel from about 48 tokens on.
PREFILL_TOKENS = 48
_CHUNK_ENTRIES = 1 << 22  # row blocks of the reference loop: at most 16 MB of float32 weights


@dataclass(frozen=True)
class MaskGroups:
    """The step's mask-native token groups, built once per step and shared by every layer:
    tokens [starts[g], stops[g]) of the (sorted) step run through model ``models[g]``'s mask."""

    starts: torch.Tensor  # (G,) int64, on the CPU (the kernel reads them there)
    stops: torch.Tensor
    models: torch.Tensor

    @classmethod
    def build(cls, groups: Sequence[tuple[int, int, int]]) -> MaskGroups:
        cols = list(zip(*groups)) if groups else ([], [], [])
        return cls(*(torch.tensor(c, dtype=torch.int64) for c in cols))

    def __len__(self) -> int:
        return self.models.numel()

    def __iter__(self):
        return zip(self.starts.tolist(), self.stops.tolist(), self.models.tolist())

    @functools.cached_property
    def rows(self) -> torch.Tensor:
        """Every token row of the groups, in group order."""
        return torch.cat([torch.arange(a, b) for a, b, _ in self]) if len(self) else torch.zeros(0, dtype=torch.int64)

    def split(self, tokens: int) -> tuple[list[int], list[int]]:
        """Indices of the groups of fewer than ``tokens`` tokens, and of the others."""
        sizes = (self.stops - self.starts).tolist()
        return [g for g, n in enumerate(sizes) if n < tokens], [g for g, n in enumerate(sizes) if n >= tokens]

    def select(self, indices: list[int]) -> MaskGroups:
        if len(indices) == len(self):
            return self
        index = torch.tensor(indices, dtype=torch.int64)
        return MaskGroups(self.starts[index], self.stops[index], self.models[index])


def masked_linear_reference(x: torch.Tensor, groups: MaskGroups, base: torch.Tensor, tau_star: torch.Tensor,
                            packed: torch.Tensor, round_to: torch.dtype, out: torch.Tensor,
                            biases: Sequence[torch.Tensor | None] | None = None) -> None:
    """The semantics above, row block by row block (bounded temporary memory)."""
    rows, cols = base.shape
    block = max(1, _CHUNK_ENTRIES // max(1, cols))
    for g, (start, stop, i) in enumerate(groups):
        if stop <= start:
            continue
        xs = x[start:stop].float()
        for r in range(0, rows, block):
            w = reconstruct(base[r:r + block], unpack_bits(packed[i, r:r + block], cols), tau_star[r:r + block].float())
            out[start:stop, r:r + block] = (xs @ w.to(round_to).float().t()).to(out.dtype)
        if biases is not None and biases[g] is not None:
            out[start:stop] += biases[g]


def _fused(x: torch.Tensor, token_model: torch.Tensor, base: torch.Tensor, tau_star: torch.Tensor,
           packed: torch.Tensor, round_to: torch.dtype) -> torch.Tensor:
    """The semantics as one expression over (token, row, column), for ``torch.compile`` to fuse into
    a single reduction (the (T, O, K) weights are never materialised by the compiled kernel)."""
    cols = base.shape[1]
    bits = unpack_bits(packed.index_select(0, token_model), cols)  # (T, O, K)
    w = reconstruct(base.unsqueeze(0), bits, tau_star.float().unsqueeze(0)).to(round_to).float()
    return (x.float().unsqueeze(1) * w).sum(-1)


@functools.cache
def _compiled_fused():
    # emulate_precision_casts keeps the rounding to the checkpoint dtype inside the fused kernel
    return torch.compile(_fused, dynamic=True, options={"emulate_precision_casts": True})


def masked_linear(x: torch.Tensor, groups: MaskGroups, base: torch.Tensor, tau_star: torch.Tensor,
                  packed: torch.Tensor, round_to: torch.dtype, out: torch.Tensor,
                  biases: Sequence[torch.Tensor | None] | None = None) -> None:
    """Fill ``out``'s rows of ``groups`` (see the module docstring); ``x`` and ``out`` are (T, K) and
    (T, O) in any float dtype, the weights on the same device; ``biases``: one per group, or None."""
    if not len(groups):
        return
    small, large = groups.split(PREFILL_TOKENS)
    if len(large):
        masked_linear_reference(x, groups.select(large), base, tau_star, packed, round_to, out,
                                None if biases is None else [biases[g] for g in large])
    if small:
        _small_groups(x, groups.select(small), base, tau_star, packed, round_to, out)
        for g in small if biases is not None else ():
            if biases[g] is not None:
                out[groups.starts[g]:groups.stops[g]] += biases[g]


def _small_groups(x: torch.Tensor, groups: MaskGroups, base: torch.Tensor, tau_star: torch.Tensor,
                  packed: torch.Tensor, round_to: torch.dtype, out: torch.Tensor) -> None:
    if x.device.type == "cpu" and (lib := native.load()) is not None and round_to in native.DTYPE_CODES:
        result = out if out.dtype == torch.float32 and out.is_contiguous() else torch.empty(out.shape)
        lib.run(x.float().contiguous(), base, tau_star, packed, groups.starts, groups.stops, groups.models, round_to,
                result)
        if result is not out:
            out.index_copy_(0, groups.rows, result.index_select(0, groups.rows).to(out.dtype))
        return
    if x.device.type == "cuda":  # one compiled reduction for every group: each token tagged with its model
        rows = groups.rows.to(x.device)
        token_model = torch.repeat_interleave(groups.models, groups.stops - groups.starts).to(x.device)
        y = _compiled_fused()(x.index_select(0, rows), token_model, base, tau_star, packed, round_to)
        out.index_copy_(0, rows, y.to(out.dtype))
        return
    masked_linear_reference(x, groups, base, tau_star, packed, round_to, out)
