"""What a traced step holds: primitive names, through nested jaxprs (loop bodies, jit calls, shard_map), not kernels."""

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
