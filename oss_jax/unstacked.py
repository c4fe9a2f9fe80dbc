"""Dense expert kernels [E, in, out] handed to generation's steps on CPU as E arrays [in, out] that alias the stacked
parameter's buffer.

XLA:CPU copies a dynamically indexed slice of an array before a dot reads it. A product against an expert picked by
`lax.switch` among arrays of their own reads the weight in place: one row against a gpt-oss-20b [2880, 5760] expert
read 4 routed experts at 11.7 GB/s as slices of the stacked kernel, 30-40 GB/s as arrays of their own (Intel Xeon,
AVX-512, 2 cores; `moe.tiled_grouped_matmul` takes either).

The arrays are views: the stacked array's host buffer sliced by numpy and placed with `jax.device_put`, which on
CPU wraps an aligned host buffer without copying. They add no memory, keep that buffer alive while they live (a
donation of the stacked array is then skipped by XLA, and `delete` frees nothing until the views are gone), and are
made only where they alias: a concrete array on one CPU device whose every slice comes back at its own address.
Anything else keeps the stacked array. Only the forward products take them (generation; the parameter tree,
training and checkpoints see the stacked kernels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from oss_jax import packed


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)  # kernels compare by identity, as arrays in a tuple do
class Unstacked:
    """Expert kernels [E, in, out] as E arrays [in, out]."""

    kernels: tuple[jax.Array, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.kernels), *self.kernels[0].shape)

    @property
    def dtype(self) -> jnp.dtype:
        return self.kernels[0].dtype

    def __getitem__(self, key) -> Unstacked:
        """`kernel[...]`, as for a stacked parameter: the kernels themselves."""
        if key is not Ellipsis:
            raise TypeError(f"unstacked expert kernels are read whole (kernel[...]), not with {key!r}")
        return self

    def astype(self, dtype: jnp.dtype) -> Unstacked:
        return Unstacked(tuple(k.astype(dtype) for k in self.kernels))


def unstack(w: jax.Array) -> Unstacked | jax.Array:
    """w [E, in, out] -> views of its experts (`Unstacked`) where they alias w's buffer, else w itself."""
    if isinstance(w, jax.core.Tracer) or not isinstance(w, jax.Array) or w.ndim != 3 or w.is_deleted():
        return w
    devices = w.sharding.device_set
    if len(devices) != 1 or not w.is_fully_addressable:
        return w
    device, = devices
    if device.platform != "cpu" or not packed.on_cpu():  # (tests force accelerators' expert forms on CPU)
        return w
    host = np.asarray(w)  # zero-copy on CPU
    base = w.unsafe_buffer_pointer()
    if host.__array_interface__["data"][0] != base:
        return w
    # one batched device_put: 20b slice, 4 kernels of 32 experts, best of 40: 4.9-5.0 ms against 10.3-11.0 one at a time
    views = tuple(jax.device_put([host[e] for e in range(w.shape[0])], device))
    if any(isinstance(v, jax.core.Tracer) for v in views):
        return w  # split while tracing (the model a constant of the trace)
    stride = host[0].nbytes
    if any(v.unsafe_buffer_pointer() != base + e * stride for e, v in enumerate(views)):
        return w  # a copy was made (e.g. a misaligned slice): the views would double the experts' memory
    return Unstacked(views)


def unstack_experts(paths: Sequence[tuple], leaves: Sequence) -> list:
    """A model state's flattened leaves (with their key paths) with each dense MoE expert kernel (a leaf named
    `...{packed.KERNELS}.value`) `unstack`ed; the rest as they are."""
    return [unstack(leaf) if _expert_kernel(path) else leaf for path, leaf in zip(paths, leaves, strict=True)]


def _expert_kernel(path: tuple) -> bool:
    name = jax.tree_util.keystr(path, simple=True, separator=".")
    return name.endswith(".value") and name.removesuffix(".value").endswith(packed.KERNELS)
