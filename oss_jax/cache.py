"""KV cache as an explicit pytree: full-attention layers keep `max_len` slots, sliding layers a ring of `window`.

Every slot remembers the position it holds (-1 = empty), so masks come from positions alone and a ring buffer
needs no bookkeeping beyond `slot = position % slots`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from oss_jax.config import ModelConfig
from oss_jax.sharding import constrain

# logical axes of the cache's arrays (mesh axes through `sharding.RULES`): rows on the token axes (`rows`), kv heads
# on `tensor` as the k and v projections' outputs are; a dimension a mesh axis does not divide stays whole there
KV_AXES = ("rows", "kv_heads", None, None)  # k, v [B, K, S, H]
POS_AXES = ("rows", None)  # pos [B, S]
NEW_AXES = ("rows", None, "kv_heads", None)  # the keys and values a write stores, k, v [B, T, K, H]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    # k, v [B, K, S, H]: the kv heads before the slots, as attention's batched products take them (slots first,
    # XLA:GPU transposed the whole cache in every decode step at batch > 1)
    k: jax.Array
    v: jax.Array
    pos: jax.Array  # [B, S] int32, -1 where empty

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerCache:
        """Store new keys/values k, v [B, T, K, H] at positions [B, T] (-1 = padding, not stored).

        A ring (S < context) keeps only each sequence's last S new positions, so no two writes share a slot.
        """
        slots = self.pos.shape[1]
        if positions.shape == (1, 1):
            return self._write_one(k, v, positions)
        newest = positions.max(axis=1, keepdims=True)
        keep = (positions >= 0) & (positions > newest - slots)
        slot = jnp.where(keep, positions % slots, slots)  # out of range: dropped

        # one row's scatters, vmapped: XLA sees the batch dimension, so a mesh that splits the rows writes each row
        # where it lives (indexed by row number as well, XLA gathered every row's keys, values and slots to every
        # device: ~30 collectives per decode step at batch 2 on data=2,expert=4)
        def put(cache: jax.Array, new: jax.Array, slot: jax.Array) -> jax.Array:  # cache [K, S, H], new [T, K, H]
            return cache.at[:, slot].set(new.swapaxes(0, 1).astype(cache.dtype), mode="drop")

        def put_pos(pos: jax.Array, new: jax.Array, slot: jax.Array) -> jax.Array:  # pos [S], new [T]
            return pos.at[slot].set(new, mode="drop")

        return LayerCache(k=jax.vmap(put)(self.k, k, slot), v=jax.vmap(put)(self.v, v, slot),
                          pos=jax.vmap(put_pos)(self.pos, positions, slot))

    def _write_one(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerCache:
        """`write` for one sequence's one new position (decode at batch 1): in-place updates of its slot, which keeps
        its old entry where the position is padding. (XLA:GPU compiles `write`'s scatter here into the same update
        plus a bounds check on the index, a read of the old entry and a select: for 20b, 77 more launches a step.)"""
        slot, keep = positions[0, 0] % self.pos.shape[1], positions[0, 0] >= 0

        def put(cache: jax.Array, new: jax.Array) -> jax.Array:
            start = (0, 0, slot, 0) if cache.ndim == 4 else (0, slot)  # k, v [B, K, S, H]; pos [B, S]
            old = jax.lax.dynamic_slice(cache, start, new.shape)
            return jax.lax.dynamic_update_slice(cache, jnp.where(keep, new.astype(cache.dtype), old), start)

        return LayerCache(put(self.k, k.transpose(0, 2, 1, 3)), put(self.v, v.transpose(0, 2, 1, 3)),
                          put(self.pos, positions))

    def truncate(self, length: int) -> LayerCache:
        """Forget every position >= `length` (a full layer can roll back this way; a ring cannot, as newer positions
        have overwritten the slots of older ones)."""
        return LayerCache(self.k, self.v, jnp.where(self.pos >= length, -1, self.pos))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Caches:
    """Every layer's cache: keys and values per layer, the positions once per slot count. Layers with as many slots
    write the same positions to the same slots (`LayerCache.write` depends on nothing else), so full layers share
    one [B, S] array and sliding layers another. (One per layer cost a launch per layer in every XLA:GPU decode
    step.) Indexing and iterating give each layer's `LayerCache`."""

    k: list[jax.Array]
    v: list[jax.Array]
    pos: list[jax.Array]  # one per slot count
    group: tuple[int, ...] = dataclasses.field(metadata={"static": True})  # layer -> its entry of `pos`

    @classmethod
    def of(cls, layers: Sequence[LayerCache]) -> Caches:
        """The layers' caches, each slot count's positions taken from its first layer (the others hold the same)."""
        first: dict[int, jax.Array] = {}  # slot count -> its positions
        for c in layers:
            first.setdefault(c.pos.shape[1], c.pos)
        slots = list(first)
        return cls([c.k for c in layers], [c.v for c in layers], list(first.values()),
                   tuple(slots.index(c.pos.shape[1]) for c in layers))

    def __len__(self) -> int:
        return len(self.k)

    def __getitem__(self, layer: int) -> LayerCache:
        return LayerCache(self.k[layer], self.v[layer], self.pos[self.group[layer]])

    def __iter__(self) -> Iterator[LayerCache]:
        return (self[i] for i in range(len(self)))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> Caches:
    """Empty caches for every layer: `max_len` slots on full layers, `sliding_window` on sliding ones."""
    caches = []
    for layer in range(cfg.num_hidden_layers):
        slots = slot_count(cfg, layer, max_len)
        shape = (batch, cfg.num_key_value_heads, slots, cfg.head_dim)
        caches.append(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                                 jnp.full((batch, slots), -1, jnp.int32)))
    return placed(Caches.of(caches))


