"""Packed MXFP4 experts: exact decoding, packed == dequantize-then-compute (layer, model, sharded), loading, CLI, plan.

The dense path (`experts bf16`: MXFP4 dequantized once, then multiplied) is the reference for the packed one; both
compute in float32 on the same weight values, so they differ only in summation order. Parity with both references
runs packed too: `oss-jax parity` defaults to packed experts on MXFP4 checkpoints (test_parity's CLI runs unsharded,
test_plan's `parity --mesh expert=4` sharded).
"""

import contextlib
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxprs import HOST_WAITS, equations, primitives, triton_modules_verified

from convert import layouts
from convert.streaming import convert_checkpoint
from convert.synthetic import make_checkpoint, random_hf_tensors
from oss_jax import checkpoint, cli, layers, moe, mxfp4, packed, rowkernel
from oss_jax.cache import init_cache
from oss_jax.generate import decode_step, prefill_step, split_model
from oss_jax.model import forward, model_from_params
from oss_jax.moe import grouped_matmul, moe_local
from oss_jax.params import flat_params
from oss_jax.sharding import make_mesh, shard_model


def dense_params(cfg, seed):
    """Model parameters of a random MXFP4 checkpoint, experts dequantized (float32)."""
    hf = random_hf_tensors(cfg, seed=seed)
    return {rule.param: rule.load(cfg, *[np.asarray(hf[s]) if hf[s].dtype == np.uint8 else
                                         np.asarray(hf[s], np.float32) for s in rule.sources])
            for rule in layouts.hf_rules(cfg)}


def placed_model(cfg, params, packed_experts: bool, mesh):
    """The model from dense `params` (experts packed or not), placed on `mesh` when one is given."""
    model = model_from_params(cfg, packed.pack_params(params) if packed_experts else params,
                              packed_experts=packed_experts)
    if mesh is not None:
        shard_model(model, mesh)
        if packed_experts:
            packed.shard_packed(model, mesh)
    return model


@pytest.fixture(scope="module")
def cfg(tiny_config):
    # 24 experts: 8-, 4- and 2-way expert axes divide; F 160 = 5 groups of 32, which `tensor=2` cannot split
    return dataclasses.replace(tiny_config, num_experts=24)


@pytest.fixture(scope="module")
def params(cfg):
    return dense_params(cfg, seed=5)


@pytest.fixture(scope="module")
def short(cfg):
    """The config cut to its first two layers (one sliding, one full) and its parameters: for the tests that trace
    every expert form of a whole step (compile time grows with the layer count)."""
    short_cfg = dataclasses.replace(cfg, num_hidden_layers=2, layer_types=cfg.layer_types[:2])
    return short_cfg, dense_params(short_cfg, seed=5)


@pytest.fixture(scope="module")
def tokens(cfg):
    return np.random.default_rng(5).integers(0, cfg.vocab_size, size=(2, 19))


@pytest.fixture(scope="module")
def dense_logits(cfg, params, tokens):
    return {dt: np.asarray(forward(model_from_params(cfg, params, dtype=dt), tokens))
            for dt in (jnp.float32, jnp.bfloat16)}


