"""The GPU benchmark script runs end to end on the tiny preset here (CI has no GPU: a crash in it would otherwise
show only on a lent device)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, args: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """benchmarks/`script` on CPU with `args` (split at spaces): the finished process and the JSON it wrote."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, f"benchmarks/{script}", *args.split(), "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    print(run.stdout)
    return run, json.loads(out.read_text())


def test_device_decode_runs_on_the_tiny_preset(tmp_path):
    """Expert-matmul variants (XLA gathered and the Pallas kernel, interpreted) agree, the model decodes, and the
    profile and JSON are written."""
    run, result = _run("device_decode.py", "--model tiny --batches 1 --steps 1 --warmup 1 --reps 1 "
                       "--variants words,kernel --no-prefill --profile 1", tmp_path)
    assert [r["impl"] for r in result["expert_matmul"]] == ["gathered-words", "gathered-kernel"]
    assert all(r["max_rel_diff"] <= 1e-6 for r in result["expert_matmul"])
    [decoded] = result["runs"]
    assert decoded["batch"] == 1 and decoded["decode_tok_s"] > 0
    assert "profile of 1 steps" in run.stdout
    # the random cache is the steps' own pytree: every donated buffer is reused in place
    assert "donated buffers were not usable" not in run.stderr


def test_device_decode_dense_variants_agree(tmp_path):
    """bf16 experts: the gathered reduction, the bf16 einsum and the dense Pallas kernel (interpreted) give the same
    expert matmul at batch 2 (8 rows); `--matmul-only` draws no model."""
    _, result = _run("device_decode.py", "--model tiny --experts bf16 --batches 2 --reps 1 --matmul-only", tmp_path)
    assert [r["impl"] for r in result["expert_matmul"]] == ["gathered", "einsum", "kernel"]
    assert all(r["max_rel_diff"] <= 1e-5 for r in result["expert_matmul"])  # exact bf16 products, float32 sums
    assert "runs" not in result


def test_launch_counts_read_a_compiled_entry_computation():
    """benchmarks/gpu_launches.py counts what a step launches from XLA's compiled text (on CPU here: the script
    itself needs the CUDA plugin): every instruction of the entry computation that does work, the ROOT included,
    none of the parameters, constants or tuples, nor anything inside the fused computations."""
    import re

    import jax
    import jax.numpy as jnp

    from benchmarks.gpu_launches import entry_instructions, launch_counts

    for fn in (lambda x: jnp.tanh(x @ x) + 1, lambda x: (jnp.sort(x), jnp.tanh(x @ x) + 1)):
        text = jax.jit(fn).lower(jnp.ones((64, 64))).compile().as_text()
        entry = text[text.find("\nENTRY"):]
        counts, names = launch_counts(text), [name for name, *_ in entry_instructions(text)]
        root = re.search(r"ROOT %(\S+) = (?:\([^()]*\)|\S+) ([a-z][\w.-]*)\(", entry)
        print(f"CPU compile: {dict(counts)} ({names}), ROOT {root.groups()}")
        assert counts["dot"] + counts["fusion"] >= 1 and counts["sort"] == (len(names) > 2)
        assert not {"parameter", "tuple", "constant"} & set(counts)
        assert len(names) == len(set(names)) == sum(counts.values())
        assert all(f"%{name} = " in entry for name in names)
        assert (root.group(1) in names) == (root.group(2) != "tuple")


