"""Every test runs with 8 host CPU devices so sharding tests use a real 8-device mesh."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402,F401  (imported after XLA_FLAGS on purpose)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_config():
    from configs import preset_path
    from oss_jax.config import ModelConfig

    return ModelConfig.from_file(preset_path("tiny"))
