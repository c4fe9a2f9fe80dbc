"""Generation: greedy == HF transformers generate, cache == recomputation, batching, sharding, sampling, errors."""

import json
import operator
import re
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxprs import collectives
from paused_cli import paused_command

from convert.reader import load_params
from convert.synthetic import make_checkpoint
from oss_jax import cli, data
from oss_jax.cache import init_cache
from oss_jax.generate import (
    GenerationError,
    Sampling,
    _decode,
    _prefill,
    decode_step,
    filter_logits,
    generate,
    prefill,
    prefill_step,
    split_model,
)
from oss_jax.model import forward, model_from_params
from oss_jax.session import Session
from oss_jax.sharding import make_mesh, shard_model
from oss_jax.unstacked import Unstacked

NEW = 64


@pytest.fixture(scope="module")
def ckpt(two_layer_config, tmp_path_factory):
    """Two layers (sliding: a ring-buffer cache, full: a growing one) with the real vocabulary and tokenizer."""
    return make_checkpoint(two_layer_config, tmp_path_factory.mktemp("gen") / "hf", seed=4)


@pytest.fixture(scope="module")
def model(ckpt):
    cfg, params = load_params(ckpt)
    return model_from_params(cfg, params)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(4)
    return [rng.integers(0, 199_000, n).tolist() for n in (23, 5, 12)]  # 23 > the window of 8


@pytest.fixture(scope="module")
def greedy(model, prompts):
    return generate(model, prompts, max_new_tokens=NEW, stop_tokens=())


def test_greedy_equals_hf_generate(ckpt, prompts, greedy):
    torch = pytest.importorskip("torch")
    import transformers

    hf = transformers.GptOssForCausalLM.from_pretrained(
        str(ckpt), quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager").float().eval()
    for prompt, ours in zip(prompts, greedy, strict=True):
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        theirs = out[0, len(prompt):].tolist()
        agree = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), NEW)
        print(f"prompt of {len(prompt)} tokens: first {agree} of {NEW} tokens agree with HF")
        assert ours == theirs


def test_batched_equals_one_by_one(model, prompts, greedy):
    assert greedy == [generate(model, [p], max_new_tokens=NEW, stop_tokens=())[0] for p in prompts]


def test_steps_compile_once_for_every_split_of_a_model(model, prompts):
    """Each generate() call splits the model anew; the steps' static argument (the graph, hashed once) is one
    object for equal graphs, so a repeated request hits jit's cache instead of compiling again."""
    first, second = split_model(model), split_model(model)
    buffers = [[a.unsafe_buffer_pointer() for a in jax.tree.leaves(s.leaves)] for s in (first, second)]
    assert first.graph is second.graph and buffers[0] == buffers[1]
    generate(model, [prompts[1]], max_new_tokens=2, stop_tokens=())
    compiled = (_prefill._cache_size(), _decode._cache_size())
    generate(model, [prompts[1]], max_new_tokens=2, stop_tokens=())
    assert (_prefill._cache_size(), _decode._cache_size()) == compiled


def test_chunked_prefill_equals_one_chunk(model, prompts, greedy):
    # all NEW tokens: the cache length is then greedy's, whose compiled decode step this run reuses
    assert generate(model, prompts, max_new_tokens=NEW, stop_tokens=(), chunk=4) == greedy


def test_last_chunk_is_only_as_wide_as_what_is_left(model, prompts, monkeypatch):
    """35 tokens in chunks of 32 (then 16 for the 3 left, not 32) == in chunks of 16; batch 1 with a 128-slot cache,
    the shapes test_batched_equals_one_by_one compiled."""
    from oss_jax import generate as generate_module

    long = prompts[0] + prompts[2]
    step, widths = generate_module.prefill_step, []
    monkeypatch.setattr(generate_module, "prefill_step", lambda m, t, *a: widths.append(t.shape[1]) or step(m, t, *a))
    assert generate(model, [long], max_new_tokens=NEW, stop_tokens=(), chunk=32) == \
        generate(model, [long], max_new_tokens=NEW, stop_tokens=(), chunk=16)
    assert widths == [32, 16, 16, 16, 16]


