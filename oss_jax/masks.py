"""Which keys a query may see, from positions alone: causal, a sliding window, packed segments, empty slots.

One definition for every attention form (`layers.attend` and its blocked forms, `causal_blocks.attend_causal`).
"""

from __future__ import annotations

import jax


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None, segments: jax.Array | None = None,
                   k_segments: jax.Array | None = None) -> jax.Array:
    """q_pos [B, T], k_pos [B, S] -> bool [B, T, S]: causal, within `window` keys (self included); k_pos -1 = empty.

    `segments` [B, T] (no cache): packed sequences attend only within their own segment; the keys' are `k_segments`
    [B, S], by default `segments` (T == S).
    """
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    mask = (diff >= 0) & (k_pos[:, None, :] >= 0)
    if window is not None:
        mask &= diff < window
    if segments is not None:
        mask &= segments[:, :, None] == (segments if k_segments is None else k_segments)[:, None, :]
    return mask
