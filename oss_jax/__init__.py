"""gpt-oss in JAX/Flax.

    model = oss_jax.load("converted-dir", mesh=oss_jax.make_mesh({"expert": 8}))
    logits = oss_jax.forward(model, tokens)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load": "oss_jax.checkpoint",
    "restore": "oss_jax.checkpoint",
    "ModelConfig": "oss_jax.config",
    "GptOss": "oss_jax.model",
    "forward": "oss_jax.model",
    "model_from_params": "oss_jax.model",
    "make_mesh": "oss_jax.sharding",
}


def __getattr__(name: str) -> Any:  # imports jax/orbax only when used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'oss_jax' has no attribute {name!r}")


__all__ = list(_LAZY)
