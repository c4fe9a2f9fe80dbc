"""The minimum work of a gpt-oss step, for benchmarks: parameter counts, FLOPs and bytes that must be read.

No side effects on import (unlike the benchmark scripts, which pick a JAX platform).
"""

from __future__ import annotations

from oss_jax.config import ModelConfig


def sizes(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts (elements) of one layer's parts and of the vocabulary matrices."""
    d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    e, f = cfg.num_experts, cfg.intermediate_size
    return {"attn": d * n * h + 2 * d * k * h + n * h * d, "attn_small": n * h + 2 * k * h + d + n,
            "router": d * e, "router_b": e, "expert": d * 2 * f + f * d, "expert_b": 2 * f + d, "norms": 2 * d,
            "vocab": cfg.vocab_size * d}


def visible_keys(cfg: ModelConfig, layer: int, position: int) -> int:
    w = cfg.window(layer)
    return position + 1 if w is None else min(position + 1, w)


def min_flops(cfg: ModelConfig, positions: list[int], logits_rows: int) -> float:
    """Minimum FLOPs for len(positions) tokens (active weights + causal attention scores), unembedding for
    `logits_rows` of them; total, not per token."""
    s = sizes(cfg)
    per_token = 2 * cfg.num_hidden_layers * (s["attn"] + s["router"] + cfg.experts_per_token * s["expert"])
    attn = sum(4 * cfg.num_attention_heads * cfg.head_dim * visible_keys(cfg, layer, p)
               for layer in range(cfg.num_hidden_layers) for p in positions)
    return per_token * len(positions) + attn + 2 * s["vocab"] * logits_rows


def min_bytes(cfg: ModelConfig, itemsize: int, distinct: list[float], rows: int, positions: list[int],
              expert_bytes: float | None = None, cache_itemsize: int = 4) -> float:
    """Minimum bytes read by one step of `rows` tokens: every shared weight once (in `itemsize`; biases, sinks and
    norms float32), the `distinct[l]` routed experts of each layer once (`expert_bytes` each, kernels and biases;
    default: kernels in `itemsize`, biases float32), `rows` embedding rows, the KV cache keys and values each token
    at `positions` sees (`cache_itemsize`)."""
    s, d = sizes(cfg), cfg.hidden_size
    if expert_bytes is None:
        expert_bytes = s["expert"] * itemsize + s["expert_b"] * 4
    kv = sum(2 * visible_keys(cfg, layer, p) * cfg.num_key_value_heads * cfg.head_dim * cache_itemsize
             for layer in range(cfg.num_hidden_layers) for p in positions)
    layers = sum((s["attn"] + s["router"]) * itemsize + (s["attn_small"] + s["router_b"] + s["norms"]) * 4
                 + n * expert_bytes for n in distinct)
    return layers + s["vocab"] * itemsize + rows * d * itemsize + d * 4 + kv