def test_largest_outputs_total_what_each_launch_writes():
    """gpu_launches' --outputs: bytes of HLO shapes (tuples summed, bf16 2 bytes, pred 1) and, per kind of launch,
    the total its outputs hold, largest first: a jitted step that writes a [256, 512] float32 intermediate out (a
    sort's operand, which no fusion can take) lists it at 512 KiB."""
    import jax
    import jax.numpy as jnp

    from benchmarks.gpu_launches import entry_instructions, largest_outputs, shape_bytes

    assert shape_bytes("f32[8,64]{1,0}") == 2048 and shape_bytes("(bf16[3]{0}, pred[2,2]{1,0})") == 10
    assert shape_bytes("s32[]") == 4
    text = jax.jit(lambda x, w: jnp.sort(jnp.tanh(x @ w), axis=0)[:2]).lower(
        jnp.ones((256, 64)), jnp.ones((64, 512))).compile().as_text()
    largest = largest_outputs(text, 8)
    print(largest)
    total = sum(shape_bytes(shape) for _, shape, _, _ in entry_instructions(text))
    assert sum(b for _, b, _, _ in largest) == total and total >= 2 * 256 * 512 * 4
    assert largest[0][1] >= 256 * 512 * 4 and [b for _, b, _, _ in largest] == sorted((b for _, b, _, _ in largest),
                                                                                     reverse=True)


def test_router_forms_agree_with_float64_and_the_library(force_backend):
    """benchmarks/router_forms.py: every router form within 2e-6 of float64 at 20b and 120b decode shapes, and its
    `sum` form is what the library's router takes for GPU decode (forced here), bit for bit."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import router_forms
    from oss_jax.moe import router_logits

    results = router_forms.time_forms(reps=1)
    assert len(results) == 2 * 2 * len(router_forms.FORMS)
    assert all(err <= 2e-6 for _, err in results.values())
    force_backend("gpu")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 2880)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((2880, 32)) * 0.02, jnp.float32)
    b = jnp.asarray(rng.standard_normal(32), jnp.float32)
    library = jax.jit(router_logits, static_argnums=(3, 4))(x, w, b, 4, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(library),
                                  np.asarray(jax.jit(router_forms.FORMS["sum"])(x, w.astype(jnp.bfloat16), b)))


def test_decode_attention_forms_agree_and_cpus_copies_no_cache(tmp_path):
    """benchmarks/decode_attention.py on the tiny preset: writing first and `attend_then_write` give the same output
    and write the same caches; CPU's form copies no cache, where writing first copies the batch-1 cache (the reason
    for it: if a jaxlib stops doing so, this says the two forms could be one again)."""
    _, result = _run("decode_attention.py", "--model tiny --slots 256 --batches 1,2 --steps 1 --rounds 1", tmp_path)
    results = result["results"]
    assert [(r["batch"], r["slots"]) for r in results] == [(1, 256), (2, 256)]
    assert all(r["same_cache"] for r in results)
    assert all(0 < r["largest"] and r["max_abs_diff"] <= 1e-5 * r["largest"] for r in results)
    assert [r["cache_copies"]["attend_then_write"] for r in results] == [0, 0]
    assert results[0]["cache_copies"]["write first"] > 0


def test_sliding_attention_forms_agree(tmp_path):
    """benchmarks/sliding_attention.py on the tiny preset: scoring every key and `attend_banded` give the same prefill
    output after a full ring and the same training gradients, and the banded form needs no more temporary memory."""
    _, result = _run("sliding_attention.py", "--model tiny --chunks 37 --train 64 --steps 1 --rounds 1", tmp_path)
    results = result["results"]
    assert [(r["kind"], r["tokens"]) for r in results] == [("prefill", 37), ("train", 64)]
    assert all(0 < r["largest"] and r["max_abs_diff"] <= 1e-5 * r["largest"] for r in results)
    assert all(r["temp_bytes"]["banded"] <= r["temp_bytes"]["every key"] for r in results)


def test_full_attention_forms_agree(tmp_path):
    """benchmarks/sliding_attention.py --full on the tiny preset: a 600-token training row (two blocks of 300) through
    a full layer gives the same gradients with every key scored and with `attend_causal`."""
    _, result = _run("sliding_attention.py", "--model tiny --full --train 600 --steps 1 --rounds 1", tmp_path)
    [r] = result["results"]
    assert (r["kind"], r["tokens"], r["window"], r["forms"]) == ("train", 600, None, ["every key", "blocks"])
    assert 0 < r["largest"] and r["max_abs_diff"] <= 1e-5 * r["largest"]
