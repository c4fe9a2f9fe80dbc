"""What a traced step holds: primitive names, through nested jaxprs (loop bodies, jit calls, shard_map), not kernels;
whether its Pallas kernels lower to Triton modules that verify; and the collectives a compiled step runs."""

import re

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr

from oss_jax.plan import HLO_ITEMSIZE

# loops whose trip count is data, and conditionals: XLA:GPU copies their flag to the host and waits for it every step
HOST_WAITS = frozenset({"while", "cond"})


def equations(jaxpr: ClosedJaxpr | Jaxpr) -> list:
    """Every equation of `jaxpr` and of the jaxprs nested in its equations' parameters, in order; a Pallas kernel's
    own equations run on the device and are not entered."""
    out = []
    for eqn in (jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr).eqns:
        out.append(eqn)
        if eqn.primitive.name == "pallas_call":
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(sub, (ClosedJaxpr, Jaxpr)):
                    out.extend(equations(sub))
    return out


def primitives(jaxpr: ClosedJaxpr | Jaxpr) -> set[str]:
    """Every primitive's name in `jaxpr` and in the jaxprs nested in it (see `equations`)."""
    return {eqn.primitive.name for eqn in equations(jaxpr)}


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


COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def collectives(hlo_text: str) -> list[tuple[str, int]]:
    """(op, bytes of its result on one device) for every collective in a compiled, partitioned HLO module's text
    (`jax.jit(...).lower(...).compile().as_text()`); a tuple result counts all its parts."""
    ops = "|".join(COLLECTIVES)
    out = []
    for line in hlo_text.splitlines():
        m = re.search(rf"= (.*?) ({ops})(?:-start)?\(", line)
        if m:
            shapes = re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", m.group(1))
            out.append((m.group(2), sum(HLO_ITEMSIZE.get(t, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
                                        for t, dims in shapes)))
    return out
