"""Ahead-of-time memory plan: lower and compile one step of the full-size model on a mesh, allocating nothing.

Parameters and inputs are `jax.ShapeDtypeStruct`s carrying their `NamedSharding`s; the step is lowered and compiled
for that mesh (fake CPU devices are enough) and its per-device bytes are read off:
  params_bytes     exact, from each parameter's shape, dtype and sharding (the largest per-device sum)
  optimizer_bytes  optimizer state, the same way (0 for inference steps)
  input_bytes      the step's other inputs (tokens)
  temp_bytes       XLA temporaries, from `compiled.memory_analysis()`
  output_bytes     the step's outputs (logits), from `compiled.memory_analysis()`
  total_bytes      params + optimizer + inputs + temp + output - aliased (donated) bytes
Steps: `prefill` (the full-sequence forward, T = seq_len) and `decode` (one token per row against a KV cache of
seq_len positions, donated), `train` (an AdamW step of `oss_jax.train`: block remat, bf16 compute, master weights
in the plan's dtype, optimizer state like the weights) and `train-lora` (rank-16 adapters on attention, base frozen).
Experts are dense kernels in the plan's dtype (`experts="bf16"`) or MXFP4 blocks + scales (`"packed"`, as the
published checkpoints store them; decoded inside the step).
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from oss_jax.cache import init_cache, with_axes
from oss_jax.config import ModelConfig
from oss_jax.model import GptOss, abstract_model, forward
from oss_jax.packed import named_sharding as packed_sharding
from oss_jax.packed import packed_leaves
from oss_jax.params import flat_params
from oss_jax.sharding import RULES, MeshError, named_sharding

BATCH_AXES = RULES["batch"]  # mesh axes the batch is split over
DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}
EXPERTS = ("bf16", "packed")


class PlanError(ValueError):
    """A step that cannot be planned (yet)."""


@dataclass(frozen=True)
class Step:
    """A function to jit and the abstract, sharded arguments to lower it with (leaves grouped by what they hold)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    params: list[jax.ShapeDtypeStruct]
    inputs: list[jax.ShapeDtypeStruct]
    optimizer: list[jax.ShapeDtypeStruct]
    donate: tuple[int, ...] = ()  # argument positions the step donates (their buffers are reused for outputs)


@dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one compiled step (see the module docstring)."""

    params_bytes: int
    optimizer_bytes: int
    input_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    total_bytes: int
    argument_bytes: int  # the compiled executable's own count of params + optimizer + inputs (a cross-check)
    devices: int
    mesh: dict[str, int]
    platform: str
    step: str
    batch: int
    seq_len: int
    dtype: str
    experts: str
    lower_s: float
    compile_s: float
    weight_copy_bytes: int = 0  # within temp: whole copies of the parameters (see `weight_copy_bytes`)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def shardings(model: GptOss, mesh: Mesh) -> dict[str, NamedSharding]:
    """The NamedSharding of every parameter by dotted name (MeshError if the mesh cannot split one)."""
    return {name: named_sharding(var.get_metadata()["axes"], var.shape, mesh, name)
            for name, var in flat_params(model).items()}


def abstract_sharded_model(cfg: ModelConfig, mesh: Mesh, dtype: jnp.dtype, packed_experts: bool = False
                           ) -> GptOss:
    """The model with every parameter a ShapeDtypeStruct carrying its NamedSharding on `mesh` (nothing allocated)."""
    model = abstract_model(cfg, dtype, packed_experts)
    placed = shardings(model, mesh)
    for name, var in flat_params(model).items():
        var.set_value(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=placed[name]))
    for name, var in packed_leaves(model).items():
        sharding = packed_sharding(var.get_metadata()["axes"], var.shape, mesh, name)
        var.set_value(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding))
    return model


def batch_sharding(mesh: Mesh, shape: tuple[int, ...], dim: int = 0) -> NamedSharding:
    """Split dimension `dim` (the batch; 1 for micro-batches stacked [A, B, T]) of an array of `shape` over the mesh's
    data and fsdp axes; the rest replicated."""
    size = batch_parallel_size(mesh.shape)
    if shape[dim] % size:
        axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
        raise MeshError(f"batch {shape[dim]} cannot be split {size} ways over mesh axes {axes}; "
                        f"use a multiple of {size}")
    return named_sharding(tuple("batch" if d == dim else None for d in range(len(shape))), shape, mesh)


def batch_parallel_size(mesh_shape: Mapping[str, int]) -> int:
    """How many ways the batch is split (the product of the data and fsdp axes)."""
    return math.prod(mesh_shape.get(a, 1) for a in BATCH_AXES)


def mesh_devices(n: int) -> list[jax.Device]:
    """The default backend's devices if it has `n`, else the host CPU devices (fake ones on a CPU-only machine)."""
    return jax.devices() if len(jax.devices()) >= n else jax.devices("cpu")


