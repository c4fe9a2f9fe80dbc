"""Expert parallelism and the other mesh axes on 8 CPU devices: sharded == single device, 1/EP experts each."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert import layouts
from convert.synthetic import random_hf_tensors
from oss_jax.model import forward, model_from_params
from oss_jax.moe import moe_expert_parallel, moe_local
from oss_jax.sharding import MeshError, make_mesh, parse_mesh, partition_spec, shard_model, split_ways

MESHES = [{"expert": 8}, {"data": 2, "expert": 4}, {"data": 2, "expert": 2, "tensor": 2}, {"fsdp": 8}]


@pytest.fixture(scope="module")
def cfg(two_layer_config):
    # 24 experts so that 8-, 4- and 2-way expert axes all divide, and no two dimensions share a size; two layers
    # (one sliding, one full): a third would add compile time to every sharded forward, not coverage
    return dataclasses.replace(two_layer_config, num_experts=24)


@pytest.fixture(scope="module")
def params(cfg):
    hf = random_hf_tensors(cfg, seed=11)
    return {rule.param: rule.load(cfg, *[np.asarray(hf[s]) if hf[s].dtype == np.uint8 else
                                         np.asarray(hf[s], np.float32) for s in rule.sources])
            for rule in layouts.hf_rules(cfg)}


@pytest.fixture(scope="module")
def tokens(cfg):
    return np.random.default_rng(11).integers(0, cfg.vocab_size, size=(2, 19))


@pytest.fixture(scope="module")
def reference(cfg, params, tokens):
    """Single-device logits, and the single-device model's own float32 noise floor under a batch-shape change."""
    model = model_from_params(cfg, params)
    logits = np.asarray(forward(model, tokens))
    alone = np.asarray(forward(model, tokens[:1]))
    return logits, float(np.abs(alone - logits[:1]).max())


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_sharded_forward_equals_single_device(cfg, params, tokens, reference, shape):
    want, floor = reference
    model = model_from_params(cfg, params)
    shard_model(model, make_mesh(shape))
    got = np.asarray(forward(model, tokens))
    err = float(np.abs(got - want).max())
    print(f"{shape}: max |Δlogit| {err:.2e}; single device vs itself at batch 1: {floor:.2e}; "
          f"logit std {want.std():.2f}")
    # Split work sums float32 in another order. At this logit scale the single-device model itself moves by
    # ~2-3e-5 when only the batch shape changes, so whole-model logits are held to the reference-parity bound
    # (1e-4, identical argmax); the layer where sharding acts (MoE) is held to 1e-5 below.
    assert err <= 1e-4
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


def _moe_inputs(cfg, params, layer=1, n=40, seed=0):
    x = jax.random.normal(jax.random.key(seed), (n, cfg.hidden_size), jnp.float32)
    p = f"layers.{layer}.moe."
    names = ("router_kernel", "router_bias", "mlp1_kernel", "mlp1_bias", "mlp2_kernel", "mlp2_bias")
    return x, [jnp.asarray(params[p + n], jnp.float32) for n in names]


@pytest.fixture(scope="module")
def moe_reference(cfg, params):
    """One MoE layer's inputs and its output with all experts local (computed once for every mesh)."""
    x, w = _moe_inputs(cfg, params)
    return x, w, jax.jit(lambda x, *w: moe_local(x, *w, cfg=cfg, dtype=jnp.float32))(x, *w)


