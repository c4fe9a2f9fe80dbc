"""Streaming conversion to Orbax, sharded restore, export back to HF: exactness, atomicity, clear errors."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from paused_cli import paused_command
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from convert import streaming
from convert.reader import load_params
from convert.synthetic import make_checkpoint
from oss_jax import checkpoint, cli
from oss_jax.model import forward, model_from_params
from oss_jax.sharding import MeshError, make_mesh


def read_all(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory (all shards)."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out |= load_file(str(file))
    return out


def assert_bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.fixture(scope="module")
def src(tiny_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    return {"hf": make_checkpoint(tiny_config, root / "hf", layout="hf", seed=7),
            "original": make_checkpoint(tiny_config, root / "original", layout="original", seed=7),
            "dequantized": make_checkpoint(tiny_config, root / "deq", layout="hf", seed=7, packed=False)}


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("orbax") / "tiny"
    streaming.convert_checkpoint(src["hf"], dst, progress=False)
    return dst


def test_hf_to_orbax_to_hf_is_bit_identical(src, converted, tmp_path):
    out = tmp_path / "hf"
    assert cli.main(["export", str(converted), str(out), "--quiet"]) == 0
    assert_bit_identical(read_all(src["hf"]), read_all(out))
    assert json.loads((out / "config.json").read_text()) == json.loads((src["hf"] / "config.json").read_text())


def test_original_layout_converts_to_the_same_checkpoint(src, tmp_path):
    assert cli.main(["convert", str(src["original"]), str(tmp_path / "o"), "--quiet"]) == 0
    streaming.export_checkpoint(tmp_path / "o", tmp_path / "hf", progress=False)
    assert_bit_identical(read_all(src["hf"]), read_all(tmp_path / "hf"))


def test_python_dash_m_convert(src, tmp_path):
    done = subprocess.run([sys.executable, "-m", "convert", str(src["hf"]), str(tmp_path / "o"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "converted" in done.stdout and (tmp_path / "o" / "params").is_dir()


def test_dequantized_source_round_trips(src, tmp_path):
    with pytest.raises(ValueError, match="--experts bf16 or fp32"):
        streaming.convert_checkpoint(src["dequantized"], tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    streaming.convert_checkpoint(src["dequantized"], tmp_path / "o", experts="bf16", progress=False)
    streaming.export_checkpoint(tmp_path / "o", tmp_path / "hf", progress=False)
    assert_bit_identical(read_all(src["dequantized"]), read_all(tmp_path / "hf"))


def test_stored_experts_are_the_shipped_mxfp4_bytes(src, converted):
    stored = checkpoint.restore(converted, names=["layers.1.moe.mlp1_kernel.blocks", "layers.1.moe.mlp2_kernel.scales"])
    with safe_open(str(src["hf"] / "model.safetensors"), "np") as f:
        np.testing.assert_array_equal(stored["layers.1.moe.mlp1_kernel.blocks"],
                                      f.get_tensor("model.layers.1.mlp.experts.gate_up_proj_blocks"))
        np.testing.assert_array_equal(stored["layers.1.moe.mlp2_kernel.scales"],
                                      f.get_tensor("model.layers.1.mlp.experts.down_proj_scales"))
    meta = checkpoint.stored_metadata(converted)
    assert meta["embed"][1] == np.dtype("bfloat16")  # other weights keep the checkpoint's dtype


def test_loaded_model_computes_what_the_safetensors_checkpoint_computes(src, converted, tmp_path):
    cfg, params = load_params(src["hf"])
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 13))
    want = np.asarray(forward(model_from_params(cfg, params), tokens))
    got = np.asarray(forward(checkpoint.load(converted), tokens))
    np.testing.assert_array_equal(got, want)
    streaming.convert_checkpoint(src["hf"], tmp_path / "fp32", experts="fp32", dtype="fp32", progress=False)
    assert checkpoint.stored_metadata(tmp_path / "fp32")["layers.0.moe.mlp1_kernel"][1] == np.float32
    np.testing.assert_array_equal(np.asarray(forward(checkpoint.load(tmp_path / "fp32"), tokens)), want)


MESHES = [{}, {"expert": 2}, {"expert": 4}, {"expert": 4, "tensor": 2}, {"fsdp": 8}]


def test_sharded_restore_is_identical_on_1_2_4_8_devices(converted):
    values = {}
    for shape in MESHES:
        mesh = make_mesh(shape) if shape else None
        stored = checkpoint.restore(converted, mesh)
        values[str(shape)] = {k: np.asarray(v) for k, v in stored.items()}
        blocks = stored["layers.0.moe.mlp1_kernel.blocks"]
        e = blocks.shape[0]
        local = {s.data.shape[0] for s in blocks.addressable_shards}
        assert local == {e // shape.get("expert", 1)}, (shape, local)  # each device holds 1/EP of the experts
        if "tensor" in shape:
            assert {s.data.shape for s in stored["layers.0.attn.q_kernel"].addressable_shards} == {(64, 3, 16)}
        if "fsdp" in shape:
            assert {s.data.shape for s in stored["embed"].addressable_shards} == {(201088, 8)}
    first = values[str(MESHES[0])]
    for key, vals in values.items():
        for name in first:
            np.testing.assert_array_equal(vals[name], first[name], err_msg=f"{key} {name}")


def test_sharded_model_matches_unsharded(converted):
    tokens = np.random.default_rng(1).integers(0, 201088, (2, 13))  # the shape above: one unsharded compile
    want = np.asarray(forward(checkpoint.load(converted), tokens))
    model = checkpoint.load(converted, mesh=make_mesh({"expert": 4, "tensor": 2}))
    assert len(model.layers[0].moe.mlp1_kernel[...].sharding.device_set) == 8
    got = np.asarray(forward(model, tokens))
    print(f"sharded vs unsharded max |Δlogit| {np.abs(got - want).max():.2e}")
    # tensor parallelism splits the attention-output contraction, so float32 sums run in another order
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


def test_mesh_that_cannot_divide_the_experts(converted):
    with pytest.raises(MeshError, match="layers.0.moe.mlp1_.*: dimension 'expert' of size 12 cannot be split 8 ways"):
        checkpoint.restore(converted, make_mesh({"expert": 8}))


def test_exported_checkpoint_loads_in_transformers(src, converted, tmp_path):
    from oss_jax import parity

    streaming.export_checkpoint(converted, tmp_path / "hf", max_shard_bytes=10_000_000, progress=False)
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    tokens = np.random.default_rng(2).integers(0, 201088, (2, 9))
    np.testing.assert_array_equal(parity.hf_logits(tmp_path / "hf", tokens), parity.hf_logits(src["hf"], tokens))


def test_tokenizer_files_are_copied(src, tmp_path):
    hub = tmp_path / "hub"
    shutil.copytree(src["hf"], hub)
    shutil.copytree(src["original"], hub / "original")
    (hub / "tokenizer.json").write_text('{"version": "1.0"}')
    (hub / "generation_config.json").write_text('{"eos_token_id": [200002]}')
    streaming.convert_checkpoint(hub, tmp_path / "a", progress=False)  # a Hub root means the HF layout
    streaming.convert_checkpoint(hub / "original", tmp_path / "b", progress=False)  # original/: files from above
    for out in ("a", "b"):
        assert (tmp_path / out / "tokenizer.json").read_text() == '{"version": "1.0"}'
        assert (tmp_path / out / "generation_config.json").is_file()
    assert json.loads((tmp_path / "a" / "conversion.json").read_text())["source_layout"] == "hf"
    assert json.loads((tmp_path / "b" / "conversion.json").read_text())["source_layout"] == "original"


# ------------------------------------------------------------------ bad input: one clear error, nothing left


def _broken(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    file = dst / "model.safetensors"
    if how == "truncated":
        with open(file, "r+b") as f:
            f.truncate(file.stat().st_size - 100)
    elif how == "corrupt_header":
        data = bytearray(file.read_bytes())
        data[8:20] = b"not json at!"
        file.write_bytes(bytes(data))
    elif how == "no_config":
        (dst / "config.json").unlink()
    elif how == "invalid_config":
        (dst / "config.json").write_text('{"model_type": "gpt_oss", "hidden_size": 64}')
    elif how == "index_missing_shard":
        (dst / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    else:
        tensors = load_file(str(file))
        if how == "missing":
            tensors.pop("model.layers.1.mlp.router.weight")
        elif how == "extra":
            tensors["model.layers.9.extra"] = np.zeros(2, np.float32)
        elif how == "shape":
            tensors["model.norm.weight"] = tensors["model.norm.weight"][:32]
        elif how == "dtype":
            tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"] = tensors[
                "model.layers.0.mlp.experts.gate_up_proj_blocks"].astype(np.int32)
        save_file(tensors, str(file))
    return dst


@pytest.mark.parametrize("how, message", [
    ("missing", "missing tensors.*model.layers.1.mlp.router.weight"),
    ("extra", "model.safetensors: unexpected tensor 'model.layers.9.extra'"),
    ("shape", r"'model.norm.weight' has shape \(32,\), config.json implies \(64,\)"),
    ("dtype", "model.safetensors: tensor 'model.layers.0.mlp.experts.gate_up_proj_blocks' has unsupported dtype I32"),
    ("truncated", "model.safetensors: unreadable safetensors file"),
    ("corrupt_header", "model.safetensors: unreadable safetensors file"),
    ("no_config", "config.json not found"),
    ("invalid_config", "config.json: HF-layout config is missing"),
    ("index_missing_shard", "index.json: shard 'model-00001-of-00002.safetensors' does not exist"),
])
def test_bad_source_gives_one_clear_error_and_no_output(src, tmp_path, capsys, how, message):
    bad = _broken(src["hf"], tmp_path / "bad", how)
    dst = tmp_path / "out"
    assert cli.main(["convert", str(bad), str(dst), "--quiet"]) == 2
    err = capsys.readouterr().err
    print(err)
    assert len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    assert cli.main(["convert", str(tmp_path / "notes"), str(tmp_path / "out")]) == 2
    assert "config.json not found" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_existing_destination_needs_overwrite(src, converted, capsys):
    before = sorted(p.name for p in converted.iterdir())
    assert cli.main(["convert", str(src["hf"]), str(converted), "--quiet"]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in converted.iterdir()) == before
    assert cli.main(["convert", str(src["hf"]), str(converted), "--quiet", "--overwrite"]) == 0


def test_not_enough_disk_space(src, tmp_path, monkeypatch, capsys):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10_000_000))
    assert cli.main(["convert", str(src["hf"]), str(tmp_path / "out"), "--quiet"]) == 2
    assert "not enough free disk space" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_interrupted_conversion_leaves_no_destination(src, converted, tmp_path, sig):
    """Interrupted with its first partial save on disk and not finalized: the command pauses there (tests/paused_cli.py)
    until the signal, so the signal cannot arrive after the conversion already finished."""
    dst, partial = tmp_path / "out", tmp_path / ".out.partial"
    with paused_command(tmp_path, "save", ["convert", str(src["hf"]), str(dst), "--quiet"]) as (proc, log):
        assert (partial / "params.partial_save").is_dir() and not dst.exists()
        proc.send_signal(sig)
        proc.wait(timeout=120)
    assert not dst.exists()
    if sig == signal.SIGKILL:  # no chance to clean up: the partial directory stays behind
        assert partial.is_dir()
    else:  # Ctrl-C or kill: unwinds and cleans up
        assert proc.returncode == 130 and not partial.exists()
        assert "interrupted; nothing was left half-written" in log.read_text()
    # re-running succeeds (and clears what a kill -9 left behind)
    assert cli.main(["convert", str(src["hf"]), str(dst), "--quiet"]) == 0
    assert not partial.exists()
    assert checkpoint.stored_metadata(dst) == checkpoint.stored_metadata(converted)
    jax.clear_caches()
