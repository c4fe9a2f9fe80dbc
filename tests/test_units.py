"""Op-level tests: MXFP4 codec, YaRN RoPE, sliding mask, sinks, router and MoE, SwiGLU.

Expected values come from hand computation, independent numpy formulas, or the reference implementations
(OpenAI's `gpt_oss.torch`, HF transformers); never from the code under test.
"""

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jaxprs import equations, primitives

from oss_jax import mxfp4
from oss_jax.config import ModelConfig
from oss_jax.layers import apply_rope, attend, attention_mask, rope_cos_sin, yarn_inv_freq
from oss_jax.moe import MoE, route, router_logits, swiglu
from oss_jax.params import flat_params

ROOT = Path(__file__).resolve().parent.parent
CFG_20B = ROOT / "configs" / "gpt-oss-20b.json"


@pytest.fixture(scope="module")
def cfg_20b():
    return ModelConfig.from_file(CFG_20B)


def _random_mxfp4(rng, shape, scale_lo=0, scale_hi=256):
    """Random blocks uint8 [*shape, 16] and scales uint8 [*shape] with scales in [scale_lo, scale_hi)."""
    blocks = rng.integers(0, 256, size=(*shape, 16), dtype=np.uint8)
    scales = rng.integers(scale_lo, scale_hi, size=shape).astype(np.uint8)
    return blocks, scales


# ------------------------------------------------------------------ MXFP4 decode


def test_mxfp4_decode_hand_built_bytes():
    blocks = np.zeros((2, 2, 16), np.uint8)
    scales = np.array([[127, 128], [125, 127]], np.uint8)  # x1, x2 / x1/4, x1
    # row 0, group 0 (x1)
    blocks[0, 0, 0] = 0x21  # elem 0 = code 1 (+0.5), elem 1 = code 2 (+1.0)
    blocks[0, 0, 1] = 0xF8  # elem 2 = code 8 (-0.0), elem 3 = code 15 (-6)
    blocks[0, 0, 2] = 0x7A  # elem 4 = code 10 (-1.0), elem 5 = code 7 (+6)
    # row 0, group 1 (x2)
    blocks[0, 1, 0] = 0x43  # elem 32 = code 3 (1.5 * 2 = 3), elem 33 = code 4 (2 * 2 = 4)
    blocks[0, 1, 15] = 0x9D  # elem 62 = code 13 (-3 * 2 = -6), elem 63 = code 9 (-0.5 * 2 = -1)
    # row 1, group 0 (x1/4)
    blocks[1, 0, 0] = 0x5E  # elem 0 = code 14 (-4 / 4 = -1), elem 1 = code 5 (3 / 4 = 0.75)
    blocks[1, 0, 7] = 0x06  # elem 14 = code 6 (4 / 4 = 1), elem 15 = code 0 (0)
    # row 1, group 1 (x1): every byte 0xBB -> every element code 11 (-1.5)
    blocks[1, 1, :] = 0xBB

    expected = np.zeros((2, 64), np.float32)
    expected[0, :6] = [0.5, 1.0, -0.0, -6.0, -1.0, 6.0]
    expected[0, 32:34] = [3.0, 4.0]
    expected[0, 62:64] = [-6.0, -1.0]
    expected[1, :2] = [-1.0, 0.75]
    expected[1, 14] = 1.0
    expected[1, 32:64] = -1.5

    out = mxfp4.decode(blocks, scales)
    assert out.dtype == np.float32 and out.shape == (2, 64)
    np.testing.assert_array_equal(out, expected)
    assert np.signbit(out[0, 2]), "code 8 must decode to -0.0"
    assert not np.signbit(out[1, 15])


def _reference_dequantize(blocks: np.ndarray, scales: np.ndarray, tmp_path: Path) -> np.ndarray:
    """OpenAI's own dequantizer: gpt_oss.torch.weights.Checkpoint._get_mxfp4_tensor on a real safetensors file."""
    from gpt_oss.torch.weights import Checkpoint
    from safetensors.torch import save_file

    save_file({"w.blocks": torch.from_numpy(blocks), "w.scales": torch.from_numpy(scales)},
              str(tmp_path / "w.safetensors"))
    ckpt = Checkpoint(str(tmp_path), torch.device("cpu"))
    return ckpt._get_mxfp4_tensor("w.blocks", "w.scales", dtype=torch.float32).numpy()


def test_mxfp4_decode_matches_reference_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    blocks, scales = _random_mxfp4(rng, (3, 5, 4), scale_lo=0, scale_hi=255)
    expected = _reference_dequantize(blocks, scales, tmp_path)
    out = mxfp4.decode(blocks, scales)
    assert out.shape == expected.shape == (3, 5, 128)
    # bit-equal (same signed zeros, same infinities for scales that overflow float32)
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))


def test_mxfp4_decode_matches_reference_lut_formula():
    """The reference's FP4_VALUES table + ldexp (as `_get_mxfp4_tensor_copy` does it), in torch."""
    from gpt_oss.torch.weights import FP4_VALUES

    rng = np.random.default_rng(1)
    blocks, scales = _random_mxfp4(rng, (7, 3), scale_lo=90, scale_hi=160)
    b = torch.from_numpy(blocks)
    codes = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(7, 3, 32).long()
    exp = torch.from_numpy(scales).to(torch.int32) - 127
    expected = torch.ldexp(torch.tensor(FP4_VALUES, dtype=torch.float32)[codes], exp[..., None]).reshape(7, 96)
    out = mxfp4.decode(blocks, scales)
    np.testing.assert_array_equal(out.view(np.uint32), expected.numpy().view(np.uint32))


def test_mxfp4_decode_rejects_bad_inputs():
    blocks = np.zeros((2, 3, 16), np.uint8)
    scales = np.full((2, 3), 127, np.uint8)
    with pytest.raises(TypeError):
        mxfp4.decode(blocks.astype(np.int8), scales)
    with pytest.raises(TypeError):
        mxfp4.decode(blocks, scales.astype(np.int32))
    with pytest.raises(ValueError):
        mxfp4.decode(np.zeros((2, 3, 15), np.uint8), scales)  # 15 bytes per group
    with pytest.raises(ValueError):
        mxfp4.decode(blocks, np.full((2, 4), 127, np.uint8))  # group count mismatch
    with pytest.raises(ValueError):
        mxfp4.decode(blocks, np.full((3, 3), 127, np.uint8))  # leading dims mismatch


# ------------------------------------------------------------------ MXFP4 encode


