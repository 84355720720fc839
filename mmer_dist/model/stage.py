"""A pipeline stage: decoder layers [first, stop) of one store version, with its requests' KV caches.

The first stage also embeds tokens (and takes modality embeddings from encoders); the last also
applies the final norm and the LM heads and returns logits. ``forward`` runs one engine step
(``StepBatch``: prefill and decode of any requests together) and is the only entry point, so a
stage holds no per-step state between calls beyond the caches. A step that names something the
stage cannot serve (a model outside the version, a request without a cache, a cache overrun) is
refused before anything changes, and the stage keeps serving the other requests.

    stage = DecoderStage(VersionWeights.open(url), 0, n_layers, device="cpu", slot_budget_bytes=2**30)
    logits = stage.forward(batch)          # one tensor per request (or None, logits="none")
    stage.release(["req-1"])               # finished or cancelled: its caches go
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from mmer_dist.devices import resolve_device
from mmer_dist.errors import InvalidInputError
from mmer_dist.model import layers as L
from mmer_dist.model.batch import RoutingPlan, StepBatch
from mmer_dist.model.config import DecoderConfig
from mmer_dist.model.dense import EMBED, HEAD, DenseWeights, build_dense, check_layer_tensors
from mmer_dist.model.kv_cache import KVCacheTable, RequestCache
from mmer_dist.model.resident import ResidentTensors
from mmer_dist.model.slots import SlotPool
from mmer_dist.store.weights import VersionWeights
from mmer_dist.store.weightsets import WeightSet


class DecoderStage:
    def __init__(self, weights: VersionWeights, first: int, stop: int, *, device: str | torch.device | None = "cpu",
                 dtype: torch.dtype | None = None, slot_budget_bytes: int = 0,
                 fetcher: Callable[[WeightSet], Callable[[str], torch.Tensor] | None] | None = None):
        """``fetcher(key)`` may give ``name -> float32 tensor`` for weight set ``key`` in place of
        ``compose`` on the resident theta_pre / tau* / masks (None: the resident way); benchmarks
        use it to serve other weights, e.g. the ingested originals, through the same engine."""
        self.config = DecoderConfig.from_base_config(weights.base_config)
        cfg = self.config
        self.version = weights.version
        self.models = weights.models
        self.vocabulary = weights.vocabulary
        self.first, self.stop = first, stop
        self.has_embed, self.has_head = first == 0, stop == cfg.n_layers
        self.device = resolve_device(device)
        self.weight_dtype = weights.dtype  # served weights are rounded to it, as exports are
        self.dtype = dtype or weights.dtype  # what the stage computes in
        names = [t.name for t in weights.layers(first, stop)]
        if self.has_head and cfg.tie_embeddings and EMBED not in names:
            names.append(EMBED)  # a tied head is the embedding matrix
        if self.has_head and not cfg.tie_embeddings and HEAD not in names:
            raise InvalidInputError(f"the base has no {HEAD!r} and does not tie its embeddings")
        self.biases = {layer: check_layer_tensors(set(names), layer) for layer in range(first, stop)}
        self.resident = ResidentTensors(weights, names, self.device, self.dtype)
        self._fetcher = fetcher
        self.rope = LlamaRotaryEmbedding(cfg.hf_config()).to(self.device)
        self.caches = KVCacheTable(stop - first, cfg.n_kv_heads, cfg.head_dim, self.device, self.dtype)
        self.slots = SlotPool(self._build, slot_budget_bytes, pinned=[WeightSet.bar()])
        self.slot_bytes = self.slots.pinned[WeightSet.bar()].nbytes

    def _build(self, key: WeightSet) -> DenseWeights:
        self.resident.check(key)
        fetch = (self._fetcher(key) if self._fetcher else None) or self.resident.fetcher(key)
        return build_dense(fetch, range(self.first, self.stop), self.biases,
                           embed=self.has_embed, head=self.has_head, tied=self.config.tie_embeddings,
                           weight_dtype=self.weight_dtype, dtype=self.dtype)

    # -- what the engine asks ------------------------------------------------------------------

    @property
    def slot_capacity(self) -> int:
        """Weight sets (besides the pinned theta_bar) that fit in this stage's slot budget."""
        return self.slots.capacity(self.slot_bytes)

    def stats(self) -> dict:
        return {"layers": [self.first, self.stop], "version": self.version, "device": str(self.device),
                "resident_bytes": self.resident.nbytes, "slot_bytes": self.slot_bytes,
                "slot_budget_bytes": self.slots.budget_bytes, "slots_used_bytes": self.slots.used_bytes,
                "resident_sets": self.slots.resident(), "requests": len(self.caches),
                "kv_cache_bytes": self.caches.nbytes, **self.slots.stats.as_dict()}

    def release(self, request_ids: Iterable[str]) -> int:
        return sum(self.caches.release(r) for r in request_ids)

    # -- one step ------------------------------------------------------------------------------

    def _validate(self, batch: StepBatch, hidden: torch.Tensor | None) -> None:
        for key in batch.weight_sets():
            self.resident.check(key)
        for r in batch.requests:
            if r.vocab_model is not None:
                self.resident.model_index(r.vocab_model)
            if r.reserve:
                if r.request_id in self.caches:
                    raise InvalidInputError(f"request {r.request_id!r} is already running")
                if r.past != 0 or r.reserve < r.n_new:
                    raise InvalidInputError(f"request {r.request_id!r}: a new request starts at position 0 and "
                                            f"reserves at least its {r.n_new} tokens")
                if r.reserve > self.config.max_positions:
                    raise InvalidInputError(f"request {r.request_id!r} needs {r.reserve} positions; the model's "
                                            f"context is {self.config.max_positions}")
            else:
                cache = self.caches.get(r.request_id)
                if r.past != cache.length or r.past + r.n_new > cache.capacity:
                    raise InvalidInputError(f"request {r.request_id!r}: {r.n_new} tokens after {r.past} do not fit "
                                            f"its cache ({cache.length} cached, {cache.capacity} reserved)")
        if len({r.request_id for r in batch.requests}) != len(batch.requests):
            raise InvalidInputError("a step names one request twice")
        if self.has_embed:
            if batch.token_ids is None or batch.token_ids.numel() != batch.n_tokens:
                raise InvalidInputError("the first stage needs the step's token ids, one per new token")
            ids = batch.token_ids
            if int((ids >= self.vocabulary.size).sum()) or int((ids < -1).sum()):
                raise InvalidInputError(f"token ids outside the vocabulary ({self.vocabulary.size} tokens)")
            media = int((ids == -1).sum())
            given = 0 if batch.embeds is None else batch.embeds.shape[0]
            if media != given:
                raise InvalidInputError(f"{media} positions take encoder embeddings, {given} were given")
            if given and batch.embeds.shape[-1] != self.config.hidden:
                raise InvalidInputError(f"encoder embeddings have width {batch.embeds.shape[-1]}, the LLM's hidden "
                                        f"size is {self.config.hidden}")
            if sum(n for _, n in batch.embed_route) != batch.n_tokens:
                raise InvalidInputError("the embedding route must cover every new token")
        elif hidden is None or hidden.shape != (batch.n_tokens, self.config.hidden):
            raise InvalidInputError(f"stage [{self.first}, {self.stop}) expects hidden states of shape "
                                    f"({batch.n_tokens}, {self.config.hidden})")

    @torch.inference_mode()
    def forward(self, batch: StepBatch, hidden: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor | None]:
        """Hidden states (T, hidden) in the step's token order for the next stage, or, on the last
        stage, each request's logits (float32, on the CPU)."""
        self._validate(batch, hidden)
        plan = RoutingPlan.build(batch, self.device)
        needed = list(plan.keys)
        if self.has_embed:
            needed += [k for k, _ in batch.embed_route]
        if self.has_head:
            needed += [r.head for r in batch.requests]
        sets = self.slots.acquire(needed)
        caches = [self.caches.allocate(r.request_id, r.reserve) if r.reserve else self.caches.get(r.request_id)
                  for r in batch.requests]
        try:
            x = self._embed(batch, sets) if self.has_embed else hidden.to(self.device, self.dtype)
            x = self._layers(plan.to_sorted(x), plan, sets, caches)
        except BaseException:
            self.release(r.request_id for r in batch.requests if r.reserve)
            raise
        for r, cache in zip(batch.requests, caches):
            cache.length = r.past + r.n_new
        if not self.has_head:
            return plan.to_natural(x)
        x = L.grouped_rms_norm(x, plan, [sets[k].final_norm for k in plan.keys], self.config.rms_eps)
        return self._logits(batch, plan, plan.to_natural(x), sets)

    def _layers(self, x: torch.Tensor, plan: RoutingPlan, sets: dict[WeightSet, DenseWeights],
                caches: Sequence[RequestCache]) -> torch.Tensor:
        cfg = self.config
        cos, sin = self.rope(x, plan.positions[None])
        cos, sin = cos[0], sin[0]
        for i, layer in enumerate(range(self.first, self.stop)):
            w = [sets[k].layers[layer] for k in plan.keys]
            h = L.grouped_rms_norm(x, plan, [lw.attn_norm for lw in w], cfg.rms_eps)
            qkv = plan.to_natural(L.grouped_linear(h, plan, [lw.wqkv for lw in w], [lw.bqkv for lw in w]))
            attn = L.attention(qkv, plan, caches, i, cos, sin, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
            x = x + L.grouped_linear(plan.to_sorted(attn), plan, [lw.wo for lw in w], [lw.bo for lw in w])
            h = L.grouped_rms_norm(x, plan, [lw.mlp_norm for lw in w], cfg.rms_eps)
            up = L.grouped_linear(h, plan, [lw.w_gate_up for lw in w], [lw.b_gate_up for lw in w])
            x = x + L.grouped_linear(L.swiglu(up), plan, [lw.w_down for lw in w], [lw.b_down for lw in w])
        return x

    def _embed(self, batch: StepBatch, sets: dict[WeightSet, DenseWeights]) -> torch.Tensor:
        """Natural-order embeddings: encoder rows where ids are -1, else the row of the id in its
        weight set's table (base vocabulary) or in its owner model's extra rows."""
        ids = batch.token_ids.to(self.device, torch.int64)
        x = torch.empty((ids.numel(), self.config.hidden), device=self.device, dtype=self.dtype)
        vocab = self.vocabulary
        keys = list(dict.fromkeys(k for k, _ in batch.embed_route))
        if len(keys) == 1:
            group = torch.zeros_like(ids)
        else:  # each token's weight set, by index into ``keys``: one gather per set, not per run
            runs = torch.tensor([keys.index(k) for k, _ in batch.embed_route], device=self.device)
            group = torch.repeat_interleave(runs, torch.tensor([n for _, n in batch.embed_route], device=self.device))
        base = (ids >= 0) & (ids < vocab.base)
        for g, key in enumerate(keys):
            rows = base & (group == g) if len(keys) > 1 else base
            x[rows] = sets[key].embed[ids[rows]]
        extra = ids >= vocab.base
        if bool(extra.any()):
            for m in self.models:
                lo = vocab.base + vocab.offsets[m]
                own = extra & (ids >= lo) & (ids < lo + vocab.extra_of(m))
                if bool(own.any()):
                    x[own] = self.resident.extra[m][EMBED][ids[own] - lo]
        media = ids == -1
        if bool(media.any()):
            x[media] = batch.embeds.to(self.device, self.dtype)
        return x

    def _logits(self, batch: StepBatch, plan: RoutingPlan, x: torch.Tensor,
                sets: dict[WeightSet, DenseWeights]) -> list[torch.Tensor | None]:
        """Each request's logits: its last token's (decode, and a prompt's end) or every token's.
        Last tokens that share an LM head go through it in one matmul: one pass over the head's
        weights per step, not one per request (what batch decode is bound by)."""
        out: list[torch.Tensor | None] = [None] * len(batch.requests)
        by_head: dict[WeightSet, list[int]] = {}
        for i, (r, (start, n, _)) in enumerate(zip(batch.requests, plan.spans)):
            if r.logits == "last":
                by_head.setdefault(r.head, []).append(i)
            elif r.logits != "none":
                out[i] = self._head(r, x[start:start + n], sets).float().cpu()
        for head, members in by_head.items():
            last = torch.tensor([plan.spans[i][0] + plan.spans[i][1] - 1 for i in members], device=x.device)
            rows = x.index_select(0, last)
            logits = rows @ sets[head].head.t()
            plain = [j for j, i in enumerate(members) if self._extra_head(batch.requests[i]) is None]
            cpu = logits.float().cpu()
            for j in plain:
                out[members[j]] = cpu[j:j + 1]
            for j, i in enumerate(members):  # a model's own extra vocabulary rows
                if (extra := self._extra_head(batch.requests[i])) is not None:
                    out[i] = torch.cat([logits[j:j + 1], rows[j:j + 1] @ extra.t()], dim=-1).float().cpu()
        return out

    def _extra_head(self, r) -> torch.Tensor | None:
        head_extra = HEAD if not self.config.tie_embeddings else EMBED
        if r.vocab_model is not None and head_extra in self.resident.extra[r.vocab_model]:
            return self.resident.extra[r.vocab_model][head_extra]
        return None

    def _head(self, r, rows: torch.Tensor, sets: dict[WeightSet, DenseWeights]) -> torch.Tensor:
        logits = rows @ sets[r.head].head.t()
        if (extra := self._extra_head(r)) is not None:
            logits = torch.cat([logits, rows @ extra.t()], dim=-1)
        return logits
