"""LoRA: low-rank adapters W + (alpha / r) * A @ B on chosen weights, merged into the weights before each forward.

A weight's axes split into [*lead, *in, *out]: lead are per-expert batch axes (experts get one adapter each), `in`
are contracted with the activations, `out` are produced. A is [*lead, *in, r] (random), B is [*lead, r, *out]
(zeros), so training starts from the base model exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

# parameter suffix -> (lead axes, in axes) of that weight; the remaining axes are out axes
LAYOUT = {
    "attn.q_kernel": (0, 1), "attn.k_kernel": (0, 1), "attn.v_kernel": (0, 1), "attn.o_kernel": (0, 2),
    "moe.router_kernel": (0, 1), "moe.mlp1_kernel": (1, 1), "moe.mlp2_kernel": (1, 1),
}
TARGETS = {
    "attn": ("attn.q_kernel", "attn.k_kernel", "attn.v_kernel", "attn.o_kernel"),
    "router": ("moe.router_kernel",),
    "experts": ("moe.mlp1_kernel", "moe.mlp2_kernel"),
}


class LoraError(ValueError):
    """A LoRA setting that cannot apply (unknown target group, non-positive rank)."""


def target_names(param_names: Sequence[str], groups: Sequence[str]) -> list[str]:
    """The parameters adapted for these target groups (any of TARGETS), e.g. ('attn', 'router')."""
    unknown = sorted(set(groups) - set(TARGETS))
    if unknown:
        raise LoraError(f"unknown LoRA targets {unknown}; choose from {sorted(TARGETS)}")
    suffixes = tuple(s for g in groups for s in TARGETS[g])
    return [n for n in param_names if n.endswith(suffixes)]


def _layout(name: str) -> tuple[int, int]:
    """'layers.3.attn.q_kernel' -> (number of lead axes, number of in axes)."""
    return LAYOUT[name.split(".", 2)[2]]


def _split(name: str, shape: tuple) -> tuple[tuple, tuple, tuple]:
    lead, n_in = _layout(name)
    return shape[:lead], shape[lead:lead + n_in], shape[lead + n_in:]


def adapter_shapes(name: str, shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of A and B for the weight `name` of `shape`."""
    lead, ins, outs = _split(name, shape)
    return lead + ins + (rank,), lead + (rank,) + outs


def adapter_axes(name: str, axes: tuple[str | None, ...]) -> tuple[tuple[str | None, ...], tuple[str | None, ...]]:
    """Logical axes of A and B from the weight's axes (the rank axis is never split)."""
    lead, ins, outs = _split(name, axes)
    return lead + ins + (None,), lead + (None,) + outs


def init_adapters(shapes: Mapping[str, tuple[int, ...]], rank: int, key: jax.Array) -> dict[str, jax.Array]:
    """{'<weight>.lora_a': A, '<weight>.lora_b': B} float32 for weights of these shapes; A ~ N(0, 1/in), B = 0."""
    if rank <= 0:
        raise LoraError(f"LoRA rank must be positive, got {rank}")
    out = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        a_shape, b_shape = adapter_shapes(name, shape, rank)
        fan_in = math.prod(_split(name, shape)[1])
        out[f"{name}.lora_a"] = jax.random.normal(jax.random.fold_in(key, i), a_shape) / math.sqrt(fan_in)
        out[f"{name}.lora_b"] = jnp.zeros(b_shape, jnp.float32)
    return out


def delta(name: str, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * A @ B in the weight's own shape: A [*lead, *in, r], B [*lead, r, *out]."""
    lead, _ = _layout(name)
    r = a.shape[-1]
    ins, outs = a.shape[lead:-1], b.shape[lead + 1:]
    a2 = a.reshape(*a.shape[:lead], math.prod(ins), r)
    b2 = b.reshape(*b.shape[:lead], r, math.prod(outs))
    return (scale * jnp.matmul(a2, b2)).reshape(*a.shape[:lead], *ins, *outs)


def merge(params: Mapping[str, jax.Array], adapters: Mapping[str, jax.Array], scale: float) -> dict[str, jax.Array]:
    """The base weights with every adapter folded in (dtypes kept)."""
    out = dict(params)
    for key in adapters:
        if key.endswith(".lora_a"):
            name = key[: -len(".lora_a")]
            d = delta(name, adapters[key], adapters[f"{name}.lora_b"], scale)
            out[name] = (params[name].astype(jnp.float32) + d).astype(params[name].dtype)
    return out
