"""The gpt-oss transformer: embed -> [x += Attn(norm x); x += MoE(norm x)] * L -> norm -> unembed.

Parameter tree (dotted names; shapes in the letters of `oss_jax.layers`):
  embed [V, D]; final_norm.scale [D]; unembed [V, D]
  layers.{i}.attn_norm.scale [D]; layers.{i}.mlp_norm.scale [D]
  layers.{i}.attn.{q_kernel [D,N,H], q_bias [N,H], k_kernel/v_kernel [D,K,H], k_bias/v_bias [K,H],
                   o_kernel [N,H,D], o_bias [D], sinks [N]}
  layers.{i}.moe.{router_kernel [D,E], router_bias [E], mlp1_kernel [E,D,2F] (gate/linear interleaved),
                  mlp1_bias [E,2F], mlp2_kernel [E,F,D], mlp2_bias [E,D]}
With packed experts (`packed_experts=True`, inference), each expert kernel is MXFP4 as shipped instead:
  layers.{i}.moe.mlp1_kernel.{blocks [E,2F,D/32,16], scales [E,2F,D/32]} (uint8 `packed.Packed` variables)
  layers.{i}.moe.mlp2_kernel.{blocks [E,D,F/32,16], scales [E,D,F/32]}
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oss_jax import YNN_FLAG_KNOWN, packed
from oss_jax.cache import Caches, LayerCache
from oss_jax.config import ModelConfig
from oss_jax.layers import Attention, RMSNorm
from oss_jax.moe import MoE
from oss_jax.packed import assign_packed
from oss_jax.params import assign_params, param

# remat policy name -> what a block keeps for the backward pass (None: no remat, everything is kept)
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs, dtype: jnp.dtype,
                 packed_experts: bool = False):
        self.attn_norm = RMSNorm(cfg, rngs=rngs)
        self.attn = Attention(cfg, layer, rngs=rngs, dtype=dtype)
        self.mlp_norm = RMSNorm(cfg, rngs=rngs)
        self.moe = MoE(cfg, rngs=rngs, dtype=dtype, packed_experts=packed_experts)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerCache | None = None
                 ) -> tuple[jax.Array, LayerCache | None]:
        """x [B, T, D] float32 residual stream -> same, and the layer's updated cache."""
        h, cache = self.attn(self.attn_norm(x), positions, cache)
        x = x + h
        return x + self.moe(self.mlp_norm(x)), cache

    def train(self, x: jax.Array, positions: jax.Array, segments: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Packed rows, no cache: x [B, T, D] -> same, and the router logits [B, T, E] (for the auxiliary loss)."""
        h, _ = self.attn(self.attn_norm(x), positions, None, segments)
        x = x + h
        h = self.mlp_norm(x)
        return x + self.moe(h), self.moe.router_logits(h)


class GptOss(nnx.Module):
    """gpt-oss with parameters in `dtype` (matmul inputs too); norms, softmax and the residual stay float32.

    `packed_experts`: expert kernels stay MXFP4 (4.25 bits/weight) and are decoded inside the step (inference).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 packed_experts: bool = False):
        self.cfg, self.dtype = cfg, dtype
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List([Block(cfg, i, rngs=rngs, dtype=dtype, packed_experts=packed_experts)
                                for i in range(cfg.num_hidden_layers)])
        self.final_norm = RMSNorm(cfg, rngs=rngs)
        self.unembed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """tokens [B, T] int -> logits [B, T, V] float32 (positions default to 0..T-1)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return self.unembed_logits(self.hidden(tokens, positions, None)[0])

    def hidden(self, tokens: jax.Array, positions: jax.Array, caches: Caches | None
               ) -> tuple[jax.Array, Caches | None]:
        """tokens [B, T] at positions [B, T] (-1 = padding) -> final-normed hidden [B, T, D] and updated caches."""
        x = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.float32)
        new_caches = []
        for i, block in enumerate(self.layers):
            x, cache = block(x, positions, None if caches is None else caches[i])
            new_caches.append(cache)
        return self.final_norm(x), (None if caches is None else Caches.of(new_caches))

    def train_hidden(self, tokens: jax.Array, positions: jax.Array, segments: jax.Array, remat: str = "none"
                     ) -> tuple[jax.Array, jax.Array]:
        """Packed training rows [B, T] -> final-normed hidden [B, T, D] and router logits [L, B, T, E].

        `remat` (see REMAT_POLICIES) recomputes each block in the backward pass instead of keeping its activations.
        """
        x = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.float32)
        block_fn = Block.train
        if REMAT_POLICIES[remat] is not None:
            block_fn = nnx.remat(Block.train, policy=REMAT_POLICIES[remat])
        router_logits = []
        for block in self.layers:
            x, logits = block_fn(block, x, positions, segments)
            router_logits.append(logits)
        return self.final_norm(x), jnp.stack(router_logits)

    def unembed_logits(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., V] float32."""
        rows = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        return rows_dot_transposed(rows, self.unembed[...].astype(self.dtype)).reshape(*x.shape[:-1], -1)