def test_mxfp4_encode_hand_built_values():
    """Scale = smallest power of two bringing max |x| within 6; ties go to the even code."""
    group = np.zeros(32, np.float32)
    group[:10] = [6.0, 0.25, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.75, -6.0]
    # nearest fp4 (ties to even code): 0.25 -> 0 (code 0), 1.25 -> 1 (code 2), 1.75 -> 2 (code 4),
    # 2.5 -> 2 (code 4), 3.5 -> 4 (code 6), 5 -> 4 (code 6), -5 -> -4 (code 14), -0.75 -> -1 (code 10)
    blocks, scales = mxfp4.encode(group[None])
    assert blocks.dtype == np.uint8 and scales.dtype == np.uint8
    assert blocks.shape == (1, 1, 16) and scales.shape == (1, 1)
    assert scales[0, 0] == 127
    expected_bytes = np.zeros(16, np.uint8)
    expected_bytes[:5] = [0x07, 0x42, 0x64, 0xE6, 0xFA]  # code pairs (7,0) (2,4) (4,6) (6,14) (10,15)
    np.testing.assert_array_equal(blocks[0, 0], expected_bytes)

    # same pattern times 2^-3 and times 2^5: only the scale moves
    for shift in (-3, 5):
        b, s = mxfp4.encode(np.ldexp(group, shift)[None])
        np.testing.assert_array_equal(b[0, 0], expected_bytes)
        assert s[0, 0] == 127 + shift

    # max |x| = 7 does not fit 6 * 2^0, so the scale is 2^1 and 7/2 = 3.5 rounds (tie) to 4 -> 8
    b, s = mxfp4.encode(np.array([[7.0] + [0.0] * 31], np.float32))
    assert s[0, 0] == 128 and b[0, 0, 0] == 0x06
    # an all-zero group decodes to zeros
    b, s = mxfp4.encode(np.zeros((1, 32), np.float32))
    np.testing.assert_array_equal(mxfp4.decode(b, s), np.zeros((1, 32), np.float32))


def test_mxfp4_encode_decode_roundtrip_is_exact():
    rng = np.random.default_rng(2)
    blocks, scales = _random_mxfp4(rng, (4, 6, 5), scale_lo=100, scale_hi=151)
    values = mxfp4.decode(blocks, scales)
    b2, s2 = mxfp4.encode(values)
    assert b2.shape == blocks.shape and s2.shape == scales.shape
    again = mxfp4.decode(b2, s2)
    np.testing.assert_array_equal(again, values)  # == (so -0.0 may come back as +0.0)


def test_mxfp4_encode_error_is_within_half_a_grid_step():
    rng = np.random.default_rng(3)
    # groups of very different magnitudes: 6 rows x 4 groups, each group scaled by 10^u, u in [-3, 3]
    x = rng.standard_normal((6, 4, 32)) * 10.0 ** rng.uniform(-3, 3, size=(6, 4, 1))
    x[0, 0, 5] = 0.0
    x = x.astype(np.float32).reshape(6, 128)
    blocks, scales = mxfp4.encode(x)
    dec = mxfp4.decode(blocks, scales).astype(np.float64)

    xg = x.astype(np.float64).reshape(6, 4, 32)
    step = np.ldexp(1.0, scales.astype(np.int64) - 127)[..., None]  # group scale 2^(s-127)
    amax = np.abs(xg).max(-1, keepdims=True)
    assert np.all(amax <= 6 * step), "group max must fit in 6 * scale"
    assert np.all(amax > 3 * step), "scale must be the smallest power of two that fits"

    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)
    grid = np.concatenate([-grid[::-1], grid])
    nearest = np.abs(xg[..., None] / step[..., None] - grid).min(-1) * step  # distance to nearest grid point
    err = np.abs(dec.reshape(6, 4, 32) - xg)
    rel = (err / amax).max()
    print(f"max |err - nearest grid distance| = {np.abs(err - nearest).max():.3e}; "
          f"max err / group amax = {rel:.4f} (bound 1/3)")
    np.testing.assert_allclose(err, nearest, rtol=0, atol=1e-12 * float(amax.max()))
    # half of the widest step (2 between 4 and 6) at the group scale, relative to amax > 3 * scale
    assert rel <= 1.0 / 3.0
    assert np.all(err <= 1.0 * step)


def test_mxfp4_encode_rejects_bad_inputs():
    with pytest.raises(ValueError):
        mxfp4.encode(np.zeros((2, 33), np.float32))
    with pytest.raises(ValueError):
        mxfp4.encode(np.zeros((2, 16), np.float32))
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((2, 64), np.float32)
        x[1, 40] = bad
        with pytest.raises(ValueError):
            mxfp4.encode(x)
    # 3e38 would round up to 4 * 2^126 = 2^128, past float32's range: refused rather than stored as inf
    with pytest.raises(ValueError, match="exceed the MXFP4 range"):
        mxfp4.encode(np.full((1, 32), 3e38, np.float32))
    blocks, scales = mxfp4.encode(np.full((1, 32), 1e38, np.float32))
    assert np.all(np.isfinite(mxfp4.decode(blocks, scales)))


# ------------------------------------------------------------------ YaRN RoPE


def _reference_rope(cfg: ModelConfig):
    from gpt_oss.torch.model import RotaryEmbedding

    return RotaryEmbedding(cfg.head_dim, cfg.rope_theta, torch.float32,
                           initial_context_length=cfg.initial_context_length,
                           scaling_factor=cfg.rope_scaling_factor, ntk_alpha=cfg.rope_beta_slow,
                           ntk_beta=cfg.rope_beta_fast)