def test_prefill_against_the_cache_in_key_blocks(model, prompts, greedy, monkeypatch):
    """A full layer's prompt chunk scores its cache 16 keys at a time (`layers.KEY_BLOCK`, 1024 by default: a long
    context's width): the same logits as all 128 slots at once, and the same greedy tokens."""
    from oss_jax import layers

    tokens = np.zeros((len(prompts), 32), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    pos = np.where(np.arange(32) < np.array([len(p) for p in prompts])[:, None], np.arange(32), -1).astype(np.int32)

    def prefill_logits():
        jax.clear_caches()  # KEY_BLOCK is read while tracing
        return np.asarray(prefill_step(model, jnp.asarray(tokens), jnp.asarray(pos), init_cache(model.cfg, 3, 128))[0])

    want = prefill_logits()
    monkeypatch.setattr(layers, "KEY_BLOCK", 16)
    try:
        got = prefill_logits()
        err = float(np.abs(got - want).max())
        print(f"prefill, cache scored 16 keys at a time vs all 128: max |Δlogit| {err:.2e}")
        assert err <= 1e-5
        assert generate(model, prompts, max_new_tokens=NEW, stop_tokens=()) == greedy
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def cached_logits(model, prompt: list[int], new: list[int], slots: int, dtype=jnp.float32):
    """Logits [len(new), V] of `prompt` prefilled (padded to 32) into a cache of `slots` in `dtype`, then of `new`
    but its last token decoded one at a time; and the caches."""
    caches = init_cache(model.cfg, 1, slots, dtype)
    pos = jnp.arange(32, dtype=jnp.int32)[None]
    pos = jnp.where(pos < len(prompt), pos, -1)  # -1: padding
    logits, caches = prefill_step(model, jnp.asarray([prompt + [0] * (32 - len(prompt))]), pos, caches)
    steps = [logits[0]]
    for i, t in enumerate(new[:-1]):
        logits, caches = decode_step(model, jnp.asarray([t]), jnp.asarray([len(prompt) + i]), caches)
        steps.append(logits[0])
    return jnp.stack(steps), caches


def test_cached_decode_logits_equal_full_recompute(model, prompts, greedy):
    """The prompt padded to its bucket and the cache length `generate` picks: the compiled steps are those of
    test_batched_equals_one_by_one."""
    cfg = model.cfg
    prompt, new = prompts[0], greedy[0][:12]
    steps, caches = cached_logits(model, prompt, new, 128)
    full = forward(model, jnp.asarray([prompt + new[:-1]]))[0, len(prompt) - 1:]
    err = float(jnp.abs(steps - full).max())
    print(f"cached decode vs full recompute over {len(new)} steps: max |Δlogit| {err:.2e}")
    assert err <= 1e-4
    sliding = [c for layer, c in enumerate(caches) if cfg.window(layer) is not None]
    assert {c.k.shape[2] for c in sliding} == {cfg.sliding_window}  # ring: memory independent of the context
    # positions held once per slot count (full layers' 128, rings' 8), each slot holding the last position it took
    last = len(prompt) + len(new) - 2
    full = np.where(np.arange(128) <= last, np.arange(128), -1)
    w = cfg.sliding_window
    ring = np.zeros(w, int)
    ring[np.arange(last - w + 1, last + 1) % w] = np.arange(last - w + 1, last + 1)
    assert len(caches.pos) == 2 and len(jax.tree.leaves(caches)) == 2 * cfg.num_hidden_layers + 2
    for layer, c in enumerate(caches):
        np.testing.assert_array_equal(np.asarray(c.pos[0]), ring if cfg.window(layer) is not None else full)


def test_cpu_steps_read_each_expert_in_place(model, prompts, greedy):
    """On one CPU device the steps get each dense expert kernel as views of its experts (`oss_jax.unstacked`) that
    alias the parameter; a batched prefill and 4 decode steps give the logits of the stacked kernels (each expert
    sliced out inside the step) within 1e-5 of the largest logit."""
    views, stacked = split_model(model), split_model(model, unstack=False)
    kernels = [leaf for leaf in views.leaves if isinstance(leaf, Unstacked)]
    params = [p for block in model.layers for p in (block.moe.mlp1_kernel[...], block.moe.mlp2_kernel[...])]
    assert len(kernels) == len(params) == 2 * model.cfg.num_hidden_layers
    assert not any(isinstance(leaf, Unstacked) for leaf in stacked.leaves)
    for u, p in zip(kernels, params, strict=True):
        assert [k.unsafe_buffer_pointer() for k in u.kernels] == [
            p.unsafe_buffer_pointer() + e * p[0].nbytes for e in range(p.shape[0])]
    lengths = np.array([len(p) for p in prompts], np.int32)
    logits = {}
    for name, split in (("views", views), ("stacked", stacked)):
        out, caches = prefill(split, prompts, init_cache(model.cfg, len(prompts), 128), 512)
        steps = [out]
        for s in range(4):
            tokens = jnp.asarray([g[s] for g in greedy], jnp.int32)
            out, caches = decode_step(split, tokens, jnp.asarray(lengths + s), caches)
            steps.append(out)
        logits[name] = np.stack(steps)
    err, largest = float(np.abs(logits["views"] - logits["stacked"]).max()), float(np.abs(logits["stacked"]).max())
    print(f"expert views vs stacked kernels, prefill + 4 decode steps of 3 rows: max |Δlogit| {err:.1e} "
          f"(largest {largest:.1f})")
    assert err <= 1e-5 * largest


@pytest.mark.parametrize("batch", [1, 2])
def test_cpu_decode_updates_the_caches_in_place(model, batch):
    """XLA:CPU's compiled decode step copies and transposes no layer's k or v cache: each is updated in place in
    its donated buffer (`layers.attend_then_write`). Written first and then attended to, every cache of the batch-1
    step was copied ~4 times and k transposed."""
    graph, leaves = split_model(model)
    caches = init_cache(model.cfg, batch, 96)
    tokens = jnp.zeros((batch,), jnp.int32)
    hlo = _decode.lower(graph, leaves, tokens, tokens + 40, caches).compile().as_text()
    shapes = {f"f32[{','.join(map(str, a.shape))}]" for a in caches.k}
    moved = [line.strip()[:160] for line in hlo.splitlines()
             if re.search(r" (copy|transpose)\(", line) and any(f"= {shape}{{" in line for shape in shapes)]
    print(f"batch {batch}: {len(moved)} copies or transposes of a layer's cache {sorted(shapes)}")
    assert not moved, moved[:4]


def test_prefill_updates_the_caches_in_place(model):
    """A prompt chunk's step is given the cache (donated) and returns it in the same buffers, copying no full
    layer's k or v cache (the ones as long as the context; a sliding layer's ring of `window` slots is reordered by
    position, a copy): a chunk holds one cache at a time. Before, each chunk allocated a second one."""
    graph, leaves, cfg = *split_model(model), model.cfg
    caches = init_cache(cfg, 2, 96)
    tokens, positions = jnp.ones((2, 32), jnp.int32), jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (2, 32))
    step = _prefill.lower(graph, leaves, tokens, positions, caches).compile()
    hlo = step.as_text()
    full = [i for i in range(cfg.num_hidden_layers) if cfg.window(i) is None]
    shapes = {f"f32[{','.join(map(str, caches[i].k.shape))}]" for i in full}
    assert full and all(caches[i].k.shape[2] == 96 != cfg.sliding_window for i in full)
    copies = [line.strip()[:160] for line in hlo.splitlines()
              if re.search(r" copy\(", line) and any(f"= {shape}{{" in line for shape in shapes)]
    before = [a.unsafe_buffer_pointer() for a in jax.tree.leaves(caches)]
    _, out = step(leaves, tokens, positions, caches)  # what prefill_step runs (compiled once here)
    after = [a.unsafe_buffer_pointer() for a in jax.tree.leaves(out)]
    print(f"prefill chunk of 32 tokens, 2 rows: {sum(map(operator.eq, before, after))} of {len(before)} cache "
          f"buffers reused, {len(copies)} copies of a full layer's cache")
    assert all(a.is_deleted() for a in jax.tree.leaves(caches))
    assert after == before and not copies, copies[:4]


