"""gpt-oss in JAX/Flax.

    model = oss_jax.load("converted-dir", mesh=oss_jax.make_mesh({"expert": 8}))
    logits = oss_jax.forward(model, tokens)
"""

from __future__ import annotations

import os
from typing import Any

# XLA:CPU's default float32 GEMM path in jaxlib 0.10 (YNNPACK fusions) errs ~5x more than torch's on gpt-oss
# shapes ([64,2880]x[2880,5760]: 7.0e-6 vs 1.4e-6 against float64), enough to push a full-width 2-layer slice past
# 1e-4 logit parity; switching it off is also faster here. The flag only matters on CPU, and only when set before
# jax starts its backends (importing oss_jax first, or before the first jax computation, is enough).
# XLA rejects flags it does not know, so the flag is set only for the jaxlib it was measured with.
_YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="


def _jaxlib_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxlib")
    except PackageNotFoundError:
        return ""


YNN_FLAG_KNOWN = _jaxlib_version().startswith("0.10.")  # the jaxlib these YNNPACK settings were measured with
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", "") and YNN_FLAG_KNOWN:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_YNN_OFF}".strip()

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
