"""KV cache as an explicit pytree: full-attention layers keep `max_len` slots, sliding layers a ring of `window`.

Every slot remembers the position it holds (-1 = empty), so masks come from positions alone and a ring buffer
needs no bookkeeping beyond `slot = position % slots`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from oss_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    k: jax.Array  # [B, S, K, H]
    v: jax.Array  # [B, S, K, H]
    pos: jax.Array  # [B, S] int32, -1 where empty

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerCache:
        """Store new keys/values k, v [B, T, K, H] at positions [B, T] (-1 = padding, not stored).

        A ring (S < context) keeps only each sequence's last S new positions, so no two writes share a slot.
        """
        slots = self.pos.shape[1]
        newest = positions.max(axis=1, keepdims=True)
        keep = (positions >= 0) & (positions > newest - slots)
        slot = jnp.where(keep, positions % slots, slots)  # out of range: dropped
        b = jnp.broadcast_to(jnp.arange(positions.shape[0])[:, None], positions.shape)
        return LayerCache(
            k=self.k.at[b, slot].set(k.astype(self.k.dtype), mode="drop"),
            v=self.v.at[b, slot].set(v.astype(self.v.dtype), mode="drop"),
            pos=self.pos.at[b, slot].set(positions, mode="drop"),
        )

    def truncate(self, length: int) -> LayerCache:
        """Forget every position >= `length` (a full layer can roll back this way; a ring cannot, as newer positions
        have overwritten the slots of older ones)."""
        return LayerCache(self.k, self.v, jnp.where(self.pos >= length, -1, self.pos))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> list[LayerCache]:
    """Empty caches for every layer: `max_len` slots on full layers, `sliding_window` on sliding ones."""
    caches = []
    for layer in range(cfg.num_hidden_layers):
        window = cfg.window(layer)
        slots = min(window, max_len) if window is not None else max_len
        shape = (batch, slots, cfg.num_key_value_heads, cfg.head_dim)
        caches.append(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                                 jnp.full((batch, slots), -1, jnp.int32)))
    return caches


def cache_bytes(caches: list[LayerCache]) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(caches))


def grow(cfg: ModelConfig, caches: list[LayerCache], max_len: int) -> list[LayerCache]:
    """The same keys and values in caches of `max_len` slots (layers whose slot count does not change are kept)."""
    bigger = init_cache(cfg, caches[0].pos.shape[0], max_len, caches[0].k.dtype)
    return [old if new.pos.shape == old.pos.shape else new.write(old.k, old.v, old.pos)
            for old, new in zip(caches, bigger, strict=True)]