def test_cpu_steps_of_several_rows_unembed_apart(model, prompts, monkeypatch):
    """On CPU a step of 2-32 rows unembeds in a compile of its own (`unembed_apart`: YNNPACK's GEMM); its logits equal
    the step's own unembedding (XLA's GEMM) within 1e-5 of the largest logit. Traced inside another jit, the step
    stays one computation (compiler options are for top-level jits only)."""
    from oss_jax import generate as generate_module

    calls = []
    apart = generate_module._unembed
    monkeypatch.setattr(generate_module, "_unembed", lambda *a: calls.append(a[2].shape) or apart(*a))
    cfg, rows = model.cfg, len(prompts)
    tokens = jnp.asarray([p[0] for p in prompts], jnp.int32)
    zero = jnp.zeros(rows, jnp.int32)
    jax.make_jaxpr(lambda *a: decode_step(model, *a))(tokens, zero, init_cache(cfg, rows, 128))
    assert calls == []
    got = decode_step(model, tokens, zero, init_cache(cfg, rows, 128))[0]  # 128 slots: the steps `generate` compiles
    assert calls == [(rows, cfg.hidden_size)]
    inside = _decode(*split_model(model), tokens, zero, init_cache(cfg, rows, 128), unembed=True)[0]
    err, largest = float(jnp.abs(got - inside).max()), float(jnp.abs(inside).max())
    print(f"{rows} rows, unembedding apart vs in the step: max |Δlogit| {err:.1e} (largest {largest:.1f})")
    assert got.shape == inside.shape == (rows, cfg.vocab_size) and err <= 1e-5 * largest


