"""The demo kit at its test size: deterministic, cached atomically, real checkpoints that load
offline and beat chance, prompts as serving builds them, and the mmer CLI ingests and merges them.

The kit is built once per session (``kit`` fixture); a second build of the same seed runs in a
subprocess at the same time (the machine has 2 cores, each build uses 1) and must give the same bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import KIT_SEED
from store_helpers import assert_identical, reference_for_version, run_cli, split_checkpoint, status_json
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration, VideoLlavaForConditionalGeneration

from mmer_dist.demo.kit import build as kit_build
from mmer_dist.demo.kit import build_kit, evaluate, get_task, load_kit, predict
from mmer_dist.demo.kit.encoding import encode, render
from mmer_dist.errors import InvalidInputError, StoreError
from mmer_dist.media import load_adapter
from mmer_dist.media.processor import VideoLlavaFrameProcessor, load_processor
from mmer_dist.method.reference import reference_reconstruct

SEED = KIT_SEED  # the session kit's (conftest)


def test_same_seed_gives_bit_identical_checkpoints(kit_pair) -> None:
    kit, twin = kit_pair
    assert kit.root != twin.root and kit.sha256 == twin.sha256
    for name in ["base", *kit.models]:
        assert (kit.root / name / "model.safetensors").read_bytes() == (twin.root / name / "model.safetensors").read_bytes()
    assert len(set(kit.sha256.values())) == len(kit.sha256)  # and the models do differ from each other


def test_the_cli_offers_the_kit_sizes() -> None:
    from mmer_dist.cli.demo import KIT_SIZES

    assert set(KIT_SIZES) == set(kit_build.SIZES)


def test_kit_layout_and_sizes(kit) -> None:
    assert [m.id for m in kit.initial] == ["digits", "tones", "shapes", "motion"]
    assert [m.id for m in kit.added] == ["parity"]
    assert {m.format for m in kit.models.values()} == {"llava-hf", "video-llava-hf"}
    for m in kit.models.values():
        assert m.path.is_dir() and m.bytes < 2_000_000 and 100_000 < m.parameters < 400_000
    assert kit.models["motion"].format == "video-llava-hf"


def test_cache_is_reused_and_checked(kit, tmp_path) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in kit.root.rglob("*") if p.is_file()}
    again = build_kit(kit.root.parent, size="test", seed=SEED)
    assert again.root == kit.root and again.sha256 == kit.sha256
    assert {p: p.stat().st_mtime_ns for p in kit.root.rglob("*") if p.is_file()} == stamps  # nothing rewritten
    tampered = shutil.copytree(kit.root, tmp_path / kit.root.name)
    (tampered / "tones" / "mmer_adapter.json").write_text("{}")
    with pytest.raises(StoreError, match=r"checkpoints \['tones'\] differ"):
        load_kit(tampered)


def test_a_failed_build_leaves_no_entry_and_stale_ones_are_ignored(tmp_path, monkeypatch) -> None:
    name = f"test-seed7-{kit_build.cache_key('test', 7)[:16]}"
    stale = tmp_path / f".{name}.tmp-dead"  # a build killed mid-way left this
    (stale / "base").mkdir(parents=True)
    (stale / "base" / "model.safetensors").write_bytes(b"half written")

    def crash(out: Path, size: str, seed: int, log, progress) -> None:
        (out / "base").mkdir()
        (out / "base" / "config.json").write_text("{}")
        raise RuntimeError("killed while training")

    monkeypatch.setattr(kit_build, "_build", crash)
    with pytest.raises(RuntimeError, match="killed while training"):
        build_kit(tmp_path, size="test", seed=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.lock"]  # no entry, no temp dir left

    def fake(out: Path, size: str, seed: int, log, progress) -> None:  # a complete (tiny) kit, to see it published
        (out / "base").mkdir()
        (out / "base" / "config.json").write_text("{}")
        doc = {"size": size, "seed": seed, "base_facts_accuracy": 1.0, "models": [], "build_seconds": 0.0,
               "sha256": {"base": kit_build.checkpoint_sha256(out / "base")}}
        (out / kit_build.MANIFEST).write_text(json.dumps(doc))

    monkeypatch.setattr(kit_build, "_build", fake)
    built = build_kit(tmp_path, size="test", seed=7)
    assert built.root == tmp_path / name and (built.root / "base" / "config.json").is_file()
    with pytest.raises(InvalidInputError, match="kit size 'huge' unknown"):
        build_kit(tmp_path, size="huge")


@pytest.mark.parametrize("model_id", ["digits", "tones", "shapes", "motion", "parity"])
def test_models_load_offline_and_beat_chance(kit, model_id, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = kit.models[model_id]
    cls = VideoLlavaForConditionalGeneration if m.format == "video-llava-hf" else LlavaForConditionalGeneration
    model = cls.from_pretrained(m.path)
    assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads  # GQA
    assert not model.config.text_config.tie_word_embeddings
    if m.format == "llava-hf":
        assert type(AutoProcessor.from_pretrained(m.path)).__name__ == "LlavaProcessor"
    else:  # transformers' VideoLlavaProcessor needs torchvision; the frame processor reads the same files
        assert isinstance(load_processor(m.path), VideoLlavaFrameProcessor)
    accuracy = evaluate(m.path)
    assert accuracy == m.accuracy  # the evaluator is deterministic and matches the build's record
    assert accuracy >= m.chance + 0.2, f"{model_id}: {accuracy:.2f} vs chance {m.chance:.2f}"


def test_base_knows_the_prompt_style(kit) -> None:
    assert kit.base_facts_accuracy >= 0.6
    assert evaluate(kit.base, "facts") == kit.base_facts_accuracy


@pytest.mark.parametrize("model_id", ["digits", "tones", "motion"])
def test_prompts_are_what_serving_builds(kit, model_id) -> None:
    """One BOS, from the template; the placeholder expanded to the encoder's token count; the
    tokenizer's own chat template and the processor agree on the text tokens."""
    m, task = kit.models[model_id], get_task(model_id)
    processor, adapter = load_processor(m.path), load_adapter(m.path)
    tokenizer = AutoTokenizer.from_pretrained(m.path)
    sample = kit.split(model_id).test[0]
    messages = task.messages(sample, with_media=True)  # the real content parts, payload included
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    batch = encode(processor, task, [sample], adapter, with_answer=False)
    placeholder = {"digits": "<image>", "tones": "<audio>", "motion": "<video>"}[model_id]
    pid = tokenizer.convert_tokens_to_ids(placeholder)
    row = batch["input_ids"][0].tolist()
    assert ids.count(tokenizer.bos_token_id) == 1 == row.count(tokenizer.bos_token_id) and row[0] == tokenizer.bos_token_id
    config = json.loads((m.path / "config.json").read_text())
    expected = config["video_seq_length"] if model_id == "motion" else config["image_seq_length"]
    assert row.count(pid) == expected and ids.count(pid) == 1
    assert [t for t in row if t != pid] == [t for t in ids if t != pid]
    assert tokenizer.unk_token_id not in row
    assert render(processor, task, sample, with_answer=False).endswith("<|assistant|>")


