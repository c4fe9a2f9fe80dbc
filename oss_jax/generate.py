"""Generation: chunked prefill into a KV cache, then a jitted one-token decode step with the cache donated.

Shapes are bucketed (prompt chunk, cache length) so a new prompt length rarely means a new compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oss_jax.cache import Caches, init_cache, placed
from oss_jax.model import APART_UNEMBED_OPTIONS, GptOss, model_mesh, unembed_apart
from oss_jax.sharding import constrain
from oss_jax.unstacked import Unstacked, unstack_experts

STOP_TOKENS = (200002, 200012)  # <|return|>, <|call|>


class GenerationError(ValueError):
    """A request that cannot be generated (empty prompt, token outside the vocabulary, beyond the context)."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def filter_logits(logits: jax.Array, s: Sampling) -> jax.Array:
    """logits [B, V] -> float32 logits / temperature, -inf outside the top-k and outside the top-p nucleus (the
    smallest set of the most likely tokens whose probability reaches top_p; the most likely token always stays)."""
    logits = logits.astype(jnp.float32) / s.temperature
    if s.top_k > 0:
        # the min of all k values, not the k-th alone: XLA:CPU turns a lone k-th value into a full sort (~45 ms)
        kth = jnp.min(jax.lax.top_k(logits, s.top_k)[0], axis=-1, keepdims=True)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:
        logits = jnp.where(_ordered(logits) < _nucleus_threshold(logits, s.top_p), -jnp.inf, logits)
    return logits


def _ordered(x: jax.Array) -> jax.Array:
    """float32 -> int32 in the same order (the sign-magnitude bits made two's complement)."""
    i = jax.lax.bitcast_convert_type(x, jnp.int32)
    return i ^ ((i >> 31) & 0x7FFFFFFF)


def _nucleus_threshold(logits: jax.Array, top_p: float) -> jax.Array:
    """[B, V] -> [B, 1]: the largest t (in `_ordered` values) whose tokens at or above it hold >= top_p of the
    probability. A bisection over the 2^32 orderings, 32 masked sums over V: no sort of the vocabulary (~45 ms on
    CPU for 201,088 tokens, where this takes ~2 ms)."""
    probs = jax.nn.softmax(logits, axis=-1)
    keys = _ordered(logits)
    lo = jnp.min(keys, axis=-1, keepdims=True)  # everything at or above it: mass 1
    hi = jnp.max(keys, axis=-1, keepdims=True)  # the most likely token: kept whatever its mass

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1) + ((lo ^ hi) & 1)  # ceil((lo + hi) / 2) without overflow
        enough = jnp.sum(jnp.where(keys >= mid, probs, 0.0), axis=-1, keepdims=True) >= top_p
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
    return lo


@functools.partial(jax.jit, static_argnums=2)
def sample(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """logits [B, V] -> token ids [B] int32, one compiled call."""
    if s.temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, s), axis=-1).astype(jnp.int32)


@jax.tree_util.register_static  # a pytree without leaves, as an nnx.GraphDef is
class Graph:
    """A model's nnx graph and its state's tree structure: the static argument of the jitted steps, its hash taken
    once. (jit hashes static arguments on every call, and an nnx.GraphDef hashes in Python: ~0.1 ms per layer.)"""

    def __init__(self, graphdef: nnx.GraphDef, treedef: jax.tree_util.PyTreeDef):
        self.graphdef, self.treedef, self._hash = graphdef, treedef, hash((graphdef, treedef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Graph) and self._hash == other._hash
                                 and (self.graphdef, self.treedef) == (other.graphdef, other.treedef))

    def merge(self, leaves: Sequence[jax.Array]) -> GptOss:
        """The model of these state arrays (inside a jitted step)."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


@functools.lru_cache(maxsize=16)
def _graph(graphdef: nnx.GraphDef, treedef: jax.tree_util.PyTreeDef) -> Graph:
    # one object per distinct graph: jit then matches its cached key by identity, not by comparing graphs
    return Graph(graphdef, treedef)


class SplitModel(NamedTuple):
    """A model split once into its graph and its state's arrays as a flat tuple. Steps called with it skip
    `nnx.split`, which walks every variable in Python (~25 ms for 24 layers, longer than a whole decode step on a
    GPU); jit flattens a tuple of arrays in C++ and hashes the `Graph` in constant time. Passing an nnx.GraphDef and
    nnx.State instead cost 3.7 ms per call of a jitted function that does nothing (gpt-oss-20b, an H100 machine's
    host): most of a decode step. On CPU a dense expert kernel's leaf may be its `Unstacked` views (`split_model`)."""

    graph: Graph
    leaves: tuple[jax.Array | Unstacked, ...]