def test_a_bf16_model_keeps_a_bf16_cache_at_no_cost_in_precision(ckpt, prompts, monkeypatch):
    """Attention casts keys and values to the model's dtype before using them, so a bf16 model's bf16 cache (half a
    float32 one; what `oss-jax plan` counts) gives bit for bit the logits of a float32 cache."""
    from oss_jax import session as session_module

    monkeypatch.setattr(session_module, "MIN_SLOTS", 64)  # the session's compiled steps serve the bf16 run below
    cfg, params = load_params(ckpt)
    model16 = model_from_params(cfg, params, dtype=jnp.bfloat16)
    chat = Session(model16)
    new = chat.generate(prompts[0], max_new_tokens=4, stop_tokens=())
    assert {c.k.dtype for c in chat.caches} == {jnp.dtype(jnp.bfloat16)}
    runs = {dtype: np.asarray(cached_logits(model16, prompts[0], new, 64, dtype)[0].astype(jnp.float32))
            for dtype in (jnp.float32, jnp.bfloat16)}
    assert np.array_equal(runs[jnp.float32], runs[jnp.bfloat16])
    assert new == [int(t) for t in runs[jnp.float32].argmax(-1)]


def test_sharded_generation_equals_unsharded(ckpt, prompts, greedy, monkeypatch):
    """Two prompts, their rows split over `data`: the same tokens, each step compiled once (the caches and logits
    every step returns are placed alike: left to XLA, the decode step, the apart unembedding and `sample` each
    compiled twice on this mesh)."""
    from oss_jax import generate as generate_module
    from oss_jax.model import unembed_apart

    cfg, params = load_params(ckpt)
    model = model_from_params(cfg, params)
    shard_model(model, make_mesh({"data": 2, "expert": 4}))
    steps = (generate_module._prefill, generate_module._decode, generate_module._unembed, generate_module.sample)
    before = [f._cache_size() for f in steps]
    assert generate(model, prompts[:2], max_new_tokens=16, stop_tokens=()) == [g[:16] for g in greedy[:2]]
    assert [f._cache_size() - n for f, n in zip(steps, before, strict=True)] == [1, 1, int(unembed_apart(2)), 1]
    from oss_jax import session as session_module

    monkeypatch.setattr(session_module, "MIN_SLOTS", 64)  # as small as the sharded batch above: less to scan
    chat = Session(model)  # a session's second turn, from the sharded cache it kept, goes on with greedy's tokens
    first = chat.generate(prompts[1], max_new_tokens=4, stop_tokens=())
    assert first == greedy[1][:4]
    assert chat.generate(prompts[1] + first, max_new_tokens=8, stop_tokens=()) == greedy[1][4:12]
    assert chat.reused == len(prompts[1]) + 3


