"""Float32 logit parity on the published gpt-oss-20b geometry, cut to 2 layers (sliding, full).

Full width: hidden 2880, 64 query / 8 kv heads of 64, 32 experts top-4, intermediate 2880, window 128,
YaRN as published. Only the depth (24 -> 2) and the vocabulary (201,088 -> 8,192; embed + unembed would
otherwise be 4.6 GB per float32 copy) are cut: the point is the head and expert geometry. Tokens are
longer than the sliding window. Same bounds as tests/test_parity.py: max |Δlogit| <= 1e-4 and 100 %
top-1 against each reference.

Memory: each model holds ~6.8 GB of float32 weights, so only one exists at a time (logits, then delete).

Two stand-ins, both for memory on a CPU host, neither touching the arithmetic under test:
- OpenAI's reference MLP gathers every token's 4 experts' weights at once ([T, 4, 5760, 2880] float32 is
  37 GB at T=140). Its MLP block is row-wise, so it runs on token chunks: the same code on the same rows.
- On CPU, JAX lowers `jax.lax.ragged_dot` to a dense dot against all E experts, contracting over (E, D):
  XLA transposes every expert weight tensor (+2.1 GB and +1.1 GB per layer, more than one copy live) and
  does E x the work; this slice then exceeds 20 GB and ~35 s per call. While our model runs, ragged_dot
  is swapped for `tiled_ragged_dot` (same contract: each row times its group's matrix, float32
  accumulation), which walks row tiles and only the experts each tile spans. It is checked against
  `jax.lax.ragged_dot` here, and the tiny-config parity tests run the real lowering.
"""

import contextlib
import dataclasses
import gc
import resource
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import preset_path
from convert.reader import load_params
from convert.synthetic import random_hf_tensors
from convert.writer import write_checkpoint
from oss_jax import parity
from oss_jax.config import FULL, SLIDING, ModelConfig

VOCAB = 8192
BATCH, SEQ_LEN = 2, 140
OPENAI_MLP_ROWS = 4  # tokens per reference MLP call: 4 x 398 MB of gathered float32 expert weights
SEED = 5


def slice_config() -> ModelConfig:
    cfg = ModelConfig.from_file(preset_path("gpt-oss-20b"))
    return dataclasses.replace(cfg, num_hidden_layers=2, layer_types=(SLIDING, FULL), vocab_size=VOCAB,
                               eos_token_id=VOCAB - 2, pad_token_id=VOCAB - 1)


@contextlib.contextmanager
def openai_mlp_in_token_chunks(rows: int):
    """gpt_oss.torch MLPBlock.forward applied to `rows` tokens at a time (it is row-wise: norm, gate, experts)."""
    import torch
    from gpt_oss.torch import model as ref

    original = ref.MLPBlock.forward

    def forward(self, x):
        return torch.cat([original(self, part) for part in x.split(rows)])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ref.MLPBlock, "forward", forward)
        yield


