"""One full-attention layer's decode step on CPU against long KV caches: `layers.write_then_attend` (the
accelerators' form: the new key written first, then the cache attended to) vs `layers.attend_then_write` (CPU's: the
old cache plus the new key, then the write), both in one process, interleaved.

    python benchmarks/decode_attention.py [--model gpt-oss-20b] [--slots 1024,16384,65536] [--batches 1,2]

Per cache length and batch: the best step time of each form (the whole `Attention` module: q/k/v/o projections of
the model's width plus attention over the cache, the cache donated), the k and v bytes it holds over that time, the
ratio, the copies or transposes of a cache-sized array in each compiled step, and the largest difference of the two
forms' outputs (their written caches must be equal). At 16k slots and more the cache, not the projections' weights,
is most of what a step reads. Random weights and caches; the cache holds positions up to slots - 16.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from unittest import mock

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not benchmarks/ (convert.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import oss_jax  # noqa: E402,F401  (before any computation: it sets XLA flags)
from configs import preset_path  # noqa: E402
from oss_jax import layers  # noqa: E402
from oss_jax.cache import LayerCache  # noqa: E402
from oss_jax.config import ModelConfig  # noqa: E402

FORMS = {"write first": layers.write_then_attend, "attend_then_write": layers.attend_then_write}


def random_cache(cfg: ModelConfig, batch: int, slots: int, seed: int = 0) -> LayerCache:
    rng = np.random.default_rng(seed)
    shape = (batch, cfg.num_key_value_heads, slots, cfg.head_dim)
    pos = np.full((batch, slots), -1, np.int32)
    pos[:, :slots - 16] = np.arange(slots - 16)
    return LayerCache(jnp.asarray(rng.standard_normal(shape, np.float32)),
                      jnp.asarray(rng.standard_normal(shape, np.float32)), jnp.asarray(pos))


def cache_copies(hlo: str, cache: LayerCache) -> int:
    """Copies or transposes of a k/v-cache-shaped array in a compiled program's text."""
    shape = f"f32[{','.join(map(str, cache.k.shape))}]"
    return sum(1 for line in hlo.splitlines() if re.search(r" (copy|transpose)\(", line) and f"= {shape}{{" in line)


def measure(cfg: ModelConfig, layer: int, batch: int, slots: int, steps: int, rounds: int) -> dict:
    """Both forms on one layer and one cache size: best step seconds, cache copies, outputs and caches compared."""
    attention = layers.Attention(cfg, layer, rngs=nnx.Rngs(0))
    graph, state = nnx.split(attention)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((batch, 1, cfg.hidden_size), np.float32))
    position = jnp.full((batch, 1), slots - 16, jnp.int32)
    cache = random_cache(cfg, batch, slots)
    compiled, copies, first = {}, {}, {}
    for name, form in FORMS.items():  # each form traced (so compiled) once, with `form` in place
        with mock.patch.object(layers, "attend_then_write", form):  # `Attention` takes `form` while tracing
            step = jax.jit(lambda s, x, p, c: nnx.merge(graph, s)(x, p, c), donate_argnums=3)
            compiled[name] = step.lower(state, x, position, cache).compile()
        copies[name] = cache_copies(compiled[name].as_text(), cache)
    best = {name: float("inf") for name in FORMS}
    for _ in range(rounds):
        for name, step in compiled.items():
            cache = random_cache(cfg, batch, slots)
            y, cache = step(state, x, position, cache)  # the first step is compared
            first[name] = (np.asarray(y), [np.asarray(a) for a in jax.tree.leaves(cache)])
            for _ in range(steps):
                t0 = time.perf_counter()
                y, cache = step(state, x, position, cache)
                y.block_until_ready()
                best[name] = min(best[name], time.perf_counter() - t0)
            del cache
    (y_a, c_a), (y_b, c_b) = first.values()
    same_cache = all(np.array_equal(a, b) for a, b in zip(c_a, c_b, strict=True))
    kv_bytes = 2 * batch * cfg.num_key_value_heads * slots * cfg.head_dim * 4
    return {"batch": batch, "slots": slots, "cache_bytes": kv_bytes,
           "best_s": best, "cache_copies": copies, "max_abs_diff": float(np.abs(y_a - y_b).max()),
           "largest": float(np.abs(y_a).max()), "same_cache": same_cache}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt-oss-20b", help="a preset (its width and heads) or a config.json path")
    p.add_argument("--slots", default="1024,16384,65536", help="cache lengths of the full-attention layer")
    p.add_argument("--batches", default="1,2", help="rows per step")
    p.add_argument("--steps", type=int, default=8, help="timed steps per form and round (best counts)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of both forms, interleaved")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if jax.default_backend() != "cpu":
        p.error("this compares CPU decode forms; run it with JAX_PLATFORMS=cpu")
    cfg = ModelConfig.from_file(preset_path(args.model))
    layer = next(i for i in range(cfg.num_hidden_layers) if cfg.window(i) is None)
    print(f"{args.model}: layer {layer} (full attention), D {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
          f"{cfg.num_key_value_heads} kv heads of {cfg.head_dim}; best of {args.steps} steps x {args.rounds} rounds",
          flush=True)
    results = []
    for slots in (int(s) for s in args.slots.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            r = measure(cfg, layer, batch, slots, args.steps, args.rounds)
            a, b = r["best_s"]["write first"], r["best_s"]["attend_then_write"]
            print(f"slots {slots:6d} batch {batch}: write first {a * 1e3:8.2f} ms "
                  f"({r['cache_bytes'] / a / 1e9:5.1f} GB/s of cache, {r['cache_copies']['write first']} copies), "
                  f"attend_then_write {b * 1e3:8.2f} ms ({r['cache_bytes'] / b / 1e9:5.1f} GB/s, "
                  f"{r['cache_copies']['attend_then_write']} copies): {a / b:.2f}x; outputs differ by "
                  f"{r['max_abs_diff']:.1e} (largest {r['largest']:.2e}), "
                  f"caches {'equal' if r['same_cache'] else 'DIFFER'}",
                  flush=True)
            results.append(r)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "results": results}, indent=1))
    return 0 if all(r["same_cache"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