@pytest.mark.parametrize("batch", [2, 8])
def test_sharded_steps_leave_each_rows_cache_where_it_lives(ckpt, batch):
    """data=2,expert=4: a row's MoE tokens, its attention and its KV cache share devices, so no collective of a
    decode step moves half as much as one layer's cache slice on a device (the MoE's all-to-alls carry its tokens,
    not caches). (Before: at batch 2, XLA moved row 1's whole cache to a device of data 0 and back every step; at
    batch 8 it all-gathered four rows' caches, and the logits, to every device.)"""
    cfg, params = load_params(ckpt)
    model = model_from_params(cfg, params)
    mesh = make_mesh({"data": 2, "expert": 4})
    shard_model(model, mesh)
    graph, leaves = split_model(model)
    full = next(i for i in range(cfg.num_hidden_layers) if cfg.window(i) is None)
    with jax.set_mesh(mesh):
        caches = init_cache(cfg, batch, 512)
        cache_slice = caches.k[full].addressable_shards[0].data.nbytes
        tokens = jnp.zeros((batch,), jnp.int32)
        hlo = _decode.lower(graph, leaves, tokens, tokens + 40, caches).compile().as_text()
    moved = [(op, b) for op, b in collectives(hlo) if op != "all-to-all"]
    print(f"batch {batch}: {len(moved)} collectives besides the MoE's all-to-alls, largest "
          f"{max((b for _, b in moved), default=0)} bytes, {sum(b for _, b in moved)} in all; a layer's cache slice "
          f"{cache_slice} bytes")
    assert all(b < cache_slice // 2 for _, b in moved), sorted(moved, key=lambda m: -m[1])[:4]


def test_session_reuses_the_cache_and_equals_fresh_generation(model, prompts, monkeypatch):
    """A 4-turn conversation of raw ids: each turn's output == a fresh `generate` of the whole prompt, with only
    the unshared part prefilled. Turn 2 drops the start of turn 1's completion (as harmony drops analysis), so the
    session must return to turn 1's prompt end: the sliding layer's ring (8 slots) from the snapshot there, the full
    layer's slots by position; turn 3 extends turn 2; turn 4 leaves turn 2's prompt before its end. The first cache
    (64 slots) must grow on the way."""
    from oss_jax import session as session_module

    monkeypatch.setattr(session_module, "MIN_SLOTS", 64)  # the cache `generate` picks for turns 1, 2 and 4
    n = 12
    chat = session_module.Session(model)
    p1 = prompts[0]
    new1 = chat.generate(p1, max_new_tokens=n, stop_tokens=())
    p2 = p1 + new1[4:] + prompts[1]
    new2 = chat.generate(p2, max_new_tokens=n, stop_tokens=())
    assert (chat.reused, chat.prefilled) == (len(p1), len(p2) - len(p1))
    p3 = p2 + new2 + prompts[1]
    new3 = chat.generate(p3, max_new_tokens=n, stop_tokens=())
    assert (chat.reused, chat.prefilled) == (len(p2) + n - 1, len(prompts[1]) + 1)
    slots = {c.pos.shape[1] for layer, c in enumerate(chat.caches) if model.cfg.window(layer) is None}
    assert slots == {128}  # grown from 64 (p3 + n = 65 positions)
    p4 = p2[:30] + [(p2[30] + 1) % 199_000] + prompts[2]
    new4 = chat.generate(p4, max_new_tokens=n, stop_tokens=())
    assert (chat.reused, chat.prefilled) == (len(p1), len(p4) - len(p1))
    for p, new in ((p1, new1), (p2, new2), (p3, new3), (p4, new4)):
        assert new == generate(model, [p], max_new_tokens=n, stop_tokens=())[0]
    print(f"session: 4 turns of {len(p1)}/{len(p2)}/{len(p3)}/{len(p4)} prompt tokens equal fresh generation")


def test_interrupted_session_starts_over(model, prompts, greedy, monkeypatch):
    from oss_jax import session as session_module

    monkeypatch.setattr(session_module, "MIN_SLOTS", 128)  # the shapes of test_batched_equals_one_by_one
    chat = Session(model)
    chat.generate(prompts[1], max_new_tokens=4, stop_tokens=())

    def interrupt(ids, done):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        chat.generate(prompts[1] + prompts[2], max_new_tokens=4, stop_tokens=(), on_token=interrupt)
    assert chat.tokens == [] and chat.caches is None
    assert chat.generate(prompts[0], max_new_tokens=8, stop_tokens=()) == greedy[0][:8]
    assert chat.reused == 0


def test_sampling_is_seeded_and_filters(model, prompts, greedy):
    hot = Sampling(temperature=1.5, seed=7)
    a = generate(model, prompts[:2], max_new_tokens=12, sampling=hot, stop_tokens=())
    assert a == generate(model, prompts[:2], max_new_tokens=12, sampling=hot, stop_tokens=())
    assert a != generate(model, prompts[:2], max_new_tokens=12, sampling=Sampling(1.5, seed=8), stop_tokens=())
    assert a != [g[:12] for g in greedy[:2]]
    # top-k 1 and a tiny top-p both leave only the most likely token: greedy again
    for s in (Sampling(temperature=1.5, top_k=1, seed=3), Sampling(temperature=1.5, top_p=1e-6, seed=3)):
        assert generate(model, prompts[:2], max_new_tokens=12, sampling=s, stop_tokens=()) == [g[:12] for g in
                                                                                                 greedy[:2]]


def _kept_float64(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """What temperature + top-k + top-p keep [B, V], by sorting in float64."""
    x = logits.astype(np.float64) / s.temperature
    keep = np.ones_like(x, bool)
    if s.top_k:
        keep &= x >= np.sort(x, axis=-1)[:, -s.top_k][:, None]
    if s.top_p < 1:
        order = np.argsort(-np.where(keep, x, -np.inf), axis=-1)
        p = np.where(keep, np.exp(x - x.max(axis=-1, keepdims=True)), 0.0)
        cum = np.cumsum(np.take_along_axis(p / p.sum(axis=-1, keepdims=True), order, axis=-1), axis=-1)
        nucleus = np.zeros_like(keep)
        for row, (o, n) in enumerate(zip(order, np.sum(cum < s.top_p, axis=-1) + 1, strict=True)):
            nucleus[row, o[:n]] = True
        keep &= nucleus
    return keep


@pytest.mark.parametrize("vocab", [1000, 201_088])
def test_sampling_filters_keep_what_a_sort_keeps(vocab):
    """top-k (k-th value from all k) and top-p (a bisection, no sort) keep exactly the tokens a float64 sort keeps."""
    logits = (np.random.default_rng(vocab).standard_normal((4, vocab)) * 2.5).astype(np.float32)
    for s in (Sampling(0.8, top_k=5), Sampling(1.0, top_p=0.5), Sampling(0.7, top_k=200, top_p=0.9),
              Sampling(1.3, top_p=0.95), Sampling(1.0, top_p=1e-6)):
        kept = np.isfinite(np.asarray(jax.jit(filter_logits, static_argnums=1)(jnp.asarray(logits), s)))
        print(f"V {vocab} top_k {s.top_k} top_p {s.top_p}: kept {kept.sum(axis=-1).tolist()}")
        np.testing.assert_array_equal(kept, _kept_float64(logits, s))


def test_stops_at_a_stop_token(model, prompts, greedy):
    stop = greedy[1][5]
    out = generate(model, prompts[1:2], max_new_tokens=NEW, stop_tokens=(stop,))[0]
    assert out == greedy[1][: greedy[1].index(stop) + 1]


def test_pipelined_decoding_gives_the_same_tokens(model, prompts, greedy, monkeypatch):
    """Accelerators queue each decode step before reading the sampled token back (forced here): the same tokens as
    step by step, batched with a stop token, sampled, stopped by `on_token`, and through a session whose first turn
    ended on a stop (its cache then holds that token too, which the next turn's prefill overwrites)."""
    from oss_jax import generate as generate_module
    from oss_jax import session as session_module

    hot = Sampling(temperature=1.5, seed=7)
    sampled = generate(model, prompts[:2], max_new_tokens=12, sampling=hot, stop_tokens=())
    monkeypatch.setattr(generate_module, "pipelined", lambda: True)
    stop = greedy[1][5]
    want = [g[: g.index(stop) + 1] if stop in g else g for g in greedy]
    assert generate(model, prompts, max_new_tokens=NEW, stop_tokens=(stop,)) == want
    assert generate(model, prompts[:2], max_new_tokens=12, sampling=hot, stop_tokens=()) == sampled
    calls = []

    def stop_after_four(ids, done):
        calls.append(ids)
        return np.full(len(ids), len(calls) == 4)

    assert generate(model, prompts[1:2], max_new_tokens=NEW, stop_tokens=(), on_token=stop_after_four) == [
        greedy[1][:4]]
    monkeypatch.setattr(session_module, "MIN_SLOTS", 128)
    chat = Session(model)
    assert chat.generate(prompts[1], max_new_tokens=NEW, stop_tokens=(stop,)) == greedy[1][:6]
    p2 = prompts[1] + greedy[1][:6] + prompts[2]
    assert chat.generate(p2, max_new_tokens=8, stop_tokens=()) == generate(model, [p2], max_new_tokens=8,
                                                                            stop_tokens=())[0]
    assert chat.reused == len(prompts[1]) + 5


@pytest.mark.parametrize("bad, message", [
    ([[]], "prompt 0 is empty"),
    ([[1, 2, 201088]], "token id 201088 outside the vocabulary"),
    ([[1] * 131_000], "exceed the context of 131072"),
])
def test_bad_requests_fail_before_compiling(model, bad, message):
    from oss_jax.generate import _prefill

    before = _prefill._cache_size()
    with pytest.raises(GenerationError, match=message):
        generate(model, bad, max_new_tokens=100)
    assert _prefill._cache_size() == before  # nothing was compiled


def test_steps_take_caches_not_a_list_of_layers(model):
    """A list of LayerCache (what iterating a Caches gives) is refused before compiling: it traced as another pytree
    than the steps return, so the first step compiled apart and its donated buffers aliased other layers' outputs
    (a copy of every layer's cache per step; seen in benchmarks/device_decode.py on an H100)."""
    layers = list(init_cache(model.cfg, 1, 32))
    before = (_prefill._cache_size(), _decode._cache_size())
    with pytest.raises(TypeError, match="caches must be a oss_jax.cache.Caches .* got list"):
        decode_step(model, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32), layers)
    with pytest.raises(TypeError, match="got list"):
        prefill_step(model, jnp.zeros((1, 4), jnp.int32), jnp.arange(4, dtype=jnp.int32)[None], layers)
    assert (_prefill._cache_size(), _decode._cache_size()) == before


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_generate_and_chat_take_the_same_sampling_flags(command):
    """Both commands read the model and sampling flags from one place (`chat` had no --top-k / --top-p)."""
    argv = [command, "--ckpt", "x", "--temperature", "0.7", "--top-k", "40", "--top-p", "0.9", "--seed", "5",
            "--mesh", "expert=8", "--dtype", "bf16", "--experts", "packed"]
    args = cli.build_parser().parse_args(argv)
    assert cli.sampling_of(args) == Sampling(temperature=0.7, top_k=40, top_p=0.9, seed=5)
    assert (args.mesh, args.dtype, args.experts, args.reasoning) == ("expert=8", "bf16", "packed", "medium")


def test_generate_cli_json(ckpt, capsys):
    code = cli.main(["generate", "--ckpt", str(ckpt), "--prompt", "Hello there", "--prompt", "Bonjour",
                     "--max-new-tokens", "6", "--json", "--reasoning", "low"])
    results = json.loads(capsys.readouterr().out)
    assert code == 0 and [len(r["tokens"]) <= 6 for r in results] == [True, True]
    assert results[0]["prompt_tokens"] > 10  # the harmony system + user message around the text
    raw = cli.main(["generate", "--ckpt", str(ckpt), "--prompt", "Hello there", "--raw", "--max-new-tokens", "3",
                    "--json"])
    out = json.loads(capsys.readouterr().out)
    assert raw == 0 and out[0]["prompt_tokens"] == 2 and len(out[0]["tokens"]) == 3


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_generate_cli_tools_and_conversations(ckpt, capsys, tmp_path):
    """--developer/--tools and --conversation files reach the prompt exactly as harmony renders them through
    `chat.render_conversation` (an independent path from the CLI's, which goes through the training data's
    format), and --json carries the parsed channels and tool calls."""
    from oss_jax import chat

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    base = ["generate", "--ckpt", str(ckpt), "--max-new-tokens", "2", "--json", "--reasoning", "low"]
    assert cli.main(base + ["--prompt", "Weather in Paris?", "--developer", "Be brief.", "--tools", str(tools)]) == 0
    out = json.loads(capsys.readouterr().out)[0]
    user = [{"role": "user", "content": "Weather in Paris?"}]
    assert out["prompt_tokens"] == len(chat.render_conversation(user, "low", "Be brief.", [WEATHER]))
    assert out["prompt_tokens"] > len(chat.render_conversation(user, "low")) + 20  # the tool's schema is in it
    assert isinstance(out["tool_calls"], list) and "final" in out

    turn = user + [{"role": "assistant", "recipient": "functions.get_weather", "content": {"city": "Paris"}},
                   {"role": "tool", "name": "functions.get_weather", "content": {"temp_c": 21}}]
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps({"messages": [{"role": "developer", "content": "Be brief."}] + turn,
                                "tools": [WEATHER]}))
    assert cli.main(base + ["--conversation", str(conv), "--conversation", str(conv)]) == 0
    outs = json.loads(capsys.readouterr().out)
    expected = chat.render_conversation(turn, "low", "Be brief.", [WEATHER])
    assert [o["prompt_tokens"] for o in outs] == [len(expected)] * 2 and outs[0]["prompt"] == str(conv)
    assert outs[0]["tokens"] == outs[1]["tokens"]  # greedy, same prompt: batched rows agree


