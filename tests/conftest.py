"""Every test runs with 8 host CPU devices so sharding tests use a real 8-device mesh."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# keep the tokenizer cache (a ~28 MB tokenizer.json built from toktok's ranks) out of the user's home
if "OSS_JAX_CACHE" not in os.environ:
    os.environ["OSS_JAX_CACHE"] = tempfile.mkdtemp(prefix="oss-jax-test-cache-")
    atexit.register(shutil.rmtree, os.environ["OSS_JAX_CACHE"], True)
# one JAX compilation cache for the whole run, this process's and the CLI subprocesses' (the same steps of the same
# tiny checkpoints compile in several of them)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="oss-jax-test-jit-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
# every compile, not only those over 1 s (jax's default): the many small ones (sampling, slicing, the tiny steps'
# pieces) recur across tests and workers; 594 hits saved 84 s of XLA compile time in one run of the suite
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402,F401  (imported after XLA_FLAGS on purpose)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_config():
    from configs import preset_path
    from oss_jax.config import ModelConfig

    return ModelConfig.from_file(preset_path("tiny"))


@pytest.fixture(scope="session")
def two_layer_config(tiny_config):
    """The tiny preset cut to its first two layers, one sliding and one full: for the properties that need both kinds
    of layer but not a third (about 2/3 of the tiny model's XLA compile time, which grows with the layer count)."""
    import dataclasses

    return dataclasses.replace(tiny_config, num_hidden_layers=2, layer_types=tiny_config.layer_types[:2])


@pytest.fixture
def force_backend(monkeypatch):
    """force(form): the expert matmuls take backend `form`'s forms ("gpu", "tpu"; read while tracing) until the test
    ends; jax's caches are cleared around it, so no trace crosses from one form to another."""
    from oss_jax import packed

    def force(form: str) -> None:
        jax.clear_caches()
        monkeypatch.setattr(packed, "backend", lambda: form)

    yield force
    monkeypatch.undo()
    jax.clear_caches()
