"""The tiled grouped matmul (tiles of one expert each) and its tiled VJP against float64 numpy and jax.lax.ragged_dot,
in its CPU form and in GPUs' (forced here: one tile size, a fixed trip count); the accelerators' decode paths (the
gathered reduction, GPUs' row kernel) against float64."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxprs import equations

from oss_jax import moe, packed, rowkernel, tiles

D, N = 48, 40

# group sizes [E] and rows A (three shapes, so few compilations): empty experts, one expert takes all, rows past
# the groups, A not a multiple of the tile, full tiles plus remainders of every power of two; one-row tiles where
# A <= E/4 (decode, unrolled); A = 1
CASES = {
    "empty-experts": ([50, 0, 70, 0, 0, 30, 0, 0, 0, 0, 0, 0], 160),
    "one-takes-all-last": ([0] * 11 + [160], 160),
    "one-takes-all-first": ([150] + [0] * 11, 160),
    "padding-rows": ([2, 3, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0], 160),
    "full-tiles": ([64, 64, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0], 160),
    "remainders": ([33, 1, 0, 2, 65, 3, 0, 31, 0, 16, 5, 4], 160),
    "no-rows": ([0] * 12, 160),
    "decode-b1": ([0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0], 4),
    "decode-repeats": ([0, 2, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0], 4),
    "decode-padding": ([0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0], 4),
    "a1": ([0, 1, 0, 0], 1),
    "a1-padding": ([0, 0, 0, 0], 1),
    # GPUs' form: tiles of 16 rows, and groups of 16m + 1 make 21 tiles, the fixed trip count (tiles.most_tiles)
    "most-tiles": ([17] * 9 + [1] * 3, 160),
}
CHUNKED = ["remainders", "decode-b1"]  # also run with weights taken a few rows at a time


def reference(lhs, rhs, sizes, g):
    """float64 numpy from the definition: y[i] = lhs[i] @ rhs[e(i)]; d lhs[i] = g[i] @ rhs[e(i)]^T;
    d rhs[e] = sum over its rows of lhs[i]^T g[i]; rows past the groups: 0."""
    lhs, rhs, g = (np.asarray(v, np.float64) for v in (lhs, rhs, g))
    y, d_lhs, d_rhs = np.zeros((lhs.shape[0], rhs.shape[2])), np.zeros_like(lhs), np.zeros_like(rhs)
    start = 0
    for e, n in enumerate(sizes):
        rows = slice(start, start + n)
        y[rows] = lhs[rows] @ rhs[e]
        d_lhs[rows] = g[rows] @ rhs[e].T
        d_rhs[e] = lhs[rows].T @ g[rows]
        start += n
    return y, d_lhs, d_rhs


def inputs(sizes, a, seed=0):
    rng = np.random.default_rng(seed)
    lhs = rng.standard_normal((a, D), np.float32)
    rhs = rng.standard_normal((len(sizes), D, N), np.float32)
    g = rng.standard_normal((a, N), np.float32)
    return lhs, rhs, np.asarray(sizes, np.int32), g


@functools.partial(jax.jit, static_argnums=(0, 1))
def _value_and_grads(fn, chunk_bytes, lhs, rhs, sizes, g):
    del chunk_bytes  # only part of the cache key: moe.CHUNK_BYTES is read while tracing
    y, vjp = jax.vjp(lambda a, b: fn(a, b, sizes), lhs, rhs)
    return (y, *vjp(g))


def value_and_grads(fn, lhs, rhs, sizes, g):
    """fn(lhs, rhs, sizes) and the gradients of <fn(...), g> with respect to lhs and rhs, all under one jit."""
    return [np.asarray(v) for v in _value_and_grads(fn, moe.CHUNK_BYTES, lhs, rhs, sizes, g)]


def ragged_dot(lhs, rhs, sizes):
    return jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32)


@pytest.mark.parametrize("case, chunked", [(c, False) for c in CASES] + [(c, True) for c in CHUNKED],
                         ids=[*CASES, *(f"{c}-weight-chunks" for c in CHUNKED)])
def test_forward_and_gradients_match_float64_and_ragged_dot(case, chunked, monkeypatch):
    """Chunked: 32 of D 48 and 24 of N 40 weight rows at a time (the last chunk overlaps the one before, masked)."""
    if chunked:
        monkeypatch.setattr(moe, "CHUNK_BYTES", 32 * N * 4)
    sizes, a = CASES[case]
    lhs, rhs, gs, g = inputs(sizes, a)
    got = value_and_grads(moe._tiled_grouped_matmul, lhs, rhs, gs, g)
    want = reference(lhs, rhs, sizes, g)
    ragged = value_and_grads(ragged_dot, lhs, rhs, gs, g)
    errs = [float(np.abs(x - w).max(initial=0.0)) for x, w in zip(got, want, strict=True)]
    errs_ragged = [float(np.abs(x - r).max(initial=0.0)) for x, r in zip(got, ragged, strict=True)]
    print(f"{case} (A {a}, tile {moe.row_tile(a, len(sizes))}): max |err| vs float64 y/d_lhs/d_rhs "
          + " ".join(f"{e:.1e}" for e in errs) + "; vs ragged_dot " + " ".join(f"{e:.1e}" for e in errs_ragged))
    assert_matches_float64(got, want, sizes)
    assert max(errs_ragged) <= 3e-5 * (1 + max(np.abs(w).max(initial=0.0) for w in want))


def assert_matches_float64(got, want, sizes):
    """y, d lhs, d rhs within 1e-5 of float64 (relative to each one's largest value); rows past the groups exactly 0;
    no gradient for experts without rows."""
    for x, w in zip(got, want, strict=True):
        np.testing.assert_allclose(x, w, rtol=1e-5, atol=1e-5 * (1 + np.abs(w).max(initial=0.0)))
    assert not got[0][sum(sizes):].any() and not got[1][sum(sizes):].any()  # rows past the groups: exactly 0
    assert not got[2][np.asarray(sizes) == 0].any()  # experts without rows: no gradient


@pytest.mark.parametrize("tile", [1, 4, 8, 64])
def test_tile_sizes_for_groups_of_at_most_some_rows(tile):
    """With `max_group`, the tile sizes are exactly those groups of 1..max_group rows need: a full tile where a group
    reaches one, and what each remainder rounds up to among all the sizes."""
    every = moe.tile_sizes(tile)
    for most in range(1, 3 * tile + 2):
        needed = set()
        for rows in range(1, most + 1):
            if rows >= tile:
                needed.add(tile)
            if rows % tile:
                needed.add(next(s for s in every if s >= rows % tile))
        assert moe.tile_sizes(tile, most) == tuple(sorted(needed)), (tile, most)


BOUNDED = ["padding-rows", "most-tiles"]  # groups of at most 4 and 17 rows over tiles of 64


@pytest.mark.parametrize("case", BOUNDED)
def test_groups_of_at_most_max_group_rows_loop_over_fewer_tile_sizes(case):
    """`max_group` = the largest group (a token's k rows go to k experts: no group holds more rows than tokens):
    forward and gradients still match float64, in tiles and with a head, from fewer loops (one per tile size)."""
    sizes, a = CASES[case]
    lhs, rhs, gs, g = inputs(sizes, a)
    most, tile = max(sizes), moe.row_tile(a, len(sizes))
    want = reference(lhs, rhs, sizes, g)
    forms = {"tiles": functools.partial(_bounded_tiles, most)}
    if a > len(sizes):
        forms["head 16"] = functools.partial(_bounded_headed, most)
    for name, fn in forms.items():
        got = value_and_grads(fn, lhs, rhs, gs, g)
        loops = [sum(e.primitive.name == "while" for e in equations(jax.make_jaxpr(lambda x, w, f=f: f(x, w, gs))(
            lhs, rhs))) for f in (fn, functools.partial(fn.func, None))]
        errs = [float(np.abs(x - w).max(initial=0.0)) for x, w in zip(got, want, strict=True)]
        bound = most if name == "tiles" else most - 16  # the tail's
        print(f"{case} {name} (A {a}, largest group {most}, tile sizes {moe.tile_sizes(tile, bound)}): {loops[0]} "
              f"loops in the forward, {loops[1]} unbounded; max |err| vs float64 y/d_lhs/d_rhs "
              + " ".join(f"{e:.1e}" for e in errs))
        assert_matches_float64(got, want, sizes)
        dropped = len(moe.tile_sizes(tile)) - len(moe.tile_sizes(tile, most))
        assert (loops[1] - loops[0] == dropped) if name == "tiles" else (loops[0] < loops[1])


def _bounded_tiles(most, lhs, rhs, sizes):
    return moe.grouped_matmul(lhs, rhs, sizes, max_group=most)


def _bounded_headed(most, lhs, rhs, sizes):
    return moe.grouped_matmul(lhs, rhs, sizes, head=16, max_group=most)


HEADED = [(c, 16) for c, (sizes, a) in CASES.items() if a > len(sizes) and c != "most-tiles"] + [("remainders", 8)]


@pytest.mark.parametrize("case, head", HEADED, ids=[f"{c}-head{h}" for c, h in HEADED])
def test_headed_form_matches_float64(case, head):
    """CPU's form for routed rows (`moe.head_rows`): each expert's first `head` rows as one batched product, the rest
    in tiles; experts under `head` rows pad the head, one expert's 150-160 rows go mostly to the tail."""
    sizes, a = CASES[case]
    lhs, rhs, gs, g = inputs(sizes, a)
    got = value_and_grads(functools.partial(_headed, head), lhs, rhs, gs, g)
    want = reference(lhs, rhs, sizes, g)
    errs = [float(np.abs(x - w).max(initial=0.0)) for x, w in zip(got, want, strict=True)]
    tail = int(np.maximum(np.asarray(sizes) - head, 0).sum())
    print(f"{case} (A {a}, head {head}, {tail} rows in the tail): max |err| vs float64 y/d_lhs/d_rhs "
          + " ".join(f"{e:.1e}" for e in errs))
    assert_matches_float64(got, want, sizes)


def _headed(head, lhs, rhs, sizes):
    return moe.grouped_matmul(lhs, rhs, sizes, head=head)


def test_head_rows_where_a_batched_product_pays(force_backend):
    """A/E rounded down to 8 where that is at least HEAD_MIN rows, on CPU only: the 20b slice's 512-token prefill
    (2048 rows, 32 experts) gets 64; decode-sized and short inputs get none."""
    assert moe.head_rows(2048, 32) == 64 and moe.head_rows(2047, 32) == 56
    assert moe.head_rows(384, 12) == 32 and moe.head_rows(383, 12) == 0 and moe.head_rows(32, 32) == 0
    force_backend("gpu")
    assert moe.head_rows(2048, 32) == 0


@pytest.mark.parametrize("case", [c for c, (sizes, a) in CASES.items() if a > len(sizes)])
def test_gpu_form_matches_float64(case, force_backend):
    """GPUs' form (more rows than experts; fewer take `gathered_matmul`): one tile size up to 256 rows, whole weights,
    a loop of the most tiles any routing makes, the steps past this routing's tiles writing nothing; forward and
    gradients from the definition, rows past the groups and experts without rows exactly 0."""
    force_backend("gpu")
    sizes, a = CASES[case]
    tile, tile_kinds, chunk, trips = moe.tiling(a, len(sizes), D, N, 4)
    assert (tile_kinds, chunk, trips) == ((tile,), D, tiles.most_tiles(a, len(sizes), tile))
    lhs, rhs, gs, g = inputs(sizes, a)
    got = value_and_grads(moe._tiled_grouped_matmul, lhs, rhs, gs, g)
    want = reference(lhs, rhs, sizes, g)
    errs = [float(np.abs(x - w).max(initial=0.0)) for x, w in zip(got, want, strict=True)]
    needed = int(sum(-(-np.asarray(sizes) // tile)))
    print(f"{case} GPU form (A {a}, tile {tile}, {needed} of {trips} steps with rows): max |err| vs float64 "
          "y/d_lhs/d_rhs " + " ".join(f"{e:.1e}" for e in errs))
    for x, w in zip(got, want, strict=True):
        np.testing.assert_allclose(x, w, rtol=1e-5, atol=1e-5 * (1 + np.abs(w).max(initial=0.0)))
    assert not got[0][sum(sizes):].any() and not got[1][sum(sizes):].any()
    assert not got[2][np.asarray(sizes) == 0].any()
    if case == "most-tiles":
        assert needed == trips == 21


@pytest.mark.parametrize("form, case", [("gathered", c) for c in ["decode-b1", "decode-repeats", "decode-padding",
                                                                   "a1-padding", "padding-rows"]]
                         + [("kernel", c) for c in ["decode-b1", "decode-repeats", "decode-padding", "a1-padding"]])
def test_decode_forms_match_float64(form, case):
    """The accelerators' decode paths, each row reading only its own expert's weight, run here on CPU: the gathered
    reduction (TPUs) and GPUs' Pallas kernel `rowkernel.dense_matmul` (interpreted; its VJP is plain XLA): forward
    and gradients from the definition, rows past the groups exactly 0."""
    sizes, a = CASES[case]
    lhs, rhs, gs, g = inputs(sizes, a)
    got = value_and_grads(moe.gathered_matmul if form == "gathered" else rowkernel.dense_matmul, lhs, rhs, gs, g)
    want = reference(lhs, rhs, sizes, g)
    errs = [float(np.abs(x - w).max(initial=0.0)) for x, w in zip(got, want, strict=True)]
    print(f"{case}: {form} max |err| vs float64 y/d_lhs/d_rhs " + " ".join(f"{e:.1e}" for e in errs))
    for x, w in zip(got, want, strict=True):
        np.testing.assert_allclose(x, w, rtol=1e-5, atol=1e-5 * (1 + np.abs(w).max(initial=0.0)))
    assert not got[0][sum(sizes):].any()


def test_accessor_called_only_for_experts_with_rows():
    """The weight accessor (here not an array: a dequantizing function) runs only for experts that have rows."""
    sizes, a = [0, 2, 0, 0, 5, 1, 0, 0], 9
    lhs, rhs, gs, _ = inputs(sizes, a)
    codes = np.clip(np.round(rhs * 8), -127, 127).astype(np.int8)
    fetched = []

    def weight(j):
        jax.debug.callback(lambda j: fetched.append(int(j)), j)
        return jnp.asarray(codes)[j].astype(jnp.float32) / 8

    got = np.asarray(jax.jit(lambda x, s: moe.tiled_grouped_matmul(x, weight, len(sizes), s))(lhs, gs))
    want, _, _ = reference(lhs, codes.astype(np.float64) / 8, sizes, np.zeros((a, N)))
    print(f"experts fetched {sorted(set(fetched))} ({len(fetched)} fetches); max |err| {np.abs(got - want).max():.1e}")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert sorted(fetched) == [1, 4, 5]  # once each: one tile per expert


@pytest.mark.parametrize("a, experts", [(4, 32), (8, 32), (3, 12)])
def test_decode_cost_analysis_near_minimum_flops(a, experts):
    """Decode-sized calls (one-row tiles, unrolled): XLA's cost analysis of the compiled forward counts at most
    1.15x the 2*A*D*N FLOPs of the rows themselves (the former tiling multiplied ~29 of 32 experts per token).
    Larger calls loop over a traced number of tiles, which the cost analysis counts once: the generation benchmark
    replays those on the actual routing."""
    d, n = 256, 384
    rng = np.random.default_rng(a)
    ids = np.sort(rng.integers(0, experts, a))
    sizes = jnp.asarray(np.bincount(ids, minlength=experts), jnp.int32)
    lhs = jax.ShapeDtypeStruct((a, d), jnp.float32)
    rhs = jax.ShapeDtypeStruct((experts, d, n), jnp.float32)
    cost = jax.jit(moe._tiled_grouped_matmul).lower(lhs, rhs, sizes).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ratio = cost["flops"] / (2 * a * d * n)
    print(f"A {a}, E {experts}: cost-analysis FLOPs / 2*A*D*N = {ratio:.3f}")
    assert 1.0 <= ratio <= 1.15


@pytest.mark.parametrize("form", ["cpu", "gpu"])
@pytest.mark.parametrize("check_vma", [False, True])
def test_inside_shard_map_per_device_groups(check_vma, form, force_backend):
    """Expert parallelism calls it per device, each with its own experts and group sizes (rows past them: 0); in the
    CPU form and GPUs' (10 rows over 3 experts: the tiled loop with a fixed count)."""
    force_backend(form)
    devices = jax.devices()
    p, experts, a = len(devices), 3, 10
    rng = np.random.default_rng(3)
    sizes = np.stack([np.bincount(rng.integers(0, experts, rng.integers(0, a + 1)), minlength=experts)
                      for _ in range(p)]).astype(np.int32)
    lhs, rhs, _, g = inputs([0] * p * experts, p * a, seed=3)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("expert",))
    spec = jax.sharding.PartitionSpec("expert")

    def per_device(x_, w_, s_, g_):
        y, vjp = jax.vjp(lambda x, w: moe.grouped_matmul(x, w, s_), x_, w_)
        return (y, *vjp(g_))

    got = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=spec,
                                  check_vma=check_vma))(
        lhs, rhs, sizes.reshape(-1), g)
    errs = []
    for i in range(p):
        rows, exps = slice(i * a, (i + 1) * a), slice(i * experts, (i + 1) * experts)
        want = reference(lhs[rows], rhs[exps], sizes[i], g[rows])
        for x, w in zip((got[0][rows], got[1][rows], got[2][exps]), want, strict=True):
            errs.append(float(np.abs(np.asarray(x) - w).max(initial=0.0)))
            np.testing.assert_allclose(np.asarray(x), w, rtol=1e-5, atol=1e-4)
    print(f"{p} devices, group sizes {sizes.tolist()}: max |err| vs float64 {max(errs):.1e}")


@pytest.mark.parametrize("form", ["gathered", "kernel", "packed-gathered", "packed-kernel"])
def test_row_forms_take_rows_in_any_order(form):
    """The row forms (decode on accelerators) given each row's expert (`rowkernel.RowExperts`: rows in any order,
    some not valid) equal the same rows grouped by expert, row for row, and invalid rows come out exactly 0; dense
    forms' gradients too (an expert's gradient sums its rows wherever they sit). This is how decode skips the sort
    by expert and the scatter back (`moe.moe_local`)."""
    sizes, a = CASES["decode-repeats"]  # 4 rows: experts 1, 1, 8, 11
    lhs, rhs, gs, g = inputs(sizes, a)
    grouped_ids = np.repeat(np.arange(len(sizes)), sizes)
    order = np.array([2, 0, 3, 1])  # any order: rows of one expert apart
    valid = np.array([True, True, False, True])
    rows = rowkernel.RowExperts(jnp.asarray(grouped_ids[order], jnp.int32), jnp.asarray(valid))
    if form.startswith("packed"):
        rng = np.random.default_rng(1)
        blocks = rng.integers(0, 256, (len(sizes), N, 64 // 32, 16), dtype=np.uint8)
        w = packed.MXFP4(jnp.asarray(blocks), jnp.asarray(rng.integers(118, 126, blocks.shape[:3], dtype=np.uint8)))
        x = np.random.default_rng(2).standard_normal((a, 64)).astype(np.float32)
        fn = packed.gathered_matmul if form == "packed-gathered" else packed.kernel_matmul
        want = np.asarray(jax.jit(fn)(x, w, gs))
        got = np.asarray(jax.jit(fn)(x[order], w, rows))
        err = float(np.abs(got[valid] - want[order][valid]).max())
        print(f"{form}: rows in any order vs grouped max |Δ| {err:.1e}")
    else:
        fn = moe.gathered_matmul if form == "gathered" else rowkernel.dense_matmul
        want = value_and_grads(fn, lhs, rhs, gs, g)
        got = value_and_grads(fn, lhs[order], rhs, rows, np.where(valid[:, None], g[order], 0))
        err = max(float(np.abs(got[0][valid] - want[0][order][valid]).max()),
                  float(np.abs(got[1][valid] - want[1][order][valid]).max()))
        d_rhs = want[2].copy()
        d_rhs[grouped_ids[order][~valid]] = 0  # the invalid row (expert 11's only one) is left out: no gradient
        err_w = float(np.abs(got[2] - d_rhs).max())
        print(f"{form}: rows in any order vs grouped max |Δ| y/d_lhs {err:.1e}, d_rhs {err_w:.1e}")
        np.testing.assert_allclose(got[2], d_rhs, rtol=1e-6, atol=1e-6)
        assert not got[1][~valid].any()
        got = got[0]
    assert err <= 1e-6
    assert not got[~valid].any()


def test_row_experts_only_where_a_row_form_runs(force_backend):
    """Grouping is the contract of the other forms: RowExperts there is one clear error, not wrong rows."""
    force_backend("gpu")
    lhs, rhs, _, _ = inputs([1] * 4, 40)
    rows = rowkernel.RowExperts(jnp.zeros((40,), jnp.int32), jnp.ones((40,), bool))
    with pytest.raises(ValueError, match="40 rows over 4 experts must come grouped by expert"):
        moe.grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), rows)
