"""Parameter declaration (shape, dtype, logical axes, init) and the flat name <-> array view of a model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INIT_STD = 0.02


class ParamError(ValueError):
    """Parameters that do not fit the model: missing, unexpected, or of the wrong shape."""


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: Any,
          init: str = "normal") -> nnx.Param:
    """One parameter, carrying its logical axis names (mapped to mesh axes by `oss_jax.sharding`)."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "normal":
        value = INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), axes=axes)


def path_name(path: tuple[Any, ...]) -> str:
    """('layers', 0, 'attn', 'q_kernel') -> 'layers.0.attn.q_kernel'."""
    return ".".join(str(p) for p in path)


def flat_params(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Every nnx.Param of the model by dotted name."""
    return {path_name(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def logical_axes(model: nnx.Module) -> dict[str, tuple[str | None, ...]]:
    """Logical axis names of every parameter by dotted name."""
    return {k: v.get_metadata()["axes"] for k, v in flat_params(model).items()}


def assign_params(model: nnx.Module, arrays: Mapping[str, np.ndarray | jax.Array]) -> None:
    """Set every parameter from `arrays` (cast to the parameter's dtype); exactly the model's names, right shapes."""
    targets = flat_params(model)
    missing = sorted(set(targets) - set(arrays))
    unexpected = sorted(set(arrays) - set(targets))
    if missing or unexpected:
        raise ParamError(f"parameter names do not match the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    for name, var in targets.items():
        value = arrays[name]
        if tuple(value.shape) != tuple(var.shape):
            raise ParamError(f"{name}: shape {tuple(value.shape)} does not match the model's {tuple(var.shape)}")
        var.set_value(jnp.asarray(value, dtype=var.dtype))