@pytest.mark.parametrize("shape", MESHES + [{"expert": 2, "tensor": 2, "fsdp": 2}],
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_moe_layer_sharded_equals_local(cfg, moe_reference, shape):
    """One MoE layer (where no depth amplifies rounding): expert-parallel == all experts local, to 1e-5; where the
    mesh splits 2 rows (over data), also as 2 rows of 19 tokens, each row's run padded on its own (19 -> 20)."""
    x, w, want = moe_reference
    mesh = make_mesh(shape)
    groups = split_ways("rows", 2, mesh)
    err_rows = 0.0
    with jax.set_mesh(mesh):
        got = jax.jit(lambda x, *w: moe_expert_parallel(x, *w, cfg=cfg, dtype=jnp.float32, mesh=mesh))(x, *w)
        if groups > 1:
            rows = jax.jit(lambda x, *w: moe_expert_parallel(x, *w, cfg=cfg, dtype=jnp.float32, mesh=mesh,
                                                             groups=groups))(x[:38], *w)
            err_rows = float(jnp.abs(rows - want[:38]).max())
    err, scale = float(jnp.abs(got - want).max()), float(jnp.abs(want).max())
    rows_note = f"; as 2 rows padded apart: {err_rows:.2e}" if groups > 1 else ""
    print(f"{shape}: MoE max |Δ| {err:.2e}, relative to max |y| {scale:.1f}: {err / scale:.1e}{rows_note}")
    # float32 GEMM blocking depends on how many rows each expert got, so sums may differ in the last few ulps:
    # 1e-5 absolute on unit-scale outputs, i.e. 1e-6 of the largest output
    assert max(err, err_rows) <= 1e-6 * max(scale, 10.0)


def test_local_shards_with_a_batched_head_equal_one_device_in_tiles(cfg, params, monkeypatch):
    """Meshes without an expert axis run `moe_local` per shard, where enough routed rows take the batched head
    (`moe.head_rows`): on data=4,tensor=2, 4 x 400 tokens, 1,600 rows over 24 experts per shard (head 64), F split
    over `tensor`; one device runs all 6,400 rows in tiles. Held to the expert-parallel bound above."""
    from oss_jax import moe

    x, w = _moe_inputs(cfg, params, n=1600)
    assert moe.head_rows(1600 * cfg.experts_per_token // 4, cfg.num_experts) == 64
    with monkeypatch.context() as m:
        m.setattr(moe, "HEAD_MIN", 10**9)  # no head: tiles only
        want = jax.jit(lambda x, *w: moe_local(x, *w, cfg=cfg, dtype=jnp.float32))(x, *w)
    mesh = make_mesh({"data": 4, "tensor": 2})
    with jax.set_mesh(mesh):
        got = jax.jit(lambda x, *w: moe_expert_parallel(x, *w, cfg=cfg, dtype=jnp.float32, mesh=mesh))(x, *w)
    err, scale = float(jnp.abs(got - want).max()), float(jnp.abs(want).max())
    print(f"data=4,tensor=2, head 64 per shard: MoE max |Δ| {err:.2e}, relative to max |y| {scale:.1f}: "
          f"{err / scale:.1e}")
    assert err <= 1e-6 * max(scale, 10.0)


def test_routing_collapse_is_dropless(cfg, params):
    """Every token picks the same 4 experts (all on one device): nothing is dropped, results stay exact."""
    x, w = _moe_inputs(cfg, params, n=64)
    bias = np.zeros(cfg.num_experts, np.float32)
    bias[[3, 4, 5, 2]] = [400.0, 300.0, 200.0, 100.0]  # experts 2-5 live on device 0 or 1 of 8
    w[1] = jnp.asarray(bias)
    want = jax.jit(lambda x, *w: moe_local(x, *w, cfg=cfg, dtype=jnp.float32))(x, *w)
    mesh = make_mesh({"expert": 8})
    with jax.set_mesh(mesh):
        got = jax.jit(lambda x, *w: moe_expert_parallel(x, *w, cfg=cfg, dtype=jnp.float32, mesh=mesh))(x, *w)
    err, scale = float(jnp.abs(got - want).max()), float(jnp.abs(want).max())
    print(f"routing collapse: max |Δ| {err:.2e}, relative to max |y| {scale:.1f}: {err / scale:.1e}")
    assert err <= 1e-6 * max(scale, 10.0)
    # the collapse really happened: the routing weights are one-hot-like on experts 3, 4, 5, 2
    logits = x @ w[0] + w[1]
    assert set(np.asarray(jax.lax.top_k(logits, 4)[1]).ravel().tolist()) == {2, 3, 4, 5}


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_each_device_holds_its_share_of_the_experts(cfg, params, shape):
    model = model_from_params(cfg, params)
    shard_model(model, make_mesh(shape))
    moe = model.layers[0].moe
    ep, tp, fsdp = shape.get("expert", 1), shape.get("tensor", 1), shape.get("fsdp", 1)
    e, d, f2 = moe.mlp1_kernel.shape
    for array, local in ((moe.mlp1_kernel[...], (e // ep, d // fsdp, f2 // tp)),
                         (moe.mlp2_kernel[...], (e // ep, f2 // 2 // tp, d // fsdp))):
        assert {s.data.shape for s in array.addressable_shards} == {local}
        assert len(array.addressable_shards) == 8


def test_meshes_that_cannot_hold_the_model_fail_before_compiling(cfg, params):
    model = model_from_params(cfg, params)
    with pytest.raises(MeshError, match="'expert' of size 24 cannot be split 5 ways"):
        shard_model(model, make_mesh({"expert": 5}))
    with pytest.raises(MeshError, match="'kv_heads' of size 2 cannot be split 4 ways"):
        shard_model(model, make_mesh({"tensor": 4}))
    with pytest.raises(MeshError, match="unknown mesh axes"):
        make_mesh({"experts": 2})
    with pytest.raises(MeshError, match="needs 16 devices, 8 available"):
        make_mesh({"expert": 16})


def test_fitted_specs_keep_what_a_mesh_axis_cannot_divide_whole():
    """Activations (the KV cache, a step's logits) take `fit`: a batch the batch axes do not divide is split over the
    leading ones that do, or not at all, where a parameter's axis that does not divide is refused."""
    from oss_jax.cache import KV_AXES as kv

    P = jax.sharding.PartitionSpec
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert partition_spec(kv, (4, 8, 16, 64), mesh, fit=True) == P(("data", "fsdp"), "tensor", None, None)
    assert partition_spec(kv, (2, 8, 16, 64), mesh, fit=True) == P("data", "tensor", None, None)
    assert partition_spec(kv, (3, 1, 16, 64), mesh, fit=True) == P(None, None, None, None)
    assert partition_spec(("rows", "vocab"), (2, 10), mesh, fit=True) == P("data", "tensor")
    with pytest.raises(MeshError, match="'rows' of size 2 cannot be split 4 ways"):
        partition_spec(kv, (2, 8, 16, 64), mesh, "cache")
    # generation's rows go on `expert` too, after the batch axes, as the MoE splits its tokens
    mesh = make_mesh({"data": 2, "expert": 4})
    assert partition_spec(kv, (8, 8, 16, 64), mesh, fit=True) == P(("data", "expert"), None, None, None)
    assert partition_spec(kv, (2, 8, 16, 64), mesh, fit=True) == P("data", None, None, None)
    assert split_ways("rows", 8, mesh) == 8 and split_ways("rows", 6, mesh) == 2 and split_ways("rows", 1, mesh) == 1


def test_mesh_presets_and_inline_specs():
    assert parse_mesh("ep8") == {"expert": 8}
    assert parse_mesh("data=2, expert=4") == {"data": 2, "expert": 4}
    with pytest.raises(MeshError, match="unknown mesh preset"):
        parse_mesh("ep9")
    with pytest.raises(MeshError, match="bad mesh entry"):
        parse_mesh("expert=x")


def test_model_code_has_no_partition_specs():
    """Sharding is declared once (logical axes + the rules table); model code names no mesh layout."""
    from pathlib import Path

    import oss_jax

    root = Path(oss_jax.__file__).parent
    for name in ("model.py", "layers.py", "params.py"):
        assert "PartitionSpec" not in (root / name).read_text(), name
