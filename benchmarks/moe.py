"""One MoE layer on 8 host CPU devices: the expert-parallel path vs a dense one, same inputs, one run.

Rows (median ms/iter after warm-up, and the ratio to the dense path):
  expert-parallel  `moe_expert_parallel` under `jax.set_mesh` on {'expert': 8}: tokens and experts split 8 ways,
                   all_to_all dispatch and combine, grouped matmul over each device's experts
  dense            every expert on every token (einsum), weighted by the routing (zero outside each token's top k),
                   tokens split 8 ways, weights replicated: E/k times the expert FLOPs, no dispatch. The OpenAI
                   reference instead gathers each token's k experts' weights, [X, k, D, 2F] (8.6 GB at the default
                   sizes), so it cannot run here
  local            `moe_local` on one device: all experts there, the same grouped matmul, no dispatch
Also prints max |Δ| of each path's output against the dense one. The 8 devices share this machine's cores, so
this measures work and dispatch overhead, not a multi-device speed-up. Not part of CI.

    python benchmarks/moe.py [--tokens 1024] [--d-model 512] [--ffn 512] [--experts 32] [--top-k 4] [--iters 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# `python benchmarks/moe.py` puts this folder first on sys.path, where benchmarks/convert.py would shadow the package
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from configs import preset_path  # noqa: E402
from oss_jax.config import ModelConfig  # noqa: E402
from oss_jax.moe import moe_expert_parallel, moe_local, route, swiglu  # noqa: E402
from oss_jax.sharding import make_mesh  # noqa: E402


def moe_dense(x, router_w, router_b, w1, b1, w2, b2, *, cfg: ModelConfig) -> jax.Array:
    """x [X, D] -> [X, D]: all E experts on every token, summed with the top-k routing weights (0 elsewhere)."""
    ids, weights = route(x @ router_w + router_b, cfg.experts_per_token)
    gate = jnp.zeros((x.shape[0], w1.shape[0]), jnp.float32).at[jnp.arange(x.shape[0])[:, None], ids].set(weights)
    h = swiglu(jnp.einsum("XD,EDF->XEF", x, w1) + b1, cfg.swiglu_limit, cfg.swiglu_alpha)
    y = jnp.einsum("XEF,EFD->XED", h, w2) + b2
    return jnp.einsum("XED,XE->XD", y, gate)


def inputs(cfg: ModelConfig, tokens: int, seed: int = 0) -> list[jax.Array]:
    """x [X, D] and the layer's weights (router [D, E], [E]; mlp1 [E, D, 2F], [E, 2F]; mlp2 [E, F, D], [E, D])."""
    d, e, f = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
    shapes = [(tokens, d), (d, e), (e,), (e, d, 2 * f), (e, 2 * f), (e, f, d), (e, d)]
    stds = [1.0, 2.0 / d**0.5, 0.1, 4.0 / d**0.5, 0.1, 0.5 / f**0.5, 0.1]  # as convert/synthetic.py scales them
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [std * jax.random.normal(k, s, jnp.float32) for k, s, std in zip(keys, shapes, stds, strict=True)]


def time_paths(paths: dict[str, tuple], iters: int, warmup: int) -> dict[str, tuple[float, jax.Array]]:
    """name -> (fn, args) to name -> (median ms of fn(*args), its output). The paths take turns, run after run, so
    load from other processes on the machine slows them alike; the `warmup` runs before timing include compiling."""
    for fn, args in paths.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in paths}
    outs = {}
    for _ in range(iters):
        for name, (fn, args) in paths.items():
            t0 = time.perf_counter()
            outs[name] = jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: (1e3 * statistics.median(times[name]), outs[name]) for name in paths}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="X, tokens in the layer's input")
    p.add_argument("--d-model", type=int, default=512, help="D")
    p.add_argument("--ffn", type=int, default=512, help="F, each expert's width")
    p.add_argument("--experts", type=int, default=32, help="E (a multiple of 8)")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--iters", type=int, default=5, help="timed runs (the median is printed)")
    p.add_argument("--warmup", type=int, default=1, help="runs before timing (the first compiles)")
    args = p.parse_args()
    if args.experts % 8 or args.iters < 1:
        p.error("--experts must be a multiple of 8 (the expert axis) and --iters at least 1")
    cfg = dataclasses.replace(ModelConfig.from_file(preset_path("tiny")), hidden_size=args.d_model,
                              intermediate_size=args.ffn, num_experts=args.experts, experts_per_token=args.top_k)
    mesh = make_mesh({"expert": 8})
    x, *w = inputs(cfg, args.tokens)

    def placed(specs: list[PartitionSpec]) -> list[jax.Array]:
        return [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip([x, *w], specs, strict=True)]

    tokens_split, whole, experts_split = PartitionSpec("expert", None), PartitionSpec(), PartitionSpec("expert")
    expert_parallel = placed([tokens_split, whole, whole] + [experts_split] * 4)  # x, router, then expert weights
    data_parallel = placed([tokens_split] + [whole] * 6)
    one_device = jax.device_put([x, *w], jax.devices()[0])

    def on_mesh(fn):
        """fn jitted, called under `jax.set_mesh(mesh)` as the model's forward calls the MoE."""
        jitted = jax.jit(fn)

        def run(*a):
            with jax.set_mesh(mesh):
                return jitted(*a)
        return run

    ep, dense = "expert-parallel (expert=8)", "dense, all experts (8-way tokens)"
    paths = {
        ep: (on_mesh(functools.partial(moe_expert_parallel, cfg=cfg, dtype=jnp.float32, mesh=mesh)), expert_parallel),
        dense: (on_mesh(functools.partial(moe_dense, cfg=cfg)), data_parallel),
        "local, 1 device": (jax.jit(functools.partial(moe_local, cfg=cfg, dtype=jnp.float32)), one_device),
    }
    results = time_paths(paths, args.iters, args.warmup)

    print(f"MoE layer, float32: X={args.tokens} tokens, D={cfg.hidden_size}, F={cfg.intermediate_size}, "
          f"E={cfg.num_experts}, k={cfg.experts_per_token}; {jax.device_count()} CPU devices on {os.cpu_count()} "
          f"cores; median of {args.iters} after {args.warmup} warm-up")
    print(f"{'path':<34}{'ms/iter':>10}{'vs dense':>10}{'max |Δ| vs dense':>18}")
    dense_ms, dense_out = results[dense]
    for name, (ms, out) in results.items():
        err = float(jnp.abs(jax.device_get(out) - jax.device_get(dense_out)).max())
        print(f"{name:<34}{ms:>10.1f}{ms / dense_ms:>10.2f}{err:>18.1e}")
    print(f"expert-parallel / dense time ratio: {results[ep][0] / dense_ms:.2f} (dense does "
          f"{cfg.num_experts / cfg.experts_per_token:.0f}x the expert FLOPs); outputs reach |y| "
          f"{float(jnp.abs(dense_out).max()):.1f}")


if __name__ == "__main__":
    main()
