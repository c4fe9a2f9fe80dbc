"""Random gpt-oss checkpoints of any config, in the published layouts, for tests, demos and benchmarks.

Weights are scaled by fan-in so that activations and logits spread over several units at any width
(at the usual 0.02 init every logit is ~0 and a parity check proves little). Expert weights are random
MXFP4 bytes, so every layout and every implementation sees exactly the same values.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from convert import layouts
from convert.layouts import HF
from convert.writer import MAX_SHARD_BYTES, write_checkpoint
from oss_jax import mxfp4
from oss_jax.config import ModelConfig

FP4_STD = float(np.sqrt(np.mean(mxfp4.FP4_VALUES ** 2)))

# Output std of each weight kind per unit input (weight std = gain / sqrt(fan_in)).
GAINS = {"q_proj": 1.0, "k_proj": 1.0, "v_proj": 1.0, "o_proj": 1.0, "router.weight": 2.0, "gate_up_proj": 4.0,
         "down_proj": 0.5, "lm_head": 3.0}
BIAS_STD = 0.1


def _std(name: str, shape: tuple[int, ...], cfg: ModelConfig) -> float:
    if name.endswith("embed_tokens.weight"):
        return 1.0
    if name.endswith("sinks"):
        return 1.0
    if "bias" in name:
        return BIAS_STD
    for key, gain in GAINS.items():
        if key in name:
            fan_in = cfg.intermediate_size if "down_proj" in key else cfg.hidden_size
            if key == "o_proj":
                fan_in = cfg.num_attention_heads * cfg.head_dim
            return gain / math.sqrt(fan_in)
    raise KeyError(name)


def random_hf_tensors(cfg: ModelConfig, seed: int = 0, *, packed: bool = True) -> dict[str, np.ndarray]:
    """Every HF tensor of `cfg`, random, in the published dtypes (bf16, MXFP4 uint8 experts)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (dtype, shape) in sorted(layouts.hf_tensors(cfg, packed=True).items()):
        if name.endswith("_blocks"):
            out[name] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        elif name.endswith("_scales"):
            std = _std(name.removesuffix("_scales"), shape, cfg)
            center = 127 + round(math.log2(std / FP4_STD))
            out[name] = rng.integers(center - 1, center + 2, size=shape, dtype=np.uint8)
        elif name.endswith(("norm.weight", "layernorm.weight")):
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape, np.float32)).astype(dtype)
        else:
            out[name] = (_std(name, shape, cfg) * rng.standard_normal(shape, np.float32)).astype(dtype)
    if not packed:
        out = _dequantize_experts(out)
    return out


def _dequantize_experts(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Experts as `save_pretrained` writes them: gate_up_proj [E, D, 2F], down_proj [E, F, D] in bf16."""
    out = {}
    for name, t in hf.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            w = mxfp4.decode(t, hf[base + "_scales"]).transpose(0, 2, 1)
            out[base] = np.ascontiguousarray(w).astype(layouts.BF16)
        else:
            out[name] = t
    return out


def make_checkpoint(cfg: ModelConfig, dst: str | Path, *, layout: str = HF, seed: int = 0, packed: bool = True,
                    max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Write a random checkpoint of `cfg` to `dst` in `layout` ('hf' or 'original')."""
    hf = random_hf_tensors(cfg, seed, packed=packed)
    return write_checkpoint(dst, cfg, hf, layout=layout, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
