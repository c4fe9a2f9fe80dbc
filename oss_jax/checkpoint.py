"""Converted checkpoints: an Orbax tree of parameters + config.json, restored straight into shardings.

Directory layout written by `oss-jax convert`:
  config.json       HF-style model config
  params/           Orbax checkpoint: the model's parameter tree (dotted names nested as dicts); experts either
                    MXFP4 exactly as shipped (`mlp1_kernel: {blocks [E,2F,D/32,16], scales [E,2F,D/32]}`,
                    `mlp2_kernel: {blocks [E,D,F/32,16], scales [E,D,F/32]}`) or dense [E,D,2F] / [E,F,D]
  conversion.json   what was converted, how (provenance)
  tokenizer files   copied from the source when present
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from jax.sharding import Mesh, Sharding, SingleDeviceSharding

from oss_jax import mxfp4
from oss_jax.config import ModelConfig
from oss_jax.files import atomic_dir, copy_tokenizer
from oss_jax.model import GptOss, abstract_model
from oss_jax.packed import KERNELS, assign_packed, named_sharding, packed_leaves
from oss_jax.params import assign_params, flat_params, logical_axes

PARAMS = "params"
EXPERTS = ("packed", "bf16")  # how `load` gives MXFP4 experts to the model: as stored, or dequantized (dense)
RESTORE_GROUP_BYTES = 128 * 2**20  # leaves read per Orbax call (bounds the reader's transient host memory)


class CheckpointError(ValueError):
    """A converted checkpoint directory that is missing or does not fit its config."""


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'a.b.c': x} -> {'a': {'b': {'c': x}}}."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Inverse of nest()."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, name + ".")
        else:
            out[name] = value
    return out


def packed_param(name: str) -> str | None:
    """'layers.3.moe.mlp1_kernel.blocks' -> 'layers.3.moe.mlp1_kernel' (None for other names)."""
    base, _, part = name.rpartition(".")
    return base if part in ("blocks", "scales") and base.endswith(KERNELS) else None


def stored_axes(name: str, model_axes: dict[str, tuple[str | None, ...]]) -> tuple[str | None, ...]:
    """Logical axes of one stored leaf (a model parameter, or the blocks/scales of a packed one).

    MXFP4 leaves keep the shipped [E, out, in/32, 16] order, with the axes of the packed model's leaves: out is 2F
    (`mlp`) for mlp1 and D (`embed`) for mlp2, whose F groups go on `tensor` where they divide.
    """
    return model_axes[name]


def stored_metadata(path: str | Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Stored leaf name -> (shape, dtype), from the Orbax metadata (no array is read)."""
    params = Path(path).absolute() / PARAMS
    if not params.is_dir():
        raise CheckpointError(f"{path}: no {PARAMS}/ Orbax checkpoint (convert one with `oss-jax convert`)")
    meta = ocp.metadata(params).metadata
    return {name: (tuple(m.shape), np.dtype(m.dtype)) for name, m in flatten(meta).items()}


def restore(path: str | Path, mesh: Mesh | None = None, names: Iterable[str] | None = None) -> dict[str, jax.Array]:
    """Stored leaves by name (all, or `names`), each read straight into its sharding on `mesh`.

    Read RESTORE_GROUP_BYTES at a time: the reader's transient host copies then cover one group, not the whole tree.
    """
    path = Path(path).absolute()  # Orbax wants absolute paths
    cfg = ModelConfig.from_file(path)
    meta = stored_metadata(path)
    wanted = set(meta) if names is None else set(names)
    unknown = sorted(wanted - set(meta))
    if unknown:
        raise CheckpointError(f"{path}: no stored parameters {unknown[:5]}")
    axes = _model_axes(cfg)
    out = {}
    for group in _groups([n for n in meta if n in wanted], meta):
        target = {name: ocp.PLACEHOLDER for name in meta}
        for name in group:
            shape, dtype = meta[name]
            target[name] = jax.ShapeDtypeStruct(shape, dtype, sharding=_sharding(stored_axes(name, axes), shape,
                                                                                  mesh, name))
        restored = flatten(ocp.load(path / PARAMS, nest(target)))
        out |= {name: restored[name] for name in group}
    return out


