"""One attention layer on CPU for many queries at once: scoring every key (`layers.attend` with the mask from
positions, as before) vs the form that scores only the keys a query can see, both in one process, interleaved:
  sliding layers (default): `layers.attend_banded` (queries in blocks of W/2, each scoring the 1.5W keys before it);
  full layers (--full):     `layers.attend_causal` (tiles of queries x keys, none past the diagonal; training only).

    python benchmarks/sliding_attention.py [--model gpt-oss-20b] [--chunks 512,2048] [--train 4096]
    python benchmarks/sliding_attention.py --full --train 2048,4096

Two workloads, each the whole `Attention` module (q/k/v/o projections of the model's width included):
  prefill: a prompt chunk of C tokens after a full ring of W slots (forward only; sliding layers);
  train:   T tokens of one packed row, no cache, forward and backward (gradients of the input and every weight).
Printed per workload: each form's best time, the ratio, the compiled step's temporary bytes (XLA's memory analysis,
where the [.., T, S] scores live) and the largest difference of the outputs (and of the gradients). Random weights.
"""

from __future__ import annotations

import argparse
import json
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


def every_key(q, k, v, sinks, q_pos, k_pos, window, scale, segments=None):
    """`attend_banded`'s arguments, every key scored (the sliding layer's form before it)."""
    return layers.attend(q, k, v, sinks, layers.attention_mask(q_pos, k_pos, window, segments), scale)


def every_key_causal(q, k, v, sinks, positions, segments, scale):
    """`attend_causal`'s arguments, every key scored (the full layer's form before it)."""
    return layers.attend(q, k, v, sinks, layers.attention_mask(positions, positions, None, segments), scale)


# per layer kind: the function `Attention` calls (patched by name) and the forms compared, the old one first
FORMS = {"sliding": ("attend_banded", {"every key": every_key, "banded": layers.attend_banded}),
         "full": ("attend_causal", {"every key": every_key_causal, "blocks": layers.attend_causal})}


def full_ring(cfg: ModelConfig, window: int, start: int, seed: int = 0) -> LayerCache:
    """A ring of `window` slots holding the positions just before `start` (slot = position mod window)."""
    rng = np.random.default_rng(seed)
    shape = (1, cfg.num_key_value_heads, window, cfg.head_dim)
    pos = np.arange(start - window, start)
    ring = np.zeros(window, np.int32)
    ring[pos % window] = pos
    return LayerCache(jnp.asarray(rng.standard_normal(shape, np.float32)),
                      jnp.asarray(rng.standard_normal(shape, np.float32)), jnp.asarray(ring[None]))


def _timed(step, args, steps: int, best: float) -> tuple[float, object]:
    out = None
    for _ in range(steps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(step(*args))
        best = min(best, time.perf_counter() - t0)
    return best, out


def _step(graph, kind: str):
    """The workload as a function of (state, x, positions, cache or segments)."""
    if kind == "prefill":
        return lambda s, x, p, c: nnx.merge(graph, s)(x, p, c)[0]

    def grads(s, x, p, seg):
        def loss(s, x):
            y, _ = nnx.merge(graph, s)(x, p, None, seg)
            return jnp.sum(y * y) / y.size
        return jax.grad(loss, argnums=(0, 1))(s, x)
    return grads


def measure(cfg: ModelConfig, layer: int, kind: str, tokens: int, steps: int, rounds: int) -> dict:
    """Both forms on one workload: best seconds, temporary bytes, outputs (and gradients) compared."""
    window = cfg.window(layer)
    target, forms = FORMS["full" if window is None else "sliding"]
    attention = layers.Attention(cfg, layer, rngs=nnx.Rngs(0))
    graph, state = nnx.split(attention)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, tokens, cfg.hidden_size), np.float32))
    start = (window or 0) if kind == "prefill" else 0
    positions = jnp.arange(start, start + tokens, dtype=jnp.int32)[None]
    if kind == "prefill":
        args = (state, x, positions, full_ring(cfg, window, start))
    else:
        args = (state, x, positions, jnp.zeros_like(positions))
    compiled, temp, best, outs = {}, {}, {}, {}
    for name, form in forms.items():  # each form traced (so compiled) once, with `form` in place
        # `Attention` takes `form` while tracing; a new function each time: JAX keeps a function's trace
        with mock.patch.object(layers, target, form):
            compiled[name] = jax.jit(_step(graph, kind)).lower(*args).compile()
        memory = compiled[name].memory_analysis()
        temp[name] = None if memory is None else int(memory.temp_size_in_bytes)
        best[name] = float("inf")
    for _ in range(rounds):
        for name, step in compiled.items():
            best[name], outs[name] = _timed(step, args, steps, best[name])
    a, b = (jax.tree.leaves(o) for o in outs.values())
    diff = max(float(jnp.max(jnp.abs(u - w))) for u, w in zip(a, b, strict=True))
    largest = max(float(jnp.max(jnp.abs(u))) for u in a)
    return {"kind": kind, "tokens": tokens, "window": window, "forms": list(forms), "best_s": best, "temp_bytes": temp,
            "max_abs_diff": diff, "largest": largest}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt-oss-20b", help="a preset (its width and heads) or a config.json path")
    p.add_argument("--chunks", default=None,
                   help="prompt chunk lengths after a full ring ('' for none; default 512,2048, none with --full)")
    p.add_argument("--train", default="4096", help="training row lengths, forward and backward ('' for none)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per form and round (best counts)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of both forms, interleaved")
    p.add_argument("--full", action="store_true", help="a full-attention layer (training rows only)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    cfg = ModelConfig.from_file(preset_path(args.model))
    layer = next(i for i in range(cfg.num_hidden_layers) if (cfg.window(i) is None) == args.full)
    if args.full and args.chunks:
        p.error("--full measures training rows only (no --chunks)")
    args.chunks = ("" if args.full else "512,2048") if args.chunks is None else args.chunks
    print(f"{args.model}: layer {layer} (window {cfg.window(layer)}), D {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads, {cfg.num_key_value_heads} kv heads of {cfg.head_dim}; "
          f"{jax.devices()[0].device_kind}; best of {args.steps} steps x {args.rounds} rounds", flush=True)
    work = [("prefill", int(c)) for c in args.chunks.split(",") if c] + [
        ("train", int(t)) for t in args.train.split(",") if t]
    results = []
    for kind, tokens in work:
        r = measure(cfg, layer, kind, tokens, args.steps, args.rounds)
        old, new = r["forms"]
        a, b = r["best_s"][old], r["best_s"][new]
        ta, tb = (r["temp_bytes"][n] for n in r["forms"])
        mem = "" if ta is None else f"; temporaries {ta / 2**20:.1f} -> {tb / 2**20:.1f} MiB"
        print(f"{kind:7s} {tokens:5d} tokens: {old} {a * 1e3:9.2f} ms, {new} {b * 1e3:9.2f} ms: {a / b:5.2f}x"
              f"{mem}; outputs{' and gradients' if kind == 'train' else ''} differ by {r['max_abs_diff']:.1e} "
              f"(largest {r['largest']:.2e})", flush=True)
        results.append(r)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
