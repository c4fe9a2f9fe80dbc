"""Logit parity against OpenAI's torch reference and HF transformers, on real checkpoint files.

Needs the `test` extra (torch, transformers) and `gpt-oss` (see README). Sits above the core and `convert/`.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from convert.layouts import HF, ORIGINAL
from convert.reader import CheckpointReader, load_params
from convert.synthetic import make_checkpoint
from convert.writer import write_checkpoint
from oss_jax.config import ModelConfig
from oss_jax.model import forward, model_from_params
from oss_jax.packed import pack_params, shard_packed
from oss_jax.plan import batch_sharding
from oss_jax.sharding import shard_model


def openai_logits(original_dir: str | Path, tokens: np.ndarray, *, bf16: bool = False) -> np.ndarray:
    """OpenAI's gpt_oss.torch reference on an original-layout checkpoint: tokens [B, T] -> logits [B, T, V] f32."""
    import torch
    from gpt_oss.torch.model import Transformer

    model = Transformer.from_checkpoint(str(original_dir), device=torch.device("cpu"))
    model = model if bf16 else model.float()
    with torch.inference_mode():  # the reference takes one unbatched sequence
        out = [model(torch.as_tensor(seq, dtype=torch.long)).float().numpy() for seq in tokens]
    return np.stack(out)


def hf_logits(hf_dir: str | Path, tokens: np.ndarray, *, bf16: bool = False) -> np.ndarray:
    """HF transformers GptOssForCausalLM (eager attention) on a HF-layout checkpoint -> logits [B, T, V] f32."""
    import torch
    import transformers

    kwargs: dict[str, Any] = {}
    if CheckpointReader(hf_dir).packed:  # CPU cannot run MXFP4 kernels; dequantize while loading
        kwargs["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = transformers.GptOssForCausalLM.from_pretrained(
        str(hf_dir), dtype=dtype, attn_implementation="eager", **kwargs)
    model = model.to(dtype).eval()
    with torch.inference_mode():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def ours_logits(cfg: ModelConfig, params: dict[str, np.ndarray], tokens: np.ndarray, *, bf16: bool = False,
                mesh: Mesh | None = None, packed_experts: bool = False) -> np.ndarray:
    """This model: tokens [B, T] -> logits [B, T, V] f32; on `mesh`, parameters sharded and batch split over data.

    `packed_experts`: the (MXFP4-valued) expert kernels of `params` are packed again and decoded inside the step.
    """
    model = model_from_params(cfg, pack_params(params) if packed_experts else params,
                              dtype=jnp.bfloat16 if bf16 else jnp.float32, packed_experts=packed_experts)
    if mesh is None:
        return np.asarray(forward(model, jnp.asarray(tokens, jnp.int32)))
    shard_model(model, mesh)  # forward() then runs on the parameters' mesh (expert-parallel MoE)
    shard_packed(model, mesh)
    x = jax.device_put(jnp.asarray(tokens, jnp.int32), batch_sharding(mesh, tokens.shape))
    return np.asarray(forward(model, x))


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax p || softmax q), in float64."""
    lp = _log_softmax(p_logits.astype(np.float64))
    lq = _log_softmax(q_logits.astype(np.float64))
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(ref: np.ndarray, ours: np.ndarray) -> dict[str, float]:
    """max |Δlogit| and top-1 agreement of `ours` against `ref`."""
    return {"max_abs": float(np.abs(ref - ours).max()),
            "top1": float(np.mean(ref.argmax(-1) == ours.argmax(-1)))}


@contextlib.contextmanager
def both_layouts(*, config: ModelConfig | None = None, ckpt: str | Path | None = None, seed: int = 0):
    """Yield (hf_dir, original_dir) holding the same weights: generated from `config`, or `ckpt` plus a copy."""
    with tempfile.TemporaryDirectory(prefix="oss-jax-parity-") as tmp:
        tmp = Path(tmp)
        if ckpt is None:
            assert config is not None
            yield (make_checkpoint(config, tmp / HF, layout=HF, seed=seed),
                   make_checkpoint(config, tmp / ORIGINAL, layout=ORIGINAL, seed=seed))
            return
        reader = CheckpointReader(ckpt)
        reader.validate()
        other = ORIGINAL if reader.layout == HF else HF
        if other == ORIGINAL and not reader.packed:
            raise ValueError(f"{ckpt}: experts are dequantized; the OpenAI reference needs MXFP4 experts")
        copy = write_checkpoint(tmp / other, reader.config, dict(reader.hf_tensors()), layout=other)
        yield (ckpt, copy) if reader.layout == HF else (copy, ckpt)


def run_parity(*, config: ModelConfig | None = None, ckpt: str | Path | None = None, seed: int = 0,
               batch: int = 2, seq_len: int | None = None, bf16: bool = True, mesh: Mesh | None = None,
               experts: str | None = None) -> dict[str, Any]:
    """Logits of this model (sharded on `mesh` if given) vs both references, float32 (and the bf16 KL check).

    `experts`: 'packed' or 'bf16' (dense); default packed when the checkpoint stores MXFP4 experts.
    """
    with both_layouts(config=config, ckpt=ckpt, seed=seed) as (hf_dir, original_dir):
        cfg, params = load_params(hf_dir)
        experts = experts or ("packed" if CheckpointReader(hf_dir).packed else "bf16")
        packed = experts == "packed"
        seq_len = seq_len or cfg.sliding_window + 13  # longer than the window
        tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, seq_len))
        ours = ours_logits(cfg, params, tokens, mesh=mesh, packed_experts=packed)
        ref = openai_logits(original_dir, tokens)
        hf = hf_logits(hf_dir, tokens)
        report: dict[str, Any] = {
            "vs_openai_ref": compare(ref, ours),
            "vs_hf": compare(hf, ours),
            "hf_vs_openai_ref": compare(ref, hf),
            "logit_std": float(ref.std()),
            "experts": experts,
            "shape": {"batch": batch, "seq_len": seq_len, "layers": cfg.num_hidden_layers,
                      "experts": cfg.num_experts, "vocab": cfg.vocab_size},
        }
        if mesh is not None:
            report["mesh"] = dict(mesh.shape)
        if bf16:
            ours16 = ours_logits(cfg, params, tokens, bf16=True, mesh=mesh, packed_experts=packed)
            ref16 = openai_logits(original_dir, tokens, bf16=True)
            report["bf16"] = {"kl_ours": kl(ref, ours16), "kl_ref": kl(ref, ref16),
                              "top1_ours": compare(ref, ours16)["top1"], "top1_ref": compare(ref, ref16)["top1"]}
    return report
