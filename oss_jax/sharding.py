"""Sharding declared once: logical axis names (on every parameter) -> mesh axes, through one rules table."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axes it may be split over (in order). Unlisted logical axes are replicated.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    # generation's rows (KV cache, activations, logits): the batch axes, then `expert`, as the MoE splits tokens, so
    # a row's attention runs on the devices its MoE tokens and its cache live on
    "rows": ("data", "fsdp", "expert"),
    "expert": ("expert",),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
}


class MeshError(ValueError):
    """A mesh that cannot hold the model as asked (an axis that does not divide, an unknown axis name)."""


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over the named axes (any of data/fsdp/expert/tensor), e.g. {'expert': 8} or {'data': 2, 'expert': 4}."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"unknown mesh axes {unknown}; use {MESH_AXES}")
    names = tuple(a for a in MESH_AXES if a in shape)
    sizes = tuple(int(shape[a]) for a in names)
    devices = list(devices if devices is not None else jax.devices())
    if math.prod(sizes) > len(devices):
        raise MeshError(f"mesh {dict(zip(names, sizes, strict=True))} needs {math.prod(sizes)} devices, "
                        f"{len(devices)} available")
    if jax.process_count() > 1 and math.prod(sizes) != len(devices):
        raise MeshError(f"with {jax.process_count()} processes the mesh must use all {len(devices)} devices, "
                        f"got {dict(zip(names, sizes, strict=True))}")
    grid = np.asarray(devices[: math.prod(sizes)], dtype=object).reshape(sizes)
    return Mesh(grid, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def parse_mesh(spec: str) -> dict[str, int]:
    """A preset name from configs/mesh (e.g. 'ep8', 'tpu64') or an inline 'data=2,expert=4' -> axis sizes."""
    from configs import PRESETS_DIR

    preset = PRESETS_DIR / "mesh" / f"{spec}.json"
    if "=" not in spec and preset.is_file():
        return {k: int(v) for k, v in json.loads(preset.read_text()).items()}
    if "=" not in spec:
        names = sorted(p.stem for p in (PRESETS_DIR / "mesh").glob("*.json"))
        raise MeshError(f"unknown mesh preset {spec!r}; presets: {names}, or inline like data=2,expert=4")
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, size = part.partition("=")
        if not size.isdigit() or int(size) < 1:
            raise MeshError(f"bad mesh entry {part!r}; expected NAME=SIZE, e.g. expert=8")
        out[name.strip()] = int(size)
    return out


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh | AbstractMesh, name: str = "",
                   rules: Mapping[str, tuple[str, ...]] = RULES, fit: bool = False) -> PartitionSpec:
    """The PartitionSpec of one array with these logical axes; refuses a mesh axis that does not divide, or with
    `fit`, splits that dimension over the longest leading run of its mesh axes that divides it (maybe none)."""
    used: set[str] = set()
    spec = []
    for axis, dim in zip(axes, shape, strict=True):
        mesh_axes = tuple(m for m in rules.get(axis or "", ()) if mesh.shape.get(m, 1) > 1 and m not in used)
        while fit and mesh_axes and dim % math.prod(mesh.shape[m] for m in mesh_axes):
            mesh_axes = mesh_axes[:-1]
        size = math.prod(mesh.shape[m] for m in mesh_axes)
        if mesh_axes and dim % size:
            raise MeshError(f"{name}: dimension '{axis}' of size {dim} cannot be split {size} ways over mesh axes "
                            f"{mesh_axes}")
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def split_ways(axis: str, dim: int, mesh: Mesh | AbstractMesh) -> int:
    """How many ways a dimension of size `dim` with this logical axis is split, where a mesh axis that does not divide
    it is left out (as `constrain` places it)."""
    (entry,) = partition_spec((axis,), (dim,), mesh, fit=True)
    return math.prod(mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry or ()))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """x on the sharding its logical axes give over the mesh in context (`jax.set_mesh`; a mesh axis that does not
    divide its dimension left out), in a jitted function or outside one; x itself without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, partition_spec(axes, x.shape, mesh, fit=True))


def named_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, name: str = "", fit: bool = False
                   ) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(axes, shape, mesh, name, fit=fit))


def shard_model(model, mesh: Mesh) -> None:
    """Place every parameter of an nnx model on its NamedSharding over `mesh` (in place)."""
    from oss_jax.params import flat_params

    for name, var in flat_params(model).items():
        var.set_value(jax.device_put(var[...], named_sharding(var.get_metadata()["axes"], var.shape, mesh, name)))