def rows_dot_transposed(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [X, D] . w [V, D] -> [X, V] float32.

    On CPU, for 2-32 rows, w is the dot's left operand ([V, X], then transposed; more than 4 rows padded to a multiple
    of 8): the GEMMs read w faster that way. The gpt-oss unembedding (2.3 GB), best of 5: YNNPACK's GEMM (generation's
    steps, `unembed_apart`) 80-92 ms for 2-8 rows, near a one-row product's 78-93, against 112-137 with w on the
    right. XLA's own GEMM (a step traced inside another jit): 236 ms against 267 for 8 rows, 273 against 3,120 for 4
    (343 as one matrix-vector product per row), but ~280 against ~175 per row for 2. The barrier keeps XLA's layout
    assignment from folding the transpose back into the dot, which gives the slow form again.
    """
    rows = x.shape[0]
    if not _cpu_left_operand(rows):
        return jnp.einsum("XD,VD->XV", x, w, preferred_element_type=jnp.float32)
    padded = x if rows <= 4 else jnp.pad(x, ((0, -rows % 8), (0, 0)))
    logits = jax.lax.optimization_barrier(jnp.einsum("VD,XD->VX", w, padded, preferred_element_type=jnp.float32))
    return logits.T[:rows]


def _cpu_left_operand(rows: int) -> bool:
    """Whether `rows_dot_transposed` takes w as the dot's left operand: on CPU, 2-32 rows."""
    return 2 <= rows <= 32 and packed.on_cpu()


# XLA:CPU options for generation's unembedding compiled on its own (`unembed_apart`): YNNPACK's GEMM, which the
# package switches off everywhere else (see oss_jax/__init__.py); None on a jaxlib these were not measured with.
APART_UNEMBED_OPTIONS = ({"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
                         if YNN_FLAG_KNOWN else None)


def unembed_apart(rows: int) -> bool:
    """Whether generation's steps unembed `rows` rows in a compile of their own with `APART_UNEMBED_OPTIONS`: on
    CPU, 2-32 rows. YNNPACK's GEMM reads the gpt-oss unembedding 2.5x faster there than XLA's own (8 rows: 92 against
    236 ms), at ~5x its rounding error (max |err| 2.1e-5 against 3.8e-6 from float64 for logits up to 14.6). One row
    stays in the step: XLA's matrix-vector product already reads at the streaming bandwidth."""
    return APART_UNEMBED_OPTIONS is not None and _cpu_left_operand(rows)


def abstract_model(cfg: ModelConfig, dtype: jnp.dtype = jnp.float32, packed_experts: bool = False) -> GptOss:
    """The model with shape-only parameters (nothing allocated)."""
    return nnx.eval_shape(lambda: GptOss(cfg, rngs=nnx.Rngs(0), dtype=dtype, packed_experts=packed_experts))


def model_from_params(cfg: ModelConfig, arrays: Mapping[str, np.ndarray | jax.Array],
                      dtype: jnp.dtype = jnp.float32, packed_experts: bool = False) -> GptOss:
    """A model holding exactly `arrays` (dotted names as in this module's docstring), cast to `dtype`; packed
    experts take `NAME.blocks` / `NAME.scales` (see `packed.pack_params`)."""
    model = abstract_model(cfg, dtype, packed_experts)
    assign_params(model, assign_packed(model, arrays) if packed_experts else arrays)
    return model


def model_mesh(model: GptOss) -> jax.sharding.Mesh | None:
    """The mesh the parameters live on (None when they are not NamedSharding-placed)."""
    sharding = getattr(model.embed[...], "sharding", None)
    return sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None


@functools.partial(jax.jit, static_argnums=0)
def _forward_pure(graphdef, state, tokens: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(tokens)


def _forward(model: GptOss, tokens: jax.Array) -> jax.Array:
    # a pure jit over (graphdef, state) returns only the logits; an nnx.jit would hand every parameter back out
    graphdef, state = nnx.split(model)
    return _forward_pure(graphdef, state, tokens)


def forward(model: GptOss, tokens: jax.Array) -> jax.Array:
    """Jitted full-sequence forward: tokens [B, T] -> logits [B, T, V] float32; expert-parallel on the params' mesh."""
    mesh = model_mesh(model)
    if mesh is None:
        return _forward(model, tokens)
    with jax.set_mesh(mesh):
        return _forward(model, tokens)
