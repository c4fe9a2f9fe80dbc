"""Row tiles of one expert each, as the grouped matmuls take them: their sizes, a routing's plan of them, and the
loop over them (counted by the data on CPU; a fixed count, the most any routing makes, on accelerators).

A loop whose trip count is data, and a conditional, make XLA:GPU copy a flag to the host and wait for it at every
step (its WhileThunk); a loop whose count is known when compiling runs without the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACCELERATOR_TILE = 256  # most rows of a tile on accelerators (`packed.fixed_loop_matmul`, `moe.tiled_grouped_matmul`)


def power_of_two(a: int, num_experts: int, most: int = 64) -> int:
    """Rows of a tile: the next power of two >= A / E, at most `most`."""
    return min(most, 1 << (-(-a // num_experts) - 1).bit_length())


def most_tiles(a: int, num_experts: int, tile: int) -> int:
    """The most tiles of `tile` rows, each of one expert, that A rows over E experts can need: each expert with rows
    rounds up by at most tile - 1, and at most min(A, E) have rows."""
    return (a + min(a, num_experts) * (tile - 1)) // tile


def fixed(a: int, num_experts: int) -> tuple[int, int]:
    """Accelerators' tiling of A rows over E experts: (rows per tile, up to ACCELERATOR_TILE; the loop's fixed trip
    count, `most_tiles`)."""
    tile = power_of_two(a, num_experts, ACCELERATOR_TILE)
    return tile, most_tiles(a, num_experts, tile)


def plan(group_sizes: jax.Array, tile: int, sizes: tuple[int, ...]):
    """For each s in `sizes`: tiles of s rows per expert [E], the row where they start [E], group ends [E]. Each
    expert's rows: full tiles of `tile` rows, then one of the smallest size that holds the remainder."""
    rows = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(rows)
    starts = ends - rows
    full, rem = rows // tile, rows % tile
    table = jnp.asarray(sizes, jnp.int32)
    rounded = jnp.where(rem > 0, table[jnp.minimum(jnp.searchsorted(table, rem), len(sizes) - 1)], 0)
    for s in sizes:
        if s == tile:
            yield s, full + (rounded == s), starts, ends
        else:
            yield s, (rounded == s).astype(jnp.int32), starts + full * tile, ends


def loop(s: int, count: jax.Array, first: jax.Array, ends: jax.Array, body, carry, unroll: int | None = None,
         trips: int | None = None):
    """carry = body(carry, expert, first row, valid rows) over every tile of s rows (count [E] of them per expert).

    A loop with a traced trip count; with `unroll`, that many conditional steps instead (a static upper bound); with
    `trips`, a loop of that many steps, those past the last tile with no valid rows (body must leave carry as is)."""
    tile_end = jnp.cumsum(count)

    def step(t, carry):
        j = jnp.minimum(jnp.searchsorted(tile_end, t, side="right", method="compare_all"), count.shape[0] - 1)
        row0 = first[j] + (t - tile_end[j] + count[j]) * s
        return body(carry, j.astype(jnp.int32), row0, ends[j] - row0)

    if trips is not None:
        return jax.lax.fori_loop(0, trips, step, carry)
    if unroll is None:
        return jax.lax.fori_loop(0, tile_end[-1], step, carry)
    for t in range(unroll):
        carry = jax.lax.cond(t < tile_end[-1], step, lambda _, c: c, t, carry)
    return carry