@pytest.mark.parametrize("which", ["tiny", "20b"])
def test_yarn_inv_freq_matches_reference(which, tiny_config, cfg_20b):
    cfg = tiny_config if which == "tiny" else cfg_20b
    ref_conc, ref_inv = _reference_rope(cfg)._compute_concentration_and_inv_freq()
    inv, conc = yarn_inv_freq(cfg)
    assert inv.dtype == np.float32 and inv.shape == (cfg.head_dim // 2,)
    err = np.abs(inv / ref_inv.numpy() - 1).max()
    print(f"{which}: max relative inv_freq error vs gpt_oss reference = {err:.3e}")
    np.testing.assert_allclose(inv, ref_inv.numpy(), rtol=1e-6, atol=0)
    assert conc == pytest.approx(ref_conc, rel=1e-12)


@pytest.mark.parametrize("which", ["tiny", "20b"])
def test_rope_cos_sin_matches_reference(which, tiny_config, cfg_20b):
    cfg = tiny_config if which == "tiny" else cfg_20b
    t, offset = 300, 57
    ref_cos, ref_sin = (a.numpy() for a in _reference_rope(cfg)._compute_cos_sin(t + offset))
    positions = jnp.stack([jnp.arange(t), jnp.arange(t) + offset]).astype(jnp.int32)  # [B=2, T]
    cos, sin = rope_cos_sin(cfg, positions)
    assert cos.shape == sin.shape == (2, t, cfg.head_dim // 2)
    expected_cos = np.stack([ref_cos[:t], ref_cos[offset:]])
    expected_sin = np.stack([ref_sin[:t], ref_sin[offset:]])
    err = max(np.abs(np.asarray(cos) - expected_cos).max(), np.abs(np.asarray(sin) - expected_sin).max())
    # our float32 pow is correctly rounded, torch's is not always: inv_freq may differ by 1 ulp (20b: dims 6 and
    # 10), and that angle error grows with the position; allow exactly that plus float32 rounding
    ref_inv = _reference_rope(cfg)._compute_concentration_and_inv_freq()[1].numpy()
    inv, conc = yarn_inv_freq(cfg)
    np.testing.assert_array_max_ulp(inv, ref_inv, maxulp=1)
    last = t + offset - 1  # largest position
    atol = 1e-6 + conc * (last * np.abs(inv - ref_inv) + np.spacing(np.float32(last) * inv))  # per dim [H/2]
    print(f"{which}: max |cos/sin error| vs gpt_oss reference = {err:.3e} (tolerance up to {atol.max():.3e}, "
          f"inv_freq dims off by 1 ulp: {np.flatnonzero(inv != ref_inv).tolist()})")
    assert np.all(np.abs(np.asarray(cos) - expected_cos) <= atol)
    assert np.all(np.abs(np.asarray(sin) - expected_sin) <= atol)


def test_yarn_spec_facts_20b(cfg_20b):
    inv, conc = yarn_inv_freq(cfg_20b)
    assert conc == pytest.approx(0.1 * math.log(32) + 1, rel=1e-12)
    assert conc == pytest.approx(1.34657, abs=1e-5)

    # independent float64 YaRN formula with the unrounded correction dims
    d_half, base, ctx = 32, 150000.0, 4096
    low = d_half * math.log(ctx / (32 * 2 * math.pi)) / math.log(base)
    high = d_half * math.log(ctx / (1 * 2 * math.pi)) / math.log(base)
    assert low == pytest.approx(8.0928, abs=1e-4) and high == pytest.approx(17.3980, abs=1e-4)
    i = np.arange(d_half, dtype=np.float64)
    plain = base ** (-2 * i / 64)
    keep = 1 - np.clip((i - low) / (high - low), 0, 1)
    expected = plain * keep + plain / 32 * (1 - keep)
    err = np.abs(inv / expected - 1).max()
    print(f"max relative inv_freq error vs float64 YaRN formula = {err:.3e}")
    np.testing.assert_allclose(inv, expected, rtol=1e-6)

    # dims 0..8 keep the original frequency exactly, dims >= 18 are exactly divided by 32, the rest blend
    plain32, conc1 = yarn_inv_freq(dataclasses.replace(cfg_20b, rope_scaling_factor=1.0))
    assert conc1 == 1.0
    np.testing.assert_allclose(plain32, plain, rtol=1e-6)
    # the pow is the correctly rounded float32 one on every machine (numpy's float32 pow is off by up to 2 ulp on
    # AVX-512 CPUs, which moved 7 of the 20b's frequencies there)
    np.testing.assert_array_equal(plain32, np.float32(1) / (base ** (2 * i / 64)).astype(np.float32))
    np.testing.assert_array_equal(inv[:9], plain32[:9])
    np.testing.assert_array_equal(inv[18:] * np.float32(32), plain32[18:])
    assert np.all(inv[9:18] < plain32[9:18]) and np.all(inv[9:18] > plain32[9:18] / 32)


def test_yarn_matches_transformers(cfg_20b):
    """HF transformers' YaRN: ROPE_INIT_FUNCTIONS['yarn'](config, device) -> (inv_freq, attention_factor)."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = transformers.GptOssConfig(**json.loads(CFG_20B.read_text()))
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, None)
    inv, conc = yarn_inv_freq(cfg_20b)
    err = np.abs(inv / hf_inv.numpy() - 1).max()
    print(f"max relative inv_freq error vs transformers YaRN = {err:.3e}")
    np.testing.assert_allclose(inv, hf_inv.numpy(), rtol=1e-6)
    assert conc == pytest.approx(hf_factor, rel=1e-12)


def test_apply_rope_matches_reference_half_split(tiny_config):
    from gpt_oss.torch.model import _apply_rotary_emb

    cfg, t = tiny_config, 11
    x = np.random.default_rng(4).standard_normal((t, cfg.num_attention_heads, cfg.head_dim)).astype(np.float32)
    ref_cos, ref_sin = _reference_rope(cfg)._compute_cos_sin(t)
    expected = _apply_rotary_emb(torch.from_numpy(x), ref_cos, ref_sin).numpy()
    cos, sin = rope_cos_sin(cfg, jnp.arange(t, dtype=jnp.int32)[None])
    out = np.asarray(apply_rope(jnp.asarray(x)[None], cos, sin))[0]
    print(f"apply_rope max error vs reference = {np.abs(out - expected).max():.3e}")
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ sliding mask


def test_sliding_mask_window_128():
    t = 300
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    mask = np.asarray(attention_mask(pos, pos, 128))
    assert mask.shape == (1, t, t) and mask.dtype == np.bool_
    m = mask[0]
    assert m[0].sum() == 1 and m[0, 0]
    for q in range(t):
        visible = np.flatnonzero(m[q])
        expected = np.arange(max(0, q - 127), q + 1)
        np.testing.assert_array_equal(visible, expected)
    assert np.all(m[127:].sum(-1) == 128)
    assert not np.any(np.triu(m, k=1)), "no future keys"


def test_sliding_mask_full_causal_and_offsets():
    t = 300
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    full = np.asarray(attention_mask(pos, pos, None))[0]
    np.testing.assert_array_equal(full, np.tril(np.ones((t, t), bool)))
    # one decode query at position 299 against 300 cached keys, batch of 2 with different key positions
    q_pos = jnp.array([[299], [10]], jnp.int32)
    k_pos = jnp.stack([jnp.arange(t), jnp.arange(t)]).astype(jnp.int32)
    m = np.asarray(attention_mask(q_pos, k_pos, 128))
    assert m.shape == (2, 1, t)
    np.testing.assert_array_equal(np.flatnonzero(m[0, 0]), np.arange(172, 300))
    np.testing.assert_array_equal(np.flatnonzero(m[1, 0]), np.arange(0, 11))
    # window 1 = only itself
    np.testing.assert_array_equal(np.asarray(attention_mask(pos, pos, 1))[0], np.eye(t, dtype=bool))


# ------------------------------------------------------------------ attention with sinks


B, T, S, K, G, H = 2, 3, 5, 4, 6, 8  # every dim different


def _attn_inputs(seed=5):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, K, G, H))
    k = rng.standard_normal((B, S, K, H))
    v = rng.standard_normal((B, S, K, H))
    q_pos = np.arange(S - T, S)[None].repeat(B, 0)  # the last T positions of S (chunked prefill)
    k_pos = np.arange(S)[None].repeat(B, 0)
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    mask = (diff >= 0) & (diff < 4)  # causal, window 4
    mask[1, 0, :] &= np.arange(S) != 2  # an irregular hole in batch 1
    return q, k, v, mask


def _numpy_scores(q, k, mask, scale):
    """[B, K, G, T, S] float64 scaled scores, -inf where masked."""
    s = np.einsum("btkgh,bskh->bkgts", q, k) * scale
    return np.where(mask[:, None, None], s, -np.inf)


def _numpy_attend(q, k, v, sinks, mask, scale):
    """Softmax over [scores | sink] with the sink column dropped, in float64."""
    s = _numpy_scores(q, k, mask, scale)
    sink = np.broadcast_to(sinks[None, :, :, None, None], s.shape[:-1] + (1,))
    full = np.concatenate([s, sink], axis=-1)
    full = np.exp(full - full.max(-1, keepdims=True))
    probs = (full / full.sum(-1, keepdims=True))[..., :-1]
    return np.einsum("bkgts,bskh->btkgh", probs, v)


def _kv_heads_first(a):
    """keys or values [B, S, K, H] (as the numpy formulas take them) -> [B, K, S, H] (as `attend` does)."""
    return jnp.asarray(a, jnp.float32).transpose(0, 2, 1, 3)


def _jax_attend(q, k, v, sinks, mask, scale):
    f32 = jnp.float32
    out = jax.jit(attend)(jnp.asarray(q, f32), _kv_heads_first(k), _kv_heads_first(v), jnp.asarray(sinks, f32),
                          jnp.asarray(mask), scale)
    return np.asarray(out)


def test_attend_matches_numpy_with_sinks():
    q, k, v, mask = _attn_inputs()
    sinks = np.random.default_rng(6).standard_normal((K, G))
    scale = 1 / math.sqrt(H)
    out = _jax_attend(q, k, v, sinks, mask, scale)
    assert out.shape == (B, T, K, G, H) and out.dtype == np.float32
    expected = _numpy_attend(q, k, v, sinks, mask, scale)
    print(f"attend max error vs numpy = {np.abs(out - expected).max():.3e}")
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sink", [-np.inf, -1e9])
def test_attend_very_negative_sinks_is_plain_softmax(sink):
    q, k, v, mask = _attn_inputs()
    scale = 0.37
    s = _numpy_scores(q, k, mask, scale)
    p = np.exp(s - s.max(-1, keepdims=True))
    plain = np.einsum("bkgts,bskh->btkgh", p / p.sum(-1, keepdims=True), v)
    out = _jax_attend(q, k, v, np.full((K, G), sink), mask, scale)
    print(f"sink={sink}: max error vs plain softmax attention = {np.abs(out - plain).max():.3e}")
    np.testing.assert_allclose(out, plain, rtol=0, atol=1e-5)


def test_attend_sink_only_enlarges_denominator():
    q, k, v, mask = _attn_inputs()
    scale = 1 / math.sqrt(H)
    sinks = np.linspace(0.5, 4.0, K * G).reshape(K, G)  # a different, sizeable sink per head
    s = _numpy_scores(q, k, mask, scale)
    z = np.exp(s).sum(-1)  # [B, K, G, T], unshifted partition function over keys
    shrink = (z / (z + np.exp(sinks)[None, :, :, None])).transpose(0, 3, 1, 2)[..., None]  # [B, T, K, G, 1]
    plain = _jax_attend(q, k, v, np.full((K, G), -np.inf), mask, scale)
    out = _jax_attend(q, k, v, sinks, mask, scale)
    print(f"sinked = plain * Z/(Z+e^sink): max error {np.abs(out - plain * shrink).max():.3e}; "
          f"shrink factors in [{shrink.min():.3f}, {shrink.max():.3f}]")
    np.testing.assert_allclose(out, plain * shrink, rtol=0, atol=1e-5)
    assert shrink.max() < 0.99
    norm_ratio = np.linalg.norm(out, axis=-1) / np.linalg.norm(plain, axis=-1)
    np.testing.assert_allclose(norm_ratio, shrink[..., 0], rtol=1e-4)


def test_attend_fully_masked_query_gives_zeros():
    q, k, v, mask = _attn_inputs()
    mask[0, 1, :] = False
    out = _jax_attend(q, k, v, np.zeros((K, G)), mask, 0.3)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0, 1], 0.0)


@pytest.mark.parametrize("window", [None, 5])
def test_attend_in_blocks_equals_numpy(window):
    """Keys 2 at a time (four blocks) with a running softmax == the one-pass float64 formula: empty slots (-1), padded
    queries, a sliding window, queries that see only the sink in some blocks. Blocks past the last query position
    (slot = position) are skipped, here 2 of 4 for the second set of queries."""
    from oss_jax.layers import attend_in_blocks

    rng = np.random.default_rng(7)
    b, t, s, block = 2, 6, 8, 2
    q, k, v = (rng.standard_normal(shape) for shape in ((b, t, K, G, H), (b, s, K, H), (b, s, K, H)))
    sinks = rng.standard_normal((K, G))
    k_pos = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, -1, -1, -1]], np.int32)
    f32 = jnp.float32
    run = jax.jit(attend_in_blocks, static_argnums=(6, 7, 8))
    for q_pos in ([[2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, -1]], [[0, 1, 2, 3, -1, -1], [0, 1, 2, 3, 3, -1]]):
        q_pos = np.array(q_pos, np.int32)
        mask = np.asarray(attention_mask(jnp.asarray(q_pos), jnp.asarray(k_pos), window))
        got = np.asarray(run(jnp.asarray(q, f32), _kv_heads_first(k), _kv_heads_first(v), jnp.asarray(sinks, f32),
                             jnp.asarray(q_pos), jnp.asarray(k_pos), window, 0.3, block))
        err = float(np.max(np.abs(got - _numpy_attend(q, k, v, sinks, mask, 0.3))))
        print(f"attend_in_blocks (window {window}, last query {q_pos.max()}) vs float64: {err:.1e}")
        assert err < 1e-5


def _banded_case(kind: str):
    """(q_pos, k_pos, segments) for `attend_banded`, window 4: P earlier keys (a ring in slot order) then T queries."""
    if kind == "ring":  # rows start at positions 9 and 2 (ring not yet full), 7 queries (not a multiple of 4)
        starts, p, t = (9, 2), 4, 7
    elif kind == "short ring":  # a ring of 3 slots (a cache shorter than the window)
        starts, p, t = (5, 6), 3, 9
    else:  # packed rows, no cache: sequences of 3, 6 and 2 tokens (positions restart), then padding
        q_pos = np.array([[0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, -1], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, -1, -1]], np.int32)
        segments = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 3], [0] * 10 + [1, 1]], np.int32)
        return q_pos, q_pos, segments
    q_pos = np.stack([np.arange(t) + s for s in starts]).astype(np.int32)
    q_pos[1, -2:] = -1  # the second row ends early
    ring = np.full((len(starts), p), -1, np.int32)
    for row, s in enumerate(starts):
        for pos in range(max(0, s - p), s):
            ring[row, pos % p] = pos
    return q_pos, np.concatenate([ring, q_pos], axis=1), None


@pytest.mark.parametrize("kind", ["ring", "short ring", "packed"])
def test_attend_banded_equals_numpy(kind):
    """A sliding layer's queries in blocks of W/2, each scoring only the W keys before it and its own == the float64
    formula over every key with the mask from positions; its gradients == `attend`'s (training takes it)."""
    from oss_jax.layers import attend_banded

    window, scale = 4, 0.3
    q_pos, k_pos, segments = _banded_case(kind)
    rng = np.random.default_rng(11)
    (b, t), s = q_pos.shape, k_pos.shape[1]
    q, k, v = (rng.standard_normal(shape) for shape in ((b, t, K, G, H), (b, s, K, H), (b, s, K, H)))
    sinks = rng.standard_normal((K, G))
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    mask = (diff >= 0) & (diff < window) & (k_pos[:, None, :] >= 0)
    if segments is not None:
        mask &= segments[:, :, None] == segments[:, None, :]
    assert mask.sum(-1).max() == window and np.any(mask[:, :, :s - t]) == (kind != "packed")
    f32 = jnp.float32
    args = (jnp.asarray(q, f32), _kv_heads_first(k), _kv_heads_first(v), jnp.asarray(sinks, f32))
    seg = None if segments is None else jnp.asarray(segments)

    def banded(q, k, v, sinks):
        return attend_banded(q, k, v, sinks, jnp.asarray(q_pos), jnp.asarray(k_pos), window, scale, seg)

    def every_key(q, k, v, sinks):
        return attend(q, k, v, sinks, jnp.asarray(mask), scale)

    got = np.asarray(jax.jit(banded)(*args))
    err = float(np.max(np.abs(got - _numpy_attend(q, k, v, sinks, mask, scale))))
    weights = jnp.asarray(rng.standard_normal(got.shape), f32)
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2, 3)))(*args)
             for f in (banded, every_key)]
    grad_err = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(*grads, strict=True))
    print(f"attend_banded ({kind}) vs float64: {err:.1e}; gradients vs attend's: {grad_err:.1e}")
    assert err < 1e-5 and grad_err < 1e-5


