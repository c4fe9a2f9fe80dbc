"""Skinny matmuls on GPUs (decode's few rows) as Pallas kernels in which each row reads only its own weight.

`row_kernel` is the plumbing: a program per (row, block of outputs, split of the input), the row's expert id from
the group sizes (or given per row, rows in any order: `RowExperts`), padding rows skipped, the splits' partial sums
added. `dense_matmul` runs it on dense weights [E, D, N]: a row's expert's [D, N] read once, contiguous along N,
summed in float32 (on an H100, 20b bf16 experts at decode shapes: 84 us device time for one layer's two matmuls
at 4 rows, the memory bound, where the gathered XLA reduction took 788 us). With E = 1 it is a plain [A, D] x [D, N]
product.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

DENSE_COLS = 128  # outputs per program of `dense_matmul`
DENSE_STEP = 64  # input rows of the weight a program reads per loop step: [64, 128] contiguous along N
DENSE_PROGRAMS = 2048  # split D over programs until about this many run
DENSE_WARPS = 4


class RowExperts(NamedTuple):
    """Rows in any order, each with its expert: ids [A] int32 and whether the row is real (valid [A] bool; others
    read nothing and come out 0). Where the row forms take this instead of group sizes, decode needs no sort by
    expert and no scatter back (`moe.moe_local`)."""

    ids: jax.Array
    valid: jax.Array


def require_groups(group_sizes: jax.Array | RowExperts, a: int, e: int, caller: str) -> jax.Array:
    """Group sizes [E] as given, for the forms that loop over experts (not a row form: see `packed.row_form`); rows
    given as `RowExperts` there are one clear error."""
    if isinstance(group_sizes, RowExperts):
        raise ValueError(f"{caller}: {a} rows over {e} experts must come grouped by expert (group sizes), not as "
                         "RowExperts: see packed.row_form")
    return group_sizes


def row_experts(group_sizes: jax.Array | RowExperts, a: int) -> RowExperts:
    """Expert id of each of A rows grouped by expert (sizes [E]; rows past the groups: the last expert) and whether
    the row is in a group; `RowExperts` as given. Compares against every group end: no loop (a while loop syncs with
    the host on GPUs)."""
    if isinstance(group_sizes, RowExperts):
        return group_sizes
    ends = jnp.cumsum(group_sizes)
    rows = jnp.arange(a)
    ids = jnp.sum(rows[:, None] >= ends[None, :], axis=1, dtype=jnp.int32)
    return RowExperts(jnp.minimum(ids, group_sizes.shape[0] - 1), rows < ends[-1])


def interpreted(interpret: bool | None) -> bool:
    """Whether a kernel runs interpreted: as asked, or by default everywhere but on GPUs."""
    return jax.default_backend() != "gpu" if interpret is None else interpret


def row_kernel(step, steps: int, group_sizes: jax.Array | RowExperts, n: int, block: int, splits: int, warps: int,
               interpret: bool | None, *operands: jax.Array, lanes: int | None = None) -> jax.Array:
    """[A, N] float32 from a Pallas kernel (Triton on GPUs, interpreted elsewhere) whose program (row, block of
    `block` outputs, split) runs acc = step(row, its expert, output slice, split, i, acc, *operand refs) for i < steps
    and writes acc (rows past the groups skip the loop and write 0: they read nothing); the splits' partial sums are
    added. With `lanes`, acc is [block, lanes], summed over the lanes once after the loop (not in every step: a
    sum across threads). The rows' experts (operands' first axis) come from `group_sizes` (`row_experts`)."""
    a = operands[0].shape[0]
    ids, valid = row_experts(group_sizes, a)

    def kernel(ids_ref, valid_ref, *refs):
        *operand_refs, out_ref = refs
        row, expert, split = pl.program_id(0), ids_ref[pl.program_id(0)], pl.program_id(2)
        outs = pl.ds(pl.program_id(1) * block, block)

        def body(i, acc):
            return step(row, expert, outs, split, i, acc, *operand_refs)

        # a branch around a loop of `steps`, not a trip count that is data: that lowered to an scf.for whose bounds
        # differ in type, which XLA:GPU rejects (tests/test_packed.py verifies the Triton module on CPU)
        valid = valid_ref[row] != 0

        @pl.when(valid)
        def _():
            acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((block,) if lanes is None else (block, lanes),
                                                              jnp.float32))
            out_ref[...] = acc if lanes is None else acc.sum(axis=1)

        @pl.when(jnp.logical_not(valid))
        def _():
            out_ref[...] = jnp.zeros((block,), jnp.float32)

    partial = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((splits, a, n), jnp.float32), grid=(a, n // block, splits),
        out_specs=pl.BlockSpec((pl.squeezed, pl.squeezed, block), lambda i, j, k: (k, i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=3),  # Triton, not Mosaic GPU
        interpret=interpreted(interpret),
    )(ids, valid.astype(jnp.int32), *operands)
    return partial.sum(axis=0)


def grid_plan(steps: int, n: int, a: int, block: int, programs: int) -> tuple[int, int]:
    """(block, splits) for A rows, N outputs and `steps` loop steps over the input: the largest power of two at most
    `block` dividing N, then the fewest splits of the steps (dividing them) that make about `programs` programs."""
    while n % block:
        block //= 2
    splits = next(s for s in range(1, steps + 1) if steps % s == 0 and (a * (n // block) * s >= programs
                                                                        or s == steps))
    return block, splits


def dense_kernel(x: jax.Array, w: jax.Array, group_sizes: jax.Array | RowExperts, interpret: bool | None = None
                 ) -> jax.Array:
    """x [A, D] (rows grouped by expert, sizes [E], or `RowExperts`) x w [E, D, N] -> [A, N] float32 (rows past the
    groups -> 0), each row reading its expert's [D, N] once, `DENSE_STEP` input rows at a time; operands in w's
    dtype, products and sums in float32. No VJP: `dense_matmul` is this with one."""
    e, d, n = w.shape
    a = x.shape[0]
    step_rows = DENSE_STEP
    while d % step_rows:
        step_rows //= 2
    block, splits = grid_plan(d // step_rows, n, a, DENSE_COLS, DENSE_PROGRAMS)
    per_split = d // step_rows // splits

    def step(row, expert, cols, split, i, acc, x_ref, w_ref):
        rows = pl.ds((split * per_split + i) * step_rows, step_rows)
        return acc + jnp.sum(w_ref[expert, rows, cols].astype(jnp.float32)
                             * x_ref[row, rows].astype(jnp.float32)[:, None], axis=0)

    return row_kernel(step, per_split, group_sizes, n, block, splits, DENSE_WARPS, interpret, x.astype(w.dtype), w)


@jax.custom_vjp
def dense_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array | RowExperts) -> jax.Array:
    """`dense_kernel` (Triton on GPUs, interpreted elsewhere), differentiable: its VJP is plain XLA, each row's
    gradient from its own expert's weight."""
    return dense_kernel(x, w, group_sizes)


def _dense_fwd(x, w, group_sizes):
    return dense_matmul(x, w, group_sizes), (x, w, group_sizes)


def _dense_bwd(res, g):
    x, w, group_sizes = res
    ids, valid = row_experts(group_sizes, x.shape[0])
    g = jnp.where(valid[:, None], g, 0.0)
    dx = jnp.einsum("AN,ADN->AD", g, w[ids].astype(jnp.float32))
    dw = jnp.zeros(w.shape, jnp.float32).at[ids].add(jnp.einsum("AD,AN->ADN", x.astype(jnp.float32), g))
    return dx.astype(x.dtype), dw.astype(w.dtype), None


dense_matmul.defvjp(_dense_fwd, _dense_bwd)
