"""A pipeline stage: decoder layers [first, stop) of one store version, with its requests' KV caches.

The first stage also embeds tokens (and takes modality embeddings from encoders); the last also
applies the final norm and the LM heads and returns logits. ``forward`` runs one engine step
(``StepBatch``: prefill and decode of any requests together) and is the only entry point, so a
stage holds no per-step state between calls beyond the caches and its slots. A step that names
something the stage cannot serve (a model outside the version, a request without a cache, a cache
overrun) is refused before anything changes, and the stage keeps serving the other requests.

Every model of the version runs in every step, whatever the slot budget: a model with a dense slot
through it, the others on the mask-native path (``masked_linear``) from the resident theta_pre,
tau* and packed masks, with the exported theta_hat_i's weights either way. Which models hold
slots follows the traffic (the slot set that cuts the bytes steps read), and slots are built on a
background thread (``SlotPool``): no step waits.
On the mask-native path a model's norms and biases are its own, composed once at load for every
model (a few thousand parameters per layer: ``model_vectors``); its embedding rows are composed
per step for the ids the step looks up (exactly the export's rows); its LM head is one more
``masked_linear`` (the head's rows for every mask-native request of the step in one call).

    stage = DecoderStage(VersionWeights.open(url), 0, n_layers, device="cpu", slot_budget_bytes=2**30)
    logits = stage.forward(batch)          # one tensor per request (or None, logits="none")
    stage.release(["req-1"])               # finished or cancelled: its caches go
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from mmer_dist.devices import resolve_device
from mmer_dist.errors import InvalidInputError
from mmer_dist.method.masks import unpack_bits
from mmer_dist.method.reconstruct import reconstruct
from mmer_dist.model import layers as L
from mmer_dist.model import native
from mmer_dist.model.batch import RoutingPlan, StepBatch
from mmer_dist.model.config import DecoderConfig
from mmer_dist.model.dense import (
    EMBED, HEAD, MATRICES, DenseWeights, build_dense, build_vectors, check_layer_tensors,
)
from mmer_dist.model.kv_cache import KVCacheTable, RequestCache
from mmer_dist.model.masked_linear import MaskGroups, masked_linear
from mmer_dist.model.residency import StepBytes
from mmer_dist.model.resident import ResidentTensors
from mmer_dist.model.slots import SlotPool
from mmer_dist.model.step_weights import PlanWeights, StepWeights
from mmer_dist.store.weights import VersionWeights
from mmer_dist.store.weightsets import WeightSet

log = logging.getLogger(__name__)


class DecoderStage:
    def __init__(self, weights: VersionWeights, first: int, stop: int, *, device: str | torch.device | None = "cpu",
                 dtype: torch.dtype | None = None, slot_budget_bytes: int = 0, tau_dtype: torch.dtype | None = None,
                 fetcher: Callable[[WeightSet], Callable[[str], torch.Tensor] | None] | None = None):
        """``tau_dtype``: tau* held in this dtype (default: as stored, float32); the serving dtype
        halves the stage's largest tensor, and every weight is then composed from the rounded tau*.
        ``fetcher(key)`` may give ``name -> float32 tensor`` for weight set ``key`` in place of
        ``compose`` on the resident theta_pre / tau* / masks (None: the resident way); benchmarks
        use it to serve other weights, e.g. the ingested originals, through the same engine. Such
        a stage runs every set dense (the mask-native path reads the resident arrays)."""
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
        # a composed weight is rounded once, to the narrower of the two (``build_dense`` rounds to
        # weight_dtype, then to dtype: the same but for bf16 checkpoints served in fp16 or back)
        self.round_to = self.weight_dtype if self.dtype == torch.float32 else self.dtype
        names = [t.name for t in weights.layers(first, stop)]
        if self.has_head and cfg.tie_embeddings and EMBED not in names:
            names.append(EMBED)  # a tied head is the embedding matrix
        if self.has_head and not cfg.tie_embeddings and HEAD not in names:
            raise InvalidInputError(f"the base has no {HEAD!r} and does not tie its embeddings")
        self.head_block = EMBED if cfg.tie_embeddings else HEAD
        self.biases = {layer: check_layer_tensors(set(names), layer) for layer in range(first, stop)}
        self.resident = ResidentTensors(weights, names, range(first, stop), self.device, self.dtype, tau_dtype)
        self._fetcher = fetcher
        # every model's norms and biases, composed once: what the mask-native path takes dense
        self.model_vectors = [build_vectors(self.resident.fetcher(WeightSet.hat(m)), range(first, stop), self.biases,
                                            head=self.has_head, weight_dtype=self.weight_dtype, dtype=self.dtype)
                              for m in self.models]
        self.rope = LlamaRotaryEmbedding(cfg.hf_config()).to(self.device)
        self.caches = KVCacheTable(stop - first, cfg.n_kv_heads, cfg.head_dim, self.device, self.dtype)
        self.slots = SlotPool(self._build, slot_budget_bytes, pinned=[WeightSet.bar()], mask_native=fetcher is None,
                              device=self.device, step_bytes=self._step_bytes())
        self.slot_bytes = self.slots.slot_bytes
        self.path_tokens: dict[str, Counter] = {"slot": Counter(), "mask_native": Counter()}
        if self.slots.capacity == 0:
            log.warning("stage [%d, %d): the slot budget (%d bytes) holds no dense weight set (%d bytes each): every "
                        "model is served through the mask-native path", first, stop, slot_budget_bytes,
                        self.slot_bytes)

    def _step_bytes(self) -> StepBytes:
        """What a step reads on each path (``residency``): the matrices' and LM head's theta_pre +
        tau* once for all mask-native models (an embedding lookup reads a few rows), one dense set
        per slot model, one model's masks per mask-native model."""
        read = [b for name, b in self.resident.blocks.items()
                if b.base.dim() == 2 and b.base.shape[0] > 1 and (name != EMBED or self.head_block == EMBED)]
        native = sum(t.numel() * t.element_size() for b in read for t in (b.base, b.tau_star))
        masks = sum(b.packed.numel() for b in read) // max(1, len(self.models))
        dense = sum(b.base.numel() * torch.finfo(self.dtype).bits // 8 for b in read)
        return StepBytes(native, dense, masks)

    def _build(self, key: WeightSet, background: bool = False) -> DenseWeights:
        self.resident.check(key)
        if key.kind == "hat" and self._fetcher is None and (lib := self._compose_kernel()) is not None:
            # one core beside the steps (they keep the others); every core when a step waits for it
            return self._build_hat(lib, self.resident.model_index(key.models[0]),
                                   1 if background else torch.get_num_threads())
        fetch = (self._fetcher(key) if self._fetcher else None) or self.resident.fetcher(key)
        return build_dense(fetch, range(self.first, self.stop), self.biases,
                           embed=self.has_embed, head=self.has_head, tied=self.config.tie_embeddings,
                           weight_dtype=self.weight_dtype, dtype=self.dtype)

    def _compose_kernel(self):
        """The compiled compose on a CPU stage (elsewhere None: ``build_dense`` builds)."""
        return native.load() if self.device.type == "cpu" else None

    def _build_hat(self, lib, model: int, threads: int) -> DenseWeights:
        """theta_hat of model row ``model`` straight from the resident blocks, each matrix composed
        in one pass by the compiled kernel (the same weights ``build_dense`` makes from ``compose``,
        test_engine checks it bit for bit), its norms and biases the ones composed at load."""
        def matrix(block: str) -> torch.Tensor:
            b = self.resident.blocks[block]
            return lib.compose(b.base, b.tau_star, b.packed[model], self.round_to, self.dtype, threads)

        vectors = self.model_vectors[model]
        layers = {layer: dataclasses.replace(vectors.layers[layer],
                                             **{f: matrix(f"{layer}.{f}") for f in MATRICES})
                  for layer in range(self.first, self.stop)}
        embed = matrix(EMBED) if self.has_embed else None
        head = None
        if self.has_head:
            head = embed if self.config.tie_embeddings and embed is not None else matrix(self.head_block)
        return DenseWeights(layers, embed=embed, final_norm=vectors.final_norm, head=head)

    # -- what the engine asks ------------------------------------------------------------------

    @property
    def slot_capacity(self) -> int:
        """Weight sets (besides the pinned theta_bar) that fit in this stage's slot budget."""
        return self.slots.capacity

    def memory(self) -> dict[str, int]:
        """Bytes this stage holds, by part: theta_pre, tau*, the masks (N bits per parameter), the
        extra vocabulary rows, every model's norms and biases, the pinned and slot weight sets, the
        KV caches."""
        vectors = sum(v.nbytes for v in self.model_vectors)
        return {**self.resident.nbytes_by_part(), "model_vectors": vectors,
                "pinned": sum(w.nbytes for w in self.slots.pinned.values()), "slots": self.slots.used_bytes,
                "kv_caches": self.caches.nbytes}

    def residency(self) -> dict[str, str]:
        """Each model's path now: ``slot``, ``building`` (mask-native until its slot is installed)
        or ``mask-native``."""
        building = self.slots.building
        out = {}
        for m in self.models:
            key = WeightSet.hat(m)
            out[m] = "slot" if self.slots.dense(key) is not None else "building" if key == building else "mask-native"
        return out

    def stats(self) -> dict:
        memory = self.memory()
        per_set = self.slots.stats.per_set
        models = {m: {"path": path, "slot_tokens": self.path_tokens["slot"][m],
                      "mask_native_tokens": self.path_tokens["mask_native"][m],
                      "builds": per_set[f"hat:{m}"].builds if f"hat:{m}" in per_set else 0,
                      "build_seconds": round(per_set[f"hat:{m}"].build_seconds, 4) if f"hat:{m}" in per_set else 0.0,
                      "demand_share": round(self.slots.demand.share(WeightSet.hat(m)), 4)}
                  for m, path in self.residency().items()}
        return {"layers": [self.first, self.stop], "version": self.version, "device": str(self.device),
                "resident_bytes": self.resident.nbytes, "memory": memory, "slot_bytes": self.slot_bytes,
                "slot_budget_bytes": self.slots.budget_bytes, "slot_capacity": self.slots.capacity,
                "slots_used_bytes": self.slots.used_bytes, "resident_sets": self.slots.resident(),
                "building": None if self.slots.building is None else str(self.slots.building),
                "requests": len(self.caches), "kv_cache_bytes": self.caches.nbytes, "models": models,
                **self.slots.stats.as_dict()}

    def release(self, request_ids: Iterable[str]) -> int:
        return sum(self.caches.release(r) for r in request_ids)

    def close(self) -> None:
        """Stop the slot builder (waits for a running build)."""
        self.slots.close()

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
        self.slots.begin_step(Counter({k: n for r in batch.requests for k, n in r.route}))
        step = self._step_weights(batch, plan)
        caches = [self.caches.allocate(r.request_id, r.reserve) if r.reserve else self.caches.get(r.request_id)
                  for r in batch.requests]
        try:
            x = self._embed(batch, step) if self.has_embed else hidden.to(self.device, self.dtype)
            by_group = step.for_plan(plan)
            x = self._layers(plan.to_sorted(x), by_group, caches)
        except BaseException:
            self.release(r.request_id for r in batch.requests if r.reserve)
            raise
        for r, cache in zip(batch.requests, caches):
            cache.length = r.past + r.n_new
        if not self.has_head:
            return plan.to_natural(x)
        x = L.grouped_rms_norm(x, plan, by_group.norm_weights(None, "final_norm"), self.config.rms_eps)
        return self._logits(batch, plan, plan.to_natural(x), step)

    def _step_weights(self, batch: StepBatch, plan: RoutingPlan) -> StepWeights:
        """Dense weights or the mask-native path for every set the step names (and the tokens
        each model ran on each path, for the stats)."""
        needed = list(plan.keys)
        if self.has_embed:
            needed += [k for k, _ in batch.embed_route]
        if self.has_head:
            needed += [r.head for r in batch.requests]
        dense, native, missing = {}, {}, []
        for key in dict.fromkeys(needed):
            if (weights := self.slots.dense(key)) is not None:
                dense[key] = weights
            elif self.slots.serves_natively(key):
                native[key] = self.resident.model_index(key.models[0])
            else:
                missing.append(key)
        dense.update(self.slots.take(missing))
        for r in batch.requests:
            for key, n in r.route:
                if key.kind == "hat":
                    self.path_tokens["mask_native" if key in native else "slot"][key.models[0]] += n
        return StepWeights(dense, native, self.model_vectors)

    def _layers(self, x: torch.Tensor, w: PlanWeights, caches: Sequence[RequestCache]) -> torch.Tensor:
        cfg, plan, blocks, rnd = self.config, w.plan, self.resident.blocks, self.round_to
        cos, sin = self.rope(x, plan.positions[None])
        cos, sin = cos[0], sin[0]
        for i, layer in enumerate(range(self.first, self.stop)):
            h = L.grouped_rms_norm(x, plan, w.norm_weights(layer, "attn_norm"), cfg.rms_eps)
            qkv = plan.to_natural(w.linear(h, layer, "wqkv", "bqkv", blocks[f"{layer}.wqkv"], rnd))
            attn = L.attention(qkv, plan, caches, i, cos, sin, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
            x = x + w.linear(plan.to_sorted(attn), layer, "wo", "bo", blocks[f"{layer}.wo"], rnd)
            h = L.grouped_rms_norm(x, plan, w.norm_weights(layer, "mlp_norm"), cfg.rms_eps)
            up = w.linear(h, layer, "w_gate_up", "b_gate_up", blocks[f"{layer}.w_gate_up"], rnd)
            x = x + w.linear(L.swiglu(up), layer, "w_down", "b_down", blocks[f"{layer}.w_down"], rnd)
        return x

    def _native_rows(self, block: str, model: int, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of matrix ``block`` of model row ``model``'s theta_hat, composed as the
        export composes them (an embedding lookup on the mask-native path)."""
        b = self.resident.blocks[block]
        w = reconstruct(b.base.index_select(0, ids), unpack_bits(b.packed[model].index_select(0, ids), b.cols),
                        b.tau_star.index_select(0, ids).float())
        return w.to(self.weight_dtype).to(self.dtype)

    def _embed(self, batch: StepBatch, step: StepWeights) -> torch.Tensor:
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
            if key in step.dense:
                x[rows] = step.dense[key].embed[ids[rows]]
            elif bool(rows.any()):
                x[rows] = self._native_rows(EMBED, step.native[key], ids[rows])
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

    def _logits(self, batch: StepBatch, plan: RoutingPlan, x: torch.Tensor, step: StepWeights) -> list[torch.Tensor | None]:
        """Each request's logits: its last token's (decode, and a prompt's end) or every token's.
        Last tokens that share an LM head go through it in one matmul, and the last tokens of every
        mask-native head through one ``masked_linear``: one pass over the head's weights per step,
        not one per request (what batch decode is bound by)."""
        out: list[torch.Tensor | None] = [None] * len(batch.requests)
        by_head: dict[WeightSet, list[int]] = {}
        for i, (r, (start, n, _)) in enumerate(zip(batch.requests, plan.spans)):
            if r.logits == "last":
                by_head.setdefault(r.head, []).append(i)
            elif r.logits != "none":
                out[i] = self._head(r, x[start:start + n], step).float().cpu()
        dense_heads = {h: members for h, members in by_head.items() if h in step.dense}
        native_heads = [(h, members) for h, members in by_head.items() if h not in step.dense]
        for head, members in dense_heads.items():
            rows = self._last_rows(x, plan, members)
            self._emit(batch, out, members, rows, L.linear(rows, step.dense[head].head))
        if native_heads:  # every mask-native head's rows in one call, grouped by model
            members = [i for _, ms in native_heads for i in ms]
            rows = self._last_rows(x, plan, members)
            logits = torch.empty((len(members), self.vocabulary.base), device=x.device, dtype=torch.float32)
            groups, start = [], 0
            for head, ms in native_heads:
                groups.append((start, start + len(ms), step.native[head]))
                start += len(ms)
            b = self.resident.blocks[self.head_block]
            masked_linear(rows, MaskGroups.build(groups), b.base, b.tau_star, b.packed, self.round_to, logits)
            self._emit(batch, out, members, rows, logits.to(self.dtype))
        return out

    @staticmethod
    def _last_rows(x: torch.Tensor, plan: RoutingPlan, members: list[int]) -> torch.Tensor:
        last = torch.tensor([plan.spans[i][0] + plan.spans[i][1] - 1 for i in members], device=x.device)
        return x.index_select(0, last)

    def _emit(self, batch: StepBatch, out: list, members: list[int], rows: torch.Tensor, logits: torch.Tensor) -> None:
        """Each member's logits row on the CPU, with its model's own extra vocabulary rows."""
        cpu = logits.float().cpu()
        for j, i in enumerate(members):
            if (extra := self._extra_head(batch.requests[i])) is None:
                out[i] = cpu[j:j + 1]
            else:
                out[i] = torch.cat([logits[j:j + 1], rows[j:j + 1] @ extra.t()], dim=-1).float().cpu()

    def _extra_head(self, r) -> torch.Tensor | None:
        head_extra = HEAD if not self.config.tie_embeddings else EMBED
        if r.vocab_model is not None and head_extra in self.resident.extra[r.vocab_model]:
            return self.resident.extra[r.vocab_model][head_extra]
        return None

    def _head(self, r, rows: torch.Tensor, step: StepWeights) -> torch.Tensor:
        if r.head in step.dense:
            logits = L.linear(rows, step.dense[r.head].head)
        else:
            logits = torch.empty((rows.shape[0], self.vocabulary.base), device=rows.device, dtype=torch.float32)
            b = self.resident.blocks[self.head_block]
            masked_linear(rows, MaskGroups.build([(0, rows.shape[0], step.native[r.head])]), b.base, b.tau_star,
                          b.packed, self.round_to, logits)
            logits = logits.to(self.dtype)
        if (extra := self._extra_head(r)) is not None:
            logits = torch.cat([logits, rows @ extra.t()], dim=-1)
        return logits
