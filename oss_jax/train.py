"""Training step: masked next-token cross-entropy (+ router load balancing), AdamW with warmup + cosine, clipping.

The train state is a pytree of flat dicts keyed by dotted parameter names: `trainable` (every parameter, or only
LoRA adapters), `frozen` (the base weights under LoRA; empty otherwise) and the optax state. Parameters keep the
dtype they were loaded in (float32 master weights by default); `compute_dtype` only sets the matmul inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from oss_jax import lora
from oss_jax.checkpoint import nest
from oss_jax.config import ModelConfig
from oss_jax.model import REMAT_POLICIES, GptOss, abstract_model, model_mesh
from oss_jax.params import flat_params, logical_axes
from oss_jax.sharding import named_sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BATCH_KEYS = ("tokens", "targets", "loss_mask", "positions", "segments")


class TrainConfigError(ValueError):
    """A training setting that cannot work (names the setting)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Run settings (separate from the model config); `configs/train/*.json` hold presets."""

    steps: int = 100
    batch_size: int = 8
    seq_len: int = 512
    grad_accum: int = 1
    learning_rate: float = 1e-5
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    aux_loss_coef: float = 0.0
    remat: str = "none"
    compute_dtype: str = "float32"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("attn",)
    train_on: str = "assistant"
    seed: int = 0
    save_every: int = 50
    keep: int = 3

    def __post_init__(self):
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "save_every", "keep")
        for name in positive:
            if getattr(self, name) <= 0:
                raise TrainConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.remat not in REMAT_POLICIES:
            raise TrainConfigError(f"remat {self.remat!r}: choose from {sorted(REMAT_POLICIES)}")
        if self.compute_dtype not in DTYPES:
            raise TrainConfigError(f"compute_dtype {self.compute_dtype!r}: choose from {sorted(DTYPES)}")
        if self.lora_rank < 0 or self.warmup_steps < 0 or self.learning_rate <= 0:
            raise TrainConfigError("lora_rank and warmup_steps must be >= 0 and learning_rate > 0")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """A JSON preset, with `overrides` (None values ignored) on top."""
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrainConfigError(f"{path}: cannot read the training config: {e}") from None
        return cls.from_dict(values | {k: v for k, v in overrides.items() if v is not None}, str(path))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "training config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainConfigError(f"{source}: unknown settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0


def schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine down to min_lr_ratio * peak at the last step."""
    return optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, tc.warmup_steps,
                                              max(tc.steps, tc.warmup_steps + 1), tc.learning_rate * tc.min_lr_ratio)


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (weight decay on matrices only: not on biases, norms or sinks)."""
    def decay_mask(params):
        return {name: p.ndim >= 2 for name, p in params.items()}
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                       optax.adamw(schedule(tc), tc.b1, tc.b2, tc.eps, weight_decay=tc.weight_decay, mask=decay_mask))


# ------------------------------------------------------------------ losses


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """logits [B, T, V] float32, targets [B, T], mask [B, T] -> summed masked token losses (scalar)."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - picked) * mask)


def load_balancing_loss(router_logits: jax.Array, k: int, valid: jax.Array) -> jax.Array:
    """router_logits [L, B, T, E], valid [B, T] -> E * sum_e f_e P_e over all layers' valid tokens (Switch/HF).

    f_e: share of top-k assignments to e (counted k per token), P_e: mean full-softmax probability of e.
    """
    e = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits, axis=-1)
    chosen = jax.nn.one_hot(jax.lax.top_k(router_logits, k)[1], e).sum(axis=-2)
    w = valid.astype(jnp.float32)[None, ..., None]
    rows = router_logits.shape[0] * jnp.maximum(jnp.sum(valid), 1)
    return e * jnp.sum(jnp.sum(chosen * w, axis=(0, 1, 2)) / rows * jnp.sum(probs * w, axis=(0, 1, 2)) / rows)


def loss_terms(model: GptOss, batch: Mapping[str, jax.Array], remat: str) -> tuple[jax.Array, jax.Array]:
    """One micro-batch [B, T] -> (summed masked cross-entropy, load-balancing loss)."""
    hidden, router_logits = model.train_hidden(batch["tokens"], batch["positions"], batch["segments"], remat)
    ce = cross_entropy(model.unembed_logits(hidden), batch["targets"], batch["loss_mask"])
    aux = load_balancing_loss(router_logits, model.cfg.experts_per_token, batch["positions"] >= 0)
    return ce, aux