def _causal_case():
    """Two rows of 11 tokens for `attend_causal` (tiles of 4: the third padded by one): packed sequences of 3, 4 and
    2 tokens then padding; one sequence of 9 then padding. Inputs [B,T,K,G,H], [B,K,T,H] x2, sinks, the float64 mask."""
    q_pos = np.array([[0, 1, 2, 0, 1, 2, 3, 0, 1, -1, -1], [0, 1, 2, 3, 4, 5, 6, 7, 8, -1, -1]], np.int32)
    segments = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3], [0] * 9 + [1, 1]], np.int32)
    rng = np.random.default_rng(13)
    b, t = q_pos.shape
    q, k, v = (rng.standard_normal(shape) for shape in ((b, t, K, G, H), (b, t, K, H), (b, t, K, H)))
    sinks = rng.standard_normal((K, G))
    diff = q_pos[:, :, None] - q_pos[:, None, :]
    mask = (diff >= 0) & (q_pos[:, None, :] >= 0) & (segments[:, :, None] == segments[:, None, :])
    return q_pos, segments, (q, k, v, sinks), mask


def test_attend_causal_equals_numpy():
    """A full layer's long rows in tiles of 4 queries x 4 keys, none past the diagonal, with a running softmax and its
    own backward == the float64 formula over every key; its gradients (q, k, v, sinks) == `attend`'s."""
    from oss_jax.causal_blocks import attend_causal

    q_pos, segments, (q, k, v, sinks), mask = _causal_case()
    scale, f32 = 0.3, jnp.float32
    args = (jnp.asarray(q, f32), _kv_heads_first(k), _kv_heads_first(v), jnp.asarray(sinks, f32))

    def blocks(q, k, v, sinks):
        return attend_causal(q, k, v, sinks, jnp.asarray(q_pos), jnp.asarray(segments), scale, block=4)

    def every_key(q, k, v, sinks):
        return attend(q, k, v, sinks, jnp.asarray(mask), scale)

    got = np.asarray(jax.jit(blocks)(*args))
    err = float(np.max(np.abs(got - _numpy_attend(q, k, v, sinks, mask, scale))))
    weights = jnp.asarray(np.random.default_rng(14).standard_normal(got.shape), f32)
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2, 3)))(*args)
             for f in (blocks, every_key)]
    grad_err = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(*grads, strict=True))
    print(f"attend_causal vs float64: {err:.1e}; gradients vs attend's: {grad_err:.1e}")
    assert err < 1e-5 and grad_err < 1e-5
    np.testing.assert_array_equal(got[:, -2:], 0.0)  # padding queries see only the sink


