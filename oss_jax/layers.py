"""Norm, rotary embedding (YaRN) and attention with sinks.

Dimension letters used in every einsum and shape note of this package:
  B batch, T query length, S key length, D model width, N query heads, K kv heads,
  G query heads per kv head (N = K * G), H head dim, E experts, F expert width, V vocab,
  X flattened tokens (B * T), A token-expert assignments (X * experts_per_token), C blocks of queries (banded
  attention).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oss_jax import causal_blocks, packed, rowkernel
from oss_jax.cache import NEW_AXES, LayerCache
from oss_jax.causal_blocks import attend_causal
from oss_jax.config import ModelConfig
from oss_jax.masks import attention_mask
from oss_jax.params import param
from oss_jax.sharding import constrain

# ------------------------------------------------------------------ RMSNorm


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """[..., D] -> [..., D] float32; the gain multiplies directly (no +1)."""
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * scale.astype(jnp.float32)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.eps = cfg.rms_norm_eps
        self.scale = param(rngs, (cfg.hidden_size,), ("embed",), jnp.float32, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


# ------------------------------------------------------------------ YaRN RoPE


def yarn_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies [H/2] (float32) and the YaRN concentration multiplying cos and sin."""
    h, base, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor
    # the references' float32 pow, correctly rounded: numpy's own float32 pow is not on every CPU (its AVX-512
    # kernels are off by up to 2 ulp), so the frequencies would depend on the machine
    exponent = np.arange(0, h, 2, dtype=np.float32) / np.float32(h)
    freq = (np.float64(np.float32(base)) ** exponent.astype(np.float64)).astype(np.float32)
    if factor <= 1.0:
        return (1.0 / freq).astype(np.float32), 1.0
    d_half = h / 2
    ctx = cfg.initial_context_length
    # YaRN correction dims, unrounded (both references use them so)
    low = d_half * math.log(ctx / (cfg.rope_beta_fast * 2 * math.pi)) / math.log(base)
    high = d_half * math.log(ctx / (cfg.rope_beta_slow * 2 * math.pi)) / math.log(base)
    ramp = np.clip((np.arange(d_half, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1 = original frequency (extrapolation), 0 = divided by factor
    inv_freq = (1.0 / (factor * freq)) * (1.0 - keep) + (1.0 / freq) * keep
    return inv_freq.astype(np.float32), 0.1 * math.log(factor) + 1.0


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] -> cos, sin [B, T, H/2] float32, concentration applied."""
    inv_freq, concentration = yarn_inv_freq(cfg)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * concentration, jnp.sin(angles) * concentration


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, ..., H] rotated by half-split pairs (dim i with dim i + H/2); cos/sin [B, T, H/2]."""
    extra = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# ------------------------------------------------------------------ attention


def attend(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """q [B,T,K,G,H], k/v [B,K,S,H], sinks [K,G], mask [B,T,S] -> [B,T,K,G,H] float32.

    The sink logit joins the softmax's denominator only (one more column whose output is dropped).
    """
    scores = jnp.where(mask[:, None, None], _scores(q.transpose(0, 2, 3, 1, 4), k, scale), -jnp.inf)
    sink = sinks.astype(jnp.float32)[None, :, :, None, None]
    # the shift cancels in the ratio (so no gradient through it) and is finite: the sink is always there
    top = jax.lax.stop_gradient(jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink))
    weights = jnp.exp(scores - top)
    denominator = jnp.sum(weights, axis=-1, keepdims=True) + jnp.exp(sink - top)
    # normalised after the product with the values: one pass less over the [.., T, S] weights than a softmax
    return (_mix(weights, v) / denominator).transpose(0, 3, 1, 2, 4)


# The two products take operands transposed to [B, K, ...] by hand: XLA:CPU's own layout for these batched dots ran
# 2.4-3.5x slower (prefill, 512 queries x 640 keys: scores 185 -> 53 ms, probs x values 84 -> 35 ms).
def _scores(q_t: jax.Array, k: jax.Array, scale: float) -> jax.Array:
    """q_t [B,K,G,T,H], k [B,K,S,H] -> scaled scores [B,K,G,T,S] float32."""
    return jnp.einsum("BKGTH,BKHS->BKGTS", q_t, k.transpose(0, 1, 3, 2), preferred_element_type=jnp.float32) * scale


def _mix(weights: jax.Array, v: jax.Array) -> jax.Array:
    """weights [B,K,G,T,S], v [B,K,S,H] -> [B,K,G,T,H] float32."""
    return jnp.einsum("BKGTS,BKSH->BKGTH", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)


def attend_banded(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                  window: int, scale: float, segments: jax.Array | None = None) -> jax.Array:
    """`attend` for a sliding layer, scoring only the keys a query can see: the same result with T x 1.5W scores
    instead of T x S (a 512-token prompt chunk after a 128-slot ring: 192 keys a query instead of 640).

    q [B,T,K,G,H]; k/v [B,K,S,H] and k_pos [B,S] hold P <= W earlier keys (a ring: the positions just before the
    queries', in any slot order) then the T queries' own, in order; `segments` [B, T] (P = 0). Every key a query may
    see must be among the W keys before its own once the ring is in position order (consecutive positions in a row,
    as prompts and packed sequences are). -> [B,T,K,G,H] float32.

    Queries go in C blocks of Q = W/2 (W when odd); a block scores the W keys before it and its own Q. (Blocks of
    W, scoring 2W keys: 1.3-1.5x slower on the Xeon, forward and backward.)
    """
    b, t, kh, g, h = q.shape
    w, p = window, k_pos.shape[1] - t
    if p > w:
        raise ValueError(f"attend_banded: {p} keys before the queries, more than the window of {w} (a ring has at most "
                         "`window` slots)")
    if p:
        # the ring in position order (its slots are position mod P): then the W keys before a query end at its own
        order = jnp.argsort(k_pos[:, :p], axis=1)  # empty slots (-1) first
        k, v = (jnp.concatenate([jnp.take_along_axis(a[:, :, :p], order[:, None, :, None], axis=2), a[:, :, p:]],
                                axis=2) for a in (k, v))
        k_pos = jnp.concatenate([jnp.take_along_axis(k_pos[:, :p], order, axis=1), k_pos[:, p:]], axis=1)
    qb = w // 2 if w % 2 == 0 else w
    c, shifts = -(-t // qb), w // qb
    tail = c * qb - t

    def band(a: jax.Array, axis: int, fill) -> jax.Array:
        """[.., S, ..] -> [.., C, W + Q, ..]: W earlier slots (padded with `fill`), then block by block."""
        pad = [(0, 0)] * a.ndim
        pad[axis] = (w - p, tail)
        a = jnp.pad(a, pad, constant_values=fill)
        a = a.reshape(a.shape[:axis] + (c + shifts, qb) + a.shape[axis + 1:])
        lead = (slice(None),) * axis
        return jnp.concatenate([a[lead + (slice(i, c + i),)] for i in range(shifts + 1)], axis=axis + 1)

    def blocks(a: jax.Array, fill) -> jax.Array:
        """[B, T, ..] -> [B * C, Q, ..] (each block a row of its own), the tail padded with `fill`."""
        a = jnp.pad(a, [(0, 0), (0, tail)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
        return a.reshape(b * c, qb, *a.shape[2:])

    def key_rows(a: jax.Array, fill) -> jax.Array:
        """[B, S] -> [B * C, W + Q]: what each block's keys hold."""
        return band(a, 1, fill).reshape(b * c, w + qb)

    keys, values = (band(a, 2, 0).swapaxes(1, 2).reshape(b * c, kh, w + qb, h) for a in (k, v))  # [B*C, K, W+Q, H]
    seg = () if segments is None else (blocks(segments, -1), key_rows(segments, -2))
    mask = attention_mask(blocks(q_pos, -1), key_rows(k_pos, -1), w, *seg)
    out = attend(blocks(q, 0), keys, values, sinks, mask, scale)
    return out.reshape(b, c * qb, kh, g, h)[:, :t]


def attend_then_write(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, positions: jax.Array,
                      cache: LayerCache, window: int | None, scale: float) -> tuple[jax.Array, LayerCache]:
    """One new token per row (decode on CPU): it attends to the cache as it was (strictly earlier positions; the
    slot it overwrites is left out) plus its own key, then is written. The same result as writing first.

    q [B,1,K,G,H], new k/v [B,1,K,H], sinks [K,G], positions [B,1] (-1 = padding) -> [B,1,K,G,H] float32, the cache.

    Why not write first, as accelerators do: XLA:CPU fused the in-place update of a batch-1 cache into a second
    producer for the product that reads it, so each step copied every k and v cache of the layer ~4 times (one
    gpt-oss full-attention layer's step at 16k slots: 50.3 ms, 12.8 with this; `benchmarks/decode_attention.py`).
    The writes take a data dependency on the products over the old cache, so XLA orders them after those reads and
    updates the donated cache in place. The scores are [B,K,S,G] (S the long side of the GEMM): as [B,K,G,S] they
    read k at 2-3 GB/s, here 9-12. The new key and value are rounded to the cache's dtype, as writing first does.
    """
    dt = q.dtype
    keys, values, q1 = cache.k.astype(dt), cache.v.astype(dt), q[:, 0]  # q1 [B, K, G, H]
    new_k, new_v = (a[:, 0].astype(cache.k.dtype).astype(dt) for a in (k, v))  # [B, K, H], as the cache keeps them
    old = jnp.einsum("BKSH,BKGH->BKSG", keys, q1, preferred_element_type=jnp.float32)
    earlier = attention_mask(positions, cache.pos, window)[:, 0] & (cache.pos < positions)  # [B, S]
    # the mask as a [B, S] bias: as a select inside the exp's loop, XLA:CPU redid the mask for each of the B*K*S*G
    # scores (16k slots, batch 1: 8.8 -> 4.3 ms for this function)
    scores = old * scale + jnp.where(earlier, 0.0, -jnp.inf)[:, None, :, None]
    own = jnp.einsum("BKGH,BKH->BKG", q1, new_k, preferred_element_type=jnp.float32)[:, :, None] * scale
    own = jnp.where((positions >= 0)[:, :, None, None], own, -jnp.inf)  # [B, K, 1, G]
    sink = sinks.astype(jnp.float32)[None, :, None, :]
    top = jax.lax.stop_gradient(jnp.maximum(jnp.maximum(jnp.max(scores, axis=2, keepdims=True), own), sink))
    weights, own_weight = jnp.exp(scores - top), jnp.exp(own - top)
    denominator = jnp.sum(weights, axis=2, keepdims=True) + own_weight + jnp.exp(sink - top)  # [B, K, 1, G]
    mixed = jnp.einsum("BKSG,BKSH->BKGH", weights.astype(dt), values, preferred_element_type=jnp.float32)
    out = (mixed + own_weight[:, :, 0, :, None] * new_v[:, :, None, :]) / denominator[:, :, 0, :, None]
    # the data dependency (0 x a finite product; per row and kv head, so a mesh adds no collective)
    k = k + (0.0 * old[:, None, :, 0, :1]).astype(k.dtype)
    v = v + (0.0 * mixed[:, None, :, 0, :1]).astype(v.dtype)
    return out[:, None], cache.write(k, v, positions)


def write_then_attend(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, positions: jax.Array,
                      cache: LayerCache, window: int | None, scale: float) -> tuple[jax.Array, LayerCache]:
    """`attend_then_write`'s decode as accelerators run it: write first, then attend to the cache alone (a full
    layer's cache has a slot for every position, and a ring written one new position holds the window that ends
    there; a ring joined to the new keys instead: 2 more XLA:GPU launches per sliding layer)."""
    cache = cache.write(k, v, positions)
    keys, values = (a.astype(k.dtype).astype(q.dtype) for a in (cache.k, cache.v))
    return attend(q, keys, values, sinks, attention_mask(positions, cache.pos, window), scale), cache


KEY_BLOCK = 1024  # keys per step of `attend_in_blocks`: a prompt chunk's scores stay this wide at any context


def attend_in_blocks(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, q_pos: jax.Array,
                     k_pos: jax.Array, window: int | None, scale: float, block: int) -> jax.Array:
    """`attend` over a full layer's cache of S slots taken `block` at a time (S a multiple of it) with a running
    softmax: the same result, with [.., T, block] scores in memory instead of [.., T, S] (a 512-token chunk against
    a 128k-slot cache: 17 GB). Forward only (generation; long rows with no cache take `attend_causal`).

    q [B,T,K,G,H], k/v [B,K,S,H] (slot = position mod S), sinks [K,G], q_pos [B,T], k_pos [B,S] (the mask comes
    from positions) -> [B,T,K,G,H] float32. A block that starts past the last query position holds only later or
    empty positions and is skipped (a loop of traced length).
    """
    b, s = k_pos.shape
    q_t = q.transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    rows = q_t.shape[:-1] + (1,)
    # the running max starts at the sink logit, whose weight exp(sink - max) = 1 starts the denominator
    start = (jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, :, None, None], rows), jnp.ones(rows, jnp.float32),
             jnp.zeros(q_t.shape, jnp.float32))

    def step(i, carry):
        top, denominator, out = carry
        k_blk, v_blk = (jax.lax.dynamic_slice_in_dim(a, i * block, block, 2) for a in (k, v))
        pos_blk = jax.lax.dynamic_slice_in_dim(k_pos, i * block, block, 1)
        scores = jnp.where(attention_mask(q_pos, pos_blk, window)[:, None, None], _scores(q_t, k_blk, scale), -jnp.inf)
        new_top = jax.lax.stop_gradient(jnp.maximum(top, jnp.max(scores, axis=-1, keepdims=True)))
        rescale = jnp.exp(top - new_top)
        weights = jnp.exp(scores - new_top)
        denominator = denominator * rescale + jnp.sum(weights, axis=-1, keepdims=True)
        out = out * rescale + _mix(weights, v_blk)
        return new_top, denominator, out

    blocks = jnp.minimum(jnp.max(q_pos) // block + 1, s // block)
    _, denominator, out = jax.lax.fori_loop(0, blocks, step, start)
    return (out / denominator).transpose(0, 3, 1, 2, 4)


# Rows (B x T) up to which `project` takes the row kernel on one GPU; 0 (the default): never. On an H100 (jax 0.11.2,
# 20b, packed experts) it cut batch-1 decode's device time from 4.54 to 3.99 ms/step, but the steps' wall time did
# not follow (in one process, interleaved: batch 1 102-192 vs 143-213 tok/s without it, batch 8 541-545 vs 601-602);
# with the host no longer passing the model slowly, at one row: 3.71 vs 4.26 ms of kernels but 144.9 vs 226.1 tok/s,
# the host taking 6.81 ms to issue the step's 1,001 launches (a Pallas call costs the host more than an XLA fusion).
# So it is opt-in, for benchmarks and tuning
ROW_KERNEL_ROWS = 0


def project(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(`spec`, x, w) summed in float32, where x's trailing letters contract w's leading ones ("BTD,DNH->BTNH").
    On one GPU (no mesh in context) with at most ROW_KERNEL_ROWS rows, `rowkernel.dense_matmul` instead: XLA's GEMM
    for one row reads q's weight at a third of the memory bound on an H100 and fuses the norm into k and v."""
    lhs, rhs = spec.split("->")[0].split(",")
    c = sum(ch in rhs for ch in lhs)
    lead, width = x.shape[:x.ndim - c], math.prod(x.shape[x.ndim - c:])
    rows = math.prod(lead)
    if packed.backend() == "gpu" and rows <= ROW_KERNEL_ROWS and jax.sharding.get_abstract_mesh().empty:
        y = rowkernel.dense_matmul(x.reshape(rows, width), w.reshape(1, width, -1), jnp.full((1,), rows, jnp.int32))
        return y.reshape(*lead, *w.shape[c:])
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)


def gemm_rows(x: jax.Array) -> jax.Array:
    """x [B, T, D] as the attention projections take it: on a GPU, a single row (B = T = 1) gets a zero row after it
    (unless `project`'s opt-in row kernel takes it). The caller drops the extra row.

    XLA:GPU turns a one-row product with a small weight (k's and v's [2880, 512]) into a multiply that writes the
    float32 products out and column reductions that read them back: 2 x 5.9 MB a layer, ~0.6 GB a 20b decode step.
    At two rows each stays a GEMM, and XLA merges q, k and v (one operand, three weights) into one GEMM that reads
    the three weights inside the kernel: 3 launches fewer a layer (`benchmarks/gpu_launches.py`: 20b 702 -> 630 a
    step). (The router at two rows: for 120b's [2880, 128] a GEMM split 32 ways with its weight padded, 3 launches
    more; it has its own form, `moe.router_logits`.)"""
    if packed.backend() != "gpu" or x.shape[0] * x.shape[1] != 1 or ROW_KERNEL_ROWS >= 1:
        return x
    return jnp.pad(x, ((0, 0), (0, 1), (0, 0)))


class Attention(nnx.Module):
    """GQA self-attention with biases, learned sinks, YaRN RoPE and an optional sliding window."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.cfg, self.window, self.dtype = cfg, cfg.window(layer), dtype
        self.q_kernel = param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), dtype)
        self.q_bias = param(rngs, (n, h), ("q_heads", "head_dim"), jnp.float32, init="zeros")
        self.k_kernel = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.k_bias = param(rngs, (k, h), ("kv_heads", "head_dim"), jnp.float32, init="zeros")
        self.v_kernel = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.v_bias = param(rngs, (k, h), ("kv_heads", "head_dim"), jnp.float32, init="zeros")
        self.o_kernel = param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), dtype)
        self.o_bias = param(rngs, (d,), ("embed",), jnp.float32, init="zeros")
        self.sinks = param(rngs, (n,), ("q_heads",), jnp.float32, init="zeros")

    def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerCache | None = None,
                 segments: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
        """x [B, T, D] (normed), positions [B, T] (-1 = padding) -> [B, T, D] float32 and the updated cache.

        With a cache, the new tokens attend to what it holds plus themselves, then are written into it. `segments`
        [B, T] (training on packed rows, no cache) keeps each packed sequence to itself. A row's positions rise by
        one from token to token (padding only before or after its tokens, or between packed sequences): a sliding
        layer looks at the `window` entries before a query's own (`attend_banded`), not at every key's position, and
        a full layer given more than `causal_blocks.BLOCK` tokens and no cache skips the keys after a query's own
        (`attend_causal`).
        """
        cfg, dt = self.cfg, self.dtype
        x = x.astype(dt)
        b, t = x.shape[:2]
        rows = gemm_rows(x)
        q = project("BTD,DNH->BTNH", rows, self.q_kernel[...].astype(dt))[:, :t]
        k = project("BTD,DKH->BTKH", rows, self.k_kernel[...].astype(dt))[:, :t]
        v = project("BTD,DKH->BTKH", rows, self.v_kernel[...].astype(dt))[:, :t]
        q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        cos, sin = rope_cos_sin(cfg, positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = q.reshape(b, t, cfg.num_key_value_heads, cfg.q_per_kv, cfg.head_dim)
        if cache is not None:
            # the new keys and values where the cache keeps them (a mesh may split the MoE's tokens more finely)
            k, v = constrain(k, NEW_AXES), constrain(v, NEW_AXES)
        sinks = self.sinks[...].reshape(cfg.num_key_value_heads, cfg.q_per_kv)
        scale = 1.0 / math.sqrt(cfg.head_dim)
        if cache is not None and t == 1:
            decode = attend_then_write if packed.on_cpu() else write_then_attend
            out, cache = decode(q.astype(dt), k, v, sinks, positions, cache, self.window, scale)
            return self._output(out), cache
        keys, values, k_pos = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions  # [B, K, T, H]
        full_cache = cache is not None and self.window is None
        if full_cache:
            # a slot for every position: write first, then attend to the cache alone
            cache = cache.write(k, v, positions)
            keys, values, k_pos = cache.k.astype(k.dtype), cache.v.astype(v.dtype), cache.pos
        elif cache is not None:
            # a ring may be shorter than the chunk: the chunk's keys join what it held before this write
            keys = jnp.concatenate([cache.k.astype(k.dtype), keys], axis=2)
            values = jnp.concatenate([cache.v.astype(v.dtype), values], axis=2)
            k_pos = jnp.concatenate([cache.pos, positions], axis=1)
            cache = cache.write(k, v, positions)
        s = keys.shape[2]
        if self.window is not None and t > self.window:
            # more queries than the window: each block of W/2 queries scores the 1.5W keys it can see, not all S
            out = attend_banded(q.astype(dt), keys.astype(dt), values.astype(dt), sinks, positions, k_pos,
                                self.window, scale, segments)
        elif cache is None and self.window is None and t > causal_blocks.BLOCK:
            # a long row with no cache (training, full forwards): tiles of queries x keys, none past the diagonal
            out = attend_causal(q.astype(dt), keys.astype(dt), values.astype(dt), sinks, positions, segments, scale)
        elif full_cache and t > 1 and s > KEY_BLOCK and s % KEY_BLOCK == 0:
            # a prompt chunk against a long cache: scores a block of keys at a time
            out = attend_in_blocks(q.astype(dt), keys.astype(dt), values.astype(dt), sinks, positions, k_pos,
                                   self.window, scale, KEY_BLOCK)
        else:
            mask = attention_mask(positions, k_pos, self.window, segments)
            out = attend(q.astype(dt), keys.astype(dt), values.astype(dt), sinks, mask, scale)
        return self._output(out), cache

    def _output(self, out: jax.Array) -> jax.Array:
        """The heads' outputs [B, T, K, G, H] -> the output projection [B, T, D] float32."""
        b, t = out.shape[:2]
        # N and H flattened into one contracting dimension: contracting both, XLA:CPU ran 10x slower at decode
        out = out.reshape(b, t, self.cfg.num_attention_heads * self.cfg.head_dim).astype(self.dtype)
        o = self.o_kernel[...].astype(self.dtype).reshape(out.shape[-1], -1)
        return project("BTM,MD->BTD", out, o) + self.o_bias[...]
