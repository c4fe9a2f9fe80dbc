"""ModelConfig: published values, both layouts, round trips, and clear errors for invalid configs."""

import dataclasses
import json
from pathlib import Path

import pytest

from configs import preset_path
from oss_jax.config import FULL, ORIGINAL_KEYS, SLIDING, ConfigError, ModelConfig

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path("/work/shared/reference")
PUBLISHED = {  # name: (layers, experts)
    "gpt-oss-20b": (24, 32),
    "gpt-oss-120b": (36, 128),
}


def _hf_dict(name: str = "gpt-oss-20b") -> dict:
    return json.loads((ROOT / "configs" / f"{name}.json").read_text())


def _write(tmp_path: Path, cfg) -> Path:
    path = tmp_path / "config.json"
    path.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return path


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_values(name):
    layers, experts = PUBLISHED[name]
    cfg = ModelConfig.from_file(ROOT / "configs" / f"{name}.json")
    assert cfg.num_hidden_layers == layers
    assert cfg.num_experts == experts
    assert cfg.experts_per_token == 4
    assert cfg.vocab_size == 201088
    assert cfg.hidden_size == 2880
    assert cfg.intermediate_size == 2880
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 8, 64)
    assert cfg.q_per_kv == 8
    assert cfg.sliding_window == 128
    assert [cfg.window(i) for i in range(layers)] == [128 if i % 2 == 0 else None for i in range(layers)]
    assert cfg.layer_types == tuple(SLIDING if i % 2 == 0 else FULL for i in range(layers))
    assert cfg.rope_scaling_factor == 32.0
    assert cfg.rope_beta_fast == 32.0 and cfg.rope_beta_slow == 1.0
    assert cfg.initial_context_length == 4096
    assert cfg.max_position_embeddings == 131072
    assert cfg.rope_theta == 150000.0
    assert cfg.swiglu_limit == 7.0 and cfg.rms_norm_eps == 1e-5


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_hf_and_original_layouts_agree(name):
    ref = REFERENCE / name
    if not (ref / "original" / "config.json").is_file():
        pytest.skip(f"{ref} not available")
    hf = ModelConfig.from_file(ref / "config.json")
    original = ModelConfig.from_file(ref / "original")  # a directory holding config.json
    assert hf == original
    assert hf == ModelConfig.from_file(ROOT / "configs" / f"{name}.json")
    # and to_original_config reproduces the published original config.json, value for value
    published = json.loads((ref / "original" / "config.json").read_text())
    assert hf.to_original_config() == published


def test_to_original_config_has_the_reference_keys_and_round_trips():
    from gpt_oss.torch.model import ModelConfig as ReferenceConfig

    cfg = ModelConfig.from_file(ROOT / "configs" / "gpt-oss-20b.json")
    original = cfg.to_original_config()
    reference_keys = {f.name for f in dataclasses.fields(ReferenceConfig)}
    assert len(original) == 16
    assert set(original) == reference_keys == set(ORIGINAL_KEYS)
    assert ModelConfig.from_original_config(original) == cfg
    assert ModelConfig.from_dict(original) == cfg
    ReferenceConfig(**original)  # the reference's own loader accepts it


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b", "tiny"])
def test_to_hf_config_round_trips(name, tmp_path):
    cfg = ModelConfig.from_file(preset_path(name))
    hf = cfg.to_hf_config()
    assert ModelConfig.from_hf_config(hf) == cfg
    assert ModelConfig.from_file(_write(tmp_path, hf)) == cfg  # through JSON text too
    # the published file, except the transformers version stamp
    published = _hf_dict(name)
    published.pop("transformers_version")
    assert hf == published
    assert "quantization_config" not in cfg.to_hf_config(mxfp4=False)


def test_tiny_preset_has_distinct_dims(tiny_config):
    c = tiny_config
    assert preset_path("tiny") == ROOT / "configs" / "tiny.json"
    dims = [c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size,
            c.num_experts, c.sliding_window, c.num_hidden_layers]
    assert len(set(dims)) == len(dims), dims
    assert c.hidden_size % 32 == 0 and c.intermediate_size % 32 == 0


def test_preset_path(tmp_path):
    assert preset_path("tiny").is_file()
    assert preset_path("gpt-oss-20b").name == "gpt-oss-20b.json"
    path = _write(tmp_path, _hf_dict())
    assert preset_path(tmp_path) == path  # a directory holding config.json
    assert preset_path(path) == path
    with pytest.raises(FileNotFoundError, match="no-such-preset"):
        preset_path("no-such-preset")


# ------------------------------------------------------------------ invalid configs


def _expect_error(tmp_path, cfg, *fragments):
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_file(_write(tmp_path, cfg))
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_heads_not_divisible_by_kv_heads(tmp_path):
    cfg = _hf_dict()
    cfg["num_key_value_heads"] = 6
    _expect_error(tmp_path, cfg, "num_attention_heads (64)", "num_key_value_heads (6)", "divisible")


def test_unknown_rope_type(tmp_path):
    cfg = _hf_dict()
    cfg["rope_scaling"]["rope_type"] = "linear"
    _expect_error(tmp_path, cfg, "'linear'", "yarn")


def test_layer_types_wrong_length(tmp_path):
    cfg = _hf_dict()
    cfg["layer_types"] = cfg["layer_types"][:-1]
    _expect_error(tmp_path, cfg, "layer_types", "23", "24")


def test_unknown_layer_type(tmp_path):
    cfg = _hf_dict()
    cfg["layer_types"][3] = "chunked_attention"
    _expect_error(tmp_path, cfg, "chunked_attention")


def test_experts_per_token_exceeds_num_experts(tmp_path):
    cfg = _hf_dict()
    cfg["num_experts_per_tok"] = cfg["experts_per_token"] = 33
    _expect_error(tmp_path, cfg, "experts_per_token (33)", "num_experts (32)")
    original = ModelConfig.from_file(ROOT / "configs" / "gpt-oss-20b.json").to_original_config()
    original["experts_per_token"] = 33
    _expect_error(tmp_path, original, "experts_per_token (33)")


def test_extra_key_in_original_config(tmp_path):
    original = ModelConfig.from_file(ROOT / "configs" / "gpt-oss-20b.json").to_original_config()
    original["rope_type"] = "yarn"
    _expect_error(tmp_path, original, "unknown keys", "rope_type")


def test_missing_required_key(tmp_path):
    cfg = _hf_dict()
    del cfg["hidden_size"]
    _expect_error(tmp_path, cfg, "missing", "hidden_size")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_file(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_file(tmp_path)  # a directory without config.json


def test_invalid_json(tmp_path):
    _expect_error(tmp_path, '{"num_hidden_layers": 24,', "invalid JSON")
    _expect_error(tmp_path, "[1, 2, 3]", "JSON object")
    _expect_error(tmp_path, {"foo": 1}, "not a gpt-oss config")


def test_direct_construction_validates():
    cfg = ModelConfig.from_file(ROOT / "configs" / "gpt-oss-20b.json")
    with pytest.raises(ConfigError, match="head_dim must be even"):
        dataclasses.replace(cfg, head_dim=63)
    with pytest.raises(ConfigError, match="sliding_window must be positive"):
        dataclasses.replace(cfg, sliding_window=0)
    with pytest.raises(ConfigError, match="beta_fast > beta_slow"):
        dataclasses.replace(cfg, rope_beta_fast=1.0, rope_beta_slow=32.0)
    assert dataclasses.replace(cfg, rope_scaling_factor=1.0).rope_scaling_factor == 1.0
