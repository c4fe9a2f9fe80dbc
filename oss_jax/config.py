"""Model configuration: one frozen dataclass, read from a checkpoint's own config.json (HF or original)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"

# The 16 keys of OpenAI's gpt_oss.torch ModelConfig; its loader rejects any other key.
ORIGINAL_KEYS = (
    "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
    "intermediate_size", "swiglu_limit", "head_dim", "num_attention_heads", "num_key_value_heads",
    "sliding_window", "initial_context_length", "rope_theta", "rope_scaling_factor",
    "rope_ntk_alpha", "rope_ntk_beta",
)


class ConfigError(ValueError):
    """A config.json that does not describe a valid gpt-oss model."""


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything the forward pass needs; nothing is hard-coded to the released sizes."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    intermediate_size: int
    vocab_size: int
    sliding_window: int
    layer_types: tuple[str, ...]
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0  # 1.0 = plain RoPE, no YaRN
    rope_beta_fast: float = 32.0  # original layout: rope_ntk_beta
    rope_beta_slow: float = 1.0  # original layout: rope_ntk_alpha
    initial_context_length: int = 4096
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5
    eos_token_id: int = 200002
    pad_token_id: int = 199999
    router_aux_loss_coef: float = 0.9

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def q_per_kv(self) -> int:
        """G: query heads sharing one kv head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def max_position_embeddings(self) -> int:
        return int(self.initial_context_length * self.rope_scaling_factor)

    def window(self, layer: int) -> int | None:
        """Keys visible to a query on this layer (including itself), or None for full causal attention."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    # ----- HF layout -----
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        _require(cfg, ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                       "num_local_experts", "intermediate_size", "vocab_size", "sliding_window"), "HF")
        n_layers = int(cfg["num_hidden_layers"])
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("yarn", "default"):
            raise ConfigError(f"unsupported rope scaling type {rope_type!r} (gpt-oss uses 'yarn')")
        if rope.get("truncate", False):
            raise ConfigError("rope_scaling.truncate=true is not what gpt-oss computes (expected false)")
        yarn = rope_type == "yarn"
        theta = rope.get("rope_theta", cfg.get("rope_theta", 150000.0))
        layer_types = cfg.get("layer_types") or [SLIDING if i % 2 == 0 else FULL for i in range(n_layers)]
        return cls(
            num_hidden_layers=n_layers,
            hidden_size=int(cfg["hidden_size"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            num_key_value_heads=int(cfg["num_key_value_heads"]),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]),
            num_experts=int(cfg["num_local_experts"]),
            experts_per_token=int(cfg.get("num_experts_per_tok", cfg.get("experts_per_token", 4))),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            sliding_window=int(cfg["sliding_window"]),
            layer_types=tuple(layer_types),
            rope_theta=float(theta),
            rope_scaling_factor=float(rope.get("factor", 1.0)) if yarn else 1.0,
            rope_beta_fast=float(rope.get("beta_fast", 32.0)),
            rope_beta_slow=float(rope.get("beta_slow", 1.0)),
            initial_context_length=int(rope.get("original_max_position_embeddings",
                                                cfg.get("initial_context_length", 4096))),
            swiglu_limit=float(cfg.get("swiglu_limit", 7.0)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            eos_token_id=_first_int(cfg.get("eos_token_id", 200002)),
            pad_token_id=_first_int(cfg.get("pad_token_id", 199999)),
            router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.9)),
        )

    def to_hf_config(self, *, mxfp4: bool = True) -> dict[str, Any]:
        """config.json as the Hub publishes it (with the MXFP4 quantization block when experts are packed)."""
        if self.swiglu_alpha != 1.702:
            raise ConfigError("the HF layout cannot express swiglu_alpha != 1.702")
        cfg: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": self.eos_token_id,
            "experts_per_token": self.experts_per_token,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.initial_context_length,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "gpt_oss",
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.experts_per_token,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_experts,
            "output_router_logits": False,
            "pad_token_id": self.pad_token_id,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {
                "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow,
                "factor": self.rope_scaling_factor,
                "original_max_position_embeddings": self.initial_context_length,
                "rope_type": "yarn",
                "truncate": False,
            },
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }
        if mxfp4:
            cfg["quantization_config"] = {
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
                "quant_method": "mxfp4",
            }
        return cfg

    # ----- original (OpenAI) layout -----
    @classmethod
    def from_original_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        unknown = sorted(set(cfg) - set(ORIGINAL_KEYS))
        if unknown:
            raise ConfigError(f"unknown keys in an original-layout config: {unknown}")
        _require(cfg, ("num_hidden_layers", "num_experts", "hidden_size", "vocab_size"), "original")
        n_layers = int(cfg["num_hidden_layers"])
        return cls(
            num_hidden_layers=n_layers,
            hidden_size=int(cfg["hidden_size"]),
            num_attention_heads=int(cfg.get("num_attention_heads", 64)),
            num_key_value_heads=int(cfg.get("num_key_value_heads", 8)),
            head_dim=int(cfg.get("head_dim", 64)),
            num_experts=int(cfg["num_experts"]),
            experts_per_token=int(cfg.get("experts_per_token", 4)),
            intermediate_size=int(cfg.get("intermediate_size", 2880)),
            vocab_size=int(cfg["vocab_size"]),
            sliding_window=int(cfg.get("sliding_window", 128)),
            # the reference slides on even layers, always
            layer_types=tuple(SLIDING if i % 2 == 0 else FULL for i in range(n_layers)),
            rope_theta=float(cfg.get("rope_theta", 150000.0)),
            rope_scaling_factor=float(cfg.get("rope_scaling_factor", 32.0)),
            rope_beta_fast=float(cfg.get("rope_ntk_beta", 32.0)),
            rope_beta_slow=float(cfg.get("rope_ntk_alpha", 1.0)),
            initial_context_length=int(cfg.get("initial_context_length", 4096)),
            swiglu_limit=float(cfg.get("swiglu_limit", 7.0)),
        )

    def to_original_config(self) -> dict[str, Any]:
        """The 16-key config.json that gpt_oss.torch loads."""
        expected = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
        if self.layer_types != expected:
            raise ConfigError("the original layout requires sliding attention on exactly the even layers")
        if self.rms_norm_eps != 1e-5 or self.swiglu_alpha != 1.702:
            raise ConfigError("the original layout hard-codes rms_norm_eps=1e-5 and swiglu_alpha=1.702")
        return {
            "num_hidden_layers": self.num_hidden_layers, "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit, "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window, "initial_context_length": self.initial_context_length,
            "rope_theta": self.rope_theta, "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_beta_slow, "rope_ntk_beta": self.rope_beta_fast,
        }

    # ----- files -----
    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Either layout's config.json, told apart by its keys."""
        if "num_local_experts" in cfg or "model_type" in cfg:
            return cls.from_hf_config(cfg)
        if "num_experts" in cfg:
            return cls.from_original_config(cfg)
        raise ConfigError("not a gpt-oss config: neither 'num_local_experts' (HF) nor 'num_experts' (original)")

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read a config.json (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(cfg)
        except (ConfigError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: {e}") from None


def _first_int(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _require(cfg: dict[str, Any], keys: tuple[str, ...], layout: str) -> None:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ConfigError(f"{layout}-layout config is missing {missing}")


def _validate(c: ModelConfig) -> None:
    positive = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "num_experts", "experts_per_token", "intermediate_size", "vocab_size", "sliding_window")
    for name in positive:
        if getattr(c, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(c, name)}")
    if c.num_attention_heads % c.num_key_value_heads:
        raise ConfigError(f"num_attention_heads ({c.num_attention_heads}) is not divisible by "
                          f"num_key_value_heads ({c.num_key_value_heads})")
    if c.head_dim % 2:
        raise ConfigError(f"head_dim must be even for RoPE, got {c.head_dim}")
    if c.experts_per_token > c.num_experts:
        raise ConfigError(f"experts_per_token ({c.experts_per_token}) exceeds num_experts ({c.num_experts})")
    if len(c.layer_types) != c.num_hidden_layers:
        raise ConfigError(f"layer_types has {len(c.layer_types)} entries for {c.num_hidden_layers} layers")
    bad = sorted(set(c.layer_types) - {SLIDING, FULL})
    if bad:
        raise ConfigError(f"unknown layer types {bad}; expected {SLIDING!r} or {FULL!r}")
    for name in ("eos_token_id", "pad_token_id"):
        if not 0 <= getattr(c, name) < c.vocab_size:
            raise ConfigError(f"{name} {getattr(c, name)} is outside the vocabulary (size {c.vocab_size})")
    if c.rope_scaling_factor < 1.0:
        raise ConfigError(f"rope scaling factor must be >= 1, got {c.rope_scaling_factor}")
    if c.rope_scaling_factor > 1.0 and not c.rope_beta_fast > c.rope_beta_slow > 0:
        raise ConfigError(f"YaRN needs beta_fast > beta_slow > 0, got {c.rope_beta_fast}, {c.rope_beta_slow}")
    if not (c.rope_theta > 1.0 and math.isfinite(c.rope_theta)):
        raise ConfigError(f"rope_theta must be > 1, got {c.rope_theta}")