def test_attend_causal_sharded_equals_one_device():
    """`attend_causal` and its gradients jitted with rows over `data` and kv heads over `tensor` (8 devices) == on one
    device: its loops slice only T, which no mesh axis splits."""
    from oss_jax.causal_blocks import attend_causal
    from oss_jax.sharding import make_mesh

    q_pos, segments, inputs, _ = _causal_case()
    args = [jnp.asarray(a, jnp.float32) for a in inputs]
    args[1:3] = [_kv_heads_first(a) for a in inputs[1:3]]

    def loss(q, k, v, sinks):
        out = attend_causal(q, k, v, sinks, jnp.asarray(q_pos), jnp.asarray(segments), 0.3, block=4)
        return jnp.sum(out * jnp.cos(out)), out

    step = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    local = jax.jit(step)(*args)
    mesh = make_mesh({"data": 2, "tensor": 4})
    P = jax.sharding.PartitionSpec
    specs = (P("data", None, "tensor"), P("data", "tensor"), P("data", "tensor"), P("tensor"))
    placed = [jax.device_put(a, jax.sharding.NamedSharding(mesh, s)) for a, s in zip(args, specs, strict=True)]
    sharded = jax.jit(step)(*placed)
    assert len(sharded[0][1].sharding.device_set) == 8
    # relative to each leaf's largest value: the loss sums every output, in another order when sharded
    err = max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(x))) for x, y in zip(
        jax.tree.leaves(local), jax.tree.leaves(sharded), strict=True))
    print(f"attend_causal on a data=2 x tensor=4 mesh vs one device (loss, output, gradients): {err:.1e} relative")
    assert err < 1e-5


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("window", [None, 4])
def test_attend_then_write_equals_writing_first(window, cache_dtype):
    """CPU decode (`attend_then_write`: the old cache plus the new key, then the write) == writing first and attending
    to the written cache (float64), and its cache == `LayerCache.write`'s, bit for bit. Rows: one in the middle of
    its cache (a ring of 4 slots wrapped past its window), a padding row (-1: sees only the sink, stores nothing),
    and one whose slot already holds the position being written (a stale entry: left out, as the write replaces
    it), at batch 3 and, for the first row alone, batch 1 (its own in-place update); a float32 query against a bf16
    cache attends to its own key as the cache keeps it."""
    from oss_jax.cache import LayerCache
    from oss_jax.layers import attend_then_write

    rng = np.random.default_rng(11)
    s = 8 if window is None else window
    q, k, v = (rng.standard_normal(shape) for shape in ((3, 1, K, G, H), (3, 1, K, H), (3, 1, K, H)))
    old_k, old_v = (rng.standard_normal((3, s, K, H)) for _ in range(2))
    sinks = rng.standard_normal((K, G))
    if window is None:
        old_pos = np.array([[0, 1, 2, 3, 4, -1, -1, -1], [0, 1, 2, -1, -1, -1, -1, -1], [0, 1, 2, 3, 4, 5, -1, -1]])
        positions = np.array([[5], [-1], [5]])  # row 2's slot 5 holds an old position 5
    else:
        old_pos = np.array([[8, 9, 6, 7], [0, 1, 2, -1], [4, 5, 6, 7]])
        positions = np.array([[10], [-1], [7]])  # row 0 overwrites position 6, row 2 a stale 7
    f32 = jnp.float32
    run = jax.jit(attend_then_write, static_argnums=(6, 7))
    for rows in ([0, 1, 2], [0]):
        cache = LayerCache(_kv_heads_first(old_k[rows]).astype(cache_dtype),
                           _kv_heads_first(old_v[rows]).astype(cache_dtype), jnp.asarray(old_pos[rows]))
        pos = jnp.asarray(positions[rows], jnp.int32)
        new_k, new_v = jnp.asarray(k[rows], f32), jnp.asarray(v[rows], f32)
        written = cache.write(new_k, new_v, pos)
        out, got = run(jnp.asarray(q[rows], f32), new_k, new_v, jnp.asarray(sinks, f32), pos, cache, window, 0.3)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(written), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        keys, values = (np.asarray(a, np.float64).transpose(0, 2, 1, 3) for a in (written.k, written.v))
        mask = np.asarray(attention_mask(pos, written.pos, window))
        expected = _numpy_attend(q[rows], keys, values, sinks, mask, 0.3)
        err = float(np.max(np.abs(np.asarray(out) - expected)))
        print(f"attend_then_write (window {window}, rows {rows}, {jnp.dtype(cache_dtype).name} cache) vs writing "
              f"first, float64: {err:.1e}")
        assert err < 1e-5
        if 1 in rows:
            np.testing.assert_array_equal(np.asarray(out)[1], 0.0)


