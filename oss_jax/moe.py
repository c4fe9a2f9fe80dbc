"""Mixture of experts: route (top-k, then softmax) -> permute -> expert MLP (grouped matmul) -> unpermute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from oss_jax.config import ModelConfig
from oss_jax.params import param


def route(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """logits [X, E] -> expert ids [X, k] int32 and weights [X, k]: softmax over the top-k logits only."""
    top, ids = jax.lax.top_k(logits, k)
    return ids.astype(jnp.int32), jax.nn.softmax(top.astype(jnp.float32), axis=-1)


def permute(x: jax.Array, ids: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """x [X, D], ids [X, k] -> rows [A, D] grouped by expert, their expert ids [A], group sizes [E], order [A]."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return x[order // k], flat[order], group_sizes, order


def unpermute(y: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """y [A, D] in expert order, weights [X, k] -> [X, D]: each token's k outputs, weighted and summed."""
    x, k = weights.shape
    back = jnp.zeros_like(y).at[order].set(y).reshape(x, k, y.shape[-1])
    return jnp.einsum("XkD,Xk->XD", back, weights.astype(back.dtype))


def swiglu(h: jax.Array, limit: float, alpha: float) -> jax.Array:
    """h [..., 2F] with gate/linear interleaved (even/odd) -> [..., F]; gate clamped above, linear both ways."""
    pairs = h.reshape(*h.shape[:-1], h.shape[-1] // 2, 2)
    gate = jnp.minimum(pairs[..., 0], limit)
    linear = jnp.clip(pairs[..., 1], -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (linear + 1.0)


def expert_mlp(rows: jax.Array, expert_ids: jax.Array, group_sizes: jax.Array, w1: jax.Array, b1: jax.Array,
               w2: jax.Array, b2: jax.Array, cfg: ModelConfig, dtype: jnp.dtype) -> jax.Array:
    """rows [A, D] grouped by expert (sizes [E]); w1 [E, D, 2F], b1 [E, 2F], w2 [E, F, D], b2 [E, D] -> [A, D].

    The one place expert weights are multiplied: biases are per expert and added before routing weights.
    """
    h = jax.lax.ragged_dot(rows.astype(dtype), w1.astype(dtype), group_sizes, preferred_element_type=jnp.float32)
    h = swiglu(h + b1[expert_ids], cfg.swiglu_limit, cfg.swiglu_alpha)
    y = jax.lax.ragged_dot(h.astype(dtype), w2.astype(dtype), group_sizes, preferred_element_type=jnp.float32)
    return y + b2[expert_ids]


class MoE(nnx.Module):
    """Router with bias, top-k experts per token, clamped-SwiGLU expert MLPs with biases."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        d, e, f = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
        self.cfg, self.dtype = cfg, dtype
        self.router_kernel = param(rngs, (d, e), ("embed", "router"), dtype)
        self.router_bias = param(rngs, (e,), ("router",), jnp.float32, init="zeros")
        self.mlp1_kernel = param(rngs, (e, d, 2 * f), ("expert", "embed", "mlp"), dtype)
        self.mlp1_bias = param(rngs, (e, 2 * f), ("expert", "mlp"), jnp.float32, init="zeros")
        self.mlp2_kernel = param(rngs, (e, f, d), ("expert", "mlp", "embed"), dtype)
        self.mlp2_bias = param(rngs, (e, d), ("expert", "embed"), jnp.float32, init="zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] (normed) -> [B, T, D] float32."""
        cfg, dt = self.cfg, self.dtype
        b, t, d = x.shape
        xs = x.reshape(b * t, d).astype(dt)
        with jax.named_scope("route"):
            logits = jnp.einsum("XD,DE->XE", xs, self.router_kernel[...].astype(dt),
                                preferred_element_type=jnp.float32) + self.router_bias[...]
            ids, weights = route(logits, cfg.experts_per_token)
        with jax.named_scope("permute"):
            rows, expert_ids, group_sizes, order = permute(xs, ids, cfg.num_experts)
        with jax.named_scope("experts"):
            y = expert_mlp(rows, expert_ids, group_sizes, self.mlp1_kernel[...], self.mlp1_bias[...],
                           self.mlp2_kernel[...], self.mlp2_bias[...], cfg, dt)
        with jax.named_scope("unpermute"):
            out = unpermute(y, order, weights)
        return out.reshape(b, t, d)
