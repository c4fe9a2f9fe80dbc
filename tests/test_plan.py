"""`oss-jax plan` (ahead-of-time per-device memory, nothing allocated) and `oss-jax parity --mesh`, tiny preset."""

import json
import re

import pytest

from oss_jax import cli


def hand_param_bytes(cfg, itemsize: int, expert: int = 1, tensor: int = 1, fsdp: int = 1) -> int:
    """Per-device parameter bytes written out by hand: weights in `itemsize`, biases/norms/sinks float32; each
    dimension split as the rules say (expert -> expert, vocab/heads/mlp -> tensor, embed -> fsdp)."""
    d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    e, f, v, b = cfg.num_experts, cfg.intermediate_size, cfg.vocab_size, itemsize
    layer = (2 * d * 4 // fsdp                                                   # attn_norm, mlp_norm
             + d * n * h * b // (fsdp * tensor) + n * h * 4 // tensor            # q kernel, bias
             + 2 * (d * k * h * b // (fsdp * tensor) + k * h * 4 // tensor)      # k, v kernels and biases
             + n * h * d * b // (tensor * fsdp) + d * 4 // fsdp + n * 4 // tensor  # o kernel, o bias, sinks
             + d * e * b // fsdp + e * 4                                         # router kernel, bias
             + e * d * 2 * f * b // (expert * fsdp * tensor) + e * 2 * f * 4 // (expert * tensor)  # mlp1
             + e * f * d * b // (expert * tensor * fsdp) + e * d * 4 // (expert * fsdp))           # mlp2
    return cfg.num_hidden_layers * layer + 2 * v * d * b // (tensor * fsdp) + d * 4 // fsdp  # + embed, unembed, norm


def run_plan(capsys, *argv):
    code = cli.main(["plan", "--model", "tiny", "--seq-len", "8", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def check_plan(p: dict) -> None:
    assert p["temp_bytes"] > 0 and p["output_bytes"] > 0 and p["optimizer_bytes"] == 0
    assert p["argument_bytes"] == p["params_bytes"] + p["input_bytes"]  # the compiler's own count agrees
    assert p["total_bytes"] == sum(p[f"{k}_bytes"] for k in ("params", "optimizer", "input", "temp", "output"))


def test_plan_json_params_bytes_are_the_hand_computation(tiny_config, capsys):
    code, out, _ = run_plan(capsys, "--mesh", "dp2-ep2-tp2", "--dtype", "fp32", "--json")
    p = json.loads(out)
    print(p)
    assert code == 0
    assert p["params_bytes"] == hand_param_bytes(tiny_config, 4, expert=2, tensor=2)
    assert p["devices"] == 8 and p["mesh"] == {"data": 2, "expert": 2, "tensor": 2} and p["batch"] == 2
    assert p["model"] == "tiny" and p["step"] == "prefill" and p["compile_s"] > 0
    check_plan(p)


def test_plan_table(tiny_config, capsys):
    code, out, _ = run_plan(capsys, "--mesh", "expert=4")
    print(out)
    assert code == 0
    params = int(re.search(r"^params\s+([\d,]+)", out, re.M).group(1).replace(",", ""))
    assert params == hand_param_bytes(tiny_config, 2, expert=4)
    assert re.search(r"^temp\s+[1-9][\d,]*", out, re.M)
    assert "matches params + optimizer + input" in out


def test_plan_on_more_devices_than_jax_started_with(tiny_config, capsys):
    """16 devices while this pytest process has 8: the plan runs in a fresh process with 16 host devices."""
    code, out, err = run_plan(capsys, "--mesh", "data=2,fsdp=2,expert=4", "--json")
    assert code == 0, err
    p = json.loads(out)
    print(p)
    assert p["devices"] == 16 and p["batch"] == 4  # default batch: one sequence per data x fsdp shard
    assert p["params_bytes"] == hand_param_bytes(tiny_config, 2, expert=4, fsdp=2)
    check_plan(p)


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "expert=5"], "dimension 'expert' of size 12 cannot be split 5 ways"),
    (["--mesh", "expert=4,pipeline=2"], "unknown mesh axes ['pipeline']"),
    (["--mesh", "ep99"], "unknown mesh preset 'ep99'"),
    (["--mesh", "data=2,expert=2", "--batch", "3"], "batch 3 cannot be split 2 ways over mesh axes ('data',)"),
    (["--mesh", "ep8", "--train", "--experts", "packed"], "training computes gradients of dense experts"),
])
def test_clear_one_line_errors_before_compiling(capsys, argv, message):
    code, out, err = run_plan(capsys, *argv)
    print(err)
    assert code == 2 and not out
    assert err.startswith("oss-jax plan: error: ") and err.count("\n") == 1
    assert message in err


def test_train_step_plan_holds_adam_state_like_the_params(tiny_config, capsys):
    """AdamW keeps two moments per parameter, sharded like it; the step's state is donated."""
    code, out, err = run_plan(capsys, "--mesh", "fsdp8", "--step", "train", "--batch", "8", "--dtype", "fp32",
                              "--json")
    assert code == 0, err
    p = json.loads(out)
    print(p)
    assert p["params_bytes"] == hand_param_bytes(tiny_config, 4, fsdp=8)
    scalars = 3 * 4  # int32, replicated: the train step counter, Adam's count and the schedule's count
    assert p["optimizer_bytes"] == 2 * p["params_bytes"] + scalars
    assert p["argument_bytes"] == p["params_bytes"] + p["optimizer_bytes"] + p["input_bytes"]
    assert p["alias_bytes"] >= p["params_bytes"] + p["optimizer_bytes"] - scalars  # donated, updated in place


def test_device_count_flag_is_replaced():
    assert cli._with_device_count("--a=1 --xla_force_host_platform_device_count=8 --b", 64) == (
        "--a=1 --b --xla_force_host_platform_device_count=64")


def test_parity_on_a_mesh(capsys):
    code = cli.main(["parity", "--config", "tiny", "--mesh", "expert=4", "--json", "--no-bf16"])
    report = json.loads(capsys.readouterr().out)
    print({k: report[k] for k in ("vs_openai_ref", "vs_hf", "mesh")})
    assert code == 0 and report["pass"] and report["mesh"] == {"expert": 4}
    for ref in ("vs_openai_ref", "vs_hf"):
        assert report[ref]["max_abs"] <= 1e-4 and report[ref]["top1"] == 1.0


def test_decode_step_plan_holds_the_kv_cache(tiny_config, capsys):
    """The decode step's inputs are the tokens, positions and the KV cache (ring buffers on sliding layers)."""
    from oss_jax.cache import cache_bytes, init_cache

    assert cli.main(["plan", "--model", "tiny", "--mesh", "expert=4", "--step", "decode", "--seq-len", "64",
                     "--dtype", "fp32", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    cache = cache_bytes(init_cache(tiny_config, 1, 64))
    print(p)
    assert p["step"] == "decode" and p["input_bytes"] == cache + 2 * 4  # batch 1: cache replicated, 2 int32 ids
