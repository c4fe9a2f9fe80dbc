"""MXFP4 codec: uint8 blocks [..., G, 16] + uint8 scales [..., G] <-> values [..., G*32].

Each group of 32 consecutive values shares one E8M0 scale 2^(s-127); value j of a group is byte j//2,
low nibble for even j. Nibble codes 0-7 are +{0, .5, 1, 1.5, 2, 3, 4, 6}, 8-15 the same negated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

GROUP = 32
BYTES_PER_GROUP = 16
SCALE_BIAS = 127
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
MAX_FP4 = 6.0


def unpack_nibbles(blocks: np.ndarray) -> np.ndarray:
    """uint8 [..., G, 16] -> fp4 codes uint8 [..., G*32], in element order."""
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1)
    return codes.reshape(*blocks.shape[:-2], blocks.shape[-2] * GROUP)


def decode(blocks: np.ndarray, scales: np.ndarray, dtype: np.dtype = np.float32) -> np.ndarray:
    """Exact dequantisation: blocks uint8 [..., G, 16], scales uint8 [..., G] -> [..., G*32]."""
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BYTES_PER_GROUP or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 shapes do not match: blocks {blocks.shape}, scales {scales.shape}")
    values = FP4_VALUES[unpack_nibbles(blocks)].reshape(*scales.shape, GROUP)
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - SCALE_BIAS)
    return values.reshape(*scales.shape[:-1], scales.shape[-1] * GROUP).astype(dtype)


def encode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantise [..., IN] (IN a multiple of 32) to (blocks [..., IN/32, 16], scales [..., IN/32]).

    The scale of a group is the smallest power of two that brings its largest magnitude within 6, and each
    value rounds to the nearest fp4 value (ties to the even code); values already on that grid round-trip
    exactly.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.shape[-1] % GROUP:
        raise ValueError(f"last dimension {values.shape[-1]} is not a multiple of {GROUP}")
    if not np.all(np.isfinite(values)):
        raise ValueError("cannot MXFP4-encode non-finite values")
    groups = values.reshape(*values.shape[:-1], values.shape[-1] // GROUP, GROUP)
    amax = np.abs(groups).max(axis=-1)
    _, exp = np.frexp(np.where(amax > 0, amax / MAX_FP4, 1.0).astype(np.float64))
    # frexp gives m * 2^exp with m in [0.5, 1); an exact power of two needs one less
    exact = np.where(amax > 0, np.ldexp(0.5, exp) == amax / MAX_FP4, False)
    exp = np.where(amax > 0, exp - exact, -SCALE_BIAS)
    exp = np.maximum(exp, -SCALE_BIAS)
    scaled = np.ldexp(groups, -exp[..., None].astype(np.int32))
    codes = _nearest_code(scaled)
    top = exp >= 126  # only these scales can round up past float32's range
    with np.errstate(over="ignore"):
        overflow = np.any(top) and not np.all(np.isfinite(np.ldexp(FP4_VALUES[codes[top]], exp[top][:, None])))
    if overflow:
        raise ValueError(f"values up to {np.abs(values).max():.3g} exceed the MXFP4 range")
    lo, hi = codes[..., 0::2], codes[..., 1::2]
    blocks = (lo | (hi << 4)).astype(np.uint8)
    return blocks, (exp + SCALE_BIAS).astype(np.uint8)


def _nearest_code(x: np.ndarray) -> np.ndarray:
    """Nearest fp4 code for each value of x (|x| <= 6), ties to the even code."""
    grid = FP4_VALUES[:8]
    mag = np.abs(x)
    idx = np.searchsorted(grid, mag).clip(1, 7)
    below, above = grid[idx - 1], grid[idx]
    pick_above = (mag - below > above - mag) | ((mag - below == above - mag) & (idx % 2 == 0))
    code = np.where(pick_above, idx, idx - 1).astype(np.uint8)
    return np.where((x < 0) & (code > 0), code | 8, code).astype(np.uint8)


def decode_jax(blocks: jax.Array, scales: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """decode() traced in JAX (for device-side dequantisation): [..., G, 16] u8, [..., G] u8 -> [..., G*32]."""
    codes = jnp.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*scales.shape, GROUP)
    values = jnp.asarray(FP4_VALUES)[codes]
    values = jnp.ldexp(values, scales.astype(jnp.int32)[..., None] - SCALE_BIAS)
    return values.reshape(*scales.shape[:-1], scales.shape[-1] * GROUP).astype(dtype)
