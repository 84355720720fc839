"""Formats: mappings on real tiny checkpoints, detection, the reader (sharded, corrupt inputs) and
the streaming writer (bit-exact round trips, any block order, completeness, from_pretrained)."""

from __future__ import annotations

import json
import pickle
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from mmer_dist.demo import tiny_models
from mmer_dist.errors import FormatError
from mmer_dist.formats import CheckpointReader, FormatMapping, SafetensorsWriter, builtin_formats, detect_format
from mmer_dist.formats.checkpoint import INDEX_NAME

FORMATS = ["llava-hf", "video-llava-hf", "llava", "generic"]
COMPONENT_PREFIXES = {
    "llava-hf": ("vision_tower.", "multi_modal_projector."),
    "video-llava-hf": ("image_tower.", "video_tower.", "multi_modal_projector."),
    "llava": ("model.mm_projector.", "model.vision_tower.vision_tower.vision_model."),
    "generic": ("audio_encoder.", "audio_projector."),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    base = tiny_models.save_base(root / "base", seed=0)
    out = {"base": base, "base-sharded": tiny_models.save_base(root / "base-sharded", seed=0, max_shard_size=20_000)}
    for i, fmt in enumerate(FORMATS):
        out[fmt] = tiny_models.save_finetuned(base, root / fmt, fmt, seed=10 + i)
    return out


def _mapping_for(name: str, path: Path) -> FormatMapping:
    return FormatMapping.load(path / tiny_models.GENERIC_MAPPING_FILE if name == "generic" else name)


# ---------------------------------------------------------------- mappings


@pytest.mark.parametrize("fmt", FORMATS)
def test_split_real_checkpoint_gives_base_llm_keys(ckpts: dict[str, Path], fmt: str) -> None:
    base = CheckpointReader(ckpts["base"])
    reader = CheckpointReader(ckpts[fmt])
    split = _mapping_for(fmt, ckpts[fmt]).split(reader.keys())
    assert sorted(split.llm) == base.keys()
    assert split.unknown == [] and split.ignored == []
    assert len(split.llm) + len(split.component) == len(reader.keys())
    for prefix in COMPONENT_PREFIXES[fmt]:
        assert any(k.startswith(prefix) for k in split.component), prefix
    assert all(k.startswith(COMPONENT_PREFIXES[fmt]) for k in split.component)
    for canonical, source in split.llm.items():
        assert reader.info(source).shape == base.info(canonical).shape


def test_llava_hf_is_saved_in_legacy_layout(ckpts: dict[str, Path]) -> None:
    keys = set(CheckpointReader(ckpts["llava-hf"]).keys())
    assert "language_model.model.embed_tokens.weight" in keys and "language_model.lm_head.weight" in keys
    assert "model.mm_projector.0.weight" in CheckpointReader(ckpts["llava"]).keys()


def test_split_new_hf_layout_and_base() -> None:
    keys = ["model.language_model.layers.0.mlp.up_proj.weight", "lm_head.weight",
            "model.language_model.embed_tokens.weight", "model.vision_tower.embeddings.patch_embedding.weight",
            "model.multi_modal_projector.linear_1.bias"]
    split = FormatMapping.load("llava-hf").split(keys)
    assert split.llm == {"model.layers.0.mlp.up_proj.weight": keys[0], "lm_head.weight": keys[1],
                         "model.embed_tokens.weight": keys[2]}
    assert split.component == keys[3:]


def test_split_ignore_unknown_and_duplicates() -> None:
    llama = FormatMapping.load("llama")
    split = llama.split(["model.layers.3.self_attn.rotary_emb.inv_freq", "model.norm.weight", "foo.bar", "model.extra.w"])
    assert split.ignored == ["model.layers.3.self_attn.rotary_emb.inv_freq"]
    assert split.llm == {"model.norm.weight": "model.norm.weight"}
    assert split.unknown == ["foo.bar", "model.extra.w"]  # a rename outside the Llama names is not LLM
    with pytest.raises(FormatError, match="language_model.model.norm.weight.*model.language_model.norm.weight"):
        FormatMapping.load("llava-hf").split(["language_model.model.norm.weight", "model.language_model.norm.weight"])


def test_llm_config(ckpts: dict[str, Path]) -> None:
    hf = CheckpointReader(ckpts["llava-hf"]).config
    assert FormatMapping.load("llava-hf").llm_config(hf) == hf["text_config"]
    orig = CheckpointReader(ckpts["llava"]).config
    assert FormatMapping.load("llava").llm_config(orig) == orig
    assert orig["mm_projector_type"] == "mlp2x_gelu" and orig["hidden_size"] == 32
    with pytest.raises(FormatError, match="text_config"):
        FormatMapping.load("video-llava-hf").llm_config(orig, where="x/config.json")


def test_generic_mapping_from_file_and_schema_errors(tmp_path: Path) -> None:
    good = {"name": "mine", "llm": [["llm.", ""]], "component": ["enc."], "text_config": None}
    path = tmp_path / "m.json"
    path.write_text(json.dumps(good))
    mapping = FormatMapping.load(path)
    assert mapping.split(["llm.lm_head.weight", "enc.w"]).llm == {"lm_head.weight": "llm.lm_head.weight"}
    bad_docs = {
        "missing-llm": {"name": "x"},
        "rule-shape": {"name": "x", "llm": [["only-one"]]},
        "extra-field": {"name": "x", "llm": [["a", "b"]], "compnent": []},
        "component-type": {"name": "x", "llm": [["a", "b"]], "component": "enc."},
    }
    for label, doc in bad_docs.items():
        p = tmp_path / f"{label}.json"
        p.write_text(json.dumps(doc))
        with pytest.raises(FormatError, match=str(p)):
            FormatMapping.load(p)
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(FormatError, match="broken.json.*not valid JSON"):
        FormatMapping.load(tmp_path / "broken.json")
    with pytest.raises(FormatError, match="does not exist"):
        FormatMapping.load(tmp_path / "absent.json")
    with pytest.raises(FormatError, match="llava-hf"):
        FormatMapping.load("llava_hf")
    with pytest.raises(FormatError, match="--mapping FILE"):
        FormatMapping.load("generic")
    assert builtin_formats() == ["llama", "llava", "llava-hf", "video-llava-hf"]


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize("name,expected", [("base", "llama"), ("base-sharded", "llama"), ("llava-hf", "llava-hf"),
                                           ("video-llava-hf", "video-llava-hf"), ("llava", "llava")])
def test_detect(ckpts: dict[str, Path], name: str, expected: str) -> None:
    assert detect_format(CheckpointReader(ckpts[name])) == expected


def test_detect_unknown_suggests_generic(ckpts: dict[str, Path]) -> None:
    with pytest.raises(FormatError, match=r"generic.*--format generic --mapping FILE") as e:
        detect_format(CheckpointReader(ckpts["generic"]))
    assert str(ckpts["generic"]) in str(e.value) and "llava-hf" in str(e.value)


@pytest.mark.parametrize("name", ["llava", "llava-hf", "base"])
def test_detect_by_keys_when_config_is_vague(ckpts: dict[str, Path], tmp_path: Path, name: str) -> None:
    copy = shutil.copytree(ckpts[name], tmp_path / name)
    config = json.loads((copy / "config.json").read_text())
    config.pop("architectures")
    config["model_type"] = "llava" if name != "base" else "unheard_of"  # "llava" is ambiguous
    (copy / "config.json").write_text(json.dumps(config))
    assert detect_format(CheckpointReader(copy)) == {"base": "llama"}.get(name, name)


# ---------------------------------------------------------------- reader


def test_reader_sharded_matches_single(ckpts: dict[str, Path]) -> None:
    single, sharded = CheckpointReader(ckpts["base"]), CheckpointReader(ckpts["base-sharded"])
    assert (ckpts["base-sharded"] / INDEX_NAME).is_file()
    assert len({sharded.info(k).file for k in sharded.keys()}) > 1
    assert single.keys() == sharded.keys()
    for key in single.keys():
        assert single.info(key).shape == sharded.info(key).shape and sharded.info(key).dtype == torch.float32
        assert torch.equal(single.read(key), sharded.read(key))
    emb = sharded.read("model.embed_tokens.weight")
    assert torch.equal(sharded.read_rows("model.embed_tokens.weight", 100, 137), emb[100:137])
    assert torch.equal(sharded.read_rows("model.norm.weight", 3, 9), sharded.read("model.norm.weight")[3:9])
    with pytest.raises(FormatError, match="out of range"):
        sharded.read_rows("model.norm.weight", 0, 33)
    with pytest.raises(FormatError, match="no tensor 'nope'"):
        sharded.info("nope")
    aux = [p.name for p in sharded.aux_files()]
    assert aux == ["chat_template.jinja", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


def test_sha256_is_content_and_name_sensitive(ckpts: dict[str, Path], tmp_path: Path) -> None:
    digest = CheckpointReader(ckpts["base"]).sha256()
    copy = shutil.copytree(ckpts["base"], tmp_path / "copy")
    assert CheckpointReader(copy).sha256() == digest
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + " ")
    assert CheckpointReader(copy).sha256() != digest


def _corrupt(src: Path, dst: Path, how: str) -> Path:
    dst = shutil.copytree(src, dst)
    index = json.loads((dst / INDEX_NAME).read_text()) if (dst / INDEX_NAME).exists() else None
    shards = sorted(dst.glob("*.safetensors"))
    if how == "truncated":
        data = shards[0].read_bytes()
        shards[0].write_bytes(data[: len(data) - 100])
    elif how == "garbled-header":
        data = bytearray(shards[0].read_bytes())
        data[8:20] = b"#garbage####"
        shards[0].write_bytes(bytes(data))
    elif how == "header-length":
        data = shards[0].read_bytes()
        shards[0].write_bytes(struct.pack("<Q", len(data)) + data[8:])
    elif how == "missing-shard":
        shards[-1].unlink()
    elif how == "key-absent-from-shard":
        index["weight_map"]["model.layers.9.ghost.weight"] = shards[0].name
    elif how == "duplicate-across-shards":
        save_file({"model.norm.weight": torch.ones(32)}, shards[0].with_name("model-extra.safetensors"))
        index["weight_map"]["model.norm.weight"] = "model-extra.safetensors"
    elif how == "no-weights":
        for s in shards:
            s.unlink()
        (dst / INDEX_NAME).unlink(missing_ok=True)
    elif how == "pickle":
        for s in shards:
            s.unlink()
        (dst / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    elif how == "two-files-no-index":
        save_file({"x": torch.ones(2)}, dst / "other.safetensors")
    if index is not None:
        (dst / INDEX_NAME).write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("how,source,message", [
    ("truncated", "base", r"model\.safetensors: .*truncated"),
    ("truncated", "base-sharded", r"model-00001-of-\d+\.safetensors: .*(truncated|cover)"),
    ("garbled-header", "base", r"model\.safetensors: safetensors header does not parse"),
    ("header-length", "base", r"model\.safetensors: header length"),
    ("missing-shard", "base-sharded", r"index\.json: names shard 'model-\d+-of-\d+\.safetensors', which is missing"),
    ("key-absent-from-shard", "base-sharded", r"model-00001-of-\d+\.safetensors: key 'model\.layers\.9\.ghost\.weight'"),
    ("duplicate-across-shards", "base-sharded", r"'model\.norm\.weight' is in both .*model-extra\.safetensors"),
    ("no-weights", "base", r"no \*\.safetensors weight files"),
    ("pickle", "base", r"pytorch_model\.bin.*only safetensors"),
    ("two-files-no-index", "base", r"2 safetensors files .*no model\.safetensors\.index\.json"),
])
def test_reader_rejects_corrupt_checkpoints(ckpts: dict[str, Path], tmp_path: Path, how: str, source: str,
                                            message: str) -> None:
    bad = _corrupt(ckpts[source], tmp_path / how, how)
    with pytest.raises(FormatError, match=message) as e:
        CheckpointReader(bad)
    assert str(bad) in str(e.value)


# ---------------------------------------------------------------- writer


def _random_tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (37, 16), "b.bias": (16,), "c.conv": (5, 3, 4), "d.scalar": (), "e.big": (300, 24)}
    others = {"f.ids": torch.arange(7, dtype=torch.int64), "g.mask": torch.rand(9, 3, generator=g) > 0.5,
              "h.empty": torch.zeros(0, 4, dtype=dtype), "i.fp8": torch.randn(6, 2, generator=g).to(torch.float8_e4m3fn)}
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()} | others


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("max_shard_bytes", [10**9, 4000])
def test_writer_round_trip_out_of_order(tmp_path: Path, dtype: torch.dtype, max_shard_bytes: int) -> None:
    tensors = _random_tensors(dtype)
    blocks = [(k, r, t[r:r + 7]) for k, t in tensors.items() if t.dim() for r in range(0, t.shape[0], 7)]
    blocks += [("d.scalar", 0, tensors["d.scalar"])]
    random.Random(1).shuffle(blocks)
    with SafetensorsWriter(tmp_path, [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()],
                           max_shard_bytes=max_shard_bytes, metadata={"origin": "test"}) as writer:
        for key, row, block in blocks:
            writer.write(key, row, block)
    files = sorted(p.name for p in tmp_path.iterdir())
    loaded: dict[str, torch.Tensor] = {}
    if max_shard_bytes == 10**9:
        assert files == ["model.safetensors"]
        loaded = load_file(tmp_path / "model.safetensors")
    else:
        n = len(files) - 1
        assert n > 1 and files[-1] == INDEX_NAME
        assert files[:-1] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        text = (tmp_path / INDEX_NAME).read_text()
        index = json.loads(text)
        assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert sorted(index["weight_map"]) == sorted(tensors)
        for f in files[:-1]:
            loaded |= load_file(tmp_path / f)
    assert sorted(loaded) == sorted(tensors)
    for key, t in tensors.items():
        assert loaded[key].dtype == t.dtype and loaded[key].shape == t.shape
        assert torch.equal(_bits(loaded[key]), _bits(t)), key
    reader = CheckpointReader(tmp_path)  # our own validation agrees, metadata kept
    assert torch.equal(_bits(reader.read_rows("e.big", 10, 20)), _bits(tensors["e.big"][10:20]))


