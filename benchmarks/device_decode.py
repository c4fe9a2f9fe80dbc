"""Full-size decode on one accelerator: gpt-oss-20b / 120b shapes, random weights generated on the device.

No checkpoint and no host copy: every parameter (packed MXFP4 expert bytes, or bf16 experts) is drawn by a jitted
function straight into device memory. Then, per batch size: prefill a --context-token prompt per row (each row
alone, in chunks of --chunk: batch-1 prefill tokens/s), and time --steps decode steps (each feeding its argmax
back, nothing leaves the device). Printed:

  prefill and decode tokens/s; device memory (weights, KV cache, peak in use)
  decode as a fraction of the memory-bandwidth bound: bytes that must be read per step / streaming-read
      bandwidth, measured in the same process (a jitted sum over a 2 GiB array, best of 5)
  the expert matmul alone at decode shapes (one layer's mlp1 + mlp2 rows, random routing): each implementation
      (packed: --variants, the XLA gathered forms and Pallas kernel tilings; bf16: the XLA gathered reduction,
      an einsum in bf16 and the library's GPU form, the Pallas kernel `rowkernel.dense_matmul`), its time, its share
      of the bound and its largest difference from the first variant's output, relative to that output's largest
  with --profile N: N more decode steps traced with jax.profiler, the device time per kernel name and per step

Bytes per decode step (stored dtypes): every non-expert weight once (attention, router, norms, unembedding), one
embedding row per sequence, the experts the step routes to once each (batch 1: k per layer; batch B: the expected
number of distinct experts under uniform routing, E (1 - (1 - k/E)^B), per layer), and the KV entries visible to
each query. Not part of CI.

    python benchmarks/device_decode.py --model gpt-oss-20b --experts packed --json out.json
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python benchmarks/device_decode.py --model gpt-oss-120b --experts packed \
        --skip-matmul --no-prefill --profile 3    # the default 0.75 of an 80 GB card is too little for 120b
    python benchmarks/device_decode.py --model tiny --batches 1,2     # a smoke run anywhere (CPU too)
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # benchmarks/convert.py would shadow the `convert` package; the repository root works uninstalled too
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.bounds import min_bytes, sizes  # noqa: E402
from benchmarks.gpu_launches import launch_counts  # noqa: E402
from configs import preset_path  # noqa: E402
from oss_jax import layers, moe, mxfp4, packed, rowkernel  # noqa: E402
from oss_jax.cache import Caches, cache_bytes, init_cache  # noqa: E402
from oss_jax.config import ModelConfig  # noqa: E402
from oss_jax.generate import _decode, decode_step, prefill_step, split_model  # noqa: E402
from oss_jax.model import GptOss, abstract_model  # noqa: E402
from oss_jax.params import INIT_STD, path_name  # noqa: E402

GiB = 2**30


def device_memory() -> dict[str, int]:
    """The allocator's bytes in use and peak (empty where the backend does not report them)."""
    stats = jax.devices()[0].memory_stats() or {}
    return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


def _memory_line() -> str:
    m = device_memory()
    return f"in use {m.get('bytes_in_use', 0) / GiB:.2f} GiB, peak {m.get('peak_bytes_in_use', 0) / GiB:.2f} GiB"


