"""The published tensor layouts and how they map onto the model's parameters, both ways.

Two tables drive everything (loading, writing, and the streaming converter):
  ORIGINAL_TO_HF: `original/` names -> HF names (renames, plus the fused qkv split into q, k, v);
  HF_RULES:       HF names -> model parameters (transposes, head reshapes, MXFP4 decode).
Any layout is first brought to HF names, then to parameters; writing runs the tables backwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_dtypes
import numpy as np

from oss_jax import mxfp4
from oss_jax.config import ModelConfig

BF16 = np.dtype(ml_dtypes.bfloat16)
U8 = np.dtype(np.uint8)
HF, ORIGINAL = "hf", "original"


class LayoutError(ValueError):
    """Checkpoint tensors that contradict the layout or config: missing, unexpected, wrong shape or dtype."""


# ------------------------------------------------------------------ expected tensors


def hf_tensors(cfg: ModelConfig, *, packed: bool = True) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Every tensor of a HF-layout checkpoint: name -> (dtype, shape); experts MXFP4 or dequantized."""
    d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    e, f, v = cfg.num_experts, cfg.intermediate_size, cfg.vocab_size
    out = {"model.embed_tokens.weight": (BF16, (v, d)), "model.norm.weight": (BF16, (d,)),
           "lm_head.weight": (BF16, (v, d))}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (BF16, (d,)), p + "post_attention_layernorm.weight": (BF16, (d,)),
            p + "self_attn.q_proj.weight": (BF16, (n * h, d)), p + "self_attn.q_proj.bias": (BF16, (n * h,)),
            p + "self_attn.k_proj.weight": (BF16, (k * h, d)), p + "self_attn.k_proj.bias": (BF16, (k * h,)),
            p + "self_attn.v_proj.weight": (BF16, (k * h, d)), p + "self_attn.v_proj.bias": (BF16, (k * h,)),
            p + "self_attn.o_proj.weight": (BF16, (d, n * h)), p + "self_attn.o_proj.bias": (BF16, (d,)),
            p + "self_attn.sinks": (BF16, (n,)),
            p + "mlp.router.weight": (BF16, (e, d)), p + "mlp.router.bias": (BF16, (e,)),
            p + "mlp.experts.gate_up_proj_bias": (BF16, (e, 2 * f)),
            p + "mlp.experts.down_proj_bias": (BF16, (e, d)),
        }
        if packed:
            _check_groups(cfg)
            out |= {
                p + "mlp.experts.gate_up_proj_blocks": (U8, (e, 2 * f, d // 32, 16)),
                p + "mlp.experts.gate_up_proj_scales": (U8, (e, 2 * f, d // 32)),
                p + "mlp.experts.down_proj_blocks": (U8, (e, d, f // 32, 16)),
                p + "mlp.experts.down_proj_scales": (U8, (e, d, f // 32)),
            }
        else:
            out |= {p + "mlp.experts.gate_up_proj": (BF16, (e, d, 2 * f)),
                    p + "mlp.experts.down_proj": (BF16, (e, f, d))}
    return out


def original_tensors(cfg: ModelConfig) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Every tensor of an `original/` checkpoint: name -> (dtype, shape)."""
    hf = hf_tensors(cfg, packed=True)
    out = {}
    for orig, parts in original_to_hf_names(cfg).items():
        dtype, shape = hf[parts[0]]
        rows = sum(hf[p][1][0] for p in parts)  # the fused qkv stacks q, k, v rows
        out[orig] = (dtype, (rows,) + shape[1:])
    return out


def _check_groups(cfg: ModelConfig) -> None:
    for name in ("hidden_size", "intermediate_size"):
        if getattr(cfg, name) % mxfp4.GROUP:
            raise LayoutError(f"MXFP4 experts need {name} to be a multiple of {mxfp4.GROUP}, "
                              f"got {getattr(cfg, name)}")


# ------------------------------------------------------------------ original <-> HF names


def original_to_hf_names(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Each original tensor name -> the HF tensor names it holds (three for the fused qkv)."""
    out = {"embedding.weight": ("model.embed_tokens.weight",), "norm.scale": ("model.norm.weight",),
           "unembedding.weight": ("lm_head.weight",)}
    for i in range(cfg.num_hidden_layers):
        b, p = f"block.{i}.", f"model.layers.{i}."
        a = p + "self_attn."
        x = p + "mlp.experts."
        out |= {
            b + "attn.norm.scale": (p + "input_layernorm.weight",),
            b + "attn.qkv.weight": (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
            b + "attn.qkv.bias": (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
            b + "attn.sinks": (a + "sinks",),
            b + "attn.out.weight": (a + "o_proj.weight",),
            b + "attn.out.bias": (a + "o_proj.bias",),
            b + "mlp.norm.scale": (p + "post_attention_layernorm.weight",),
            b + "mlp.gate.weight": (p + "mlp.router.weight",),
            b + "mlp.gate.bias": (p + "mlp.router.bias",),
            b + "mlp.mlp1_weight.blocks": (x + "gate_up_proj_blocks",),
            b + "mlp.mlp1_weight.scales": (x + "gate_up_proj_scales",),
            b + "mlp.mlp1_bias": (x + "gate_up_proj_bias",),
            b + "mlp.mlp2_weight.blocks": (x + "down_proj_blocks",),
            b + "mlp.mlp2_weight.scales": (x + "down_proj_scales",),
            b + "mlp.mlp2_bias": (x + "down_proj_bias",),
        }
    return out


def split_original(cfg: ModelConfig, name: str, tensor: np.ndarray) -> dict[str, np.ndarray]:
    """One original tensor -> its HF tensors (the fused qkv rows are q | k | v)."""
    parts = original_to_hf_names(cfg)[name]
    if len(parts) == 1:
        return {parts[0]: tensor}
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    return dict(zip(parts, np.split(tensor, [q, q + kv], axis=0), strict=True))


def fuse_original(cfg: ModelConfig, name: str, hf: dict[str, np.ndarray]) -> np.ndarray:
    """The original tensor `name` built from the HF tensors it holds."""
    parts = original_to_hf_names(cfg)[name]
    return hf[parts[0]] if len(parts) == 1 else np.concatenate([hf[p] for p in parts], axis=0)


# ------------------------------------------------------------------ HF names <-> model parameters


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF tensors `sources` <-> one model parameter `param`, with the transform each way."""

    param: str
    sources: tuple[str, ...]
    load: Callable[..., np.ndarray]  # (cfg, *sources) -> param value
    save: Callable[..., tuple[np.ndarray, ...]]  # (cfg, param value) -> sources


def _same(cfg, x):
    return x


def _same_out(cfg, x):
    return (x,)


def _heads_in(heads_attr: str):
    def load(cfg, w):  # [heads*H, D] -> [D, heads, H]
        return w.T.reshape(cfg.hidden_size, getattr(cfg, heads_attr), cfg.head_dim)

    def save(cfg, w):
        return (np.ascontiguousarray(w.reshape(cfg.hidden_size, -1).T),)
    return load, save


def _heads_bias(heads_attr: str):
    def load(cfg, b):  # [heads*H] -> [heads, H]
        return b.reshape(getattr(cfg, heads_attr), cfg.head_dim)

    def save(cfg, b):
        return (b.reshape(-1),)
    return load, save


def _out_load(cfg, w):  # [D, N*H] -> [N, H, D]
    return w.T.reshape(cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size)


def _out_save(cfg, w):
    return (np.ascontiguousarray(w.reshape(-1, cfg.hidden_size).T),)


def _transpose_load(cfg, w):
    return np.ascontiguousarray(w.T)


def _transpose_save(cfg, w):
    return (np.ascontiguousarray(w.T),)


def _mxfp4_load(cfg, blocks, scales):  # [E, out, in/32, 16] -> [E, in, out]
    return np.ascontiguousarray(mxfp4.decode(blocks, scales).transpose(0, 2, 1))


def _mxfp4_save(cfg, w):
    return mxfp4.encode(np.ascontiguousarray(np.asarray(w, np.float32).transpose(0, 2, 1)))


def hf_rules(cfg: ModelConfig, *, packed: bool = True) -> list[Rule]:
    """The HF <-> parameter table for this config (experts MXFP4-packed or dequantized)."""
    rules = [Rule("embed", ("model.embed_tokens.weight",), _same, _same_out)]
    for i in range(cfg.num_hidden_layers):
        p, m = f"model.layers.{i}.", f"layers.{i}."
        a, x = p + "self_attn.", p + "mlp.experts."
        rules += [
            Rule(m + "attn_norm.scale", (p + "input_layernorm.weight",), _same, _same_out),
            Rule(m + "mlp_norm.scale", (p + "post_attention_layernorm.weight",), _same, _same_out),
            Rule(m + "attn.q_kernel", (a + "q_proj.weight",), *_heads_in("num_attention_heads")),
            Rule(m + "attn.q_bias", (a + "q_proj.bias",), *_heads_bias("num_attention_heads")),
            Rule(m + "attn.k_kernel", (a + "k_proj.weight",), *_heads_in("num_key_value_heads")),
            Rule(m + "attn.k_bias", (a + "k_proj.bias",), *_heads_bias("num_key_value_heads")),
            Rule(m + "attn.v_kernel", (a + "v_proj.weight",), *_heads_in("num_key_value_heads")),
            Rule(m + "attn.v_bias", (a + "v_proj.bias",), *_heads_bias("num_key_value_heads")),
            Rule(m + "attn.o_kernel", (a + "o_proj.weight",), _out_load, _out_save),
            Rule(m + "attn.o_bias", (a + "o_proj.bias",), _same, _same_out),
            Rule(m + "attn.sinks", (a + "sinks",), _same, _same_out),
            Rule(m + "moe.router_kernel", (p + "mlp.router.weight",), _transpose_load, _transpose_save),
            Rule(m + "moe.router_bias", (p + "mlp.router.bias",), _same, _same_out),
            Rule(m + "moe.mlp1_bias", (x + "gate_up_proj_bias",), _same, _same_out),
            Rule(m + "moe.mlp2_bias", (x + "down_proj_bias",), _same, _same_out),
        ]
        if packed:
            rules += [Rule(m + "moe.mlp1_kernel", (x + "gate_up_proj_blocks", x + "gate_up_proj_scales"),
                           _mxfp4_load, _mxfp4_save),
                      Rule(m + "moe.mlp2_kernel", (x + "down_proj_blocks", x + "down_proj_scales"),
                           _mxfp4_load, _mxfp4_save)]
        else:
            rules += [Rule(m + "moe.mlp1_kernel", (x + "gate_up_proj",), _same, _same_out),
                      Rule(m + "moe.mlp2_kernel", (x + "down_proj",), _same, _same_out)]
    # model order; the two vocabulary-sized tensors sit apart so a streaming pass never holds both
    return rules + [Rule("final_norm.scale", ("model.norm.weight",), _same, _same_out),
                    Rule("unembed", ("lm_head.weight",), _same, _same_out)]


def check_tensor(name: str, array_dtype: np.dtype, shape: tuple[int, ...],
                 expected: dict[str, tuple[np.dtype, tuple[int, ...]]], where: str) -> None:
    """Raise LayoutError if tensor `name` is unknown or its dtype/shape contradicts config.json."""
    if name not in expected:
        raise LayoutError(f"{where}: unexpected tensor {name!r} for this config")
    dtype, want = expected[name]
    if tuple(shape) != tuple(want):
        raise LayoutError(f"{where}: tensor {name!r} has shape {tuple(shape)}, config.json implies {want}")
    float_ok = dtype != U8 and np.dtype(array_dtype).kind == "f"
    if np.dtype(array_dtype) != dtype and not float_ok:
        raise LayoutError(f"{where}: tensor {name!r} has dtype {np.dtype(array_dtype)}, expected {dtype}")
