"""Mixture of experts: route (top-k, then softmax) -> permute -> expert MLP (grouped matmul) -> unpermute.

Decode on accelerators skips the permutation (`unsorted`): each row names its expert (`rowkernel.RowExperts`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from oss_jax import packed, rowkernel, tiles
from oss_jax.config import ModelConfig
from oss_jax.params import param
from oss_jax.sharding import RULES, split_ways
from oss_jax.unstacked import Unstacked


def route(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """logits [X, E] -> expert ids [X, k] int32 and weights [X, k]: softmax over the top-k logits only."""
    top, ids = jax.lax.top_k(logits, k)
    return ids.astype(jnp.int32), jax.nn.softmax(top.astype(jnp.float32), axis=-1)


def router_logits(x: jax.Array, router_w: jax.Array, router_b: jax.Array, k: int, dtype: jnp.dtype) -> jax.Array:
    """x [X, D] -> x @ router_w + router_b [X, E] float32 (x and the weight as `dtype` values, summed in float32).

    Decode on GPUs (at most E/k rows) sums the products over D in one reduction and adds the bias to its result.
    At 8 rows XLA:GPU compiled the GEMM split 32 ways over D padded to 3,072, copying x and the weight into padded
    buffers every step (5 launches; benchmarks/gpu_launches.py). The reduction runs over D itself: with the bias
    as one more row of products (D + 1 = 2,881 = 43 x 67), XLA:GPU left it in one launch of 22 us a layer (20b,
    batch 1), where a reduction over D = 2,880 takes two launches of 3.4 us in all (H200, jax 0.11.2;
    benchmarks/router_forms.py, logs in benchmarks/results/h100-h200-2026-11-27/)."""
    w = router_w.astype(dtype)
    if packed.backend() != "gpu" or x.shape[0] * k > w.shape[1]:
        return jnp.einsum("XD,DE->XE", x, w, preferred_element_type=jnp.float32) + router_b
    return router_decode_logits(x, w, router_b)


def router_decode_logits(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """`router_logits`' GPU decode form: x [X, D] . w [D, E] summed over D in float32, then + b [E] -> [X, E]."""
    products = x.astype(jnp.float32)[:, :, None] * w.astype(jnp.float32)  # exact: products of two `dtype` values
    return jnp.sum(products, axis=1) + b


def permute(x: jax.Array, ids: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """x [X, D], ids [X, k] -> rows [A, D] grouped by expert, their expert ids [A], group sizes [E], order [A]."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return x[order // k], flat[order], group_sizes, order


def unpermute(y: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """y [A, D] in expert order, weights [X, k] -> [X, D]: each token's k outputs, weighted and summed."""
    return combine(jnp.zeros_like(y).at[order].set(y), weights)


def combine(y: jax.Array, weights: jax.Array) -> jax.Array:
    """y [X*k, D] in token order (token x's k outputs at rows x*k ...), weights [X, k] -> [X, D], weighted sums."""
    x, k = weights.shape
    return jnp.einsum("XkD,Xk->XD", y.reshape(x, k, y.shape[-1]), weights.astype(y.dtype))


def swiglu(h: jax.Array, limit: float, alpha: float) -> jax.Array:
    """h [..., 2F] with gate/linear interleaved (even/odd) -> [..., F]; gate clamped above, linear both ways."""
    pairs = h.reshape(*h.shape[:-1], h.shape[-1] // 2, 2)
    gate = jnp.minimum(pairs[..., 0], limit)
    linear = jnp.clip(pairs[..., 1], -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (linear + 1.0)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array | Unstacked, group_sizes: jax.Array | rowkernel.RowExperts,
                   head: int = 0, max_group: int | None = None) -> jax.Array:
    """lhs [A, D] (rows grouped by expert, sizes [E], or in any order with `RowExperts` where `packed.row_form`) x
    rhs [E, D, N] -> [A, N] float32; rows past the groups -> 0. `head` > 0 (CPU): `_headed_grouped_matmul`.
    `Unstacked` rhs (generation on CPU): the same head and tiles, forward only, each expert read in place.
    `max_group`: a promise that no group holds more rows (rows past it in a group may come out 0; `tile_sizes`).

    On CPU and GPUs, `tiled_grouped_matmul`, with a tiled VJP (gradients of lhs and rhs): XLA expands
    `jax.lax.ragged_dot` there into a dense product against every expert, E times the work and an [E, A, D] buffer
    (on GPUs unless cuDNN takes it, which needs a bf16 output; XLA's RaggedDotRewriter). On TPUs,
    `jax.lax.ragged_dot`. Up to E rows (decode): on GPUs the Pallas kernel `rowkernel.dense_matmul`, on other
    accelerators `gathered_matmul`; each row reads only its own expert's weight.
    """
    if packed.row_form(lhs.shape[0], rhs.shape[0], False):
        return (rowkernel.dense_matmul if packed.backend() == "gpu" else gathered_matmul)(lhs, rhs, group_sizes)
    group_sizes = rowkernel.require_groups(group_sizes, lhs.shape[0], rhs.shape[0], "moe.grouped_matmul")
    if isinstance(rhs, Unstacked):  # forward only: generation's steps
        if head:
            return _headed(lhs, rhs, _head_and_tail(group_sizes, lhs.shape[0], head), head, False, max_group)
        return tiled_grouped_matmul(lhs, rhs, rhs.shape[0], group_sizes, max_group)
    if packed.on_cpu():
        return _headed_grouped_matmul(lhs, rhs, group_sizes, head, max_group) if head else _tiled_grouped_matmul(
            lhs, rhs, group_sizes, max_group)
    if packed.backend() == "gpu":
        return _tiled_grouped_matmul(lhs, rhs, group_sizes, max_group)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)


def gathered_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array | rowkernel.RowExperts) -> jax.Array:
    """`grouped_matmul` as one reduction in which each row reads only its own expert's weight: for few rows, where a
    dense lowering of ragged_dot reads every expert's weights. The gathered weights are upcast to float32 as an
    [A, D, N] product (on an H100, 20b bf16 experts: 0.9 ms for one layer's two matmuls at 4 rows, 6.5 ms at 32)."""
    ids, valid = rowkernel.row_experts(group_sizes, lhs.shape[0])
    y = jnp.sum(lhs.astype(jnp.float32)[:, :, None] * rhs[ids].astype(jnp.float32), axis=1)  # [A, D, N] -> [A, N]
    return jnp.where(valid[:, None], y, 0.0)