def best_time(fn, reps: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def read_bandwidth(nbytes: int = 2 * GiB) -> float:
    """Streaming-read bytes/s: a jitted sum over a float32 array of `nbytes`."""
    x = jax.jit(lambda: jnp.ones((nbytes // 4 // 4096, 4096), jnp.float32))()
    total = jax.jit(jnp.sum)
    return nbytes / best_time(lambda: total(x), 5)


# ------------------------------------------------------------------ random weights, drawn on the device


def _kind(name: str) -> str:
    """How a leaf is drawn: packed bytes, packed scale codes, norm scales (ones), biases and sinks (zeros), normal."""
    if name.endswith((".blocks", ".scales")):
        return name.rsplit(".", 1)[-1]
    if name.endswith("scale"):
        return "ones"
    return "zeros" if name.endswith(("bias", "sinks")) else "normal"


def _fill(key: jax.Array, kind: str, shape: tuple[int, ...], dtype) -> jax.Array:
    if kind == "blocks":
        return jax.random.bits(key, shape, jnp.uint8)
    if kind == "scales":
        return jnp.full(shape, packed.INIT_SCALE, jnp.uint8)
    if kind in ("ones", "zeros"):
        return (jnp.ones if kind == "ones" else jnp.zeros)(shape, dtype)
    return (INIT_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


_fill_jit = jax.jit(_fill, static_argnums=(1, 2, 3))


def random_model(cfg: ModelConfig, dtype, packed_experts: bool, seed: int = 0) -> GptOss:
    """The model with every leaf drawn on the default device, one leaf at a time (peak: one float32 temporary)."""
    model = abstract_model(cfg, dtype, packed_experts)
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model))):
        var.set_value(_fill_jit(jax.random.fold_in(key, i), _kind(path_name(path)), tuple(var.shape),
                                jnp.dtype(var.dtype)))
    return model


# ------------------------------------------------------------------ the bound


def expected_distinct(e: int, k: int, batch: int) -> float:
    """Distinct experts one layer routes `batch` tokens to, k each, uniformly at random: E (1 - (1 - k/E)^B)."""
    return float(k if batch == 1 else e * (1 - (1 - k / e) ** batch))


def expert_bytes(cfg: ModelConfig, packed_experts: bool, itemsize: int) -> float:
    """Bytes of one expert's mlp1 + mlp2 kernels as stored, plus its biases (float32)."""
    s = sizes(cfg)
    per_weight = (mxfp4.BYTES_PER_GROUP + 1) / mxfp4.GROUP if packed_experts else itemsize
    return s["expert"] * per_weight + s["expert_b"] * 4


def step_bytes(cfg: ModelConfig, packed_experts: bool, itemsize: int, batch: int, position: int,
               cache_itemsize: int) -> float:
    """Bytes one decode step must read: see the module docstring."""
    distinct = [expected_distinct(cfg.num_experts, cfg.experts_per_token, batch)] * cfg.num_hidden_layers
    return min_bytes(cfg, itemsize, distinct, batch, [position] * batch,
                     expert_bytes=expert_bytes(cfg, packed_experts, itemsize), cache_itemsize=cache_itemsize)


# ------------------------------------------------------------------ the expert matmul alone


def _routing(cfg: ModelConfig, batch: int, seed: int) -> np.ndarray:
    """Group sizes [E] of `batch` tokens routed to k distinct random experts each."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(cfg.num_experts, cfg.experts_per_token, replace=False) for _ in range(batch)])
    return np.bincount(ids.reshape(-1), minlength=cfg.num_experts).astype(np.int32)


def _compiled_ops(fn, *args) -> str:
    """What the compiled computation launches at its top level: op name -> count (fusions, gathers, loops)."""
    return _ops_of(fn.lower(*args).compile().as_text() or "")


def _ops_of(text: str) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(launch_counts(text).items()))


def _gathered_bytes(x, w, group_sizes):
    """The gathered packed matmul reading bytes (low and high nibbles apart) instead of 32-bit words."""
    e, width, n = w.shape
    a, g = x.shape[0], width // mxfp4.GROUP
    ids, valid = rowkernel.row_experts(group_sizes, a)
    even, odd = (h.astype(jnp.float32).reshape(a, 1, g, 16) for h in packed.split_columns(x))
    blocks = w.blocks[ids]
    half = packed._half_scale(w.scales[ids])[..., None]
    y = jnp.sum((packed._twice_fp4(blocks & 15) * even + packed._twice_fp4(blocks >> 4) * odd) * half, axis=(2, 3))
    return jnp.where(valid[:, None], y, 0.0)


def _gathered_rows(x, w, group_sizes):
    """The gathered packed matmul as one reduction per row (its expert taken by a dynamic slice, not a gather)."""
    e, width, n = w.shape
    a, g = x.shape[0], width // mxfp4.GROUP
    ids, valid = rowkernel.row_experts(group_sizes, a)
    words = jax.lax.bitcast_convert_type(w.blocks.reshape(e, n, g, 4, 4), jnp.uint32)
    shifts = 4 * jnp.arange(8, dtype=jnp.uint32)
    out = []
    for r in range(a):
        codes = (jax.lax.dynamic_index_in_dim(words, ids[r], keepdims=False)[..., None] >> shifts) & 15
        half = packed._half_scale(jax.lax.dynamic_index_in_dim(w.scales, ids[r], keepdims=False))[..., None, None]
        xs = x[r].astype(jnp.float32).reshape(1, g, 4, 8)
        out.append(jnp.sum(packed._twice_fp4(codes) * xs * half, axis=(1, 2, 3)))
    return jnp.where(valid[:, None], jnp.stack(out), 0.0)


def _decoding_with(matmul, name: str, decode):
    """`matmul` with `packed.<name>` (its fp4 decoding) swapped for `decode` while it traces: the decoding's share
    of its time."""
    def swapped(x, w, group_sizes):
        saved = getattr(packed, name)
        setattr(packed, name, decode)
        try:
            return matmul(x, w, group_sizes)
        finally:
            setattr(packed, name, saved)
    return swapped


def _dense_einsum(x, w, group_sizes):
    """Dense experts' few-rows matmul with the gathered weights kept in their dtype (float32 accumulation), where
    `moe.gathered_matmul` multiplies them upcast to float32."""
    ids, valid = rowkernel.row_experts(group_sizes, x.shape[0])
    y = jnp.einsum("AD,ADN->AN", x.astype(w.dtype), w[ids], preferred_element_type=jnp.float32)
    return jnp.where(valid[:, None], y, 0.0)


DENSE = {"gathered": moe.gathered_matmul, "einsum": _dense_einsum, "kernel": rowkernel.dense_matmul}

# kernel-R{block_rows}-G{step_groups}-P{programs}-W{warps}[-L{loads}]: `packed.kernel_matmul` tilings (its
# decoding: --kernel-decode)
KERNELS = [(64, 2, 2048, 4), (128, 2, 2048, 8), (256, 2, 1024, 8), (32, 2, 8192, 2), (128, 2, 4096, 4),
           (128, 1, 2048, 8), (64, 4, 2048, 4), (64, 2, 512, 4), (32, 2, 1024, 4), (128, 2, 512, 8),
           (64, 2, 256, 4), (32, 2, 512, 2), (16, 2, 2048, 2), (128, 2, 2048, 4), (128, 2, 1024, 4),
           (64, 2, 1024, 4), (64, 2, 4096, 4), (64, 2, 2048, 8), (64, 2, 2048, 2)]
KERNELS += [(64, 2, 2048, 4, 3), (64, 2, 2048, 4, 5), (64, 2, 1024, 4, 5), (128, 2, 2048, 4, 3), (64, 2, 2048, 8, 5),
            (128, 2, 1024, 8, 5), (64, 2, 512, 4, 5), (32, 2, 2048, 4, 5)]  # -L{loads}
GATHERED = {"words": packed.gathered_matmul, "bytes": _gathered_bytes, "rows": _gathered_rows,
            "wordsbits": _decoding_with(packed.gathered_matmul, "_twice_fp4", packed.twice_fp4_bits),
            "kernel": packed.kernel_matmul,
            **{f"kernel-{d}": functools.partial(packed.kernel_matmul, decode=d) for d in packed.KERNEL_DECODES},
            "kernelfloat": _decoding_with(functools.partial(packed.kernel_matmul, decode="bits"), "twice_fp4_bits",
                                          packed._twice_fp4),
            **{f"kernel-R{r}-G{g}-P{p}-W{wp}" + (f"-L{k[0]}" if k else ""):
               functools.partial(packed.kernel_matmul, block_rows=r, step_groups=g, programs=p, warps=wp,
                                 loads=k[0] if k else 1)
               for r, g, p, wp, *k in KERNELS}}


def expert_matmuls(cfg: ModelConfig, dtype, packed_experts: bool, batches: list[int], bandwidth: float,
                   reps: int, looped: bool, hlo_dir: Path | None, variants: list[str], traced: int = 0) -> list[dict]:
    """One layer's mlp1 then mlp2 grouped matmuls at decode shapes, each implementation timed alone (wall time, and
    with `traced` the device time of its kernels over that many traced calls: the wall time of one small call is
    mostly the dispatch)."""
    d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    key = jax.random.key(1)
    if packed_experts:
        w1 = packed.MXFP4(_fill_jit(key, "blocks", (e, 2 * f, d // 32, 16), jnp.dtype(jnp.uint8)),
                          _fill_jit(key, "scales", (e, 2 * f, d // 32), jnp.dtype(jnp.uint8)))
        w2 = packed.MXFP4(_fill_jit(key, "blocks", (e, d, f // 32, 16), jnp.dtype(jnp.uint8)),
                          _fill_jit(key, "scales", (e, d, f // 32), jnp.dtype(jnp.uint8)))
        impls = {f"gathered-{k}": v for k, v in GATHERED.items()
                 if k in variants or any(v.endswith("*") and k.startswith(v[:-1]) for v in variants)}
        if looped:
            impls["looped"] = lambda x, w, g: packed.looped_matmul(x, w, g, dtype)
            impls["fixed"] = lambda x, w, g: packed.fixed_loop_matmul(x, w, g, dtype)
    else:
        w1 = _fill_jit(key, "normal", (e, d, 2 * f), jnp.dtype(dtype))
        w2 = _fill_jit(key, "normal", (e, f, d), jnp.dtype(dtype))
        impls = dict(DENSE)
    rows = []
    for batch in batches:
        group_sizes = jnp.asarray(_routing(cfg, batch, seed=batch))
        a = batch * cfg.experts_per_token
        x1 = jax.random.normal(key, (a, d), jnp.float32).astype(dtype)
        x2 = jax.random.normal(key, (a, f), jnp.float32).astype(dtype)
        distinct = int(np.count_nonzero(np.asarray(group_sizes)))
        need = distinct * (expert_bytes(cfg, packed_experts, jnp.dtype(dtype).itemsize) - sizes(cfg)["expert_b"] * 4)
        reference = None
        for name, impl in impls.items():
            step = jax.jit(lambda x1, x2, g, w1, w2, impl=impl: (impl(x1, w1, g), impl(x2, w2, g)))
            try:
                seconds = best_time(lambda step=step, x1=x1, x2=x2, gs=group_sizes: step(x1, x2, gs, w1, w2), reps)
            except Exception as err:  # noqa: BLE001 - one failing variant must not end the run
                print(f"  expert matmul b{batch} {name:28s} failed: {type(err).__name__}: {str(err)[:300]}",
                      flush=True)
                continue
            rows.append({"batch": batch, "impl": name, "rows": a, "distinct_experts": distinct,
                         "seconds": seconds, "bytes": need, "fraction_of_bound": need / bandwidth / seconds,
                         "ops": _compiled_ops(step, x1, x2, group_sizes, w1, w2)})
            kernels = ""
            if traced:
                def calls(step=step, x1=x1, x2=x2, gs=group_sizes):
                    for _ in range(traced):
                        jax.block_until_ready(step(x1, x2, gs, w1, w2))
                totals = kernel_times(calls)[0]
                busy = sum(t for t, _ in totals.values()) / traced / 1e9
                if busy:  # a host backend (CPU) records no device kernels
                    rows[-1]["device_seconds"] = busy
                    kernels = (f"device {busy * 1e6:7.1f} us ({need / bandwidth / busy:4.2f} of bound, "
                               f"{sum(c for _, c in totals.values()) / traced:.0f} kernels)  ")
            if hlo_dir is not None and batch == 1:
                text = step.lower(x1, x2, group_sizes, w1, w2).compile().as_text()
                (hlo_dir / f"hlo_matmul_{name}.txt").write_text(text)
            out = np.concatenate([np.asarray(y, np.float32) for y in step(x1, x2, group_sizes, w1, w2)], axis=1)
            if reference is None:
                reference = out  # the first implementation's: every other one is checked against it, here
            rows[-1]["max_rel_diff"] = diff = float(np.abs(out - reference).max() / np.abs(reference).max())
            print(f"  expert matmul b{batch} {name:28s} {seconds * 1e6:9.1f} us  {kernels}{need / 2**20:8.1f} MiB  "
                  f"{need / bandwidth / seconds:5.2f} of bound  max|Δ| {diff:.1e}  [{rows[-1]['ops']}]", flush=True)
    return rows


# ------------------------------------------------------------------ prefill + decode


def prefill_rows(model: GptOss, cfg: ModelConfig, prompt: np.ndarray, slots: int, chunk: int, cache_dtype
                 ) -> tuple[jax.Array, list]:
    """Prefill each row of prompt [B, C] alone (one compiled batch-1 chunk step for every batch size), then stack
    the rows' caches: the last logits [B, V] and the batch's cache."""
    rows, model = [], split_model(model)
    for row in prompt:
        caches = init_cache(cfg, 1, slots, cache_dtype)
        for c in range(0, prompt.shape[1], chunk):
            pos = jnp.arange(c, c + chunk, dtype=jnp.int32)[None]
            logits, caches = prefill_step(model, jnp.asarray(row[None, c:c + chunk]), pos, caches)
        rows.append((logits, caches))
    return (jnp.concatenate([r[0] for r in rows]),
            jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *[r[1] for r in rows]))


def random_cache(cfg: ModelConfig, batch: int, context: int, slots: int, cache_dtype) -> Caches:
    """A cache as a prefill of `context` tokens leaves it, holding random keys and values. (As a list of layers it
    made the first decode step compile for another pytree than the steps return: its outputs then aliased other
    layers' buffers, copied every step, and the steps after it compiled again.)"""
    key = jax.random.key(2)
    pos = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (batch, context))
    shape = (batch, context, cfg.num_key_value_heads, cfg.head_dim)
    kv = jax.random.normal(key, shape, jnp.float32).astype(cache_dtype)
    return Caches.of([c.write(kv, kv, pos) for c in init_cache(cfg, batch, slots, cache_dtype)])


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=4)
def greedy_steps(graph, leaves, tokens, positions, caches, k: int):
    """k greedy decode steps in one call (a loop on the device): tokens [B] at positions [B] -> the next k [B, k]."""
    model = graph.merge(leaves)

    def one(i, carry):
        out, caches = carry
        hidden, caches = model.hidden(out[:, i - 1][:, None], (positions + i - 1)[:, None], caches)
        token = jnp.argmax(model.unembed_logits(hidden[:, 0]), axis=-1).astype(jnp.int32)
        return out.at[:, i].set(token), caches

    out = jnp.zeros((tokens.shape[0], k + 1), jnp.int32).at[:, 0].set(tokens)
    out, caches = jax.lax.fori_loop(1, k + 1, one, (out, caches))
    return out[:, 1:], caches


