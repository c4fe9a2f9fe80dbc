"""Layout tables and checkpoint files: names/shapes vs the published checkpoints, round trips, clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs import preset_path
from convert import layouts
from convert.layouts import LayoutError
from convert.reader import CheckpointReader, load_params
from convert.synthetic import make_checkpoint, random_hf_tensors
from convert.writer import params_to_hf, write_checkpoint
from oss_jax import cli, mxfp4
from oss_jax.config import ORIGINAL_KEYS, ConfigError, ModelConfig

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("model", ["gpt-oss-20b", "gpt-oss-120b"])
def test_expected_tensors_match_the_published_checkpoints(model):
    """Every name, dtype and shape of both published layouts, from the config alone."""
    cfg = ModelConfig.from_file(preset_path(model))
    published = json.loads((DATA / f"{model}.tensors.json").read_text())
    for ours, key in ((layouts.hf_tensors(cfg), "hf_layout"), (layouts.original_tensors(cfg), "original_layout")):
        want = {t["name"]: (t["dtype"], tuple(t["shape"])) for t in published[key]["tensors"]}
        got = {n: ({"bfloat16": "BF16", "uint8": "U8"}[d.name], s) for n, (d, s) in ours.items()}
        assert got == want, key
    hf_sources = {t["name"]: t["original_source"] for t in published["hf_layout"]["tensors"]}
    for orig, parts in layouts.original_to_hf_names(cfg).items():
        for part in parts:
            assert hf_sources[part].split("[")[0] == orig


@pytest.fixture(scope="module")
def tiny_ckpts(tiny_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {lay: make_checkpoint(tiny_config, root / lay, layout=lay, seed=5) for lay in ("hf", "original")}


def test_both_layouts_load_to_identical_parameters(tiny_ckpts):
    _, a = load_params(tiny_ckpts["hf"])
    _, b = load_params(tiny_ckpts["original"])
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_original_config_has_exactly_the_reference_keys(tiny_ckpts):
    """gpt_oss.torch builds ModelConfig(**config.json): any extra key is a TypeError there."""
    cfg = json.loads((tiny_ckpts["original"] / "config.json").read_text())
    assert tuple(cfg) == ORIGINAL_KEYS


def test_parameters_round_trip_to_hf_tensors(tiny_config, tiny_ckpts):
    """params -> HF tensors: non-expert tensors bit-identical; MXFP4 experts decode to the same values."""
    written = load_file(str(tiny_ckpts["hf"] / "model.safetensors"))
    _, params = load_params(tiny_ckpts["hf"])
    back = params_to_hf(tiny_config, params)
    assert back.keys() == written.keys()
    for name, tensor in written.items():
        if name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            np.testing.assert_array_equal(mxfp4.decode(back[name], back[base + "_scales"]),
                                          mxfp4.decode(tensor, written[base + "_scales"]), err_msg=name)
        elif not name.endswith("_scales"):
            assert back[name].dtype == tensor.dtype
            np.testing.assert_array_equal(back[name], tensor, err_msg=name)


def test_qkv_fusion_is_q_then_k_then_v(tiny_config, tiny_ckpts):
    orig = load_file(str(tiny_ckpts["original"] / "model.safetensors"))
    hf = load_file(str(tiny_ckpts["hf"] / "model.safetensors"))
    q = tiny_config.num_attention_heads * tiny_config.head_dim
    kv = tiny_config.num_key_value_heads * tiny_config.head_dim
    qkv = orig["block.1.attn.qkv.weight"]
    assert qkv.shape[0] == q + 2 * kv
    np.testing.assert_array_equal(qkv[:q], hf["model.layers.1.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(qkv[q:q + kv], hf["model.layers.1.self_attn.k_proj.weight"])
    np.testing.assert_array_equal(qkv[q + kv:], hf["model.layers.1.self_attn.v_proj.weight"])


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_sharded_checkpoints_with_index(tiny_config, tiny_ckpts, tmp_path, layout):
    hf = random_hf_tensors(tiny_config, seed=5)
    out = write_checkpoint(tmp_path / layout, tiny_config, hf, layout=layout, max_shard_bytes=2_000_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    print(layout, shards)
    assert len(shards) > 2
    assert shards[0] == ("model-00000-of-" if layout == "hf" else "model--00001-of-") + shards[-1][-17:]
    _, a = load_params(out)
    _, b = load_params(tiny_ckpts[layout])
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_reference_loads_a_sharded_original_checkpoint(tiny_config, tmp_path):
    torch = pytest.importorskip("torch")
    from gpt_oss.torch.model import Transformer

    out = write_checkpoint(tmp_path / "o", tiny_config, random_hf_tensors(tiny_config, seed=5), layout="original",
                           max_shard_bytes=2_000_000)
    model = Transformer.from_checkpoint(str(out), device=torch.device("cpu"))
    assert model.block[1].attn.qkv.weight.shape[0] == 160  # (6 + 2 * 2) heads x 16


# ------------------------------------------------------------------ bad input


def _copy_with(src: Path, dst: Path, mutate) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_is_named(tiny_ckpts, tmp_path):
    bad = _copy_with(tiny_ckpts["hf"], tmp_path / "bad", lambda t: t.pop("model.layers.2.self_attn.sinks"))
    with pytest.raises(LayoutError, match="model.layers.2.self_attn.sinks"):
        load_params(bad)


def test_unexpected_tensor_is_named(tiny_ckpts, tmp_path):
    bad = _copy_with(tiny_ckpts["hf"], tmp_path / "bad", lambda t: t.update(extra=np.zeros(3, np.float32)))
    with pytest.raises(LayoutError, match="unexpected tensor 'extra'"):
        load_params(bad)


def test_shape_contradicting_config_is_named(tiny_ckpts, tmp_path):
    def shrink(t):
        t["model.layers.0.mlp.router.bias"] = t["model.layers.0.mlp.router.bias"][:-1]

    bad = _copy_with(tiny_ckpts["hf"], tmp_path / "bad", shrink)
    with pytest.raises(LayoutError, match=r"model.layers.0.mlp.router.bias.*\(11,\).*\(12,\)"):
        load_params(bad)


def test_wrong_dtype_is_named(tiny_ckpts, tmp_path):
    def to_float(t):
        t["model.layers.0.mlp.experts.down_proj_scales"] = t["model.layers.0.mlp.experts.down_proj_scales"].astype(
            np.float32)

    bad = _copy_with(tiny_ckpts["hf"], tmp_path / "bad", to_float)
    with pytest.raises(LayoutError, match="down_proj_scales.*dtype float32"):
        load_params(bad)


def test_missing_config_and_non_checkpoints(tiny_ckpts, tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        CheckpointReader(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        CheckpointReader(tmp_path)
    (tmp_path / "config.json").write_text((tiny_ckpts["hf"] / "config.json").read_text())
    with pytest.raises(LayoutError, match="no \\*.safetensors"):
        CheckpointReader(tmp_path)


def test_corrupt_safetensors_file_is_named(tiny_ckpts, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_ckpts["hf"] / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(LayoutError, match="model.safetensors: unreadable"):
        load_params(bad)


def test_index_pointing_to_a_missing_shard(tiny_config, tmp_path):
    out = write_checkpoint(tmp_path / "s", tiny_config, random_hf_tensors(tiny_config), max_shard_bytes=2_000_000)
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(LayoutError, match=f"shard '{shard.name}' does not exist"):
        load_params(out)


# ------------------------------------------------------------------ CLI


def test_make_checkpoint_cli(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert cli.main(["make-checkpoint", "--config", "tiny", "--layout", "original", "--seed", "2", str(out)]) == 0
    assert CheckpointReader(out).layout == "original"
    # an existing directory is kept unless --overwrite
    assert cli.main(["make-checkpoint", "--config", "tiny", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert CheckpointReader(out).layout == "original"
    assert cli.main(["make-checkpoint", "--config", "tiny", "--overwrite", str(out)]) == 0
    assert CheckpointReader(out).layout == "hf"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind


def test_failed_write_leaves_nothing(tiny_config, tmp_path):
    hf = random_hf_tensors(tiny_config)
    hf.pop("lm_head.weight")
    with pytest.raises(LayoutError, match="lm_head.weight"):
        write_checkpoint(tmp_path / "x", tiny_config, hf)
    assert list(tmp_path.iterdir()) == []