@pytest.mark.parametrize("accelerator_form", [False, True])
def test_rows_dot_transposed_any_row_count(force_backend, accelerator_form):
    """x [X, D] . w [V, D] for 1-9 and 31-33 rows (CPU: w as the left operand, rows padded to a multiple of 8, for
    2-32 rows) == float64 numpy."""
    from oss_jax.model import rows_dot_transposed

    force_backend("gpu" if accelerator_form else "cpu")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1000, 96)).astype(np.float32)
    for rows in [*range(1, 10), 31, 32, 33]:
        x = rng.standard_normal((rows, 96)).astype(np.float32)
        got = np.asarray(jax.jit(rows_dot_transposed)(x, w))
        err = float(np.max(np.abs(got - x.astype(np.float64) @ w.T.astype(np.float64))))
        print(f"rows {rows}: max |err| {err:.1e}")
        assert got.shape == (rows, 1000) and err < 1e-4
        # the fast CPU form: w the dot's left operand, the [V, X] product kept from being laid out as [X, V]
        jaxpr = jax.make_jaxpr(rows_dot_transposed)(x, w)
        dot = next(e for e in jaxpr.eqns if e.primitive.name == "dot_general")
        cpu_form = not accelerator_form and 2 <= rows <= 32
        assert ("optimization_barrier" in primitives(jaxpr)) == cpu_form
        assert dot.invars[0].aval.shape == ((1000, 96) if cpu_form else (rows, 96))


def test_apart_unembedding_at_gpt_oss_width_within_float32_rounding(force_backend):
    """Generation's CPU unembedding of 2-32 rows compiled on its own (YNNPACK's GEMM, `unembed_apart`) and inside the
    step (XLA's own GEMM), at gpt-oss width (D 2880, 8,192 of the vocabulary, the checkpoint's weight scale) == float64
    within 4e-6 of the largest logit; the compile of its own holds a YNNPACK fusion, the step's does not."""
    from oss_jax.model import APART_UNEMBED_OPTIONS, rows_dot_transposed, unembed_apart

    if APART_UNEMBED_OPTIONS is None:
        pytest.skip("YNNPACK's options are set only for the jaxlib they were measured with (0.10)")
    force_backend("cpu")
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8192, 2880)) * 0.056).astype(np.float32)
    assert not unembed_apart(1) and not unembed_apart(33)
    for rows in (2, 5, 8, 32):
        assert unembed_apart(rows)
        x = rng.standard_normal((rows, 2880)).astype(np.float32)
        want = x.astype(np.float64) @ w.T.astype(np.float64)
        scale = float(np.max(np.abs(want)))
        for name, options in (("apart (YNNPACK)", APART_UNEMBED_OPTIONS), ("in the step", None)):
            compiled = jax.jit(rows_dot_transposed, compiler_options=options).lower(x, w).compile()
            assert ("__ynn_fusion" in compiled.as_text()) == (options is not None)
            err = float(np.max(np.abs(np.asarray(compiled(x, w)) - want)))
            print(f"rows {rows}, {name}: max |err| {err:.1e} ({err / scale:.1e} of the largest logit {scale:.1f})")
            assert err <= 4e-6 * scale


def test_attend_with_mask_matches_reference_sdpa(tiny_config):
    """Self-attention through `attention_mask` + `attend` == gpt_oss.torch sdpa (sliding and full)."""
    from gpt_oss.torch.model import sdpa

    cfg, t = tiny_config, 13
    kv, g, h = cfg.num_key_value_heads, cfg.q_per_kv, cfg.head_dim
    rng = np.random.default_rng(7)
    q = rng.standard_normal((t, kv, g, h)).astype(np.float32)
    k = rng.standard_normal((t, kv, h)).astype(np.float32)
    v = rng.standard_normal((t, kv, h)).astype(np.float32)
    sinks = rng.standard_normal(kv * g).astype(np.float32)
    scale = 1 / math.sqrt(h)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    for layer in (0, 1):
        window = cfg.window(layer)
        ref = sdpa(*(torch.from_numpy(a) for a in (q, k, v, sinks)), scale, window or 0).numpy()
        out = attend(jnp.asarray(q)[None], _kv_heads_first(k[None]), _kv_heads_first(v[None]),
                     jnp.asarray(sinks).reshape(kv, g), attention_mask(pos, pos, window), scale)
        out = np.asarray(out)[0].reshape(t, -1)
        print(f"window={window}: max error vs reference sdpa = {np.abs(out - ref).max():.3e}")
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ router


def test_route_topk_then_softmax_hand_case():
    logits = jnp.array([[3.0, 1.0, 0.0, 2.0, -1.0, 5.0],
                        [0.0, 0.0, 9.0, 1.0, 8.0, -2.0]], jnp.float32)
    ids, weights = route(logits, 2)
    assert ids.dtype == jnp.int32 and ids.shape == (2, 2) and weights.shape == (2, 2)
    np.testing.assert_array_equal(np.asarray(ids), [[5, 0], [2, 4]])
    # both rows: top-2 logits differ by 1 or 2 -> weights 1/(1+e^-d), 1/(1+e^d)
    expected = np.array([[1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))],
                         [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))]])
    np.testing.assert_allclose(np.asarray(weights), expected, rtol=1e-6)
    # softmax over all experts then taking the top-2 would give e.g. 0.8360 + 0.1131 for row 0
    all_softmax = np.exp([3.0, 1.0, 0.0, 2.0, -1.0, 5.0]) / np.exp([3.0, 1.0, 0.0, 2.0, -1.0, 5.0]).sum()
    assert abs(float(weights[0, 0]) - all_softmax[5]) > 0.04


