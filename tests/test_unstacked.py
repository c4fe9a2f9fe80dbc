"""Expert kernels as views of each expert (`oss_jax.unstacked`): they alias the stacked kernel or are not made, and
the grouped matmul over them (each expert picked by `lax.switch`) equals float64 in every tile form and with a head."""

import functools
import gc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from test_grouped_matmul import CASES, HEADED, D, N, inputs, reference

from oss_jax import moe
from oss_jax.sharding import make_mesh
from oss_jax.unstacked import Unstacked, unstack


def offsets(u: Unstacked, w: jax.Array) -> list[int]:
    return [k.unsafe_buffer_pointer() - w.unsafe_buffer_pointer() for k in u.kernels]


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["fp32", "bf16"])
def test_views_alias_the_stacked_kernel_and_keep_it_alive(dtype):
    """Each view starts at its expert's offset in the stacked buffer (nothing copied) and holds w[e]; with the
    stacked array gone and its memory asked for again, the views still read their values."""
    w = jnp.asarray(np.random.default_rng(0).standard_normal((12, 64, 320)).astype(dtype))
    want = np.asarray(w).copy()
    u = unstack(w)
    assert isinstance(u, Unstacked) and u.shape == w.shape and u.dtype == w.dtype
    assert offsets(u, w) == [e * 64 * 320 * w.dtype.itemsize for e in range(12)]
    del w
    gc.collect()
    others = [jnp.full((12, 64, 320), 7.0, dtype) for _ in range(4)]  # would reuse a freed buffer
    assert all(np.array_equal(np.asarray(k), want[e]) for e, k in enumerate(u.kernels))
    del others


def test_what_cannot_alias_stays_stacked():
    """Views are made only of a concrete array on one CPU device whose slices come back in place: a traced array, a
    matrix, arrays on 8 devices (split over experts, or replicated) and slices not 64-byte aligned (60 bytes per
    expert: device_put would copy them) are returned as they are."""
    w = jnp.ones((8, 16, 32))
    seen = []
    jax.jit(lambda x: seen.append(unstack(x) is x) or x)(w)
    assert seen == [True]
    mesh = make_mesh({"expert": 8})
    split = jax.device_put(w, NamedSharding(mesh, PartitionSpec("expert")))
    replicated = jax.device_put(w, NamedSharding(mesh, PartitionSpec()))
    misaligned = jnp.ones((3, 3, 5))
    for x in (w[0], split, replicated, misaligned):
        assert unstack(x) is x


def test_a_view_is_read_whole():
    u = unstack(jnp.ones((2, 8, 8)))
    assert u[...] is u
    with pytest.raises(TypeError, match=r"read whole"):
        u[0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(head, chunk_bytes, lhs, kernels, sizes):
    del chunk_bytes  # only part of the cache key: moe.CHUNK_BYTES is read while tracing
    return moe.grouped_matmul(lhs, kernels, sizes, head=head)


FORMS = [(c, 0, False) for c in CASES if c != "most-tiles"] + [(c, 0, True) for c in ("decode-b1", "a1")] + \
    [(c, h, False) for c, h in HEADED]


@pytest.mark.parametrize("case, head, chunked", FORMS,
                         ids=[f"{c}{f'-head{h}' if h else ''}{'-row-chunks' if k else ''}" for c, h, k in FORMS])
def test_unstacked_grouped_matmul_matches_float64(case, head, chunked, monkeypatch):
    """Tiles of one expert each (one-row tiles unrolled; full tiles and remainders in loops) and the head as one
    product per kernel. Row chunks: 16 of K 48 weight rows per chunk (a one-row tile's product as 3 batched 16-term
    dots summed). Rows past the groups exactly 0."""
    if chunked:
        monkeypatch.setattr(moe, "CHUNK_BYTES", 16 * N * 4)
    sizes, a = CASES[case]
    lhs, rhs, gs, g = inputs(sizes, a)
    kernels = unstack(jnp.asarray(rhs))
    assert isinstance(kernels, Unstacked)
    got = np.asarray(_forward(head, moe.CHUNK_BYTES, lhs, kernels, gs))
    want = reference(lhs, rhs, sizes, g)[0]
    err = float(np.abs(got - want).max(initial=0.0))
    print(f"{case} (A {a}, head {head}, tile {moe.row_tile(a, len(sizes))}, K {D} in chunks of "
          f"{16 if chunked else D}): max |err| vs float64 {err:.1e}")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * (1 + np.abs(want).max(initial=0.0)))
    assert not got[sum(sizes):].any()