def test_decode_is_exact_for_every_byte_and_scale():
    """Every byte (two fp4 codes) under every normal scale code decodes to numpy's reference decode, bit for bit."""
    scales = np.arange(2, 255, dtype=np.uint8)  # 2..254; 0 and 1 give subnormals, 255 is NaN in E8M0
    blocks = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(16, 16), (len(scales), 16, 16))
    blocks = np.ascontiguousarray(blocks)  # [N, G, 16]: N scales, 16 groups of every byte
    s = np.repeat(scales[:, None], 16, axis=1)
    with np.errstate(over="ignore"):  # scale codes 253-254 overflow float32 for the largest codes: inf both ways
        want = mxfp4.decode(blocks, s).reshape(len(scales), 16, 16, 2)  # [N, G, byte, nibble]
    for high in (False, True):
        got = np.asarray(jax.jit(packed.decode_nibbles, static_argnums=(2, 3))(blocks, s, high, jnp.float32))
        np.testing.assert_array_equal(got.reshape(len(scales), 16, 16), want[..., int(high)])
        got16 = jax.jit(packed.decode_nibbles, static_argnums=(2, 3))(blocks, s, high, jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(got16, np.float32).reshape(len(scales), 16, 16), want[..., int(high)])
    codes = jnp.arange(16, dtype=jnp.uint32)  # the Pallas kernel's integer-op decoding: the same 16 values
    np.testing.assert_array_equal(np.asarray(packed.twice_fp4_bits(codes)), np.asarray(packed._twice_fp4(codes)))
    every = jnp.arange(256, dtype=jnp.uint8)  # its fp8 decoding, both nibbles of every byte: the fp4 value x 2^-6
    for nibbles, want in zip(packed.e4m3_nibbles(every), (every & 15, every >> 4), strict=True):
        got = np.asarray(nibbles) * 2.0 ** (packed.E4M3_SHIFT + 1)
        np.testing.assert_array_equal(got, np.asarray(packed._twice_fp4(want)))
    tiny = packed.decode_nibbles(jnp.full((1, 1, 16), 0x77, jnp.uint8), jnp.zeros((1, 1), jnp.uint8), False,
                                 jnp.float32)
    assert not np.any(np.asarray(tiny))  # scale code 0 (2^-127): subnormal, decodes to 0