@pytest.mark.parametrize("rows", [1, 8, 9])
def test_router_logits_decode_form_equals_float64(rows, force_backend):
    """The router's logits in bf16 (x and weight as bf16 values, summed in float32) against float64 sums of the same
    values: the GEMM (CPU, and GPUs above E/k rows) and GPUs' decode form (one reduction over the D products, then
    the bias; 1 and 8 rows over 32 experts) both within 2e-6 of the largest |logit|, and the same experts chosen.
    The decode form's reduction runs over exactly D: over D + 1 (the bias as one more row, 2,881 = 43 x 67) XLA:GPU
    made it one launch of 22 us a layer in a 20b decode step, against 3.4-4.7 us (benchmarks/router_forms.py, H200)."""
    d, e, k = 2880, 32, 4
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, d)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((d, e)) * 0.02, jnp.float32)
    b = jnp.asarray(rng.standard_normal(e), jnp.float32)
    want = (np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.bfloat16), np.float64)) + np.asarray(b, np.float64)
    results = {}
    for form in ("cpu", "gpu"):
        force_backend(form)
        results[form] = np.asarray(jax.jit(router_logits, static_argnums=(3, 4))(x, w, b, k, jnp.bfloat16))
        jaxpr = jax.make_jaxpr(router_logits, static_argnums=(3, 4))(x, w, b, k, jnp.bfloat16)
        assert ("dot_general" in primitives(jaxpr)) == (form == "cpu" or rows * k > e)
        reduced = [[eq.invars[0].aval.shape[a] for a in eq.params["axes"]] for eq in equations(jaxpr)
                   if eq.primitive.name == "reduce_sum"]
        assert reduced == ([] if form == "cpu" or rows * k > e else [[d]])
    scale = np.abs(want).max()
    for form, got in results.items():
        err = np.abs(got - want).max()
        print(f"{rows} rows, {form} form: max |Δ| vs float64 {err:.2e} (max |logit| {scale:.2f})")
        assert got.dtype == np.float32 and err <= 2e-6 * scale
        np.testing.assert_array_equal(np.argsort(-got, -1)[:, :k], np.argsort(-want, -1)[:, :k])


def test_route_random_matches_numpy():
    x, e, k = 9, 12, 4
    logits = np.random.default_rng(8).standard_normal((x, e)).astype(np.float32)
    ids, weights = route(jnp.asarray(logits), k)
    expected_ids = np.argsort(-logits, axis=-1)[:, :k]
    top = np.take_along_axis(logits, expected_ids, -1).astype(np.float64)
    expected_w = np.exp(top) / np.exp(top).sum(-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(ids), expected_ids)
    print(f"route weights max error = {np.abs(np.asarray(weights) - expected_w).max():.3e}")
    np.testing.assert_allclose(np.asarray(weights), expected_w, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)
    # and not softmax(all)[top-k]: those sum to less than 1
    sm_all = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert np.abs(np.take_along_axis(sm_all, expected_ids, -1) - expected_w).max() > 0.05


# ------------------------------------------------------------------ MoE


def _set(module: nnx.Module, **values: np.ndarray) -> None:
    params = flat_params(module)
    for name, value in values.items():
        assert params[name].shape == value.shape, (name, params[name].shape, value.shape)
        params[name].set_value(jnp.asarray(value, jnp.float32))


def _moe_with(cfg: ModelConfig, **values: np.ndarray) -> MoE:
    """A float32 MoE holding exactly `values` (shapes only at construction: no random init to wait for)."""

    def build() -> MoE:
        return MoE(cfg, rngs=nnx.Rngs(0))

    moe = nnx.eval_shape(build)
    assert set(flat_params(moe)) == set(values)
    _set(moe, **values)
    return moe


@nnx.jit
def _run_moe(moe: MoE, x: jax.Array) -> jax.Array:
    return moe(x)


def test_router_bias_steers_every_token(tiny_config):
    """Expert e's mlp2 bias = one-hot(e) and zero expert weights: the MoE output's first E columns are the
    dense routing weights, so routing is observable through MoE.__call__ itself."""
    cfg = tiny_config
    d, e, f = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
    rng = np.random.default_rng(9)
    router = rng.standard_normal((d, e)) * 0.3
    moe = _moe_with(cfg, router_kernel=router, router_bias=np.zeros(e), mlp1_kernel=rng.standard_normal((e, d, 2 * f)),
                    mlp1_bias=np.zeros((e, 2 * f)), mlp2_kernel=np.zeros((e, f, d)), mlp2_bias=np.eye(e, d))
    x = rng.standard_normal((2, 7, d)).astype(np.float32)

    def dense_weights():
        out = np.asarray(_run_moe(moe, jnp.asarray(x))).reshape(-1, d)
        assert np.all(out[:, e:] == 0)
        return out[:, :e]

    before = dense_weights()
    # independent routing: top-4 logits, softmax over them
    logits = x.reshape(-1, d).astype(np.float64) @ router
    top = np.argsort(-logits, -1)[:, :cfg.experts_per_token]
    expected = np.zeros_like(logits)
    tl = np.take_along_axis(logits, top, -1)
    np.put_along_axis(expected, top, np.exp(tl) / np.exp(tl).sum(-1, keepdims=True), -1)
    print(f"dense routing weights max error = {np.abs(before - expected).max():.3e}")
    np.testing.assert_allclose(before, expected, atol=1e-5)

    j = 7
    assert np.any(before[:, j] == 0), "some tokens must not pick expert j without the bias"
    bias = np.zeros(e)
    bias[j] = 20.0
    _set(moe, router_bias=bias)
    after = dense_weights()
    assert np.all(after[:, j] > 0.99), after[:, j]
    assert np.all((after > 0).sum(-1) == cfg.experts_per_token)