def test_adapters_make_the_images_the_towers_want(kit) -> None:
    for model_id, part_type in (("tones", "input_audio"), ("shapes", "point_cloud")):
        m = kit.models[model_id]
        adapter = load_adapter(m.path)
        assert adapter.part_type == part_type == m.part_type
        size = json.loads((m.path / "config.json").read_text())["vision_config"]["image_size"]
        image = adapter(kit.split(model_id).test[0].raw)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
    for model_id in ("digits", "motion", "parity"):
        assert load_adapter(kit.models[model_id].path) is None


def test_served_payloads_are_the_samples_bit_for_bit(kit) -> None:
    """Raw samples -> content parts (PNG, WAV, lossless mp4, npy) -> decoders -> the very samples
    the models were trained and scored on, hence the same replies: served answers can be held to
    the kit's references (a lossy yuv420p mp4 moved the 16x16 frames by up to 31/255 and flipped
    motion answers; float tones off the 16-bit grid moved log-probabilities by 1e-4)."""
    from mmer_dist.media import decode_part

    for model_id in ("digits", "tones", "shapes", "motion"):
        m, task = kit.models[model_id], get_task(model_id)
        samples = kit.split(model_id).test[:24]
        frames = getattr(load_processor(m.path), "num_frames", 8)
        decoded = [type(s)(decode_part(task.messages(s, with_media=True)[0]["content"][0], num_frames=frames), s.answer)
                   for s in samples]
        for s, d in zip(samples, decoded):
            raw, back = (s.raw, d.raw) if model_id != "tones" else (s.raw.samples, d.raw.samples)
            assert raw.dtype == back.dtype and np.array_equal(raw, back), model_id
        assert predict(m.path, task, samples) == predict(m.path, task, decoded), model_id