def slot_count(cfg: ModelConfig, layer: int, max_len: int) -> int:
    """A layer's slots in a cache for `max_len` positions: all of them, or a sliding layer's window."""
    window = cfg.window(layer)
    return min(window, max_len) if window is not None else max_len


def placed(caches: Caches) -> Caches:
    """The caches on their shardings over the mesh in context (`jax.set_mesh`), in a jitted step or outside one;
    unchanged without a mesh. Every step returns them so, so each step compiles once: with the placement left to
    XLA, the prefill's caches came out sharded unlike a decode step's, and the second decode step compiled again."""
    return with_axes(caches, constrain)


def with_axes(caches: Caches, fn: Callable[[Any, tuple[str | None, ...]], Any]) -> Caches:
    """fn(array, its logical axes: KV_AXES or POS_AXES) applied to every array of the caches."""
    return dataclasses.replace(caches, k=[fn(a, KV_AXES) for a in caches.k], v=[fn(a, KV_AXES) for a in caches.v],
                               pos=[fn(a, POS_AXES) for a in caches.pos])


def cache_bytes(caches: Caches) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(caches))


def grow(cfg: ModelConfig, caches: Caches, max_len: int) -> Caches:
    """The same keys and values in caches of `max_len` slots (layers whose slot count does not change are kept).

    A layer that grows has held only positions below its slot count, each in slot `position % slots` = its own
    position, which stays its slot among more: the new slots are appended empty. (Zeros of the new size and a
    scatter of the old entries into them held the new cache twice.)"""
    # layer by layer, positions included: layers sharing positions may not after (a ring smaller than its window
    # grows to the window, a full layer to max_len); `Caches.of` groups them again
    layers = []
    for layer, old in enumerate(caches):
        extra = slot_count(cfg, layer, max_len) - old.pos.shape[1]
        if extra < 0:
            raise ValueError(f"grow: layer {layer} holds {old.pos.shape[1]} slots, more than the {max_len} asked for")
        kv = ((0, 0), (0, 0), (0, extra), (0, 0))  # k, v [B, K, S, H]
        layers.append(old if extra == 0 else LayerCache(jnp.pad(old.k, kv), jnp.pad(old.v, kv),
                                                        jnp.pad(old.pos, ((0, 0), (0, extra)), constant_values=-1)))
    return placed(Caches.of(layers))
