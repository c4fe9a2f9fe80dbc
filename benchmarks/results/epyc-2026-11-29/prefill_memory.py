"""Compiled memory of one 512-token prefill chunk, gpt-oss-20b shapes (2 layers: sliding + full), float32 weights and
cache at 131,072 slots, batch 1: the committed (donating) step against the same step without donation."""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from configs import preset_path
from oss_jax import generate
from oss_jax.cache import init_cache
from oss_jax.config import FULL, SLIDING, ModelConfig
from oss_jax.model import abstract_model

cfg = dataclasses.replace(ModelConfig.from_file(preset_path("gpt-oss-20b")), num_hidden_layers=2,
                          layer_types=(SLIDING, FULL))
model = abstract_model(cfg, jnp.float32)
graphdef, state = nnx.split(model)
flat, treedef = jax.tree_util.tree_flatten(state)
graph = generate._graph(graphdef, treedef)
leaves = tuple(flat)
caches = jax.eval_shape(lambda: init_cache(cfg, 1, 131072, jnp.float32))
tok = jax.ShapeDtypeStruct((1, 512), jnp.int32)
undonated = jax.jit(generate._prefill.__wrapped__, static_argnums=0, static_argnames="unembed")
GiB = 2**30
for name, fn in (("donated (committed)", generate._prefill), ("not donated (before)", undonated)):
    m = fn.lower(graph, leaves, tok, tok, caches).compile().memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    print(f"{name:22s} arguments {m.argument_size_in_bytes / GiB:6.3f} GiB  outputs {m.output_size_in_bytes / GiB:6.3f}"
          f"  aliased {m.alias_size_in_bytes / GiB:6.3f}  temporaries {m.temp_size_in_bytes / GiB:6.3f}"
          f"  -> held during the step {peak / GiB:6.3f} GiB")