@pytest.mark.parametrize("rows, experts, din, dout", [(40, 12, 64, 320), (40, 12, 160, 64), (3, 12, 64, 1088)])
def test_grouped_matmul_equals_dense(rows, experts, din, dout):
    """Packed x [E, in, out] == the dense grouped matmul on the decoded weights: empty experts, padding rows past
    the groups (-> 0), more output rows than one decoded slice (1088 = 4 slices of 272)."""
    rng = np.random.default_rng(rows + din)
    blocks = rng.integers(0, 256, (experts, dout, din // 32, 16), dtype=np.uint8)
    scales = rng.integers(118, 126, (experts, dout, din // 32), dtype=np.uint8)
    dense = np.ascontiguousarray(mxfp4.decode(blocks, scales).transpose(0, 2, 1))  # [E, in, out]
    sizes = np.zeros(experts, np.int32)
    sizes[[0, 3, 4, 11]] = np.array([rows // 2, 1, rows - rows // 2 - 2, 0])  # 2 rows past the groups
    x = rng.standard_normal((rows, din)).astype(np.float32)
    w = packed.MXFP4(jnp.asarray(blocks), jnp.asarray(scales))
    ids = np.repeat(np.arange(experts), sizes)
    for dt in (jnp.float32, jnp.bfloat16):
        want = np.asarray(jax.jit(grouped_matmul)(x.astype(dt), jnp.asarray(dense, dt), sizes))
        exact = np.einsum("AD,ADN->AN", x[: len(ids)].astype(dt).astype(np.float64), dense[ids].astype(np.float64))
        ref_err = np.abs(want[: len(ids)] - exact).max()
        # looped: CPU's path; fixed: accelerators' for many rows; for few rows on accelerators, gathered (XLA) and
        # the Pallas kernel (GPUs; here interpreted, same program)
        for name, fn in (("looped", lambda x, w, s, dt=dt: packed.looped_matmul(x.astype(dt), w, s, dt)),
                         ("fixed", lambda x, w, s, dt=dt: packed.fixed_loop_matmul(x.astype(dt), w, s, dt)),
                         ("gathered", lambda x, w, s, dt=dt: packed.gathered_matmul(x.astype(dt), w, s)),
                         # GPUs decode with inline PTX: here its twin, "e4m3"; a group per load, up to 5 loads a step
                         *((f"kernel-{decode}-{loads}", lambda x, w, s, dt=dt, d=decode, g=groups, k=loads:
                            packed.kernel_matmul(x.astype(dt), w, s, decode=d, step_groups=g, loads=k))
                           for decode, groups, loads in (("bits", 2, 1), ("e4m3", 1, 5)))):
            got = np.asarray(jax.jit(fn)(x, w, sizes))
            err = np.abs(got[: len(ids)] - exact).max()
            print(f"{dt.__name__} {name}: packed vs float64 {err:.2e}, dense vs float64 {ref_err:.2e}, packed vs "
                  f"dense {np.abs(got - want).max():.2e}")
            assert not np.any(got[len(ids):])  # rows past the groups
            assert err <= 2 * ref_err + 1e-6  # as accurate as the dense path (float32 accumulation in both)


def test_fixed_loop_matmul_runs_the_most_tiles_a_routing_can_make():
    """64 rows over 8 experts (tiles of 8): groups of 8m + 1 rows make 15 tiles, the loop's fixed count, so no step is
    spare; every row equals the float64 product."""
    rng = np.random.default_rng(3)
    sizes = np.array([1, 9, 17, 1, 1, 9, 25, 1], np.int32)
    assert sum(-(-sizes // 8)) == (64 + 8 * 7) // 8 == 15
    blocks = rng.integers(0, 256, (8, 96, 2, 16), dtype=np.uint8)
    scales = rng.integers(118, 126, (8, 96, 2), dtype=np.uint8)
    dense = mxfp4.decode(blocks, scales).transpose(0, 2, 1).astype(np.float64)  # [E, in, out]
    x = rng.standard_normal((64, 64)).astype(np.float32)
    got = np.asarray(jax.jit(packed.fixed_loop_matmul, static_argnums=3)(
        x, packed.MXFP4(jnp.asarray(blocks), jnp.asarray(scales)), sizes, jnp.float32))
    exact = np.einsum("AD,ADN->AN", x.astype(np.float64), dense[np.repeat(np.arange(8), sizes)])
    err = np.abs(got - exact).max()
    print(f"fixed loop, 15 of 15 tiles: max |Δ| vs float64 {err:.2e} (max |y| {np.abs(exact).max():.1f})")
    assert err <= 1e-6 * np.abs(exact).max()


@pytest.mark.parametrize("kernel", [*(f"packed-{d}" for d in packed.KERNEL_DECODES), "dense"])
def test_kernels_lower_to_triton_modules_that_verify(kernel):
    """GPUs' Pallas kernels (`packed.kernel_matmul` with each decoding, the inline PTX of "e4m3asm" included;
    `rowkernel.dense_kernel`) lowered for CUDA (Triton, not interpreted) at decode shapes with padding rows and an
    unused expert: every Triton module passes MLIR's verifier, as XLA:GPU requires when it compiles them. A trip
    count that was data once lowered to an scf.for whose bounds differ in type, which only a GPU run had shown.
    (The PTX text itself is assembled on the GPU only: ptxas is not here.)"""
    e, d, n = 4, 96, 256  # 3 groups: with KERNEL_LOADS = 3, one step of three loads
    x, sizes = jnp.ones((8, d), jnp.bfloat16), jnp.array([2, 3, 0, 1], jnp.int32)
    if kernel == "dense":
        count = triton_modules_verified(functools.partial(rowkernel.dense_kernel, interpret=False), x,
                                        jnp.ones((e, d, n), jnp.bfloat16), sizes)
    else:
        w = packed.MXFP4(jnp.zeros((e, n, d // mxfp4.GROUP, 16), jnp.uint8),
                         jnp.full((e, n, d // mxfp4.GROUP), 127, jnp.uint8))
        decode = kernel.removeprefix("packed-")
        count = triton_modules_verified(functools.partial(packed.kernel_matmul, interpret=False, decode=decode),
                                        x, w, sizes)
    print(f"{kernel}: {count} Triton module(s) verified")
    assert count == 1


@pytest.mark.parametrize("shape", [{}, {"expert": 8}], ids=["one device", "expert=8"])
def test_gpu_steps_have_no_data_dependent_loops(short, shape, force_backend):
    """Prefill and decode traced in GPUs' forms (packed and dense experts) hold no `while` (a loop whose trip count
    is data) and no `cond`: XLA:GPU copies their flag to the host and waits for it at every step. Loops with a fixed
    count (`scan`, and `fori_loop` with static bounds) run without the host. (A prompt chunk against a cache longer
    than attention's KEY_BLOCK still loops over the key blocks that hold positions: a few steps per full-attention
    layer, not per expert.) On one device, decode sorts nothing: its rows reach the row forms unpermuted."""
    cfg, params = short
    force_backend("gpu")
    mesh = make_mesh(shape) if shape else None
    for packed_experts in (True, False):
        split, caches = split_model(placed_model(cfg, params, packed_experts, mesh)), init_cache(cfg, 2, 32)
        pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            steps = {"prefill": jax.make_jaxpr(prefill_step)(split, jnp.zeros((2, 16), jnp.int32), pos, caches),
                     "decode": jax.make_jaxpr(decode_step)(split, jnp.zeros((2,), jnp.int32), jnp.full((2,), 16),
                                                          caches)}
        for name, closed in steps.items():
            seen = primitives(closed)
            print(f"{shape or 'one device'} {'packed' if packed_experts else 'dense'} {name}: "
                  f"{sorted(seen & {'while', 'cond', 'scan', 'pallas_call', 'ragged_dot_general', 'sort'})}")
            assert not seen & HOST_WAITS
            if name == "decode" and not shape:  # rows name their experts: no sort by expert (`moe.moe_local`)
                assert "sort" not in seen


def test_gpu_decode_at_batch_1_projects_two_rows(short, force_backend):
    """Decode at batch 1 in GPUs' forms: q, k and v each project two rows, the token's and a zero row
    (`layers.gemm_rows`: XLA:GPU compiles a one-row product of k's or v's weight into a multiply that writes its
    float32 products out, and merges q, k and v at two rows into one GEMM), and the logits of 4 decode steps equal the
    CPU forms' (which project the one row) within 1e-5 of the largest, on one device and sharded over expert=4 x
    tensor=2 (heads split, the router's decode form inside the expert-parallel shards); batch 2 projects its two
    rows, no more."""
    cfg, params = short
    # stacked kernels: this split also runs GPUs' forms (views of each expert are made for CPU's forms only)
    split = split_model(placed_model(cfg, params, False, None), unstack=False)
    mesh = make_mesh({"expert": 4, "tensor": 2})
    d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, size=(1, 12))

    def projected_rows(batch: int) -> set:
        closed = jax.make_jaxpr(decode_step)(split, jnp.zeros((batch,), jnp.int32), jnp.full((batch,), 8),
                                            init_cache(cfg, batch, 32))
        return {e.invars[0].aval.shape for e in equations(closed) if e.primitive.name == "dot_general"
                and e.invars[1].aval.shape in {(d, n, h), (d, k, h)}}

    def run(split=split) -> np.ndarray:
        caches = init_cache(cfg, 1, 32)
        _, caches = prefill_step(split, jnp.asarray(tokens[:, :8]), jnp.arange(8, dtype=jnp.int32)[None], caches)
        out = []
        for i in range(8, 12):
            logits, caches = decode_step(split, jnp.asarray(tokens[:, i]), jnp.full((1,), i), caches)
            out.append(np.asarray(logits))
        return np.stack(out)

    want = run()
    assert projected_rows(1) == {(1, 1, d)}
    force_backend("gpu")
    assert projected_rows(1) == {(1, 2, d)} and projected_rows(2) == {(2, 1, d)}
    got = {"one device": run()}
    with jax.set_mesh(mesh):
        got["expert=4,tensor=2"] = run(split_model(placed_model(cfg, params, False, mesh)))
    for where, logits in got.items():
        err, scale = float(np.abs(logits - want).max()), float(np.abs(want).max())
        print(f"batch-1 decode, GPUs' forms (two projected rows), {where}, vs CPU's one device: max |Δ| {err:.2e}, "
              f"max |logit| {scale:.2f}")
        assert err <= 1e-5 * scale


def moe_weights(params, p: str = "layers.1.moe."):
    """One MoE layer's weights as `moe_local` takes them (router kernel and bias, mlp1 and mlp2 kernels and biases):
    dense, and with the two expert kernels packed."""
    w = [jnp.asarray(params[p + n]) for n in ("router_kernel", "router_bias", "mlp1_kernel", "mlp1_bias",
                                             "mlp2_kernel", "mlp2_bias")]
    packs = packed.pack_params({p + n: params[p + n] for n in ("mlp1_kernel", "mlp2_kernel")})
    wp = list(w)
    wp[2], wp[4] = (packed.MXFP4(jnp.asarray(packs[p + n + ".blocks"]), jnp.asarray(packs[p + n + ".scales"]))
                    for n in ("mlp1_kernel", "mlp2_kernel"))
    return w, wp


def test_moe_layer_packed_equals_dense(cfg, params):
    """One MoE layer in float32 (no depth to amplify rounding): packed == dequantized, to 1e-6 of the largest output."""
    x = jax.random.normal(jax.random.key(0), (40, cfg.hidden_size), jnp.float32)
    w, wp = moe_weights(params)
    layer = jax.jit(lambda x, *w: moe_local(x, *w, cfg=cfg, dtype=jnp.float32))
    want, got = layer(x, *w), layer(x, *wp)
    err, scale = float(jnp.abs(got - want).max()), float(jnp.abs(want).max())
    print(f"MoE layer: packed vs dense max |Δ| {err:.2e}, max |y| {scale:.2f}")
    assert err <= 1e-6 * max(scale, 10.0)


def test_expert_parallel_decode_rows_reach_the_experts_unsorted(cfg, params, force_backend, monkeypatch):
    """Decode on GPUs (forms forced here, kernels interpreted) in an expert-parallel shard whose dispatch buffer holds
    at most as many rows as it has experts (2 devices x 1 token x 4 assignments = 8 rows over 12 local experts): the
    rows go to the row forms unsorted (`moe.unsorted`), padding rows marked not valid. Outputs equal the CPU path's
    (one device, sorted, looped; float32 sums in another order), packed and dense, to 1e-5 of the largest, as in
    `test_accelerator_expert_paths_equal_the_cpu_paths` (which covers one device's unsorted rows)."""
    x = jax.random.normal(jax.random.key(1), (2, cfg.hidden_size), jnp.float32)
    w, wp = moe_weights(params)
    local = jax.jit(lambda x, *w: moe_local(x, *w, cfg=cfg, dtype=jnp.float32))
    want = {"dense": local(x, *w), "packed": local(x, *wp)}
    force_backend("gpu")
    taken = []
    monkeypatch.setattr(moe, "unsorted", lambda a, e, real=moe.unsorted: taken.append((a, e)) or real(a, e))
    mesh = make_mesh({"expert": 2})
    sharded = jax.jit(lambda x, *w: moe.moe_expert_parallel(x, *w, cfg=cfg, dtype=jnp.float32, mesh=mesh))
    for kind, weights in (("dense", w), ("packed", wp)):
        taken.clear()
        got = sharded(x, *weights)
        err, scale = float(jnp.abs(got - want[kind]).max()), float(jnp.abs(want[kind]).max())
        print(f"expert=2 {kind}: unsorted (rows, experts) {taken} vs the CPU path max |Δ| {err:.2e}, max |y| "
              f"{scale:.2f}")
        assert taken == [(8, 12)]
        assert err <= 1e-5 * scale


MESHES = [{}, {"expert": 8}, {"data": 2, "expert": 2, "tensor": 2}]


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "one device")
def test_model_logits_packed_equal_dense(cfg, params, tokens, dense_logits, shape):
    """Whole model, packed vs dequantize-then-compute, unsharded and sharded: float32 within 1e-5 of the largest
    logit (same argmax); bf16 (on one device) within bf16 rounding of the dense bf16 logits."""
    for dt, bound in ((jnp.float32, 1e-5), (jnp.bfloat16, 2.0 ** -8))[: 1 if shape else 2]:
        model = model_from_params(cfg, packed.pack_params(params), dtype=dt, packed_experts=True)
        if shape:
            mesh = make_mesh(shape)
            shard_model(model, mesh)
            packed.shard_packed(model, mesh)
        got, want = np.asarray(forward(model, tokens)), dense_logits[dt]
        err, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
        print(f"{shape or 'one device'} {dt.__name__}: packed vs dense max |Δlogit| {err:.2e} (max |logit| "
              f"{scale:.1f}, logit std {want.std():.2f})")
        assert err <= bound * scale
        if dt == jnp.float32:
            assert np.array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("shape", [{}, {"data": 2, "expert": 4}, {"data": 4, "tensor": 2}],
                         ids=["one device", "data=2,expert=4", "data=4,tensor=2"])
def test_accelerator_expert_paths_equal_the_cpu_paths(short, tokens, shape, monkeypatch):
    """The expert matmuls GPUs/TPUs take, forced here on CPU, through prefill + 3 cached decode steps: float32 logits
    within 1e-5 of the largest, packed and dense; two layers, one of each kind.

    One device: decode rows gather their expert's weight (on GPUs the Pallas kernels, interpreted: packed, which also
    takes the 128-row prefill, at most 8 rows per expert, and dense), decode's attention projections the dense row
    kernel (opt-in, `layers.ROW_KERNEL_ROWS`: set here with packed experts); prefill runs a fixed count of expert
    tiles (packed on TPUs, dense on GPUs) or ragged_dot (dense on TPUs). The meshes run GPUs' forms only.
    data=2,expert=4: every shard's dispatch buffer holds more rows than its 6 experts, mostly padding; packed decode
    runs the kernel (padding rows skipped), prefill the fixed tiles, and dense both the tiles. data=4,tensor=2
    (packed): the kernel inside shard_map, mlp1's outputs split over `tensor`, mlp2's 5 input groups whole on each
    device (the rows placed at their offset)."""
    cfg, params = short
    mesh = make_mesh(shape) if shape else None
    for packed_experts in (True, False) if "tensor" not in shape else (True,):
        # stacked kernels: this split also runs accelerators' forms (views of each expert are for CPU's forms)
        split = split_model(placed_model(cfg, params, packed_experts, mesh), unstack=False)

        def run(split=split):
            jax.clear_caches()  # the backend choice is read while tracing
            caches = init_cache(cfg, 2, 32)
            pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
            logits, caches = prefill_step(split, jnp.asarray(tokens[:, :16]), pos, caches)
            out = [logits]
            for i in range(3):
                logits, caches = decode_step(split, jnp.asarray(tokens[:, 16 + i]), jnp.full((2,), 16 + i), caches)
                out.append(logits)
            return np.stack([np.asarray(o) for o in out])

        # sharded, GPUs' forms only: they hold what the meshes add (the kernel under shard_map, with padding rows
        # or split outputs; both fixed-count loops under shard_map); TPUs' differ from them in code one device runs
        forms = ("gpu",) if shape else ("tpu", "gpu")
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            want = run()
            for form in forms:
                kernel_calls, row_calls = [], []
                monkeypatch.setattr(packed, "backend", lambda form=form: form)
                if packed_experts:  # opt-in: the projections' row kernel too (once: it costs time interpreted)
                    monkeypatch.setattr(layers, "ROW_KERNEL_ROWS", 8)
                monkeypatch.setattr(packed, "kernel_matmul", lambda *a, calls=kernel_calls, real=packed.kernel_matmul,
                                    **k: calls.append(a[0].shape) or real(*a, **k))
                monkeypatch.setattr(rowkernel, "dense_matmul", lambda *a, calls=row_calls,
                                    real=rowkernel.dense_matmul: calls.append(a[1].shape) or real(*a))
                got = run()
                monkeypatch.undo()
                assert bool(kernel_calls) == (form == "gpu" and packed_experts)  # decode's mlp1 and mlp2
                if not shape:  # decode's q, k, v, o projections on one GPU (packed), dense experts' mlp1 and mlp2
                    d, h = cfg.hidden_size, cfg.head_dim
                    q, kv = cfg.num_attention_heads * h, cfg.num_key_value_heads * h
                    projections = {(1, d, q), (1, d, kv), (1, q, d)} if form == "gpu" and packed_experts else set()
                    assert {w for w in row_calls if w[0] == 1} == projections
                    assert any(w[0] > 1 for w in row_calls) == (form == "gpu" and not packed_experts)
                err, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
                print(f"{shape or 'one device'} {'packed' if packed_experts else 'dense'}: {form} vs CPU expert paths "
                      f"max |Δlogit| {err:.2e} (max |logit| {scale:.1f})")
                assert err <= 1e-5 * scale
    jax.clear_caches()  # no trace of a forced form outlives the test


def test_tensor_axis_splits_the_mlp2_groups_where_they_divide(tiny_config):
    """F 192 = 6 groups: `tensor=2` splits them (3 per device); the result still equals the dense model. (F 160 = 5
    groups stays whole on each tensor device: the `data=2, expert=2, tensor=2` case above.)"""
    cfg = dataclasses.replace(tiny_config, num_experts=24, intermediate_size=192)
    params = dense_params(cfg, seed=6)
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, size=(2, 11))
    want = np.asarray(forward(model_from_params(cfg, params), tokens))
    model = model_from_params(cfg, packed.pack_params(params), packed_experts=True)
    mesh = make_mesh({"expert": 2, "tensor": 2, "fsdp": 2})
    shard_model(model, mesh)
    packed.shard_packed(model, mesh)
    moe = model.layers[0].moe
    assert {s.data.shape for s in moe.mlp2_kernel.blocks[...].addressable_shards} == {(12, 32, 3, 16)}  # D on fsdp
    assert {s.data.shape for s in moe.mlp1_kernel.blocks[...].addressable_shards} == {(12, 192, 2, 16)}
    got = np.asarray(forward(model, tokens))
    err = float(np.abs(got - want).max())
    print(f"expert=2, tensor=2, fsdp=2, F groups split: max |Δlogit| {err:.2e} of max |logit| {np.abs(want).max():.1f}")
    assert err <= 1e-5 * np.abs(want).max()


@pytest.fixture(scope="module")
def converted(tiny_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    src = make_checkpoint(tiny_config, root / "hf", layout="hf", seed=9)
    convert_checkpoint(src, root / "orbax", progress=False)
    deq = make_checkpoint(tiny_config, root / "deq", layout="hf", seed=9, packed=False)
    convert_checkpoint(deq, root / "orbax-deq", experts="bf16", progress=False)
    return root


def test_load_packed_keeps_the_stored_bytes(converted):
    """experts='packed': the model's uint8 leaves are the stored bytes, 1/EP of the experts on each device, and no
    nnx.Param; it computes what the dequantized load computes."""
    model = checkpoint.load(converted / "orbax", mesh=make_mesh({"data": 2, "expert": 4}), experts="packed")
    stored = checkpoint.restore(converted / "orbax")
    leaves = packed.packed_leaves(model)
    assert len(leaves) == 4 * model.cfg.num_hidden_layers
    for name, var in leaves.items():
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(stored[name]), err_msg=name)
    blocks = model.layers[0].moe.mlp1_kernel.blocks[...]
    assert {s.data.shape[0] for s in blocks.addressable_shards} == {blocks.shape[0] // 4}
    assert not any(name.endswith(packed.KERNELS) or ".blocks" in name for name in flat_params(model))
    assert not any("kernel.blocks" in ".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tokens = np.random.default_rng(2).integers(0, 201088, (2, 13))
    want = np.asarray(forward(checkpoint.load(converted / "orbax"), tokens))
    got = np.asarray(forward(model, tokens))
    err = float(np.abs(got - want).max())
    print(f"packed (data=2, expert=4) vs dequantized load (one device): max |Δlogit| {err:.2e}")
    assert err <= 1e-5 * np.abs(want).max()
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


def test_packed_needs_mxfp4_experts(converted):
    assert checkpoint.stores_packed(converted / "orbax") and not checkpoint.stores_packed(converted / "orbax-deq")
    with pytest.raises(checkpoint.CheckpointError, match="experts are stored dequantized"):
        checkpoint.load(converted / "orbax-deq", experts="packed")
    with pytest.raises(checkpoint.CheckpointError, match="experts must be one of"):
        checkpoint.load(converted / "orbax", experts="int4")
    with pytest.raises(packed.PackedError, match="not exactly MXFP4"):
        packed.pack_params({"layers.0.moe.mlp1_kernel": np.full((1, 32, 2), 0.1, np.float32)})


def test_generate_defaults_to_packed_for_mxfp4_checkpoints(converted, capsys):
    """The CLI's loader picks packed experts for an MXFP4 checkpoint (bf16 on request, or when stored dequantized),
    and `oss-jax generate` runs with them."""
    assert packed.packed_leaves(cli.load_model(converted / "orbax"))
    assert not packed.packed_leaves(cli.load_model(converted / "orbax", experts="bf16"))
    assert not packed.packed_leaves(cli.load_model(converted / "orbax-deq"))
    capsys.readouterr()
    assert cli.main(["generate", "--ckpt", str(converted / "orbax"), "--raw", "--prompt", "Hello there", "--json",
                     "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    print(out.out)
    assert "experts packed" in out.err and len(json.loads(out.out)[0]["tokens"]) == 4


def test_plan_packed_params_are_the_shipped_bytes(tiny_config, capsys):
    """`oss-jax plan --experts packed`: expert bytes are blocks + scales (17 bytes per 32 weights), by hand."""
    from oss_jax.plan import abstract_sharded_model, per_device_bytes

    mesh = make_mesh({"expert": 4})
    d, e, f, layers = (tiny_config.hidden_size, tiny_config.num_experts, tiny_config.intermediate_size,
                       tiny_config.num_hidden_layers)
    size = {p: per_device_bytes(jax.tree.leaves(nnx.state(abstract_sharded_model(tiny_config, mesh, jnp.bfloat16, p))))
            for p in (False, True)}
    dense_experts = layers * e * 3 * d * f * 2 // 4  # bf16 kernels, 1/4 of the experts per device
    packed_experts = layers * e * 3 * d * f * 17 // 32 // 4
    assert size[False] - size[True] == dense_experts - packed_experts
    assert cli.main(["plan", "--model", "tiny", "--mesh", "expert=4", "--seq-len", "8", "--step", "decode",
                     "--experts", "packed", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    print(plan)
    assert plan["experts"] == "packed" and plan["params_bytes"] == size[True]
    assert plan["argument_bytes"] == plan["params_bytes"] + plan["input_bytes"]
    # XLA:CPU multiplies the bf16 unembedding [V, D] through a float32 copy, counted among the weight copies in temp
    assert tiny_config.vocab_size * d * 4 <= plan["weight_copy_bytes"] <= plan["temp_bytes"]