def _groups(names: list[str], meta: dict[str, tuple[tuple[int, ...], np.dtype]]) -> list[list[str]]:
    """`names` in consecutive groups of about RESTORE_GROUP_BYTES (a larger leaf is a group of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        shape, dtype = meta[name]
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if groups[-1] and size + nbytes > RESTORE_GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return [g for g in groups if g]


@functools.lru_cache(maxsize=8)
def _model_axes(cfg: ModelConfig) -> dict[str, tuple[str | None, ...]]:
    leaves = packed_leaves(abstract_model(cfg, packed_experts=True))
    return logical_axes(abstract_model(cfg)) | {name: v.get_metadata()["axes"] for name, v in leaves.items()}


def _sharding(axes, shape, mesh: Mesh | None, name: str) -> Sharding:
    if mesh is None:
        return SingleDeviceSharding(jax.local_devices()[0])
    return named_sharding(axes, shape, mesh, name)  # packed.named_sharding: the rules table, plus packed F groups


def stores_packed(path: str | Path) -> bool:
    """Whether a converted checkpoint holds its experts as MXFP4 blocks + scales (no array is read)."""
    return any(packed_param(name) for name in stored_metadata(path))


def load(path: str | Path, mesh: Mesh | None = None, dtype: jnp.dtype = jnp.float32, experts: str = "bf16"
         ) -> GptOss:
    """A converted checkpoint -> the model, every leaf read straight into its sharding on `mesh`.

    MXFP4 experts: `experts="bf16"` dequantizes them on device into dense kernels in `dtype` (nnx.Params, trainable);
    `"packed"` keeps them as stored (uint8, 4.25 bits/weight, decoded inside the step; inference only).
    """
    if experts not in EXPERTS:
        raise CheckpointError(f"experts must be one of {EXPERTS}, got {experts!r}")
    cfg = ModelConfig.from_file(path)
    stored = restore(path, mesh)
    model = abstract_model(cfg, dtype, packed_experts=experts == "packed")
    if experts == "packed":
        if not any(packed_param(name) for name in stored):
            raise CheckpointError(f"{path}: experts are stored dequantized; packed experts need a checkpoint "
                                  f"converted with MXFP4 experts (`oss-jax convert`'s default), or use experts bf16")
        stored = assign_packed(model, stored)
    params = flat_params(model)
    arrays = {}
    for name, var in params.items():
        if name in stored:
            arrays[name] = stored[name]
        elif f"{name}.blocks" in stored:
            sharding = _sharding(var.get_metadata()["axes"], var.shape, mesh, name)
            arrays[name] = _dequantize(stored[f"{name}.blocks"], stored[f"{name}.scales"], dtype, sharding)
        else:
            raise CheckpointError(f"{path}: parameter {name!r} is not in the checkpoint")
    assign_params(model, arrays)
    return model


def _decode_swapped(blocks: jax.Array, scales: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return jnp.swapaxes(mxfp4.decode_jax(blocks, scales, dtype), 1, 2)


def _dequantize(blocks: jax.Array, scales: jax.Array, dtype: jnp.dtype, sharding: Sharding) -> jax.Array:
    """[E, out, in/32, 16] + [E, out, in/32] -> [E, in, out] in `dtype`, computed where the result lives."""
    return jax.jit(_decode_swapped, static_argnums=2, out_shardings=sharding)(blocks, scales, dtype)


def save(dst: str | Path, cfg: ModelConfig, params: dict[str, jax.Array], *, tokenizer_from: str | Path | None = None,
         overwrite: bool = False) -> Path:
    """Write parameters (dotted names, dense) as a converted checkpoint that `load` and `oss-jax export` read."""
    dst = Path(dst).absolute()
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        ocp.save_pytree(tmp / PARAMS, nest(params))
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_config(mxfp4=False), indent=2) + "\n")
        if tokenizer_from is not None:
            copy_tokenizer(Path(tokenizer_from), tmp)
    return dst