# ------------------------------------------------------------------ state and step


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a step changes (and the frozen base under LoRA), as one donated pytree."""

    step: jax.Array
    trainable: dict[str, jax.Array]
    frozen: dict[str, jax.Array]
    opt_state: Any


class Trainer:
    """Builds the initial state from a model and runs jitted steps on the params' mesh."""

    def __init__(self, model: GptOss, tc: TrainConfig):
        self.cfg: ModelConfig = model.cfg
        self.tc = tc
        self.mesh = model_mesh(model)
        self.tx = optimizer(tc)
        self._replicated = SingleDeviceSharding(jax.devices()[0]) if self.mesh is None else \
            NamedSharding(self.mesh, PartitionSpec())
        self.graphdef = nnx.graphdef(abstract_model(self.cfg, DTYPES[tc.compute_dtype]))
        self._step = None

    def init_state(self, model: GptOss) -> TrainState:
        """The step-0 state: parameters taken from `model` (not copied), adapters and optimizer state created."""
        params = {name: var[...] for name, var in flat_params(model).items()}
        frozen: dict[str, jax.Array] = {}
        if self.tc.lora:
            frozen, params = params, self._adapters(params, logical_axes(model))
        opt_state = jax.jit(self.tx.init)(params)
        state = TrainState(jnp.zeros((), jnp.int32), params, frozen, opt_state)
        return jax.tree.map(self._committed, state)

    def _committed(self, a: jax.Array) -> jax.Array:
        """`a` placed for good (on the mesh when there is one), as the step's outputs will be."""
        if self.mesh is not None and isinstance(a.sharding, NamedSharding):
            return a
        return jax.device_put(a, self._replicated)

    def _adapters(self, params: Mapping[str, jax.Array], axes: Mapping[str, tuple]) -> dict[str, jax.Array]:
        names = lora.target_names(list(params), self.tc.lora_targets)
        adapters = lora.init_adapters({n: params[n].shape for n in names}, self.tc.lora_rank,
                                      jax.random.key(self.tc.seed))
        if self.mesh is None:
            return adapters
        placed = {}
        for name in names:
            for part, ax in zip(("lora_a", "lora_b"), lora.adapter_axes(name, axes[name]), strict=True):
                key = f"{name}.{part}"
                placed[key] = jax.device_put(adapters[key], named_sharding(ax, adapters[key].shape, self.mesh, key))
        return placed

    def step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on a batch of [grad_accum, B, T] arrays (BATCH_KEYS); `state` is donated."""
        if self._step is None:  # the new state keeps the old one's shardings: one executable for every step
            shardings = jax.tree.map(lambda a: a.sharding, state)
            self._step = jax.jit(functools.partial(_train_step, self.graphdef, self.tx, self.tc), donate_argnums=0,
                                 out_shardings=(shardings, self._replicated))
        if self.mesh is None:
            return self._step(state, batch)
        with jax.set_mesh(self.mesh):
            return self._step(state, batch)

    def params(self, state: TrainState) -> dict[str, jax.Array]:
        """The model's parameters by dotted name (adapters merged in under LoRA)."""
        return full_params(state.trainable, state.frozen, self.tc)


def full_params(trainable: Mapping[str, jax.Array], frozen: Mapping[str, jax.Array], tc: TrainConfig
                ) -> dict[str, jax.Array]:
    """The model's parameters: `trainable` itself, or the frozen base with the LoRA adapters merged in."""
    if not tc.lora:
        return dict(trainable)
    return lora.merge(frozen, trainable, tc.lora_alpha / tc.lora_rank)


def _objective(graphdef, tc: TrainConfig, trainable, frozen, batch, tokens_trained, micro_batches):
    model = nnx.merge(graphdef, nest(full_params(trainable, frozen, tc)))
    ce, aux = loss_terms(model, batch, tc.remat)
    return ce / tokens_trained + tc.aux_loss_coef * aux / micro_batches, (ce, aux)


def _grads(graphdef, tc: TrainConfig, state: TrainState, batch):
    """Gradients of the whole batch's loss, accumulated over its micro-batches (exactly one big batch's)."""
    micro_batches = batch["tokens"].shape[0]
    tokens_trained = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    grad_fn = jax.value_and_grad(functools.partial(_objective, graphdef, tc), has_aux=True)

    def micro(acc, mb):
        (_, (ce, aux)), g = grad_fn(state.trainable, state.frozen, mb, tokens_trained, micro_batches)
        return jax.tree.map(jnp.add, acc, (g, ce, aux)), None

    zeros = (jax.tree.map(jnp.zeros_like, state.trainable), jnp.zeros(()), jnp.zeros(()))
    if micro_batches == 1:
        (grads, ce, aux), _ = micro(zeros, jax.tree.map(lambda a: a[0], batch))
    else:
        (grads, ce, aux), _ = jax.lax.scan(micro, zeros, batch)
    return grads, ce / tokens_trained, aux / micro_batches, tokens_trained


def _train_step(graphdef, tx, tc: TrainConfig, state: TrainState, batch):
    grads, ce, aux, tokens_trained = _grads(graphdef, tc, state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": ce + tc.aux_loss_coef * aux, "ce": ce, "aux_loss": aux, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(tc)(state.step), "trained_tokens": tokens_trained}
    return TrainState(state.step + 1, trainable, state.frozen, opt_state), metrics


def loss_and_grads(model: GptOss, batch: Mapping[str, jax.Array], tc: TrainConfig
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss a step would report and its gradient w.r.t. every parameter (by dotted name), without updating."""
    graphdef = nnx.graphdef(abstract_model(model.cfg, DTYPES[tc.compute_dtype]))
    state = TrainState(jnp.zeros((), jnp.int32), {n: v[...] for n, v in flat_params(model).items()}, {}, None)
    grads, ce, aux, _ = _grads_jit(graphdef, dataclasses.replace(tc, lora_rank=0), state, batch)
    return ce + tc.aux_loss_coef * aux, grads


_grads_jit = jax.jit(_grads, static_argnums=(0, 1))