def split_model(model: GptOss | SplitModel, unstack: bool = True) -> SplitModel:
    """The model's `SplitModel`; with `unstack`, dense expert kernels on one CPU device go to the steps as views of
    each expert (`unstacked`: XLA:CPU then reads each routed expert in place instead of copying it)."""
    if isinstance(model, SplitModel):
        return model
    graphdef, state = nnx.split(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    paths, leaves = zip(*flat, strict=True) if flat else ((), ())
    return SplitModel(_graph(graphdef, treedef), tuple(unstack_experts(paths, leaves) if unstack else leaves))


def prefill_step(model: GptOss | SplitModel, tokens: jax.Array, positions: jax.Array, caches: Caches
                 ) -> tuple[jax.Array, Caches]:
    """One prompt chunk: tokens/positions [B, C] (-1 = padding) -> logits at each row's last position [B, V]; the
    cache is donated and updated in place (use the returned one)."""
    return _logits(_prefill, model, tokens, positions, caches)


def decode_step(model: GptOss | SplitModel, tokens: jax.Array, positions: jax.Array, caches: Caches
                ) -> tuple[jax.Array, Caches]:
    """One new token per row: tokens/positions [B] -> logits [B, V]; the cache is donated and updated in place.

    Pass a `split_model(model)` when calling in a loop."""
    return _logits(_decode, model, tokens, positions, caches)


def _logits(step, model: GptOss | SplitModel, tokens: jax.Array, positions: jax.Array, caches: Caches
            ) -> tuple[jax.Array, Caches]:
    """`step`'s logits, unembedded in the step or, where `unembed_apart`, by `_unembed` after it."""
    if not isinstance(caches, Caches):
        # a list of LayerCache also traces, but for another pytree than the step returns: the donated buffers then
        # alias other layers' outputs (a copy of each layer's cache per step) and the next step compiles again
        raise TypeError(f"caches must be a oss_jax.cache.Caches (init_cache, or Caches.of(layers)), got "
                        f"{type(caches).__name__}")
    graph, leaves = split_model(model)
    # compiler options are for top-level jits only: a step traced inside another jit stays one computation
    apart = unembed_apart(tokens.shape[0]) and not isinstance(tokens, jax.core.Tracer)
    out, caches = step(graph, leaves, tokens, positions, caches, unembed=not apart)
    return (_unembed(graph, leaves, out) if apart else out), caches


# Pure jitted steps over a SplitModel's parts: they return only logits (or, unembed=False, the final-normed hidden
# rows [B, D]) and caches. (An nnx.jit'ed method also hands the module state back out, i.e. copies every parameter on
# each call.)
# the cache is donated: a chunk's step then holds one cache, not the one it was given and the one it returns (at
# 128k tokens the full layers of gpt-oss-120b cache ~4.8 GB per row in bf16)
@functools.partial(jax.jit, static_argnums=0, static_argnames="unembed", donate_argnums=4)
def _prefill(graph, leaves, tokens, positions, caches, unembed=True):
    model = graph.merge(leaves)
    hidden, caches = model.hidden(tokens, positions, caches)
    last = jnp.argmax(positions, axis=1)
    return _out(model, hidden[jnp.arange(hidden.shape[0]), last], unembed), placed(caches)


@functools.partial(jax.jit, static_argnums=0, static_argnames="unembed", donate_argnums=4)
def _decode(graph, leaves, tokens, positions, caches, unembed=True):
    model = graph.merge(leaves)
    hidden, caches = model.hidden(tokens[:, None], positions[:, None], caches)
    return _out(model, hidden[:, 0], unembed), placed(caches)


@functools.partial(jax.jit, static_argnums=0, compiler_options=APART_UNEMBED_OPTIONS)
def _unembed(graph, leaves, rows):
    return _out(graph.merge(leaves), rows, True)


def _out(model: GptOss, rows: jax.Array, unembed: bool) -> jax.Array:
    """rows [B, D] -> logits [B, V] (unembed=False: the rows), on the sharding every step gives them (left to XLA,
    the prefill's logits and a decode step's differed, so `sample` and the decode step after it compiled twice)."""
    return constrain(model.unembed_logits(rows), ("rows", "vocab")) if unembed else constrain(rows, ("rows", None))


def bucket(n: int, minimum: int = 16) -> int:
    """The power of two >= n (at least `minimum`): shapes drawn from few sizes compile few times."""
    return max(minimum, 1 << (n - 1).bit_length())


def check_request(model: GptOss, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Clear errors before anything compiles."""
    cfg = model.cfg
    if not prompts:
        raise GenerationError("no prompts given")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary (size {cfg.vocab_size})")
        if len(p) + max_new_tokens > cfg.max_position_embeddings:
            raise GenerationError(f"prompt {i}: {len(p)} tokens + {max_new_tokens} new exceed the context of "
                                  f"{cfg.max_position_embeddings}")


def generate(model: GptOss, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             sampling: Sampling = Sampling(), stop_tokens: Sequence[int] = STOP_TOKENS, chunk: int = 512,
             on_token: Callable[[np.ndarray, np.ndarray], np.ndarray | None] | None = None,
             cache_dtype: jnp.dtype | None = None) -> list[list[int]]:
    """Continue each prompt (token ids; lengths may differ) until a stop token or max_new_tokens.

    Returns the new tokens per prompt (a stop token included when one ended it). `on_token(ids [B], done [B])`
    streams each step; it may return a bool [B] of rows to stop after this token (e.g. a stop string appeared).
    The KV cache is kept in `cache_dtype` (default: the model's dtype, as HF transformers keeps it).
    """
    check_request(model, prompts, max_new_tokens)
    mesh = model_mesh(model)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return _generate(model, prompts, max_new_tokens, sampling, tuple(stop_tokens), chunk, on_token,
                         cache_dtype or model.dtype)


def _generate(model, prompts, max_new_tokens, sampling, stop_tokens, chunk, on_token, cache_dtype):
    cfg, model = model.cfg, split_model(model)
    caches = init_cache(cfg, len(prompts), bucket(max(len(p) for p in prompts) + max_new_tokens, 64), cache_dtype)
    logits, caches = prefill(model, prompts, caches, chunk)
    new, _ = decode(model, logits, caches, [len(p) for p in prompts], max_new_tokens, sampling, stop_tokens,
                    on_token)
    return new


def prefill(model: SplitModel, prompts: Sequence[Sequence[int]], caches: Caches, chunk: int,
            starts: Sequence[int] | None = None) -> tuple[jax.Array, Caches]:
    """Feed each prompt from `starts[i]` on (its earlier tokens already cached; default 0) in chunks of at most
    `chunk` tokens -> logits at each prompt's last token [B, V] and the caches."""
    batch = len(prompts)
    starts = np.zeros(batch, np.int32) if starts is None else np.asarray(starts, np.int32)
    todo = np.array([len(p) for p in prompts], np.int32) - starts
    padded = np.zeros((batch, int(todo.max()) + chunk), np.int32)  # room for the last chunk's padding
    for i, p in enumerate(prompts):
        padded[i, : todo[i]] = p[starts[i]:]
    last_logits, c0 = None, 0
    while c0 < todo.max():
        width = min(bucket(int(todo.max()) - c0), chunk)  # the last chunk only as wide as what is left needs
        offsets = np.arange(c0, c0 + width, dtype=np.int32)[None]
        pos = np.where(offsets < todo[:, None], starts[:, None] + offsets, -1)
        logits, caches = prefill_step(model, jnp.asarray(padded[:, c0:c0 + width]), jnp.asarray(pos), caches)
        ends_here = ((todo - 1 >= c0) & (todo - 1 < c0 + width))[:, None]
        last_logits = logits if last_logits is None else jnp.where(ends_here, logits, last_logits)
        c0 += width
    return last_logits, caches


def pipelined() -> bool:
    """Whether `decode` queues the next step before reading the current token back (accelerators: the host's
    Python then runs while the device computes; on CPU both share the cores, and a stop would waste a whole step)."""
    return jax.default_backend() != "cpu"


def decode(model: SplitModel, logits: jax.Array, caches: Caches, lengths: Sequence[int],
           max_new_tokens: int, sampling: Sampling, stop_tokens: Sequence[int],
           on_token: Callable[[np.ndarray, np.ndarray], np.ndarray | None] | None
           ) -> tuple[list[list[int]], Caches]:
    """Sample from the prompts' last logits [B, V], then decode one token per step (prompt i holds `lengths[i]`
    tokens) -> new tokens per row, and the caches. With one row, they hold every new token but the last (where a
    stop ended it early and steps are `pipelined`, the last too); with more, a row that stopped early keeps being
    fed (its extra tokens are dropped from the output, not from the cache)."""
    batch, lengths = logits.shape[0], np.asarray(lengths, np.int32)
    key = jax.random.key(sampling.seed)
    out = np.zeros((batch, max_new_tokens), np.int32)
    done = np.zeros(batch, bool)
    ended = np.full(batch, max_new_tokens)  # tokens kept per row
    ahead = pipelined()
    for step in range(max_new_tokens):
        key, sub = jax.random.split(key)
        sampled = sample(logits, sub, sampling)
        last = step == max_new_tokens - 1
        if ahead and not last:  # queued before the host waits for `sampled`
            logits, caches = decode_step(model, sampled, jnp.asarray(lengths + step), caches)
        ids = np.asarray(sampled)
        out[:, step] = ids
        finished_now = ~done & np.isin(ids, stop_tokens)
        if on_token is not None:
            stop = on_token(ids, done.copy())
            if stop is not None:
                finished_now |= ~done & np.asarray(stop, bool)
        ended[finished_now] = step + 1
        done |= finished_now
        if done.all() or last:
            break
        if not ahead:  # the device's own copy of the token, not the host's uploaded again
            logits, caches = decode_step(model, sampled, jnp.asarray(lengths + step), caches)
    return [out[i, : ended[i]].tolist() for i in range(batch)], caches