def dispatch_time(parts: tuple, tokens, positions, caches, calls: int = 20) -> float:
    """Seconds per call of a jitted function that takes the decode step's arguments (the model as `parts`, a
    static first one and arrays) and does nothing: the host's cost of hashing, flattening and passing them."""
    fn = jax.jit(lambda static, arrays, tokens, positions, caches: tokens, static_argnums=0)
    jax.block_until_ready(fn(*parts, tokens, positions, caches))
    t0 = time.perf_counter()
    for _ in range(calls):
        out = fn(*parts, tokens, positions, caches)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / calls


def run_batch(model: GptOss, cfg: ModelConfig, batch: int, args, cache_dtype) -> dict:
    context, steps, chunk = args.context, args.steps, min(args.chunk, args.context)
    slots = -(-(context + steps + args.warmup) // 256) * 256
    prompt = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, context)).astype(np.int32)
    first_prefill = prefill_s = float("nan")
    if args.prefill:
        t0 = time.perf_counter()
        jax.block_until_ready(prefill_rows(model, cfg, prompt[:1], slots, chunk, cache_dtype))  # compiles (once)
        first_prefill = time.perf_counter() - t0
        print(f"  after the first prefill: {_memory_line()}", flush=True)
        t0 = time.perf_counter()
        logits, caches = jax.block_until_ready(prefill_rows(model, cfg, prompt, slots, chunk, cache_dtype))
        prefill_s = time.perf_counter() - t0
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        caches = random_cache(cfg, batch, context, slots, cache_dtype)
        tokens = jnp.asarray(prompt[:, -1])
    if args.hlo_dir is not None and batch == 1:
        compiled = _decode.lower(*split_model(model), tokens, jnp.full((batch,), context, jnp.int32), caches).compile()
        text = compiled.as_text()
        (args.hlo_dir / "hlo_decode.txt").write_text(text)
        print(f"  decode step launches: [{_ops_of(text)}]", flush=True)

    position = jnp.full((batch,), context, jnp.int32)
    unsplit = nnx.split(model)  # (graphdef, nnx.State): how the steps took the model before SplitModel held leaves
    model = split_model(model)  # once: nnx.split per step would cost more than the step
    t0 = time.perf_counter()
    for i in range(args.warmup):
        logits, caches = decode_step(model, tokens, position + i, caches)
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    jax.block_until_ready(tokens)
    warm_s = time.perf_counter() - t0
    print(f"  after {args.warmup} decode steps (the first compiles): {_memory_line()}", flush=True)
    t0 = time.perf_counter()
    for i in range(steps):
        logits, caches = decode_step(model, tokens, position + args.warmup + i, caches)
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    issue_s = (time.perf_counter() - t0) / steps  # the host's share: equal to decode_s when the host is the limit
    jax.block_until_ready(tokens)
    decode_s = (time.perf_counter() - t0) / steps
    dispatch_s, unsplit_s = (dispatch_time(parts, tokens, position, caches) for parts in (model, unsplit))
    print(f"  host: {issue_s * 1e3:.2f} ms/step to issue the steps; a jitted function of the same arguments that does "
          f"nothing: {dispatch_s * 1e3:.2f} ms per call ({unsplit_s * 1e3:.2f} ms with an nnx GraphDef and State)",
          flush=True)
    fused = {}
    if args.fused_steps:
        k = args.fused_steps
        start = position + args.warmup + steps
        new, caches = jax.block_until_ready(greedy_steps(*model, tokens, start, caches, k))  # compiles
        t0 = time.perf_counter()
        for i in range(1, steps // k + 1):
            new, caches = greedy_steps(*model, new[:, -1], start + i * k, caches, k)
        jax.block_until_ready(new)
        tokens = new[:, -1]
        fused = {"fused_steps": k, "fused_tok_s": batch * k * (steps // k) / (time.perf_counter() - t0)}
        print(f"  {k} greedy steps per call (fori_loop): {fused['fused_tok_s']:.1f} tok/s", flush=True)
    if args.profile and batch == int(args.batches.split(",")[0]):
        def more_steps():
            nonlocal tokens, caches
            for i in range(args.profile):
                logits, caches = decode_step(model, tokens, position + args.warmup + steps + i, caches)
                tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            jax.block_until_ready(tokens)
        profile_steps(more_steps, args.profile)
    return {"batch": batch, "context": context, "cache_slots": slots, "cache_bytes": cache_bytes(caches),
            "prefill_tok_s": batch * context / prefill_s, "prefill_first_s": first_prefill,
            "decode_warmup_s": warm_s, "decode_step_s": decode_s, "decode_tok_s": batch / decode_s,
            "issue_step_s": issue_s, "dispatch_s": dispatch_s, "dispatch_nnx_s": unsplit_s, **fused,
            "mid_position": context + args.warmup + steps // 2}


def kernel_times(run) -> tuple[dict[str, list[float]], float, str]:
    """Trace `run` with jax.profiler: per kernel name its device time (ns) and launches, the wall time (s) and the
    device planes' stream lines (memory copies left out of the kernels)."""
    import tempfile

    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            run()
        wall = time.perf_counter() - t0
        [path] = Path(d).rglob("*.xplane.pb")
        data = ProfileData.from_file(str(path))
    totals: dict[str, list[float]] = {}
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            name = line.name.lower()  # e.g. "Stream #14(Compute)", "Stream #14(MemcpyD2D,Compute)"
            if "stream" not in name or ("memcpy" in name and "compute" not in name):
                continue
            for ev in line.events:
                t = totals.setdefault(ev.name, [0.0, 0])
                t[0] += ev.duration_ns
                t[1] += 1
    lines = "; ".join(f"{p.name}: {', '.join(x.name for x in p.lines)}" for p in data.planes
                      if p.name.startswith("/device:"))
    return totals, wall, lines


def profile_steps(run, steps: int, top: int = 14) -> None:
    """Trace `run` (`steps` decode steps) and print, per step, the device's kernel time by kernel name (the largest
    `top`), the sum over all kernels and the wall time: what the step spends where."""
    totals, wall, lines = kernel_times(run)
    busy, launches = sum(t for t, _ in totals.values()), sum(c for _, c in totals.values())
    print(f"  profile of {steps} steps: kernels {busy / steps / 1e6:.2f} ms/step, {launches / steps:.0f} launches/step;"
          f" wall {wall / steps * 1e3:.2f} ms/step (traced); device lines: {lines[:600]}", flush=True)
    for name, (t, c) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"    {t / steps / 1e3:8.1f} us/step  {c / steps:5.1f}x  {name[:90]}", flush=True)


def decode_runs(cfg: ModelConfig, dtype, packed_experts: bool, batches: list[int], bandwidth: float, args,
                result: dict) -> list[dict]:
    """Draw the model on the device, then per batch size: prefill (or a random cache) and timed decode steps."""
    t0 = time.perf_counter()
    model = random_model(cfg, dtype, packed_experts)
    weights = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model)))
    jax.block_until_ready(nnx.state(model))
    result.update(weights_bytes=weights, build_s=time.perf_counter() - t0, memory_after_build=device_memory())
    print(f"weights on device: {weights / GiB:.2f} GiB (drawn in {result['build_s']:.1f} s); "
          f"allocator {result['memory_after_build']}", flush=True)

    runs = []
    for batch in batches:
        r = run_batch(model, cfg, batch, args, dtype)
        need = step_bytes(cfg, packed_experts, dtype.itemsize, batch, r["mid_position"], dtype.itemsize)
        r.update(step_bytes=need, bound_tok_s=batch * bandwidth / need,
                 fraction_of_bound=r["decode_tok_s"] / (batch * bandwidth / need), memory=device_memory())
        runs.append(r)
        print(f"batch {batch}: prefill {r['prefill_tok_s']:8.0f} tok/s (first call {r['prefill_first_s']:.1f} s); "
              f"decode {r['decode_tok_s']:8.1f} tok/s ({r['decode_step_s'] * 1e3:.2f} ms/step; bound "
              f"{r['bound_tok_s']:.1f} tok/s from {need / 2**20:.0f} MiB/step -> {r['fraction_of_bound']:.2f} of "
              f"it); cache {r['cache_bytes'] / GiB:.2f} GiB; peak in use "
              f"{r['memory'].get('peak_bytes_in_use', 0) / GiB:.2f} GiB", flush=True)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt-oss-20b", help="a preset (gpt-oss-20b, gpt-oss-120b, tiny) or config.json")
    p.add_argument("--experts", choices=["packed", "bf16"], default="packed",
                   help="packed MXFP4 expert bytes, or experts stored in --dtype")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="the other weights, the cache")
    p.add_argument("--batches", default="1,8", help="decode batch sizes")
    p.add_argument("--context", type=int, default=1024, help="prompt tokens per row before decoding")
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk length")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=3, help="decode steps before timing (the first compiles)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions of each expert matmul (best)")
    p.add_argument("--skip-matmul", action="store_true", help="no expert-matmul timings")
    p.add_argument("--matmul-only", action="store_true", help="only the expert-matmul timings (no model)")
    p.add_argument("--variants", default="words,kernel,kernel-*",
                   help="packed few-rows matmuls to time, the first checked against (NAME* for every NAME...): "
                        + ", ".join(GATHERED))
    p.add_argument("--looped", action="store_true", help="also time the packed many-rows matmuls at decode shapes "
                   "(looped: CPU's; fixed: accelerators' for prefill)")
    p.add_argument("--gathered", choices=["auto", "default", *GATHERED], default="default",
                   help="the packed few-rows matmul the model uses (default: the library's choice; auto: the "
                        "fastest at the first batch size in the timings)")
    p.add_argument("--row-kernel-rows", type=int, default=None, help="the model's attention projections take the "
                   f"row kernel up to this many rows on one GPU (0: never; library default {layers.ROW_KERNEL_ROWS})")
    p.add_argument("--kernel-rows-per-expert", type=int, default=None, help="packed experts take the kernel up to "
                   f"this many rows per expert on GPUs (default {packed.KERNEL_ROWS_PER_EXPERT})")
    p.add_argument("--kernel-decode", choices=packed.KERNEL_DECODES, default=None, help="how the packed kernel "
                   f"decodes fp4, for the model and the kernel-R* tilings (default {packed.KERNEL_DECODE})")
    p.add_argument("--fused-steps", type=int, default=0, help="also time greedy decoding of this many steps per "
                   "call (a fori_loop on the device: the host issues one call per that many tokens)")
    p.add_argument("--no-prefill", dest="prefill", action="store_false",
                   help="decode from a cache of random keys/values instead of a timed prefill (no prefill compile)")
    p.add_argument("--profile", type=int, default=0, help="trace this many more decode steps at the first batch "
                   "size and print the device time per kernel")
    p.add_argument("--matmul-profile", type=int, default=0, help="also trace this many calls of each expert "
                   "matmul and print its kernels' device time (--gathered auto then picks by it)")
    p.add_argument("--hlo-dir", type=Path, default=None, help="write compiled HLO of the decode step here")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    if args.hlo_dir is not None:
        args.hlo_dir.mkdir(parents=True, exist_ok=True)

    if args.row_kernel_rows is not None:
        layers.ROW_KERNEL_ROWS = args.row_kernel_rows
    if args.kernel_decode is not None:
        packed.KERNEL_DECODE = args.kernel_decode
    if args.kernel_rows_per_expert is not None:
        packed.KERNEL_ROWS_PER_EXPERT = args.kernel_rows_per_expert
    cfg = ModelConfig.from_file(preset_path(args.model))
    dtype, packed_experts = jnp.dtype(args.dtype), args.experts == "packed"
    batches = [int(b) for b in args.batches.split(",")]
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}; model {args.model}, "
          f"experts {args.experts}, other weights and cache {args.dtype}", flush=True)
    bandwidth = read_bandwidth()
    print(f"streaming read: {bandwidth / 1e9:.0f} GB/s", flush=True)
    result = {"device": dev.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
              "model": args.model, "experts": args.experts, "dtype": args.dtype, "read_bandwidth": bandwidth}
    if not args.skip_matmul:
        result["expert_matmul"] = timed = expert_matmuls(cfg, dtype, packed_experts, batches, bandwidth, args.reps,
                                                         args.looped, args.hlo_dir, args.variants.split(","),
                                                         args.matmul_profile)
        gc.collect()  # its weights
        if packed_experts and args.gathered == "auto":
            best = min((r for r in timed if r["batch"] == batches[0] and r["impl"].startswith("gathered-")),
                       key=lambda r: r.get("device_seconds", r["seconds"]))
            args.gathered = best["impl"].removeprefix("gathered-")
    if packed_experts and args.gathered not in ("auto", "default"):
        # what packed.grouped_matmul calls for few rows: the kernel on GPUs, the gathered form on other accelerators
        packed.gathered_matmul = packed.kernel_matmul = GATHERED[args.gathered]
        result["gathered"] = args.gathered
        print(f"model's packed gathered matmul: {args.gathered}", flush=True)

    if not args.matmul_only:
        result["runs"] = decode_runs(cfg, dtype, packed_experts, batches, bandwidth, args, result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