def test_reader_is_picklable(ckpts: dict[str, Path]) -> None:
    reader = CheckpointReader(ckpts["base-sharded"])
    reader.read("model.norm.weight")  # opens a handle, which must not travel
    clone = pickle.loads(pickle.dumps(reader))
    assert torch.equal(clone.read("lm_head.weight"), reader.read("lm_head.weight"))


def test_writer_detects_missing_block_and_bad_writes(tmp_path: Path) -> None:
    t = torch.randn(20, 4)
    writer = SafetensorsWriter(tmp_path, [("x", (20, 4), torch.float32), ("y", (3,), torch.float32)])
    writer.write("x", 0, t[:8])
    writer.write("x", 12, t[12:])
    writer.write("y", 0, torch.zeros(3))
    with pytest.raises(FormatError, match=r"'x' rows 4:10 overlap rows 0:8"):
        writer.write("x", 4, t[4:10])
    with pytest.raises(FormatError, match=r"'x' block at row 8 is \(2, 4\) torch.float16"):
        writer.write("x", 8, t[8:10].half())
    with pytest.raises(FormatError, match="outside 0:20"):
        writer.write("x", 18, t[:4])
    with pytest.raises(FormatError, match="'z' is not in the plan"):
        writer.write("z", 0, t)
    with pytest.raises(FormatError, match=r"'x' is incomplete: 16 of 20 rows written \(rows 8:12 missing\)"):
        writer.close()
    assert not (tmp_path / "model.safetensors").exists()  # nothing published
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_replaces_an_earlier_export(tmp_path: Path) -> None:
    entries = [("x", (100, 10), torch.float32), ("y", (100, 10), torch.float32)]
    with SafetensorsWriter(tmp_path, entries, max_shard_bytes=4000) as writer:
        writer.write("x", 0, torch.zeros(100, 10))
        writer.write("y", 0, torch.zeros(100, 10))
    assert (tmp_path / INDEX_NAME).exists()
    with SafetensorsWriter(tmp_path, entries[:1]) as writer:
        writer.write("x", 0, torch.ones(100, 10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert CheckpointReader(tmp_path).keys() == ["x"]


def test_writer_context_manager_aborts_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(tmp_path, [("x", (2,), torch.float32)]) as writer:
            writer.write("x", 0, torch.ones(2))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_output_loads_with_from_pretrained(ckpts: dict[str, Path], tmp_path: Path) -> None:
    reader = CheckpointReader(ckpts["base"])
    entries = [(k, reader.info(k).shape, torch.bfloat16) for k in reader.keys()]
    with SafetensorsWriter(tmp_path, entries, max_shard_bytes=30_000) as writer:
        for key, shape, _ in reversed(entries):
            for row in range(0, shape[0], 9):
                writer.write(key, row, reader.read_rows(key, row, min(row + 9, shape[0])).to(torch.bfloat16))
    for aux in reader.aux_files():
        shutil.copy(aux, tmp_path / aux.name)
    assert (tmp_path / INDEX_NAME).exists()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ref = LlamaForCausalLM.from_pretrained(ckpts["base"], dtype=torch.bfloat16)
    for (name, p), (_, q) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), name
    assert torch.equal(ours(ids).logits, ref(ids).logits)
