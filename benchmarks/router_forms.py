"""GPU decode's router logits (at most E/k rows), form by form: device time and launches per call, error against
float64, then the full decode step with each chosen form (benchmarks/device_decode.py in this process).

    python benchmarks/router_forms.py [--model-forms concat,sum] [-- device_decode.py arguments]

One row's router is x [1, 2880] @ w [2880, E] + b: a 184 KB (E 32) or 737 KB (E 128) read, well under a microsecond
at HBM speed; what it costs is how XLA:GPU tiles the reduction over D. `concat` was the library's decode form until
2026-11-27, `sum` is it since (`moe.router_decode_logits`).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import oss_jax  # noqa: F401  (first: it sets XLA flags)
from benchmarks import device_decode
from oss_jax import moe


def _products(x, w):
    return x.astype(jnp.float32)[:, :, None] * w.astype(jnp.float32)  # [X, D, E], exact


def concat(x, w, b):
    """The bias as one more row of products, one reduction over D + 1."""
    bias = jnp.broadcast_to(b.astype(jnp.float32), (x.shape[0], 1, w.shape[1]))
    return jnp.sum(jnp.concatenate([_products(x, w), bias], axis=1), axis=1)


def gemm(x, w, b):
    return jnp.einsum("XD,DE->XE", x, w, preferred_element_type=jnp.float32) + b


def split(rows: int):
    def form(x, w, b):
        """D in groups of `rows`: the groups' sums first (many outputs to spread over the GPU), then theirs."""
        p = _products(x, w)
        parts = jnp.sum(p.reshape(p.shape[0], -1, rows, p.shape[2]), axis=2)
        return jnp.sum(parts, axis=1) + b
    return form


FORMS = {"concat": concat, "sum": moe.router_decode_logits, "gemm": gemm, "split32": split(32), "split96": split(96),
         "split320": split(320)}


def time_forms(reps: int) -> dict[tuple[int, int, str], tuple[float, float]]:
    """(E, rows, form) -> device microseconds per call (0 on a host backend) and max |error| against float64 over
    the largest |logit|, at decode shapes; prints them with the launches per call."""
    d = 2880
    out = {}
    for e in (32, 128):
        for x_rows in (1, 8):
            rng = np.random.default_rng(e + x_rows)
            x = jnp.asarray(rng.standard_normal((x_rows, d)), jnp.bfloat16)
            w = jnp.asarray(rng.standard_normal((d, e)) * 0.02, jnp.bfloat16)
            b = jnp.asarray(rng.standard_normal(e), jnp.float32)
            want = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
            for name, form in FORMS.items():
                f = jax.jit(form)
                got = np.asarray(f(x, w, b))
                err = float(np.abs(got - want).max() / np.abs(want).max())

                def calls(f=f, x=x, w=w, b=b):
                    for _ in range(reps):
                        jax.block_until_ready(f(x, w, b))
                totals = device_decode.kernel_times(calls)[0]
                us = sum(t for t, _ in totals.values()) / reps / 1e3
                launches = sum(c for _, c in totals.values()) / reps
                out[(e, x_rows, name)] = us, err
                print(f"router E {e:3d} rows {x_rows}: {name:9s} {us:7.2f} us/call, {launches:.0f} launches, "
                      f"max |Δ| vs float64 {err:.1e} of the largest", flush=True)
    return out


def main() -> None:
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--model-forms", default="concat,best", help="forms to run the decode step with (best: the "
                   "fastest at E 32 over 1 and 8 rows)")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    times = time_forms(args.reps)
    best = min(FORMS, key=lambda n: times[(32, 1, n)][0] + times[(32, 8, n)][0])
    print(f"fastest at E 32: {best}", flush=True)
    for name in args.model_forms.split(","):
        name = best if name == "best" else name
        if not name or not rest:
            continue
        print(f"=== decode with the router form {name}", flush=True)
        moe.router_decode_logits = FORMS[name]  # what moe.router_logits calls for GPU decode
        jax.clear_caches()
        sys.argv = ["device_decode.py", *rest]
        device_decode.main()


if __name__ == "__main__":
    main()