def test_evaluate_refuses_unknown_inputs(kit, tmp_path) -> None:
    with pytest.raises(InvalidInputError, match="kit task 'poetry' unknown"):
        evaluate(kit.models["digits"].path, "poetry")
    shutil.copytree(kit.models["digits"].path, tmp_path / "plain")
    (tmp_path / "plain" / "mmer_kit.json").unlink()
    with pytest.raises(InvalidInputError, match="not a kit checkpoint"):
        evaluate(tmp_path / "plain")


def test_kit_ingests_merges_and_exports(kit, tmp_path) -> None:
    """`mmer ingest --base`, `mmer ingest --model --format llava-hf|video-llava-hf`, `mmer merge`,
    and the evaluator on exported checkpoints (the original bit for bit, and the MMER rebuild)."""
    store = tmp_path / "store"
    run_cli("ingest", "--store", store, "--base", kit.base, "--quiet")
    for m in kit.initial:
        run_cli("ingest", "--store", store, "--model", m.id, "--modality", m.modality, "--path", m.path,
                "--format", m.format, "--quiet")
    run_cli("merge", "--store", store, "--quiet", "--no-compile", "--device", "cpu")
    digits = kit.models["digits"]
    run_cli("export", "original", "--store", store, "--model", "digits", "--out", tmp_path / "orig", "--quiet")
    assert evaluate(tmp_path / "orig") == digits.accuracy
    run_cli("export", "model", "--store", store, "--model", "digits", "--out", tmp_path / "rebuilt", "--quiet")
    rebuilt = evaluate(tmp_path / "rebuilt")
    assert rebuilt >= digits.chance + 0.1  # MMER's θ̂ keeps most of what the model learnt
    # ... and it is the reference θ̂: the whole-tensor oracle over the kit's own checkpoints
    version = status_json(store)["versions"][-1]
    base, _ = split_checkpoint(kit.base, "llama")
    ref = reference_for_version(version, base, {m.id: split_checkpoint(m.path, m.format)[0] for m in kit.initial})
    got, _ = split_checkpoint(tmp_path / "rebuilt", digits.format)
    want = reference_reconstruct(base, ref.tau_star, ref.masks[version["models"].index("digits")])
    for name, w in want.items():
        assert_identical(got[name][: w.shape[0]], w.to(got[name].dtype), f"digits {name}")
    run_cli("export", "merged", "--store", store, "--out", tmp_path / "merged", "--quiet")
    # the merged LLM around the digit model's own encoder (how the benchmark scores baselines)
    merged = evaluate(digits.path, llm=tmp_path / "merged")
    base = evaluate(digits.path, llm=kit.base)
    assert base == digits.base_accuracy and 0.0 <= merged <= 1.0
