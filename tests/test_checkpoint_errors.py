"""Bad checkpoints give a CheckpointError that names the file or key (and loading good ones stays strict)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omni_runtime.stages.errors import CheckpointError  # noqa: E402
from omni_runtime.stages.models.flux.transformer import FluxTransformer  # noqa: E402
from omni_runtime.stages.weights import component_dir, load_safetensors, read_model_index  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def model(tiny_dir, tmp_path) -> Path:
    """A private copy of the model's index and transformer to damage."""
    out = tmp_path / "model"
    out.mkdir()
    shutil.copy(tiny_dir / "model_index.json", out)
    shutil.copytree(tiny_dir / "transformer", out / "transformer")
    return out


def test_good_copy_loads(model):
    FluxTransformer.from_pretrained(model)  # the fixture itself is sound


def test_missing_component_directory(model):
    shutil.rmtree(model / "transformer")
    with pytest.raises(CheckpointError, match=r"transformer.*component directory 'transformer' is missing"):
        FluxTransformer.from_pretrained(model)


def test_component_not_listed_in_model_index(model):
    with pytest.raises(CheckpointError, match=r"model_index.json: component 'unet' is not listed; listed: \["):
        component_dir(model, "unet")
    assert read_model_index(model)["transformer"] == ("diffusers", "FluxTransformer2DModel")


def test_missing_weights_file(model):
    (model / "transformer" / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=rf"no weights found; expected {WEIGHTS} or {WEIGHTS}.index.json"):
        FluxTransformer.from_pretrained(model)


def test_missing_config(model):
    (model / "transformer" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"transformer/config.json: file not found"):
        FluxTransformer.from_pretrained(model)


def test_malformed_config(model):
    (model / "transformer" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"transformer/config.json: not valid JSON"):
        FluxTransformer.from_pretrained(model)


@pytest.mark.parametrize("keep", [0.5, 0.999, 4])
def test_truncated_safetensors(model, keep):
    path = model / "transformer" / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS}: cannot read safetensors file"):
        FluxTransformer.from_pretrained(model)


def _rewrite(model: Path, edit) -> None:
    path = model / "transformer" / WEIGHTS
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_wrong_shape_names_key_and_shapes(model):
    _rewrite(model, lambda s: s.__setitem__("x_embedder.weight", torch.zeros(32, 60)))
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): x_embedder.weight: checkpoint \(32, 60\) "
                                              r"vs model \(32, 64\)"):
        FluxTransformer.from_pretrained(model)


def test_missing_and_unexpected_keys_are_listed(model):
    def edit(s):
        del s["proj_out.bias"]
        del s["transformer_blocks.0.attn.norm_added_k.weight"]
        s["transformer_blocks.7.extra.weight"] = torch.zeros(2)

    _rewrite(model, edit)
    with pytest.raises(CheckpointError) as info:
        FluxTransformer.from_pretrained(model)
    msg = str(info.value)
    assert "missing keys (2): proj_out.bias, transformer_blocks.0.attn.norm_added_k.weight" in msg
    assert "unexpected keys (1): transformer_blocks.7.extra.weight" in msg
    assert str(model / "transformer") in msg


def test_unknown_class_name(model):
    cfg_path = model / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "SD3Transformer2DModel"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: _class_name='SD3Transformer2DModel' is not supported; "
                                              r"allowed: \['FluxTransformer2DModel'\]"):
        FluxTransformer.from_pretrained(model)


def _shard(model: Path) -> dict:
    """Split the transformer weights into two shards with an index, as diffusers writes them."""
    comp = model / "transformer"
    state = load_file(str(comp / WEIGHTS))
    (comp / WEIGHTS).unlink()
    keys = sorted(state)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, ks in halves.items():
        save_file({k: state[k] for k in ks}, str(comp / name))
        weight_map.update(dict.fromkeys(ks, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (comp / f"{WEIGHTS}.index.json").write_text(json.dumps(index))
    return index


def test_sharded_checkpoint_loads_the_same_tensors(model, tiny_dir):
    _shard(model)
    got = load_safetensors(model / "transformer")
    want = load_file(str(tiny_dir / "transformer" / WEIGHTS))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    loaded = FluxTransformer.from_pretrained(model).state_dict()
    assert all(torch.equal(loaded[k], want[k]) for k in want)


def test_sharded_index_naming_a_missing_shard(model):
    _shard(model)
    (model / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"index.json: shard file\(s\) not found: .*00002-of-00002"):
        FluxTransformer.from_pretrained(model)


def test_sharded_index_listing_a_key_the_shard_lacks(model):
    index = _shard(model)
    second = sorted(k for k, v in index["weight_map"].items() if v.endswith("00002-of-00002.safetensors"))
    moved = second[0]
    index["weight_map"][moved] = "diffusion_pytorch_model-00001-of-00002.safetensors"
    (model / "transformer" / f"{WEIGHTS}.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"00001-of-00002.safetensors: the index lists 1 key\(s\) this shard "
                                              rf"does not hold: {moved}"):
        FluxTransformer.from_pretrained(model)