@pytest.mark.parametrize("files, args, message", [
    ({"t.json": [{"description": "no name"}]}, ["--prompt", "hi", "--tools", "t.json"], r"t\.json: bad tool"),
    ({"t.json": "[\n{"}, ["--prompt", "hi", "--tools", "t.json"], r"t\.json:2: not valid JSON"),
    ({"t.json": {"name": "x"}}, ["--prompt", "hi", "--tools", "t.json"], r"t\.json: expected a non-empty JSON list"),
    ({"c.json": {"messages": [{"role": "usr", "content": "x"}]}}, ["--conversation", "c.json"],
     r"c\.json: message 1: unknown role 'usr'"),
    ({"c.json": {"turns": []}}, ["--conversation", "c.json"], r"c\.json: expected \{\"messages\""),
    ({"c.json": [{"role": "tool", "content": "21"}]}, ["--conversation", "c.json"], r"c\.json: message 1: a tool"),
    ({}, ["--prompt", "hi", "--raw", "--developer", "x"], "--raw feeds plain text"),
    ({}, [], "give either --prompt TEXT or --conversation FILE"),
])
def test_generate_cli_bad_chat_input_fails_before_loading(tmp_path, capsys, monkeypatch, files, args, message):
    import re

    monkeypatch.chdir(tmp_path)
    for name, value in files.items():
        Path(name).write_text(value if isinstance(value, str) else json.dumps(value))
    # the checkpoint does not exist: the request is checked (and refused) before anything is loaded
    assert cli.main(["generate", "--ckpt", str(tmp_path / "missing")] + args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err


def test_chat_turn_returns_tool_results_to_the_model():
    """`oss-jax chat`'s turn: a tool call gets the user's result, the model continues; completions are real
    harmony renderings of an assistant's messages (what a trained model emits after `<|start|>assistant`)."""
    from oss_jax import chat

    enc = chat.encoding()
    prefix = len(enc.encode("<|start|>assistant", allowed_special="all"))
    call = {"role": "assistant", "recipient": "functions.get_weather", "content": {"city": "Paris"}}
    replies = iter([enc.render(chat.to_message(call))[prefix:],
                    enc.render(chat.to_message({"role": "assistant", "content": "21 C in Paris."}))[prefix:]])
    prompts, asked = [], []

    def complete(messages):
        prompts.append(cli.conversation_ids({"messages": messages, "tools": [WEATHER]}, "low", "chat"))
        return next(replies)

    messages = [{"role": "user", "content": "Weather in Paris?"}]
    cli.chat_turn(messages, complete, lambda c: asked.append(c) or '{"temp_c": 21}')
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert asked[0]["recipient"] == "functions.get_weather" and json.loads(asked[0]["content"]) == {"city": "Paris"}
    assert messages[2] == {"role": "tool", "name": "functions.get_weather", "content": '{"temp_c": 21}'}
    assert messages[3]["channel"] == "final" and messages[3]["content"] == "21 C in Paris."
    second = enc.decode(prompts[1])
    assert second.endswith('<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>'
                           '{"temp_c": 21}<|end|><|start|>assistant')
    # unparsable output (random weights) still leaves a well-formed conversation
    assert cli.reply_messages([5, 6, 7]) == [{"role": "assistant", "channel": "final", "content": ""}]


def test_harmony_turns_leave_the_cached_tokens_only_where_a_reply_began():
    """What `Session` relies on: the next turn's prompt extends the last prompt + reply (all but its stop token),
    unless harmony dropped the reply's analysis, and then the two part right after the reply's start (where the
    session keeps a copy of its rings). Replies are real harmony renderings, as in the test above."""
    from oss_jax import chat

    enc = chat.encoding()
    start = len(enc.encode("<|start|>assistant", allowed_special="all"))

    def reply(*messages):
        ids = [t for m in messages for t in enc.render(chat.to_message(m))]
        return ids[start:-1] + enc.encode("<|call|>" if messages[-1].get("recipient") else "<|return|>",
                                          allowed_special="all")

    def shared(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    user = {"role": "user", "content": "Weather in Paris?"}
    think = {"role": "assistant", "channel": "analysis", "content": "Call the tool."}
    call = {"role": "assistant", "recipient": "functions.get_weather", "content": {"city": "Paris"}}
    answer = {"role": "assistant", "content": "21 C."}
    tool = {"role": "tool", "name": "functions.get_weather", "content": "21"}
    more = {"role": "user", "content": "Thanks"}
    first = chat.render_conversation([user], "low", tools=[WEATHER])
    for replied, then, kept in (([answer], [more], True), ([think, call], [tool], True),
                                ([think, answer], [more], False)):
        cached = first + reply(*replied)[:-1]
        following = chat.render_conversation([user, *replied, *then], "low", tools=[WEATHER])
        assert shared(cached, following) == (len(cached) if kept else len(first) + 1)


def test_stop_strings_end_a_prompt(ckpt, capsys):
    from oss_jax.tokenizer import load_tokenizer

    args = ["generate", "--ckpt", str(ckpt), "--prompt", "Hello there", "--raw", "--max-new-tokens", "8", "--json"]
    assert cli.main(args) == 0
    full = json.loads(capsys.readouterr().out)[0]["tokens"]
    tok = load_tokenizer(ckpt)  # read once (a 28 MB tokenizer.json: over a second per read)
    stop = tok.decode([full[2]], skip_special_tokens=False)
    assert cli.main(args + ["--stop", stop]) == 0
    cut = json.loads(capsys.readouterr().out)[0]["tokens"]
    first = next(i for i, t in enumerate(full) if stop in tok.decode(full[: i + 1]))
    assert cut == full[: first + 1]
    jax.clear_caches()  # after both CLI tests: the second reuses the first one's compiled steps


def test_chat_cli_keeps_the_conversation_and_ctrl_c_stops_a_reply(ckpt, tmp_path):
    """`oss-jax chat` with SIGINT while the first reply streams: that turn is dropped and the session starts over;
    the chat goes on, and its next turn reuses the cache back to where the reply before began. /save writes a record
    that `generate --conversation` accepts; /reset starts a new conversation."""
    saved = tmp_path / "conv.json"
    argv = ["chat", "--ckpt", str(ckpt), "--max-new-tokens", "4", "--reasoning", "low"]
    stdin = f"hello\nand again\n\nonce more\n/save {saved}\n/reset\nnew start\n/exit\n"
    with paused_command(tmp_path, "token=3", argv, stdin=stdin) as (proc, log):
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=300) == 0, log.read_text()
    out = log.read_text()
    assert out.count("assistant>") == 4 and "loaded in" in out
    assert "[stopped: this turn was dropped from the conversation]" in out
    first = cli.conversation_ids({"messages": [{"role": "user", "content": "and again"}]}, "low", "test")
    turns = [int(n) for n in re.findall(r"\[(\d+) cached tokens reused", out)]
    assert turns == [0, len(first), 0]
    record = json.loads(saved.read_text())
    (tmp_path / "one.jsonl").write_text(saved.read_text())  # one line: also a .jsonl of one training example
    assert len(data.load_examples(tmp_path / "one.jsonl", ckpt, max_len=1024)[0]) == 1
    assert [m["content"] for m in record["messages"] if m["role"] == "user"] == ["and again", "once more"]
    assert record["messages"][1]["role"] == "assistant"
    assert cli.conversation_ids(record, "low", str(saved))[: len(first)] == first
