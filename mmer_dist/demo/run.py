"""``mmer demo``: the whole merge engine end to end on small built-in models.

Builds a tiny base LLM and four tiny multimodal fine-tunes (image: LLaVA-HF, video: Video-LLaVA-HF,
audio and point cloud: generic format), ingests them into a local store, merges them with MMER on
an embedded Ray cluster, and shows what retention means: each model reconstructed from
base + mask + tau* is compared with the original, next to the plain merged model theta*, in
weight space and in the next-token predictions of the reconstructed LLaVA on an image prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from mmer_dist import export
from mmer_dist.demo import tiny_models
from mmer_dist.formats import FormatMapping
from mmer_dist.merge.engine import MergeRequest, merge
from mmer_dist.outputs import prepare_workdir
from mmer_dist.status import print_status
from mmer_dist import ingest

WORKDIR_ENTRIES = ("checkpoints", "store", "export")  # what a run creates in its workdir (and may replace)
MODELS = (  # id, format, modality, seed
    ("llava-image", "llava-hf", "image", 11),
    ("videollava-video", "video-llava-hf", "video", 12),
    ("tiny-audio", "generic", "audio", 13),
    ("tiny-point", "generic", "point", 14),
)


def build_checkpoints(workdir: Path) -> dict[str, Path]:
    paths = {"base": tiny_models.save_base(workdir / "checkpoints" / "base", dtype=torch.bfloat16)}
    for model_id, fmt, modality, seed in MODELS:
        paths[model_id] = tiny_models.save_finetuned(paths["base"], workdir / "checkpoints" / model_id, fmt,
                                                     modality=modality, dtype=torch.bfloat16, seed=seed)
    return paths


def _llm_weights(path: Path, fmt: str, mapping_file: Path | None = None) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    mapping = FormatMapping.load(str(mapping_file) if mapping_file else fmt)
    return {canonical: tensors[source].float() for canonical, source in mapping.split(tensors).llm.items()}


def _distance(a: dict, b: dict) -> float:
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5


def run_demo(workdir: str | Path = "mmer-demo", workers: int = 2, progress: bool = True) -> dict:
    console = Console()
    workdir = prepare_workdir(workdir, WORKDIR_ENTRIES)  # refuses a directory an earlier demo did not make
    store = str(workdir / "store")
    console.rule("1. tiny checkpoints (save_pretrained, bf16)")
    paths = build_checkpoints(workdir)
    console.print(", ".join(f"{k}: {v}" for k, v in paths.items()))

    console.rule("2. ingest into a zarr store")
    ingest.ingest_base(store, paths["base"], chunk_elems=1 << 14, progress=progress)
    for model_id, fmt, modality, _ in MODELS:
        mapping = paths[model_id] / tiny_models.GENERIC_MAPPING_FILE if fmt == "generic" else None
        ingest.ingest_model(store, model_id, paths[model_id], modality, fmt=fmt, mapping_file=mapping,
                            progress=progress)

    console.rule(f"3. MMER merge on an embedded Ray cluster ({workers} shard actors)")
    from mmer_dist.merge.ray_backend import RayBackend

    record = merge(store, MergeRequest(), RayBackend("local"), workers=workers, progress=progress)
    print_status(store)

    console.rule("4. retention: reconstructed models vs the merged model")
    base = _llm_weights(paths["base"], "llama")
    merged_dir = export.export_merged(store, workdir / "export" / "merged", progress=False)
    merged = _llm_weights(merged_dir, "llama")
    table = Table(title="distance to the original fine-tuned LLM, relative to its task vector |tau_i|")
    for col in ("model", "modality", "mask density", "theta_hat_i (MMER)", "theta* (merged)"):
        table.add_column(col)
    results = {}
    for (model_id, fmt, modality, _), density in zip(MODELS, record.mask_density):
        mapping = paths[model_id] / tiny_models.GENERIC_MAPPING_FILE if fmt == "generic" else None
        original = _llm_weights(paths[model_id], fmt, mapping)
        out = export.export_model(store, model_id, workdir / "export" / model_id, progress=False)
        rebuilt = _llm_weights(out, fmt, mapping)
        norm = _distance(original, base)
        results[model_id] = (_distance(rebuilt, original) / norm, _distance(merged, original) / norm)
        table.add_row(model_id, modality, f"{density:.3f}", f"{results[model_id][0]:.3f}", f"{results[model_id][1]:.3f}")
    console.print(table)
    logit_error = _llava_logit_error(paths["llava-image"], workdir / "export" / "llava-image", base, merged)
    console.print(f"LLaVA logits on an image prompt, distance to the original relative to the base LLM's: "
                  f"reconstructed {logit_error['reconstructed']:.3f}, merged theta* {logit_error['merged']:.3f}")
    console.print(f"store: {store}  (try: mmer status --store {store})")
    return {"distances": results, "logit_error": logit_error, "version": record.version}


def _llava_logit_error(original_dir: Path, rebuilt_dir: Path, base_llm: dict, merged_llm: dict) -> dict[str, float]:
    """Retention in function space: on an image prompt, how far each variant's logits are from the
    original fine-tune's, relative to how far the base LLM's are (1.0 = no better than the base)."""
    from transformers import LlavaForConditionalGeneration

    original = LlavaForConditionalGeneration.from_pretrained(original_dir).float().eval()
    split = FormatMapping.load("llava-hf").split(original.state_dict().keys()).llm
    variants = {"reconstructed": LlavaForConditionalGeneration.from_pretrained(rebuilt_dir).float().eval()}
    for name, llm in (("merged", merged_llm), ("base", base_llm)):
        model = LlavaForConditionalGeneration.from_pretrained(rebuilt_dir).float().eval()
        model.load_state_dict({source: llm[canonical] for canonical, source in split.items()}, strict=False)
        variants[name] = model
    cfg = original.config
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(10, cfg.text_config.vocab_size - 10, (1, 24), generator=generator)
    ids = torch.cat([text[:, :4], torch.full((1, cfg.image_seq_length), cfg.image_token_index), text[:, 4:]], dim=1)
    size = cfg.vision_config.image_size
    pixels = torch.randn((1, 3, size, size), generator=generator)
    with torch.no_grad():
        target = original(input_ids=ids, pixel_values=pixels).logits
        logits = {k: m(input_ids=ids, pixel_values=pixels).logits for k, m in variants.items()}
    scale = float((logits["base"] - target).norm())
    return {k: float((logits[k] - target).norm()) / scale for k in ("reconstructed", "merged")}
