"""Peak RSS of growing a gpt-oss-20b cache (batch 1, bf16, every layer) from 65,536 to 131,072 slots: cache.grow
(empty slots appended) against the form it replaced (zeros of the new size, the old entries scattered in)."""
import resource
import sys
import time

import jax
import jax.numpy as jnp

from configs import preset_path
from oss_jax.cache import Caches, grow, init_cache, placed
from oss_jax.config import ModelConfig


def rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def scatter_grow(cfg, caches, max_len):  # the replaced form, as it was at 6ca4bca
    bigger = init_cache(cfg, caches[0].pos.shape[0], max_len, caches[0].k.dtype)
    layers = [old if new.pos.shape == old.pos.shape else
              new.write(old.k.transpose(0, 2, 1, 3), old.v.transpose(0, 2, 1, 3), old.pos)
              for old, new in zip(caches, bigger, strict=True)]
    return placed(Caches.of(layers))


cfg = ModelConfig.from_file(preset_path("gpt-oss-20b"))
form = sys.argv[1]
caches = init_cache(cfg, 1, 65536, jnp.bfloat16)
caches = Caches.of([c.write(jnp.ones((1, 4, 8, 64), jnp.bfloat16), jnp.ones((1, 4, 8, 64), jnp.bfloat16),
                            jnp.arange(4, dtype=jnp.int32)[None]) for c in caches])
jax.block_until_ready(caches)
size = sum(x.nbytes for x in jax.tree.leaves(caches)) / 2**30
before = rss_gib()
t0 = time.perf_counter()
out = jax.block_until_ready((grow if form == "pad" else scatter_grow)(cfg, caches, 131072))
dt = time.perf_counter() - t0
new = sum(x.nbytes for x in jax.tree.leaves(out)) / 2**30
after = rss_gib()
print(f"{form:8s} cache {size:.2f} -> {new:.2f} GiB: peak RSS {before:.2f} -> {after:.2f} GiB "
      f"(+{after - before:.2f}), {dt:.2f} s")
