"""Generation that keeps its KV cache between calls (a chat): each prompt is prefilled only from where it stops
sharing tokens with what the cache already holds.

A harmony conversation is not a pure extension of the last prompt + completion: the completion's <|return|>
becomes <|end|>, and harmony drops the analysis of earlier turns once a final answer follows, so the next prompt
leaves the cached tokens at the point where that turn's completion began. A full-attention layer rolls back by
forgetting positions (its slots are positions); a sliding layer's ring cannot (newer positions overwrote the older
ones it would need), so the session keeps a copy of every ring where a prompt ended, and rolls back to the
latest copy at or before the shared prefix. The rings are small (128 slots per sliding layer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from oss_jax.cache import Caches, LayerCache, grow, init_cache
from oss_jax.generate import STOP_TOKENS, Sampling, bucket, check_request, decode, prefill, split_model
from oss_jax.model import GptOss, model_mesh

MIN_SLOTS = 1024  # a session's first cache; it doubles when a conversation outgrows it
MAX_SNAPSHOTS = 16  # ring copies kept (the oldest go first): how many prompts back a rollback can reach


def _copy(cache: LayerCache) -> LayerCache:
    return jax.tree.map(jnp.copy, cache)  # decode donates the caches; a snapshot must outlive that


class Session:
    """One conversation's generator (batch 1). `generate(prompt_ids)` reuses the cache for the longest prefix of
    the prompt that the cache can return to; `reused` and `prefilled` say how many tokens that was, per call.
    The cache is kept in `cache_dtype` (default: the model's dtype)."""

    def __init__(self, model: GptOss, *, chunk: int = 512, cache_dtype: jnp.dtype | None = None):
        self.model, self.chunk, self.cache_dtype = model, chunk, cache_dtype or model.dtype
        self._split = split_model(model)
        self._rings = [i for i in range(model.cfg.num_hidden_layers) if model.cfg.window(i) is not None]
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the next prompt is prefilled from its first token)."""
        self.tokens: list[int] = []  # what the cache holds, position by position
        self.caches: Caches | None = None
        self.snapshots: dict[int, dict[int, LayerCache]] = {}  # prompt length -> its rings, by layer
        self.reused = self.prefilled = 0

    def generate(self, prompt: Sequence[int], *, max_new_tokens: int = 64, sampling: Sampling | None = None,
                 stop_tokens: Sequence[int] = STOP_TOKENS,
                 on_token: Callable[[np.ndarray, np.ndarray], np.ndarray | None] | None = None) -> list[int]:
        """Continue `prompt` (token ids: the whole conversation so far) like `generate.generate` does for one
        prompt; returns the new tokens."""
        check_request(self.model, [prompt], max_new_tokens)
        prompt = [int(t) for t in prompt]
        mesh = model_mesh(self.model)
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            start = self._roll_back(prompt)
            caches = self._reserve(len(prompt) + max_new_tokens)
            # an interrupted call leaves an empty session rather than caches that no longer match `tokens`
            snapshots, self.tokens, self.caches, self.snapshots = self.snapshots, [], None, {}
            logits, caches = prefill(self._split, [prompt], caches, self.chunk, starts=[start])
            snapshots[len(prompt)] = {i: _copy(caches[i]) for i in self._rings}
            new, caches = decode(self._split, logits, caches, [len(prompt)], max_new_tokens, sampling or Sampling(),
                                 tuple(stop_tokens), on_token)
        self.tokens, self.caches = prompt + new[0][:-1], caches
        self.snapshots = dict(sorted(snapshots.items())[-MAX_SNAPSHOTS:])
        self.reused, self.prefilled = start, len(prompt) - start
        return new[0]

    def _roll_back(self, prompt: list[int]) -> int:
        """Bring the cache back to the longest prefix of `prompt` it can hold; returns that prefix's length."""
        if self.caches is None:
            return 0
        shared = 0
        limit = min(len(prompt) - 1, len(self.tokens))  # the prompt's last token is always fed: its logits start
        while shared < limit and prompt[shared] == self.tokens[shared]:
            shared += 1
        if shared == len(self.tokens):
            return shared
        start = max((n for n in self.snapshots if n <= shared), default=0)
        self.snapshots = {n: rings for n, rings in self.snapshots.items() if n <= start}
        self.tokens = self.tokens[:start]
        if start == 0:
            self.caches = None
            return 0
        rings = self.snapshots[start]
        self.caches = Caches.of([_copy(rings[i]) if i in rings else c.truncate(start)
                                 for i, c in enumerate(self.caches)])
        return start

    def _reserve(self, length: int) -> Caches:
        """Caches with room for `length` positions (slot counts are powers of two, so growing rarely recompiles)."""
        cfg = self.model.cfg
        slots = max(length, min(bucket(length, MIN_SLOTS), cfg.max_position_embeddings))
        if self.caches is None:
            return init_cache(cfg, 1, slots, self.cache_dtype)
        if any(c.pos.shape[1] < length for i, c in enumerate(self.caches) if i not in self._rings):
            return grow(cfg, self.caches, slots)
        return self.caches
