"""Random gpt-oss checkpoints of any config, in the published layouts, for tests, demos and benchmarks.

Weights are scaled by fan-in so that activations and logits spread over several units at any width
(at the usual 0.02 init every logit is ~0 and a parity check proves little). Expert weights are random
MXFP4 bytes, so every layout and every implementation sees exactly the same values.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from convert import layouts
from convert.layouts import HF
from convert.writer import MAX_SHARD_BYTES, write_checkpoint
from oss_jax import mxfp4
from oss_jax.config import ModelConfig
from oss_jax.tokenizer import VOCAB_SIZE, write_tokenizer_files

FP4_STD = float(np.sqrt(np.mean(mxfp4.FP4_VALUES ** 2)))

# Output std of each weight kind per unit input (weight std = gain / sqrt(fan_in)).
GAINS = {"q_proj": 1.0, "k_proj": 1.0, "v_proj": 1.0, "o_proj": 1.0, "router.weight": 2.0, "gate_up_proj": 4.0,
         "down_proj": 0.5, "lm_head": 3.0}
BIAS_STD = 0.1


def _std(name: str, cfg: ModelConfig) -> float:
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


class RandomTensors(Mapping):
    """Every HF tensor of `cfg`, random in the published dtypes, generated on access (seeded per tensor name)."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, *, packed: bool = True):
        self.cfg, self.seed, self.packed = cfg, seed, packed
        self.specs = layouts.hf_tensors(cfg, packed=packed)
        self.packed_specs = layouts.hf_tensors(cfg, packed=True)  # dequantized experts derive from these

    def __iter__(self):
        return iter(sorted(self.specs))

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.specs:
            raise KeyError(name)
        if not self.packed and name.endswith(("gate_up_proj", "down_proj")):
            blocks, scales = self._packed(name + "_blocks"), self._packed(name + "_scales")
            w = mxfp4.decode(blocks, scales).transpose(0, 2, 1)  # as save_pretrained writes: [E, in, out]
            return np.ascontiguousarray(w).astype(layouts.BF16)
        return self._packed(name)

    def _packed(self, name: str) -> np.ndarray:
        dtype, shape = self.packed_specs[name]
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        if name.endswith("_blocks"):
            return rng.integers(0, 256, size=shape, dtype=np.uint8)
        if name.endswith("_scales"):
            center = 127 + round(math.log2(_std(name.removesuffix("_scales"), self.cfg) / FP4_STD))
            return rng.integers(center - 1, center + 2, size=shape, dtype=np.uint8)
        if name.endswith(("norm.weight", "layernorm.weight")):
            return (1.0 + 0.1 * rng.standard_normal(shape, np.float32)).astype(dtype)
        return (_std(name, self.cfg) * rng.standard_normal(shape, np.float32)).astype(dtype)


def random_hf_tensors(cfg: ModelConfig, seed: int = 0, *, packed: bool = True) -> dict[str, np.ndarray]:
    """All of RandomTensors in memory (small configs)."""
    return dict(RandomTensors(cfg, seed, packed=packed))


def make_checkpoint(cfg: ModelConfig, dst: str | Path, *, layout: str = HF, seed: int = 0, packed: bool = True,
                    max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False, progress: bool = False) -> Path:
    """Write a random checkpoint of `cfg` to `dst` in `layout` ('hf' or 'original'); HF + real vocab: with tokenizer."""
    out = write_checkpoint(dst, cfg, RandomTensors(cfg, seed, packed=packed), layout=layout,
                           max_shard_bytes=max_shard_bytes, overwrite=overwrite, progress=progress)
    if layout == HF and cfg.vocab_size == VOCAB_SIZE:
        write_tokenizer_files(out)
    return out