def tiled_ragged_dot(lhs, rhs, group_sizes, precision=None, preferred_element_type=None, group_offset=None,
                     *, tile: int = 64):
    """`jax.lax.ragged_dot` for lhs [M, K] (rows grouped by sizes [G], in order) and rhs [G, K, N] -> [M, N].

    Row tiles in a scan; per tile, a loop over the groups its rows belong to (at most tiles + G - 1 dots of
    [tile, K] x [K, N] in all, against G x [M, K] x [K, N] for the CPU lowering). Rows past sum(sizes) are 0.
    """
    if group_offset is not None:
        raise NotImplementedError("group_offset")
    m, k = lhs.shape
    g, _, n = rhs.shape
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    n_tiles = -(-m // tile)
    x = jnp.pad(lhs, ((0, n_tiles * tile - m), (0, 0))).reshape(n_tiles, tile, k)
    ends = jnp.cumsum(group_sizes)
    group = jnp.searchsorted(ends, jnp.arange(n_tiles * tile), side="right").reshape(n_tiles, tile)  # g: no group
    first, last = group[:, 0], jnp.minimum(group[:, -1], g - 1)

    def one_tile(_, i):
        def one_group(e, acc):
            y = jnp.dot(x[i], rhs[e], precision=precision, preferred_element_type=out_dtype)
            return jnp.where((group[i] == e)[:, None], y, acc)
        return None, jax.lax.fori_loop(first[i], last[i] + 1, one_group, jnp.zeros((tile, n), out_dtype))

    _, out = jax.lax.scan(one_tile, None, jnp.arange(n_tiles))
    return out.reshape(n_tiles * tile, n)[:m]


@contextlib.contextmanager
def tiled_ragged_dot_on_cpu():
    with pytest.MonkeyPatch.context() as mp:
        if jax.default_backend() == "cpu":
            mp.setattr(jax.lax, "ragged_dot", tiled_ragged_dot)
        yield


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Each model's logits on the same random weights; checkpoints are deleted once all three have run."""
    start = time.perf_counter()
    timings = {}

    def lap(name):
        gc.collect()
        timings[name] = time.perf_counter() - start - sum(timings.values())
        print(f"  {name}: {timings[name]:.1f} s, peak RSS so far {_peak_rss_gb():.2f} GB")

    cfg = slice_config()
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_experts,
            cfg.experts_per_token, cfg.intermediate_size, cfg.sliding_window) == (2880, 64, 8, 64, 32, 4, 2880, 128)
    assert cfg.rope_scaling_factor == 32.0 and SEQ_LEN > cfg.sliding_window
    root = tmp_path_factory.mktemp("parity-20b-slice")
    try:
        print()
        hf = random_hf_tensors(cfg, SEED)
        hf_dir = write_checkpoint(root / "hf", cfg, hf, layout="hf")
        original_dir = write_checkpoint(root / "original", cfg, hf, layout="original")
        del hf
        lap("checkpoints")

        loaded_cfg, params = load_params(hf_dir)
        assert loaded_cfg == cfg
        for name in list(params):  # JAX copies host arrays; one tensor at a time, not the whole model twice
            params[name] = jax.block_until_ready(jnp.asarray(params.pop(name)))
        tokens = np.random.default_rng(SEED).integers(0, cfg.vocab_size, size=(BATCH, SEQ_LEN))
        with tiled_ragged_dot_on_cpu():
            ours = parity.ours_logits(cfg, params, tokens)
        del params
        lap("ours")

        with openai_mlp_in_token_chunks(OPENAI_MLP_ROWS):
            openai = parity.openai_logits(original_dir, tokens)
        lap("openai")

        hf_logits = parity.hf_logits(hf_dir, tokens)
        lap("hf")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - start
    print(f"  total {total:.1f} s, peak RSS {_peak_rss_gb():.2f} GB")
    return {"ours": ours, "openai": openai, "hf": hf_logits}


@pytest.mark.parametrize("sizes", [[5, 0, 7, 0, 0, 3], [0, 0, 0, 0, 0, 15], [15, 0, 0, 0, 0, 0], [2, 3, 1, 0, 4, 0]])
def test_tiled_ragged_dot_matches_jax(sizes):
    rng = np.random.default_rng(0)
    m = 17  # rows past sum(sizes) must come out 0, as in jax.lax.ragged_dot
    lhs = jnp.asarray(rng.standard_normal((m, 24), np.float32))
    rhs = jnp.asarray(rng.standard_normal((len(sizes), 24, 10), np.float32))
    gs = jnp.asarray(sizes, jnp.int32)
    want = jax.lax.ragged_dot(lhs, rhs, gs, preferred_element_type=jnp.float32)
    got = jax.jit(lambda a, b, c: tiled_ragged_dot(a, b, c, preferred_element_type=jnp.float32, tile=4))(lhs, rhs, gs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_logits_spread_over_several_units(case):
    std = case["openai"].std()
    print(f"reference logit std {std:.2f}")
    assert std >= 2.0


@pytest.mark.parametrize("ref", ["openai", "hf"])
def test_fp32_parity(case, ref):
    got = parity.compare(case[ref], case["ours"])
    gap = parity.compare(case["openai"], case["hf"])
    print(f"ours vs {ref}: max |Δlogit| {got['max_abs']:.3e}, top-1 {got['top1']:.3f}; "
          f"HF vs OpenAI reference: {gap['max_abs']:.3e}, top-1 {gap['top1']:.3f}")
    assert got["max_abs"] <= 1e-4
    assert got["top1"] == 1.0