def per_device_bytes(arrays: Iterable[jax.ShapeDtypeStruct]) -> int:
    """Exact bytes held by the fullest device when each array lives on its sharding."""
    totals: dict[Any, int] = defaultdict(int)
    for a in arrays:
        itemsize = np.dtype(a.dtype).itemsize
        for device, index in a.sharding.devices_indices_map(a.shape).items():
            totals[device] += itemsize * math.prod(len(range(*s.indices(d))) for s, d in zip(index, a.shape,
                                                                                             strict=True))
    return max(totals.values(), default=0)


# ------------------------------------------------------------------ steps


def prefill_step(model: GptOss, mesh: Mesh, batch: int, seq_len: int) -> Step:
    """The model's full-sequence forward: tokens [B, T] (batch over data/fsdp) -> logits [B, T, V] float32."""
    graphdef, state = nnx.split(model)

    def prefill(state, tokens):
        return forward(nnx.merge(graphdef, state), tokens)

    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=batch_sharding(mesh, (batch, seq_len)))
    return Step(prefill, (state, tokens), params=jax.tree.leaves(state), inputs=[tokens], optimizer=[])


def decode_step(model: GptOss, mesh: Mesh, batch: int, seq_len: int) -> Step:
    """One generated token per row against a KV cache of `seq_len` positions (donated): -> logits [B, V]."""
    graphdef, state = nnx.split(model)

    def decode(state, tokens, positions, caches):
        m = nnx.merge(graphdef, state)
        hidden, caches = m.hidden(tokens[:, None], positions[:, None], caches)
        return m.unembed_logits(hidden[:, 0]), caches

    caches = jax.eval_shape(lambda: init_cache(model.cfg, batch, seq_len, model.dtype))
    caches = with_axes(caches, lambda a, axes: jax.ShapeDtypeStruct(  # placed as generation places them
        a.shape, a.dtype, sharding=named_sharding(axes, a.shape, mesh, fit=True)))
    row = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding(mesh, (batch,)))
    return Step(decode, (state, row, row, caches), params=jax.tree.leaves(state),
                inputs=[row, row, *jax.tree.leaves(caches)], optimizer=[], donate=(3,))


def _train_builder(lora_rank: int) -> Callable[[GptOss, Mesh, int, int], Step]:
    """The optimizer step of `oss_jax.train` (AdamW, block remat, bf16 compute; LoRA on attention when rank > 0)."""

    def build(model: GptOss, mesh: Mesh, batch: int, seq_len: int) -> Step:
        from oss_jax import train

        tc = train.TrainConfig(batch_size=batch, seq_len=seq_len, remat="block", compute_dtype="bfloat16",
                               lora_rank=lora_rank, lora_targets=("attn",))
        params = {name: var.get_value() for name, var in flat_params(model).items()}
        frozen: dict[str, jax.ShapeDtypeStruct] = {}
        if tc.lora:
            frozen, params = params, _abstract_adapters(model, params, mesh, lora_rank)
        tx = train.optimizer(tc)
        opt = _like_params(jax.eval_shape(tx.init, params), params, mesh)
        replicated = NamedSharding(mesh, PartitionSpec())
        state = train.TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params, frozen, opt)
        stacked = batch_sharding(mesh, (1, batch, seq_len), dim=1)
        rows = {k: jax.ShapeDtypeStruct((1, batch, seq_len), jnp.float32 if k == "loss_mask" else jnp.int32,
                                        sharding=stacked) for k in train.BATCH_KEYS}
        graphdef = nnx.graphdef(abstract_model(model.cfg, jnp.bfloat16))

        def step(state, rows):
            return train._train_step(graphdef, tx, tc, state, rows)
        return Step(step, (state, rows), params=[*jax.tree.leaves(params), *jax.tree.leaves(frozen)],
                    inputs=jax.tree.leaves(rows), optimizer=[state.step, *jax.tree.leaves(opt)], donate=(0,))
    return build