TILE = 64  # rows of a full tile: about where XLA:CPU's float32 GEMM stops gaining from more rows
CHUNK_BYTES = 4 * 2**20  # weight rows multiplied per inner step: a slice that stays in cache


def row_tile(a: int, num_experts: int) -> int:
    """Rows of a full tile for A rows over E experts: TILE, or 1 where A <= E/4 (decode: experts rarely repeat)."""
    return 1 if 4 * a <= num_experts else TILE


def tiling(a: int, num_experts: int, k: int, n: int, itemsize: int, max_group: int | None = None
           ) -> tuple[int, tuple[int, ...], int, int | None]:
    """How `tiled_grouped_matmul` splits A rows over E experts (at most `max_group` rows each) against [K, N] weights:
    (full tile, tile sizes, weight rows per inner step, fixed trip count or None).

    CPU: `row_tile`, remainders in `tile_sizes`, CHUNK_BYTES of weight at a time, exactly the routing's tiles.
    Accelerators: one tile size and the most tiles any routing makes as the trip count (`tiles.fixed`), whole
    weights: a loop whose count is data makes XLA:GPU wait on the host at every step.
    """
    if packed.on_cpu():
        tile = row_tile(a, num_experts)
        return tile, tile_sizes(tile, max_group), _chunk_rows(k, n, itemsize), None
    tile, trips = tiles.fixed(a, num_experts)
    return tile, (tile,), k, trips


