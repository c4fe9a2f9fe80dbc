"""Logit parity with OpenAI's torch reference and HF transformers on real checkpoint files, float32.

Bounds (issue: Foundations): max |Δlogit| <= 1e-4 and 100 % top-1 against each reference; in bf16,
KL(ref fp32 || ours bf16) <= 1.5 x KL(ref fp32 || ref bf16). The references' own mutual gap is printed beside ours.
"""

import json

import numpy as np
import pytest

from configs import preset_path
from convert.reader import load_params
from convert.synthetic import make_checkpoint
from oss_jax import cli, parity

BATCH = 2


@pytest.fixture(scope="module")
def case(tiny_config, tmp_path_factory):
    """The same random weights in both layouts, tokens longer than the window, and each model's logits."""
    root = tmp_path_factory.mktemp("parity")
    hf_dir = make_checkpoint(tiny_config, root / "hf", layout="hf", seed=3)
    original_dir = make_checkpoint(tiny_config, root / "original", layout="original", seed=3)
    cfg, params = load_params(hf_dir)
    seq_len = 2 * cfg.sliding_window + 5
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(BATCH, seq_len))
    return {
        "cfg": cfg, "params": params, "tokens": tokens, "hf_dir": hf_dir, "original_dir": original_dir,
        "ours": parity.ours_logits(cfg, params, tokens),
        "openai": parity.openai_logits(original_dir, tokens),
        "hf": parity.hf_logits(hf_dir, tokens),
    }


def test_logits_spread_over_several_units(case):
    std = case["openai"].std()
    print(f"reference logit std {std:.2f}")
    assert std >= 2.0


@pytest.mark.parametrize("ref", ["openai", "hf"])
def test_fp32_parity(case, ref):
    got = parity.compare(case[ref], case["ours"])
    gap = parity.compare(case["openai"], case["hf"])
    print(f"ours vs {ref}: max |Δlogit| {got['max_abs']:.3e}, top-1 {got['top1']:.3f}; "
          f"HF vs OpenAI reference: {gap['max_abs']:.3e}")
    assert got["max_abs"] <= 1e-4
    assert got["top1"] == 1.0


def test_bf16_kl_no_worse_than_reference_bf16(case):
    ours16 = parity.ours_logits(case["cfg"], case["params"], case["tokens"], bf16=True)
    ref16 = parity.openai_logits(case["original_dir"], case["tokens"], bf16=True)
    kl_ours, kl_ref = parity.kl(case["openai"], ours16), parity.kl(case["openai"], ref16)
    print(f"KL(ref fp32 || ours bf16) {kl_ours:.3e}, KL(ref fp32 || ref bf16) {kl_ref:.3e}, "
          f"ratio {kl_ours / kl_ref:.2f}")
    assert kl_ours <= 1.5 * kl_ref


def test_dequantized_hf_layout_gives_the_same_logits(case, tiny_config, tmp_path):
    """HF layout with bf16 experts (as save_pretrained writes them): same values, so the same logits."""
    deq = make_checkpoint(tiny_config, tmp_path / "deq", layout="hf", seed=3, packed=False)
    _, params = load_params(deq)
    for name, value in case["params"].items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)
    hf = parity.hf_logits(deq, case["tokens"])
    err = np.abs(hf - case["hf"]).max()
    print(f"HF on dequantized vs MXFP4 checkpoint: {err:.3e}")
    assert err == 0.0


def test_parity_cli_on_any_config_json(tmp_path, capsys):
    """`oss-jax parity --config PATH --json` on a config that is not a preset: other sizes, layer pattern."""
    cfg = json.loads(preset_path("tiny").read_text())
    cfg.update(num_hidden_layers=4, num_local_experts=8, num_attention_heads=8, num_key_value_heads=2,
               head_dim=8, hidden_size=96, intermediate_size=64, vocab_size=1000, sliding_window=5,
               eos_token_id=998, pad_token_id=999,
               layer_types=["sliding_attention", "full_attention"] * 2)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    code = cli.main(["parity", "--config", str(path), "--json", "--seed", "1"])
    report = json.loads(capsys.readouterr().out)
    print(report)
    assert code == 0 and report["pass"]
    assert report["shape"] == {"batch": 2, "seq_len": 18, "layers": 4, "experts": 8, "vocab": 1000}
    for ref in ("vs_openai_ref", "vs_hf"):
        assert report[ref]["max_abs"] <= 1e-4 and report[ref]["top1"] == 1.0
    assert report["bf16"]["kl_ours"] <= 1.5 * report["bf16"]["kl_ref"]


def test_parity_cli_on_existing_original_checkpoint(case, capsys):
    code = cli.main(["parity", "--ckpt", str(case["original_dir"]), "--json", "--no-bf16"])
    report = json.loads(capsys.readouterr().out)
    print(report)
    assert code == 0 and report["vs_openai_ref"]["max_abs"] <= 1e-4
