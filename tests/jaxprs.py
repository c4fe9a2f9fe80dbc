"""What a traced step holds: primitive names, through nested jaxprs (loop bodies, jit calls, shard_map), not kernels;
and whether its Pallas kernels lower to Triton modules that verify."""

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr

# loops whose trip count is data, and conditionals: XLA:GPU copies their flag to the host and waits for it every step
HOST_WAITS = frozenset({"while", "cond"})


def primitives(jaxpr: ClosedJaxpr | Jaxpr, seen: set[str] | None = None) -> set[str]:
    """Every primitive's name in `jaxpr` and in the jaxprs nested in its equations' parameters; a Pallas kernel's
    own loops run on the device and are not entered."""
    seen = set() if seen is None else seen
    for eqn in (jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr).eqns:
        seen.add(eqn.primitive.name)
        if eqn.primitive.name == "pallas_call":
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(sub, (ClosedJaxpr, Jaxpr)):
                    primitives(sub, seen)
    return seen


def triton_modules_verified(fn, *args) -> int:
    """Lower jitted `fn(*args)` for CUDA here (no GPU needed) and run MLIR's verifier on every Triton module its
    Pallas kernels (called with interpret=False) lower to: what XLA:GPU rejects when it parses them at compile time
    ("Failed to parse Triton module"). Returns how many modules were verified."""
    from unittest import mock

    from jax._src.pallas.triton import lowering  # private: the one place the Triton module exists before bytecode

    verified = []
    lower = lowering.lower_jaxpr_to_triton_module

    def checked(*a, **k):
        result = lower(*a, **k)
        result.module.operation.verify()  # raises MLIRError naming the op and the source line
        verified.append(result)
        return result

    with mock.patch.object(lowering, "lower_jaxpr_to_triton_module", checked):
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return len(verified)