def _abstract_adapters(model: GptOss, params: Mapping[str, Any], mesh: Mesh, rank: int
                       ) -> dict[str, jax.ShapeDtypeStruct]:
    from oss_jax import lora

    out = {}
    axes = {n: v.get_metadata()["axes"] for n, v in flat_params(model).items()}
    for name in lora.target_names(list(params), ("attn",)):
        shapes = lora.adapter_shapes(name, params[name].shape, rank)
        for part, shape, ax in zip(("lora_a", "lora_b"), shapes, lora.adapter_axes(name, axes[name]), strict=True):
            out[f"{name}.{part}"] = jax.ShapeDtypeStruct(shape, jnp.float32,
                                                         sharding=named_sharding(ax, shape, mesh, name))
    return out


def _like_params(opt: Any, params: Mapping[str, jax.ShapeDtypeStruct], mesh: Mesh) -> Any:
    """Optimizer-state leaves sharded like the parameter they shadow (found by name in their path); the rest
    (step counts) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(path, leaf):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey) and k.key in params]
        sharding = params[names[-1]].sharding if names else replicated
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    return jax.tree_util.tree_map_with_path(place, opt)


STEPS: dict[str, Callable[[GptOss, Mesh, int, int], Step]] = {
    "prefill": prefill_step, "decode": decode_step, "train": _train_builder(0), "train-lora": _train_builder(16)}


def step_builder(step: str) -> Callable[[GptOss, Mesh, int, int], Step]:
    """The builder of a named step; PlanError for one that does not exist (yet)."""
    if step not in STEPS:
        raise PlanError(f"unknown step {step!r}; plannable: {sorted(STEPS)}")
    return STEPS[step]


# ------------------------------------------------------------------ the plan


def plan(cfg: ModelConfig, mesh: Mesh, *, step: str = "prefill", batch: int | None = None, seq_len: int = 4096,
         dtype: str = "bf16", experts: str = "bf16") -> MemoryPlan:
    """Lower and compile `step` of the model `cfg` on `mesh` from abstract inputs; per-device bytes and timings.

    `batch` defaults to one sequence per batch shard (the product of the data and fsdp axes). `weight_copy_bytes`
    counts the part of `temp` that holds whole copies of parameters (see `weight_copy_bytes`).
    """
    build = step_builder(step)
    if dtype not in DTYPES:
        raise PlanError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    if experts not in EXPERTS:
        raise PlanError(f"unknown experts {experts!r}; use one of {EXPERTS}")
    if step.startswith("train") and experts == "packed":
        raise PlanError("training computes gradients of dense experts: plan it with experts bf16")
    batch = batch or batch_parallel_size(mesh.shape)
    model = abstract_sharded_model(cfg, mesh, DTYPES[dtype], experts == "packed")  # MeshError here, before compiling
    s = build(model, mesh, batch, seq_len)
    compiled, lower_s, compile_s = _compile(s, mesh)
    mem = compiled.memory_analysis()
    params, optimizer, inputs = (per_device_bytes(x) for x in (s.params, s.optimizer, s.inputs))
    temp, output, alias = (int(mem.temp_size_in_bytes), int(mem.output_size_in_bytes),
                           int(mem.alias_size_in_bytes))
    return MemoryPlan(
        params_bytes=params, optimizer_bytes=optimizer, input_bytes=inputs, temp_bytes=temp,
        output_bytes=output, alias_bytes=alias, total_bytes=params + optimizer + inputs + temp + output - alias,
        argument_bytes=int(mem.argument_size_in_bytes), devices=mesh.size, mesh=dict(mesh.shape),
        platform=mesh.devices.flat[0].platform, step=step, batch=batch, seq_len=seq_len, dtype=dtype,
        experts=experts, lower_s=lower_s, compile_s=compile_s, weight_copy_bytes=weight_copy_bytes(compiled.as_text()))


_HLO_LINE = re.compile(r"^\s*%(\S+) = (\w+)\[([\d,]*)\]\{[^}]*\} (\w+)\(([^)]*)\)")


def weight_copy_bytes(hlo: str, min_bytes: int = 2**20) -> int:
    """Bytes of whole copies of the step's parameters (the `state` argument) in optimized HLO text: a fusion, convert,
    copy or transpose of the entry computation that reads one parameter and writes as many elements.

    XLA:CPU has no bf16 GEMM: it multiplies bf16 weights through float32 copies (and lays some weights out anew), and
    hoists them to the start of the step, so they sit in `temp` together; a GPU/TPU compiler reads the weights in
    place. `total - weight_copy_bytes` is the step's memory without them (as long as the copies are all live at once,
    which is what XLA:CPU's buffer assignment shows for the plans in the README).
    """
    entry = hlo[hlo.index("\nENTRY"):] if "\nENTRY" in hlo else hlo
    params: dict[str, int] = {}
    total = 0
    for line in entry.splitlines():
        match = _HLO_LINE.match(line)
        if match is None:
            continue
        name, dtype, dims, op, operands = match.groups()
        elements = math.prod(int(d) for d in dims.split(",") if d)
        if op == "parameter":
            if name.startswith("state") or 'op_name="state[' in line:  # (SPMD-partitioned modules rename them)
                params[name] = elements
            continue
        size = elements * HLO_ITEMSIZE.get(dtype, 4)
        reads = [o.strip().lstrip("%") for o in operands.split(",")]
        if op in ("fusion", "convert", "copy", "transpose") and size >= min_bytes and any(
                params.get(r) == elements for r in reads):
            total += size
    return total


HLO_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                 "f64": 8, "s64": 8, "u64": 8}


def _compile(s: Step, mesh: Mesh) -> tuple[Any, float, float]:
    """Lower and compile a step for the mesh: (the compiled step, seconds lowering, seconds compiling)."""
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        lowered = jax.jit(s.fn, donate_argnums=s.donate).lower(*s.args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
    return compiled, round(t1 - t0, 2), round(time.perf_counter() - t1, 2)


def format_plan(p: Mapping[str, Any], model: str = "") -> str:
    """A human table of a plan's dict (as printed by `oss-jax plan`)."""
    mesh = ", ".join(f"{k}={v}" for k, v in p["mesh"].items())
    lines = [f"memory plan: {model} {p['step']}, batch {p['batch']} x {p['seq_len']} tokens, {p['dtype']}, "
             f"experts {p.get('experts', 'bf16')}, "
             f"mesh {mesh} ({p['devices']} {p['platform']} devices); lowered in {p['lower_s']:.1f} s, "
             f"compiled in {p['compile_s']:.1f} s",
             f"{'per device':<12}{'bytes':>18}{'GiB':>10}"]
    for key in ("params", "optimizer", "input", "temp", "output", "total"):
        n = p[f"{key}_bytes"]
        lines.append(f"{key:<12}{n:>18,}{n / 2**30:>10.2f}")
    copies = p.get("weight_copy_bytes", 0)
    if copies:
        n = p["total_bytes"] - copies
        lines.append(f"{'- copies':<12}{copies:>18,}{copies / 2**30:>10.2f}  of temp: whole copies of weights "
                     f"(XLA:CPU: float32 upcasts of bf16 weights, relaid-out weights)")
        lines.append(f"{'= in place':<12}{n:>18,}{n / 2**30:>10.2f}  total with the weights read in place, as on "
                     f"GPU/TPU")
    expected = p["params_bytes"] + p["optimizer_bytes"] + p["input_bytes"]
    check = "matches" if p["argument_bytes"] == expected else "DOES NOT match"
    lines.append(f"the compiled executable's arguments: {p['argument_bytes']:,} bytes ({check} params + optimizer "
                 f"+ input)")
    return "\n".join(lines)
