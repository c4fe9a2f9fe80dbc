"""Float32 logit parity on the published gpt-oss-20b geometry, cut to 2 layers (sliding, full).

Full width: hidden 2880, 64 query / 8 kv heads of 64, 32 experts top-4, intermediate 2880, window 128,
YaRN as published. Only the depth (24 -> 2) and the vocabulary (201,088 -> 8,192; embed + unembed would
otherwise be 4.6 GB per float32 copy) are cut: the point is the head and expert geometry. Tokens are
longer than the sliding window. Same bounds as tests/test_parity.py: max |Δlogit| <= 1e-4 and 100 %
top-1 against each reference.

Marked slow (about 12 minutes on 2 CPU cores, peak RSS ~14 GB): run with `-m slow`.

Precision on CPU: by default XLA:CPU (jaxlib 0.10.2) sends float32 dots through YNNPACK, whose [64, 2880] x
[2880, 5760] products are ~3x further from float64 than MKL's (max 3.4e-5 vs 5.9e-6); with it ours lands
at ~1.2e-4 from each reference. With XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= (empty: no YNNPACK
fusions) ours is within ~7e-5, the references' own mutual gap being ~4.7e-5.

Memory: each model holds ~6.8 GB of float32 weights, so only one exists at a time (logits, then delete).
OpenAI's reference MLP gathers every token's 4 experts' weights at once ([T, 4, 5760, 2880] float32 is
37 GB at T=140). Its MLP block is row-wise, so it runs here on token chunks: the same code on the same rows.
Ours on CPU relies on `oss_jax.moe.grouped_matmul` (jax.lax.ragged_dot lowers to a dense product against
all experts on XLA:CPU, over 20 GB here); it is checked against ragged_dot below, unmarked.
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
from oss_jax import moe, parity
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


@pytest.mark.parametrize("sizes", [[50, 0, 70, 0, 0, 20], [0, 0, 0, 0, 0, 140], [140, 0, 0, 0, 0, 0],
                                   [2, 3, 1, 0, 4, 0], [64, 64, 0, 12, 0, 0]])
def test_grouped_matmul_matches_ragged_dot(sizes):
    """The CPU path (row tiles x the experts they hold): empty groups, tile edges, rows past the groups -> 0."""
    rng = np.random.default_rng(0)
    m = 150
    lhs = jnp.asarray(rng.standard_normal((m, 24), np.float32))
    rhs = jnp.asarray(rng.standard_normal((len(sizes), 24, 10), np.float32))
    gs = jnp.asarray(sizes, jnp.int32)
    want = jax.lax.ragged_dot(lhs, rhs, gs, preferred_element_type=jnp.float32)
    got = jax.jit(moe.grouped_matmul)(lhs, rhs, gs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.asarray(got)[sum(sizes):].any()


@pytest.mark.slow
def test_logits_spread_over_several_units(case):
    std = case["openai"].std()
    print(f"reference logit std {std:.2f}")
    assert std >= 2.0


@pytest.mark.slow
@pytest.mark.parametrize("ref", ["openai", "hf"])
def test_fp32_parity(case, ref):
    got = parity.compare(case[ref], case["ours"])
    gap = parity.compare(case["openai"], case["hf"])
    print(f"ours vs {ref}: max |Δlogit| {got['max_abs']:.3e}, top-1 {got['top1']:.3f}; "
          f"HF vs OpenAI reference: {gap['max_abs']:.3e}, top-1 {gap['top1']:.3f}")
    assert got["max_abs"] <= 1e-4
    assert got["top1"] == 1.0