def _numpy_moe(x, p, cfg):
    """SPEC MoE in float64: x [X, D] -> [X, D], plus the clamp hit counts (gate > limit, |linear| > limit)."""
    logits = x @ p["router_kernel"] + p["router_bias"]
    k = cfg.experts_per_token
    ids = np.argsort(-logits, -1)[:, :k]
    top = np.take_along_axis(logits, ids, -1)
    w = np.exp(top - top.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    h = np.einsum("xd,xkdf->xkf", x, p["mlp1_kernel"][ids]) + p["mlp1_bias"][ids]  # [X, k, 2F]
    gate, linear = h[..., 0::2], h[..., 1::2]
    hits = (int((gate > cfg.swiglu_limit).sum()), int((np.abs(linear) > cfg.swiglu_limit).sum()))
    gate = np.minimum(gate, cfg.swiglu_limit)
    linear = np.clip(linear, -cfg.swiglu_limit, cfg.swiglu_limit)
    act = gate / (1 + np.exp(-cfg.swiglu_alpha * gate)) * (linear + 1)
    y = np.einsum("xkf,xkfd->xkd", act, p["mlp2_kernel"][ids]) + p["mlp2_bias"][ids]
    return np.einsum("xkd,xk->xd", y, w), hits


def test_moe_matches_numpy_spec(tiny_config):
    cfg = tiny_config
    d, e, f = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
    rng = np.random.default_rng(10)
    p = {
        "router_kernel": rng.standard_normal((d, e)) * 0.5,
        "router_bias": rng.standard_normal(e),
        "mlp1_kernel": rng.standard_normal((e, d, 2 * f)) * 0.6,
        "mlp1_bias": rng.standard_normal((e, 2 * f)),
        "mlp2_kernel": rng.standard_normal((e, f, d)) * 0.02,
        "mlp2_bias": rng.standard_normal((e, d)),
    }
    p = {name: v.astype(np.float32).astype(np.float64) for name, v in p.items()}
    moe = _moe_with(cfg, **p)
    x = rng.standard_normal((2, 5, d)).astype(np.float32)

    out = np.asarray(_run_moe(moe, jnp.asarray(x)))
    assert out.shape == (2, 5, d) and out.dtype == np.float32
    expected, (gate_hits, linear_hits) = _numpy_moe(x.reshape(-1, d).astype(np.float64), p, cfg)
    assert gate_hits > 0 and linear_hits > 0, "the test must exercise both clamps"
    err = np.abs(out.reshape(-1, d) - expected).max()
    print(f"MoE max abs error vs numpy SPEC = {err:.3e} (output max {np.abs(expected).max():.2f}; "
          f"clamped gates {gate_hits}, clamped linears {linear_hits})")
    np.testing.assert_allclose(out.reshape(-1, d), expected, rtol=1e-5, atol=1e-5)


def test_swiglu_clamps_hand_values():
    limit, alpha = 7.0, 1.702
    # (gate, linear) pairs, interleaved even/odd
    pairs = [(-8.0, 0.5), (10.0, -10.0), (2.0, 10.0), (-30.0, -9.0), (7.5, 3.0), (0.0, 4.0)]
    h = jnp.array([v for pair in pairs for v in pair], jnp.float32)
    # expected with the clamps applied by hand: gate only above 7, linear to [-7, 7]
    clamped = [(-8.0, 0.5), (7.0, -7.0), (2.0, 7.0), (-30.0, -7.0), (7.0, 3.0), (0.0, 4.0)]
    expected = np.array([g / (1 + math.exp(-alpha * g)) * (lin + 1) for g, lin in clamped])
    out = np.asarray(swiglu(h, limit, alpha))
    assert out.shape == (6,)
    nonzero = expected != 0
    print(f"swiglu max rel error = {np.abs(out[nonzero] / expected[nonzero] - 1).max():.3e}")
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=0)
    # a gate of -8 is not raised to -7: that would give a value ~5x larger in magnitude
    assert abs(out[0]) < 0.5 * abs(-7.0 / (1 + math.exp(7.0 * alpha)) * 1.5)


def test_swiglu_matches_reference_random():
    from gpt_oss.torch.model import swiglu as ref_swiglu

    h = (np.random.default_rng(11).standard_normal((3, 5, 2 * 24)) * 6).astype(np.float32)
    expected = ref_swiglu(torch.from_numpy(h), alpha=1.702, limit=7.0).numpy()
    out = np.asarray(swiglu(jnp.asarray(h), 7.0, 1.702))
    print(f"swiglu max error vs reference = {np.abs(out - expected).max():.3e}")
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("slots", [8, 4], ids=["full", "ring"])
def test_cache_writes_one_position_at_a_time(slots):
    """Decode at batch 1 writes its one position with in-place slot updates (`LayerCache._write_one`), other shapes
    with a scatter: both keep a slot per position modulo the slots (a ring overwrites its oldest), and a padding
    position (-1) changes nothing. Checked against numpy and against the scatter (the same row twice, batch 2)."""
    from oss_jax.cache import LayerCache

    rng = np.random.default_rng(slots)
    k_h = (2, 3)
    kv = (1, k_h[0], slots, k_h[1])  # [B, K, S, H]
    one = LayerCache(jnp.zeros(kv), jnp.zeros(kv), jnp.full((1, slots), -1, jnp.int32))
    two = jax.tree.map(lambda a: jnp.concatenate([a, a]), one)
    want_k, want_pos = np.zeros((slots, *k_h), np.float32), np.full(slots, -1)
    for p in [0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, 9, 10]:
        k, v = rng.standard_normal((2, 1, 1, *k_h)).astype(np.float32)
        one = one.write(jnp.asarray(k), jnp.asarray(v), jnp.full((1, 1), p, jnp.int32))
        two = two.write(jnp.asarray(np.concatenate([k, k])), jnp.asarray(np.concatenate([v, v])),
                        jnp.full((2, 1), p, jnp.int32))
        if p >= 0:
            want_k[p % slots], want_pos[p % slots] = k[0, 0], p
        np.testing.assert_array_equal(np.asarray(one.k[0]).transpose(1, 0, 2), want_k)
        np.testing.assert_array_equal(np.asarray(one.pos[0]), want_pos)
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True):
            np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[1]))
    assert sorted(want_pos) == list(range(11 - slots, 11))  # the last `slots` positions survive


def test_grown_cache_equals_one_written_at_its_new_size(two_layer_config):
    """`cache.grow` appends empty slots to the layers whose slot count grows (a full layer; a ring smaller than its
    window): the grown cache equals the cache of the new size given the same writes, before and after more writes
    (row 1 has padding; the ring grows from 4 slots to its window of 8 and then wraps)."""
    from oss_jax.cache import Caches, grow, init_cache

    cfg = two_layer_config
    assert cfg.window(0) == 8 and cfg.window(1) is None

    def write(caches: Caches, positions: list[list[int]], seed: int) -> Caches:  # positions [B, T]
        shape = (len(positions), len(positions[0]), cfg.num_key_value_heads, cfg.head_dim)
        k, v = np.random.default_rng(seed).standard_normal((2, *shape)).astype(np.float32)
        return Caches.of([c.write(jnp.asarray(k), jnp.asarray(v), jnp.asarray(positions, jnp.int32))
                          for c in caches])

    def assert_equal(a: Caches, b: Caches) -> None:
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    first, later = [[0, 1, 2, 3], [0, 1, -1, -1]], [[4, 5, 6, 7, 8, 9], [2, 3, 4, 5, 6, 7]]
    grown = grow(cfg, write(init_cache(cfg, 2, 4), first, 0), 16)
    big = write(init_cache(cfg, 2, 16), first, 0)
    assert [c.pos.shape[1] for c in grown] == [8, 16] == [c.pos.shape[1] for c in big]
    assert_equal(grown, big)
    assert_equal(write(grown, later, 1), write(big, later, 1))
    with pytest.raises(ValueError, match="layer 1 holds 16 slots, more than the 8 asked for"):
        grow(cfg, big, 8)
