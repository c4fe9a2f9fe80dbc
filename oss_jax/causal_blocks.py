"""Causal attention over blocks of queries and keys: a running softmax forward and a hand-written backward that
keep O(T) in memory (FlashAttention-2's recurrences, in plain JAX), for rows with no cache: training and full
forwards of full-attention layers.

`attend` scores every query against every key: [B, K, G, T, T] float32 scores, weights and their gradients, 4 GiB
each for one 4,096-token gpt-oss row. Here a block of queries meets only the key blocks up to its own (the rest are
later tokens, masked out), one [.., block, block] tile at a time, in one loop over the n(n+1)/2 tiles that updates
each query block's running max, denominator and sum of values in place. The backward goes over the same tiles,
recomputing each tile's weights from the saved log-sum-exp instead of keeping them, and adds into dQ, dK and dV.

The sink logit joins each query's denominator (it starts the running max and sum), so it is in the log-sum-exp;
its gradient is -sum over queries of p_sink * (dO . O).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from oss_jax.masks import attention_mask

BLOCK = 512  # queries and keys per tile: [B, K, G, 512, 512] float32 scores (64 MiB for gpt-oss's 64 heads)


def attend_causal(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, positions: jax.Array,
                  segments: jax.Array | None, scale: float, block: int = BLOCK) -> jax.Array:
    """`attend` for T queries against their own T keys (no cache), causal, without a window.

    q [B,T,K,G,H], k/v [B,K,T,H], sinks [K,G], positions [B,T] (-1 = padding), segments [B,T] or None (packed
    sequences see only their own) -> [B,T,K,G,H] float32. A row's positions rise by one from token to token (as
    `Attention` requires): a key after a query's own token is never visible to it, so those tiles are skipped.
    Tiles hold at most `block` queries (and keys): T splits into ceil(T / block) equal blocks, the last padded.
    """
    t = positions.shape[1]
    block = -(-t // -(-t // block))  # e.g. 513 tokens: two blocks of 257, not two of 512
    pad = -t % block
    segments = jnp.zeros_like(positions) if segments is None else segments
    q_t = jnp.pad(q.transpose(0, 2, 3, 1, 4), ((0, 0),) * 3 + ((0, pad), (0, 0)))  # [B, K, G, T', H]
    k, v = (jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0))) for a in (k, v))
    positions = jnp.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
    segments = jnp.pad(segments, ((0, 0), (0, pad)), constant_values=-1)
    out = _attend(q_t, k, v, sinks.astype(jnp.float32), positions, segments, scale, block)
    return out[:, :, :, :t].transpose(0, 3, 1, 2, 4)


def _tile_scores(q_i, k_j, pos_i, pos_j, seg_i, seg_j, scale):
    """q_i [B,K,G,Q,H], k_j [B,K,S,H] (Q = S = block) -> scores [B,K,G,Q,S] float32, -inf where masked; the mask."""
    mask = attention_mask(pos_i, pos_j, None, seg_i, seg_j)
    scores = jnp.einsum("BKGQH,BKSH->BKGQS", q_i, k_j, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask[:, None, None], scores, -jnp.inf), mask


def _slice(a: jax.Array, i: jax.Array, block: int, axis: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(a, i * block, block, axis)


def _tiles(n: int) -> tuple[jax.Array, jax.Array]:
    """The query block i and key block j of each tile at or below the diagonal (j <= i), n blocks: [n(n+1)/2] each.
    One loop over them has a trip count known when compiling (XLA:GPU waits on the host at every step of a loop
    whose count is data, as a nested loop over j <= i would be)."""
    i, j = np.tril_indices(n)
    return jnp.asarray(i, jnp.int32), jnp.asarray(j, jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attend(q_t, k, v, sinks, positions, segments, scale, block):
    return _forward(q_t, k, v, sinks, positions, segments, scale, block)[0]


def _forward(q_t, k, v, sinks, positions, segments, scale, block):
    """-> out [B,K,G,T,H] float32 and each query's log-sum-exp (sink included) [B,K,G,T]."""
    tile_i, tile_j = _tiles(positions.shape[1] // block)

    def tile(t, carry):
        """Tile (i, j): query block i's running max, denominator and weighted sum of values updated in place."""
        top, denominator, out = carry
        i, j = tile_i[t], tile_j[t]
        scores, _ = _tile_scores(_slice(q_t, i, block, 3), _slice(k, j, block, 2), _slice(positions, i, block, 1),
                                 _slice(positions, j, block, 1), _slice(segments, i, block, 1),
                                 _slice(segments, j, block, 1), scale)
        top_i = _slice(top, i, block, 3)
        new_top = jnp.maximum(top_i, jnp.max(scores, axis=-1, keepdims=True))
        rescale = jnp.exp(top_i - new_top)
        weights = jnp.exp(scores - new_top)
        mixed = jnp.einsum("BKGQS,BKSH->BKGQH", weights.astype(v.dtype), _slice(v, j, block, 2),
                           preferred_element_type=jnp.float32)
        denominator_i = _slice(denominator, i, block, 3) * rescale + jnp.sum(weights, -1, keepdims=True)
        out_i = _slice(out, i, block, 3) * rescale + mixed
        return tuple(jax.lax.dynamic_update_slice_in_dim(a, a_i, i * block, 3)
                     for a, a_i in ((top, new_top), (denominator, denominator_i), (out, out_i)))

    rows = q_t.shape[:4] + (1,)
    # the running max starts at the sink logit, whose weight exp(sink - max) = 1 starts the denominator
    start = (jnp.broadcast_to(sinks[None, :, :, None, None], rows), jnp.ones(rows, jnp.float32),
             jnp.zeros(q_t.shape, jnp.float32))
    top, denominator, out = jax.lax.fori_loop(0, tile_i.shape[0], tile, start)
    return out / denominator, (top + jnp.log(denominator))[..., 0]


def _attend_fwd(q_t, k, v, sinks, positions, segments, scale, block):
    out, lse = _forward(q_t, k, v, sinks, positions, segments, scale, block)
    return out, (q_t, k, v, sinks, positions, segments, out, lse)


def _attend_bwd(scale, block, res, d_out):
    """Tile by tile, its weights p = exp(s - lse) again, then dV += p^T dO, dS = p (dO V^T - D) with
    D = rowsum(dO O), dQ += dS K, dK += dS^T Q (both times the scale)."""
    q_t, k, v, sinks, positions, segments, out, lse = res
    tile_i, tile_j = _tiles(positions.shape[1] // block)
    d_rows = jnp.sum(d_out * out, axis=-1)  # D [B, K, G, T]
    d_sinks = -jnp.sum(jnp.exp(sinks[None, :, :, None] - lse) * d_rows, axis=(0, 3))

    def tile(t, carry):
        d_q, d_k, d_v = carry
        i, j = tile_i[t], tile_j[t]
        q_i, k_j, v_j = _slice(q_t, i, block, 3), _slice(k, j, block, 2), _slice(v, j, block, 2)
        scores, mask = _tile_scores(q_i, k_j, _slice(positions, i, block, 1), _slice(positions, j, block, 1),
                                    _slice(segments, i, block, 1), _slice(segments, j, block, 1), scale)
        p = jnp.where(mask[:, None, None], jnp.exp(scores - _slice(lse, i, block, 3)[..., None]), 0.0)
        do_i = _slice(d_out, i, block, 3)
        dp = jnp.einsum("BKGQH,BKSH->BKGQS", do_i, v_j.astype(jnp.float32), preferred_element_type=jnp.float32)
        ds = p * (dp - _slice(d_rows, i, block, 3)[..., None]) * scale
        updates = ((d_q, i, 3, jnp.einsum("BKGQS,BKSH->BKGQH", ds, k_j.astype(jnp.float32))),
                   (d_k, j, 2, jnp.einsum("BKGQS,BKGQH->BKSH", ds, q_i.astype(jnp.float32))),
                   (d_v, j, 2, jnp.einsum("BKGQS,BKGQH->BKSH", p, do_i)))
        return tuple(jax.lax.dynamic_update_slice_in_dim(a, _slice(a, at, block, axis) + delta, at * block, axis)
                     for a, at, axis, delta in updates)

    start = (jnp.zeros(q_t.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    d_q, d_k, d_v = jax.lax.fori_loop(0, tile_i.shape[0], tile, start)
    return (d_q.astype(q_t.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_sinks.astype(sinks.dtype), None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)