def tile_sizes(tile: int, max_group: int | None = None) -> tuple[int, ...]:
    """Rows a tile may have: a full tile, or what a remainder rounds up to (powers of two, and 3/4 of a full tile).

    With `max_group` (no expert has more rows), only the sizes such groups can need: each size is a loop of its own,
    compiled even where it runs no step, and a decode step's few tokens need few (20b at batch 8: 32 rows over 32
    experts, at most 8 each, need 1, 2, 4 and 8 of the 8 sizes; one token, at most 1 row each: only 1)."""
    sizes = sorted({2**i for i in range(tile.bit_length()) if 2**i < tile} | {3 * tile // 4, tile} - {0})
    if max_group is None:
        return tuple(sizes)
    largest_remainder = max(1, min(max_group, tile - 1))
    top = next(s for s in sizes if s >= largest_remainder)
    return tuple(s for s in sizes if s <= top or (s == tile and max_group >= tile))


def tiled_grouped_matmul(lhs: jax.Array, weight: Callable[[jax.Array], jax.Array] | Unstacked, num_experts: int,
                         group_sizes: jax.Array, max_group: int | None = None) -> jax.Array:
    """lhs [A, D] (rows grouped by expert, sizes [E]) x expert j's weight(j) [D, N] (or kernel j of an `Unstacked`,
    `_switch_dot`) -> [A, N] float32.

    Every tile holds rows of one expert: each expert's rows make full tiles of `row_tile` rows and one tile of the
    smallest of `tile_sizes` that holds the remainder (less padding than remainder), so no row meets a second
    expert; one loop per tile size (those that groups of up to `max_group` rows can need). `weight` is called
    (with a traced int32 j) only inside the tiles, so only for experts that have rows; its rows are taken CHUNK_BYTES
    at a time. One-row tiles (decode) run unrolled, so that XLA's cost analysis counts their work. Rows past
    sum(group_sizes) -> 0. On accelerators, see `tiling`.
    """
    a, d = lhs.shape
    unstacked = isinstance(weight, Unstacked)
    w = weight.kernels[0] if unstacked else jax.eval_shape(weight, jax.ShapeDtypeStruct((), jnp.int32))
    n = w.shape[1]
    tile, sizes, chunk, trips = tiling(a, num_experts, d, n, w.dtype.itemsize, max_group)
    x = jnp.pad(lhs, ((0, tile), (0, 0)))

    def product(xt, j):
        return _switch_dot(xt, weight, j, chunk) if unstacked else _expert_dot(xt, weight, j, chunk, n)

    def tile_body(s: int):
        def body(out, j, row0, valid):
            y = product(jax.lax.dynamic_slice_in_dim(x, row0, s), j)
            cur = jax.lax.dynamic_slice_in_dim(out, row0, s)
            y = jnp.where((jnp.arange(s) < valid)[:, None], y, cur)
            return jax.lax.dynamic_update_slice_in_dim(out, y, row0, 0)
        return body

    out = _zeros_varying_like((a + tile, n), lhs, group_sizes, w)
    unroll = a if tile == 1 and trips is None else None
    for s, count, first, ends in tiles.plan(group_sizes, tile, sizes):
        out = tiles.loop(s, count, first, ends, tile_body(s), out, unroll, trips)
    return out[:a]


def _zeros_varying_like(shape: tuple[int, ...], *like) -> jax.Array:
    """float32 zeros varying over the shard_map axes any of `like` (arrays or shapes) varies over: a loop carry must
    keep its type (no-op outside shard_map or with check_vma=False)."""
    types = [v.manual_axis_type if isinstance(v, jax.ShapeDtypeStruct) else jax.typeof(v).manual_axis_type
             for v in like]
    axes = set().union(*(t.varying for t in types if t is not None))
    zeros = jnp.zeros(shape, jnp.float32)
    return jax.lax.pcast(zeros, tuple(sorted(axes)), to="varying") if axes else zeros


def _chunk_rows(k: int, n: int, itemsize: int) -> int:
    """Rows of a [K, N] weight taken per inner step: CHUNK_BYTES' worth, a multiple of 8, at most K."""
    return min(k, max(8, CHUNK_BYTES // (n * itemsize) // 8 * 8))


def _chunks(k: int, chunk: int, i: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Chunk i of K rows: its start (the last chunk ends at K, overlapping the one before) and which of its rows are
    new [chunk] (the overlap is masked out)."""
    start = jnp.minimum(i * chunk, k - chunk)
    return start, start + jnp.arange(chunk) >= i * chunk


def _expert_dot(x: jax.Array, weight, j: jax.Array, chunk: int, n: int) -> jax.Array:
    """x [S, K] @ weight(j) [K, N] -> [S, N] float32, `chunk` weight rows at a time.

    XLA:CPU copies a dynamically indexed weight before multiplying; a chunk at a time, that copy stays in cache
    (the whole [2880, 5760] expert of gpt-oss at once: 4-10x slower than a separate array)."""
    k = x.shape[1]
    if chunk == k:
        return jnp.dot(x, weight(j), preferred_element_type=jnp.float32)

    def step(i, acc):
        start, new = _chunks(k, chunk, i)
        xc = jnp.where(new, jax.lax.dynamic_slice_in_dim(x, start, chunk, 1), 0)
        wc = jax.lax.dynamic_slice_in_dim(weight(j), start, chunk, 0)
        return acc + jnp.dot(xc, wc, preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, -(-k // chunk), step, jnp.zeros((x.shape[0], n), jnp.float32))


def _switch_dot(x: jax.Array, w: Unstacked, j: jax.Array, chunk: int) -> jax.Array:
    """x [S, K] @ kernel j of w [K, N] -> [S, N] float32, reading only that kernel, in place (`lax.switch`).

    One row: the kernel as [K/C, C, N] (C the largest divisor of K up to `chunk` weight rows, `tiling`'s), one
    batched product of C-term dots summed over K/C: a gpt-oss-20b [2880, 5760] kernel read at 40 GB/s (C 180)
    against 26-28 as one matrix-vector product, which also errs more (2e-6 of the largest output against 2e-7)."""
    k, n = w.kernels[0].shape
    c = max(i for i in range(1, chunk + 1) if k % i == 0)

    def dot(kernel, x):
        if x.shape[0] == 1 and c < k:
            parts = jnp.einsum("GC,GCN->GN", x.reshape(k // c, c), kernel.reshape(k // c, c, n),
                               preferred_element_type=jnp.float32)
            return jnp.sum(parts, axis=0, keepdims=True)
        return jnp.dot(x, kernel, preferred_element_type=jnp.float32)

    return jax.lax.switch(j, [functools.partial(dot, kernel) for kernel in w.kernels], x)


def _tiled_weight_grad(lhs: jax.Array, g: jax.Array, num_experts: int, group_sizes: jax.Array) -> jax.Array:
    """d rhs [E, D, N] float32 of the grouped matmul: for each expert j, the sum over its tiles of x^T g (one loop:
    remainders in full tiles, zero rows past the group)."""
    a, d = lhs.shape
    n = g.shape[1]
    tile, _, chunk, trips = tiling(a, num_experts, d, n, 4)
    x, gp = (jnp.pad(v, ((0, tile), (0, 0))) for v in (lhs, g))

    def body(dw, j, row0, valid):
        xt = jnp.where((jnp.arange(tile) < valid)[:, None], jax.lax.dynamic_slice_in_dim(x, row0, tile), 0)
        gt = jax.lax.dynamic_slice_in_dim(gp, row0, tile)

        def step(i, dw):
            start, new = _chunks(d, chunk, i)
            xc = jnp.where(new, jax.lax.dynamic_slice_in_dim(xt, start, chunk, 1), 0)
            upd = jnp.einsum("SC,SN->CN", xc, gt, preferred_element_type=jnp.float32)
            cur = jax.lax.dynamic_slice(dw, (j, start, 0), (1, chunk, n))
            return jax.lax.dynamic_update_slice(dw, cur + upd[None], (j, start, 0))

        return jax.lax.fori_loop(0, -(-d // chunk), step, dw)

    dw = _zeros_varying_like((num_experts, d, n), lhs, g, group_sizes)
    (_, count, first, ends), = tiles.plan(group_sizes, tile, (tile,))
    return tiles.loop(tile, count, first, ends, body, dw, trips=trips)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled_grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, max_group: int | None = None
                          ) -> jax.Array:
    return tiled_grouped_matmul(lhs, lambda j: rhs[j], rhs.shape[0], group_sizes, max_group)


def _tiled_fwd(lhs, rhs, group_sizes, max_group):
    return _tiled_grouped_matmul(lhs, rhs, group_sizes, max_group), (lhs, rhs, group_sizes)


def _tiled_bwd(max_group, res, g):
    """d lhs: the same tiles against each weight transposed; d rhs: per expert, its tiles' x^T g."""
    lhs, rhs, group_sizes = res
    e = rhs.shape[0]
    d_lhs = tiled_grouped_matmul(g, lambda j: rhs[j].T, e, group_sizes, max_group)
    d_rhs = _tiled_weight_grad(lhs, g, e, group_sizes)
    return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype), None


_tiled_grouped_matmul.defvjp(_tiled_fwd, _tiled_bwd)

HEAD_MIN = 32  # fewest head rows per expert worth a batched product (XLA:CPU, gpt-oss widths: 32 rows ~110 GFLOP/s,
# 64 rows ~155-180, against ~75-85 for the same rows in tiles)


def head_rows(a: int, num_experts: int) -> int:
    """Rows per expert that `_headed_grouped_matmul` multiplies as one batched product, for A rows that are all routed
    (none past the groups) over E experts: A/E rounded down to a multiple of 8 on CPU, or 0 (tiles only) where that
    is under HEAD_MIN or off CPU."""
    c = a // num_experts // 8 * 8
    return c if c >= HEAD_MIN and packed.on_cpu() else 0


def _head_and_tail(group_sizes: jax.Array, a: int, head: int):
    """Where each grouped row goes: an expert's first `head` rows make its slot of the [E, head] head, the rest its
    run of the tail (grouped like the rows; tail rows past the tails are empty). -> (head source rows [E, head], tail
    sizes [E], tail source rows [A], and for each row: whether it is in the head, its
    place in the flattened head and in the tail, whether it is in a group at all). Sources == A: the zero pad row,
    which fills the head slots of experts with fewer rows."""
    starts = jnp.cumsum(group_sizes) - group_sizes
    slot = jnp.arange(head)
    head_src = jnp.where(slot < group_sizes[:, None], starts[:, None] + slot, a)
    tail_sizes = jnp.maximum(group_sizes - head, 0)
    tail_starts = jnp.cumsum(tail_sizes) - tail_sizes
    rows = jnp.arange(a)
    tail_of = rowkernel.row_experts(tail_sizes, a)
    tail_src = jnp.where(tail_of.valid, starts[tail_of.ids] + head + rows - tail_starts[tail_of.ids], a)
    row_of = rowkernel.row_experts(group_sizes, a)
    pos = rows - starts[row_of.ids]
    places = (row_of.valid & (pos < head), row_of.ids * head + jnp.minimum(pos, head - 1),
              tail_starts[row_of.ids] + jnp.maximum(pos - head, 0), row_of.valid)
    return head_src, tail_sizes, tail_src, places


def _headed(lhs: jax.Array, rhs: jax.Array | Unstacked, split: tuple, head: int, transposed: bool,
            max_group: int | None = None) -> jax.Array:
    """lhs [A, D] grouped by expert x rhs [E, D, N] -> [A, N]; with `transposed`, lhs [A, N] x each rhs[e]^T -> [A, D].
    The head is [E, C]: C = `head` rows per expert; `split` is `_head_and_tail` of the group sizes. An `Unstacked`
    rhs (not transposed): the head as E products, one per kernel."""
    e = rhs.shape[0]
    head_src, tail_sizes, tail_src, (in_head, at_head, at_tail, in_group) = split
    x = jnp.pad(lhs, ((0, 1), (0, 0)))
    if isinstance(rhs, Unstacked):
        xh = x[head_src]
        y_head = jnp.stack([jnp.dot(xh[i], kernel, preferred_element_type=jnp.float32)
                            for i, kernel in enumerate(rhs.kernels)])
        weight = rhs
    else:
        y_head = jnp.einsum("ECN,EDN->ECD" if transposed else "ECD,EDN->ECN", x[head_src], rhs,
                            preferred_element_type=jnp.float32)
        weight = (lambda j: rhs[j].T) if transposed else (lambda j: rhs[j])
    y_tail = tiled_grouped_matmul(x[tail_src], weight, e, tail_sizes, None if max_group is None else max_group - head)
    y = jnp.where(in_head[:, None], y_head.reshape(e * head, -1)[at_head], y_tail[at_tail])
    return jnp.where(in_group[:, None], y, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _headed_grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, head: int,
                           max_group: int | None = None) -> jax.Array:
    """`grouped_matmul` on CPU with each expert's first `head` rows multiplied as one batched [E, head] product and
    the rest (the tail) in tiles.

    XLA:CPU copies a dynamically indexed expert weight before each tile's product; the batched product reads every
    weight in place. The gpt-oss-20b slice's prefill (512 tokens, 2048 rows over 32 experts) spent 0.66 of its 3.36
    s in those copies (Intel Xeon, AVX-512). With A/E rows of head, what the head pads (experts with fewer rows)
    is about what the tail holds, so the FLOPs stay near the routed rows'. Gradients the same way (d rhs: the head's
    x^T g batched, plus the tail's tiles)."""
    return _headed(lhs, rhs, _head_and_tail(group_sizes, lhs.shape[0], head), head, False, max_group)


def _headed_fwd(lhs, rhs, group_sizes, head, max_group):
    return _headed_grouped_matmul(lhs, rhs, group_sizes, head, max_group), (lhs, rhs, group_sizes)


def _headed_bwd(head, max_group, res, g):
    lhs, rhs, group_sizes = res
    split = _head_and_tail(group_sizes, lhs.shape[0], head)
    head_src, tail_sizes, tail_src, _ = split
    d_lhs = _headed(g, rhs, split, head, True, max_group)
    x, gp = (jnp.pad(v, ((0, 1), (0, 0))) for v in (lhs, g))
    d_rhs = jnp.einsum("ECD,ECN->EDN", x[head_src], gp[head_src], preferred_element_type=jnp.float32)
    d_rhs = d_rhs + _tiled_weight_grad(x[tail_src], gp[tail_src], rhs.shape[0], tail_sizes)
    return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype), None


_headed_grouped_matmul.defvjp(_headed_fwd, _headed_bwd)


def expert_mlp(rows: jax.Array, expert_ids: jax.Array, group_sizes: jax.Array | rowkernel.RowExperts, w1: jax.Array,
               b1: jax.Array, w2: jax.Array, b2: jax.Array, cfg: ModelConfig, dtype: jnp.dtype,
               tensor_axis: str | None = None, head: int = 0, max_group: int | None = None) -> jax.Array:
    """rows [A, D] grouped by expert (sizes [E], none over `max_group`; or in any order, `RowExperts`, where
    `packed.row_form`) with their ids [A]; w1 [E, D, 2F], b1 [E, 2F], w2 [E, F, D], b2 [E, D] -> [A, D].

    The one place expert weights are multiplied (dense, or packed MXFP4 decoded on the fly): biases are per expert
    and added before routing weights. Padding rows (past sum(group_sizes), or not valid) come out as b2 of their
    (clamped) id. With `tensor_axis`, F is split over that mesh axis and the partial mlp2 products are summed across
    it.
    """
    h = _expert_matmul(rows, w1, group_sizes, dtype, tensor_axis, head, max_group)
    h = swiglu(h + b1[expert_ids], cfg.swiglu_limit, cfg.swiglu_alpha)
    y = _expert_matmul(h, w2, group_sizes, dtype, tensor_axis, head, max_group)
    if tensor_axis is not None:
        y = jax.lax.psum(y, tensor_axis)
    return y + b2[expert_ids]


def _expert_matmul(x: jax.Array, w: jax.Array | Unstacked | packed.MXFP4, group_sizes: jax.Array | rowkernel.RowExperts,
                   dtype: jnp.dtype, tensor_axis: str | None, head: int = 0, max_group: int | None = None
                   ) -> jax.Array:
    """x [A, in] (grouped by expert, or `RowExperts`) x w [E, in, out], dense or packed MXFP4 -> [A, out] float32;
    `head`, `max_group`: see `grouped_matmul` (dense weights only)."""
    if isinstance(w, packed.MXFP4):
        return packed.grouped_matmul(x, w, group_sizes, dtype, tensor_axis)
    return grouped_matmul(x.astype(dtype), w.astype(dtype), group_sizes, head, max_group)


class MoE(nnx.Module):
    """Router with bias, top-k experts per token, clamped-SwiGLU expert MLPs with biases.

    With `packed_experts`, the expert kernels are MXFP4 blocks + scales (`packed.PackedKernel`, not nnx.Param),
    decoded inside the expert matmul: inference only.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 packed_experts: bool = False):
        d, e, f = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
        self.cfg, self.dtype = cfg, dtype
        self.router_kernel = param(rngs, (d, e), ("embed", "router"), dtype)
        self.router_bias = param(rngs, (e,), ("router",), jnp.float32, init="zeros")
        if packed_experts:
            self.mlp1_kernel, self.mlp2_kernel = packed.mlp_kernels(cfg, rngs)
        else:
            self.mlp1_kernel = param(rngs, (e, d, 2 * f), ("expert", "embed", "mlp"), dtype)
            self.mlp2_kernel = param(rngs, (e, f, d), ("expert", "mlp", "embed"), dtype)
        self.mlp1_bias = param(rngs, (e, 2 * f), ("expert", "mlp"), jnp.float32, init="zeros")
        self.mlp2_bias = param(rngs, (e, d), ("expert", "embed"), jnp.float32, init="zeros")

    def router_logits(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] (normed) -> router logits [B, T, E] float32 (bias included), as the router sees them."""
        w = self.router_kernel[...].astype(self.dtype)
        return jnp.einsum("BTD,DE->BTE", x.astype(self.dtype), w, preferred_element_type=jnp.float32) + \
            self.router_bias[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] (normed) -> [B, T, D] float32."""
        cfg, dt = self.cfg, self.dtype
        b, t, d = x.shape
        xs = x.reshape(b * t, d).astype(dt)
        weights = (self.router_kernel[...], self.router_bias[...], self.mlp1_kernel[...], self.mlp1_bias[...],
                   self.mlp2_kernel[...], self.mlp2_bias[...])
        mesh = jax.sharding.get_abstract_mesh()
        if expert_parallel(mesh):
            out = moe_expert_parallel(xs, *weights, cfg=cfg, dtype=dt, mesh=mesh, groups=split_ways("rows", b, mesh))
        else:
            out = moe_local(xs, *weights, cfg=cfg, dtype=dt)
        return out.reshape(b, t, d)


def unsorted(a: int, e: int) -> bool:
    """Whether A expert rows over E experts skip the sort by expert (and the scatter back), each row naming its
    expert (`rowkernel.RowExperts`): decode on accelerators, at most E rows, where every form reads each row's own
    expert's weight (`packed.row_form`). XLA:GPU's launches per decode step for an H100 (benchmarks/gpu_launches.py,
    jax 0.10.2): 20b 853 -> 803 at batch 1, 882 -> 762 at batch 8; 120b 1,309 -> 1,199 at batch 1. More rows
    (prefill chunks) stay grouped, an expert's rows adjacent."""
    return a <= e and not packed.on_cpu()


def moe_local(x: jax.Array, router_w: jax.Array, router_b: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array,
              b2: jax.Array, *, cfg: ModelConfig, dtype: jnp.dtype, tensor_axis: str | None = None) -> jax.Array:
    """x [X, D] -> [X, D] with every expert in reach (one device, or one expert-parallel shard's own experts)."""
    k = cfg.experts_per_token
    with jax.named_scope("route"):
        ids, weights = route(router_logits(x, router_w, router_b, k, dtype), k)
    if unsorted(x.shape[0] * k, w1.shape[0]):
        with jax.named_scope("experts"):
            flat = ids.reshape(-1)
            rows = rowkernel.RowExperts(flat, jnp.ones(flat.shape, bool))
            y = expert_mlp(jnp.repeat(x, k, axis=0), flat, rows, w1, b1, w2, b2, cfg, dtype, tensor_axis)
        return combine(y, weights)
    with jax.named_scope("permute"):
        rows, expert_ids, group_sizes, order = permute(x, ids, w1.shape[0])
    with jax.named_scope("experts"):  # a token's k experts differ: no expert has more rows than there are tokens
        y = expert_mlp(rows, expert_ids, group_sizes, w1, b1, w2, b2, cfg, dtype, tensor_axis,
                       head=head_rows(rows.shape[0], w1.shape[0]), max_group=x.shape[0])
    with jax.named_scope("unpermute"):
        return unpermute(y, order, weights)


# ------------------------------------------------------------------ expert parallelism

TOKEN_AXES = RULES["rows"]  # mesh axes that split tokens; experts live on "expert", F on "tensor"


def _present(mesh, axes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def expert_parallel(mesh) -> bool:
    """Whether a (context) mesh splits experts or tokens, so the MoE runs under shard_map."""
    return not mesh.empty and bool(_present(mesh, TOKEN_AXES + ("tensor",)))


def dispatch_slots(ids: jax.Array, experts_per_device: int, devices: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ids [X, k] -> assignment order [A] (sorted by expert), destination device [A] and slot in its buffer [A]."""
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    dest = flat[order] // experts_per_device
    counts = jnp.bincount(dest, length=devices)
    slot = jnp.arange(flat.shape[0]) - (jnp.cumsum(counts) - counts)[dest]
    return order, dest, slot


def _ep_shard(x_, router_w, router_b, w1_, b1_, w2_, b2_, *, cfg, dtype, tensor_axis):
    """Per device: route local tokens, send each assignment to the device holding its expert, compute, send back."""
    k, e_local, p = cfg.experts_per_token, w1_.shape[0], jax.lax.axis_size("expert")
    ids, weights = route(router_logits(x_, router_w, router_b, k, dtype), k)
    order, dest, slot = dispatch_slots(ids, e_local, p)
    capacity = ids.size  # dropless: one device may receive every local assignment
    with jax.named_scope("dispatch"):
        send = jnp.zeros((p, capacity, x_.shape[1]), x_.dtype).at[dest, slot].set(x_[order // k])
        send_ids = jnp.full((p, capacity), e_local, jnp.int32).at[dest, slot].set(ids.reshape(-1)[order] % e_local)
        recv = jax.lax.all_to_all(send, "expert", 0, 0).reshape(p * capacity, -1)
        recv_ids = jax.lax.all_to_all(send_ids, "expert", 0, 0).reshape(-1)
    with jax.named_scope("experts"):
        if unsorted(recv.shape[0], e_local):
            ids_ = jnp.minimum(recv_ids, e_local - 1)
            rows = rowkernel.RowExperts(ids_, recv_ids < e_local)  # padding (id e_local) reads nothing
            y = expert_mlp(recv, ids_, rows, w1_, b1_, w2_, b2_, cfg, dtype, tensor_axis)
        else:
            local_order = jnp.argsort(recv_ids, stable=True)  # padding (id e_local) sorts last, outside every group
            sizes = jnp.bincount(recv_ids, length=e_local).astype(jnp.int32)
            # each of the p devices' tokens sends a local expert at most one row
            y = expert_mlp(recv[local_order], jnp.minimum(recv_ids[local_order], e_local - 1), sizes, w1_, b1_, w2_,
                           b2_, cfg, dtype, tensor_axis, max_group=p * x_.shape[0])
            y = jnp.zeros_like(y).at[local_order].set(y)
        y = y.reshape(p, capacity, -1)
    with jax.named_scope("combine"):
        back = jax.lax.all_to_all(y, "expert", 0, 0)
        return unpermute(back[dest, slot], order, weights)


def moe_expert_parallel(x: jax.Array, router_w: jax.Array, router_b: jax.Array, w1: jax.Array, b1: jax.Array,
                        w2: jax.Array, b2: jax.Array, *, cfg: ModelConfig, dtype: jnp.dtype, mesh, groups: int = 1
                        ) -> jax.Array:
    """x [X, D] -> [X, D]: tokens split over data/fsdp/expert, experts over expert, F over tensor (shard_map).

    `groups`: the ways the step splits the rows (`split_ways("rows", B)`, over the leading token axes): each of that
    many equal runs of X is padded on its own, so a row's tokens stay on the devices that hold its KV cache (padded
    at the end alone, a decode step at batch 2 on data=2,expert=4 put row 1 on a device of data 0, and XLA moved
    row 1's whole cache there and back every step)."""
    token_axes = _present(mesh, TOKEN_AXES) or None
    shards = math.prod(mesh.shape[a] for a in token_axes or ())
    (x_rows, d), run = x.shape, x.shape[0] // groups
    pad = -run % (shards // groups)
    # one run, or runs that need no padding: the plain pad, which XLA partitions more simply (the 3-d pad at batch
    # 1 cost 5 more all-reduces per decode step on data=2,expert=4)
    apart = groups > 1 and pad > 0
    xp = jnp.pad(x.reshape(groups, run, d), ((0, 0), (0, pad), (0, 0))).reshape(-1, d) if apart else \
        jnp.pad(x, ((0, pad), (0, 0)))
    tensor = "tensor" if mesh.shape.get("tensor", 1) > 1 else None
    expert = "expert" if mesh.shape.get("expert", 1) > 1 else None
    P = jax.sharding.PartitionSpec
    fn = functools.partial(_ep_shard if expert else _local_shard, cfg=cfg, dtype=dtype, tensor_axis=tensor)
    w1_spec, w2_spec = P(expert, None, tensor), P(expert, tensor, None)
    if isinstance(w1, packed.MXFP4):
        w1_spec, w2_spec = (packed.shard_map_spec(w, expert, tensor, mesh, on) for w, on in ((w1, "out"), (w2, "in")))
    out = jax.shard_map(
        fn, mesh=mesh,
        in_specs=(P(token_axes, None), P(), P(), w1_spec, P(expert, tensor), w2_spec, P(expert, None)),
        out_specs=P(token_axes, None), check_vma=False,
    )(xp, router_w, router_b, w1, b1, w2, b2)
    return out.reshape(groups, -1, d)[:, :run].reshape(x.shape) if apart else out[:x_rows]


def _local_shard(x_, router_w, router_b, w1_, b1_, w2_, b2_, *, cfg, dtype, tensor_axis):
    """Per device when experts are not split (no expert axis): every expert is local; F may be split."""
    return moe_local(x_, router_w, router_b, w1_, b1_, w2_, b2_, cfg=cfg, dtype=dtype, tensor_axis=tensor_axis)
