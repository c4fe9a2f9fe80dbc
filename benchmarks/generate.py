"""Generation speed: prefill and decode tokens/s of oss-jax vs HF transformers (torch), same config, same weights.

One run writes one random checkpoint (`convert.synthetic.make_checkpoint`, MXFP4 experts as published; kept and
reused with --workdir) and measures, each in its own subprocess so that only one model is in memory at a time
(peak RSS of each printed):
  bandwidth   streaming-read GB/s: a jitted JAX sum and a numpy sum over a 2 GiB float32 array, a JAX GEMV
              [1, D] x [V', D] over the same 2 GiB, and a JAX GEMV [V'] x [V', D] taken 180 rows of the contraction
              at a time as the CPU expert product of one row is (the best of the four: HF's bound below)
  ours fp32   `oss_jax.generate.prefill_step` (one chunk of --prefill tokens, batch 1, logits of the last position)
              and `decode_step` (batch 1, 2 and 8, one token per row after a --context-token prompt), plus XLA's cost
              analysis of both steps compiled. At batch 1, the two JAX GEMV reads of a separate 2 GiB array before
              and after each timed decode step: each step's bound uses the faster read on each side of it
  HF fp32     transformers GptOssForCausalLM (eager attention, MXFP4 dequantized while loading, experts
  HF bf16     implementation --hf-experts), torch threads = cores; prefill with logits_to_keep=1 (like ours), decode
              with the returned cache. bf16 is skipped where torch has no fast bf16 GEMM (no avx512_bf16 / AMX)
Times are the best of the timed repetitions (other processes share the machine; each row also prints the share of
the cores the process got while timed). Then: ratios, decode batch 1 as a fraction of the memory-bandwidth bound,
and FLOPs / bytes per token from XLA's cost analysis against the minimum for the active parameters. Not part of CI.

    python benchmarks/generate.py            # 20b-shaped slice: full width, 2 layers, real vocab (~5 min; RSS 14/18 GB)
    python benchmarks/generate.py --tiny     # the tiny preset (~1 min, mostly start-up and compiling)
    python benchmarks/generate.py --skip-hf  # this project only

Bandwidth bound for decode at batch 1 (stored dtype s bytes; biases, sinks, norms float32):
  bytes/token = sum over layers [ attention kernels (D*N*H + 2*D*K*H + N*H*D)*s + their biases and sinks
                                  + router D*E*s + E*4 + k * (expert kernels (D*2F + F*D)*s + biases (2F + D)*4)
                                  + two norms 2*D*4 + the KV cache keys and values it attends to, 2*keys*K*H*4 ]
                + unembedding V*D*s + one embedding row D*s + final norm D*4
  bound tok/s = streaming bandwidth / bytes/token;   fraction = measured tok/s / bound.
Ours: the median over the timed steps of (bytes/token / the bandwidth read next to the step, the mean over the reads
just before and after it) / the step's time, the target's number: this machine's read bandwidth moves by up to 1.5x
within minutes (2 cores of a shared host), so a bandwidth read in another process minutes earlier is no bound (one
run measured 1.33 of it).
Also printed: the best step against the separate run's best read, the only form HF gets (torch, another process).
Minimum FLOPs per token: 2 * (active matmul parameters: attention kernels + router + k experts per layer, plus the
unembedding for every token whose logits are computed: all of decode, 1/P of a prefill chunk) + the causal
attention scores 4*N*H*visible keys per layer. Minimum bytes per step: every shared weight once, the distinct routed
experts once, the embedding rows and visible KV entries. XLA's HloCostAnalysis counts each while-loop body once, and
the CPU grouped matmul (`oss_jax.moe.tiled_grouped_matmul`) loops over tiles of one expert each (full tiles plus a
rounded-up remainder per expert) and, inside a tile, over weight chunks (with a head, `moe.head_rows`: each expert's
first A/E rows in one batched product, only the rest in tiles): so "CA + loops" takes out what the cost analysis
counts for the grouped matmuls (each compiled alone at the same shapes) and adds the work of the products that the
actual routing of the benchmark's tokens makes: per tile, and for the head, its rows x the weights, its weights read
once, its rows read and written.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# `python benchmarks/generate.py` puts this folder first on sys.path, where benchmarks/convert.py would shadow the
# `convert` package: the repository root instead
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402

from benchmarks.bounds import min_bytes, min_flops, sizes  # noqa: E402
from configs import preset_path  # noqa: E402
from oss_jax.config import FULL, SLIDING, ModelConfig  # noqa: E402

GiB = 2**30
BELOW_MINIMUM = 0.98  # a cost-analysis count under this fraction of the minimum is an accounting error, not a success


# ------------------------------------------------------------------ shared helpers


def bench_config(tiny: bool) -> ModelConfig:
    if tiny:
        return ModelConfig.from_file(preset_path("tiny"))
    return dataclasses.replace(ModelConfig.from_file(preset_path("gpt-oss-20b")), num_hidden_layers=2,
                               layer_types=(SLIDING, FULL))


def workload(cfg: ModelConfig, args) -> dict[str, np.ndarray]:
    """The token ids both implementations see (seeded): a prefill chunk, decode prompts and decode inputs."""
    rng = np.random.default_rng(0)
    out = {"prefill": rng.integers(0, cfg.vocab_size, size=(1, args.prefill))}
    for b in args.batches:
        out[f"prompt{b}"] = rng.integers(0, cfg.vocab_size, size=(b, args.context))
        out[f"steps{b}"] = rng.integers(0, cfg.vocab_size, size=(args.warmup + args.steps, b))
    return out


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Timer:
    """Wall times of timed calls, and the share of this machine's cores this process got meanwhile (CPU time /
    wall time / cores: well below 1 means other processes took cores during the measurement)."""

    def __init__(self):
        self.times: list[float] = []
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Timer:
        self._c0, self._t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        dt = time.perf_counter() - self._t0
        self.times.append(dt)
        self.wall += dt
        self.cpu += time.process_time() - self._c0

    def summary(self) -> dict:
        return {"best_s": min(self.times), "median_s": statistics.median(self.times),
                "cpu_share": self.cpu / self.wall / (os.cpu_count() or 1)}


def best_time(fn, reps: int) -> float:
    timer = Timer()
    for _ in range(reps):
        with timer:
            fn()
    return min(timer.times)


def hf_model(ckpt: Path, dtype, experts: str = "default"):
    """transformers' GptOssForCausalLM from a checkpoint: eager attention, MXFP4 dequantized while loading, every
    weight in `dtype` (a torch dtype); `experts`: its experts_implementation, or "default"."""
    import transformers

    kwargs = {} if experts == "default" else {"experts_implementation": experts}
    model = transformers.GptOssForCausalLM.from_pretrained(
        str(ckpt), dtype=dtype, attn_implementation="eager",
        quantization_config=transformers.Mxfp4Config(dequantize=True), **kwargs)
    return model.to(dtype).eval()


# ------------------------------------------------------------------ workers (each in its own process)


READ_ROWS, READ_CHUNK = 2880, 180  # a read array's row (the unembedding's D) and the chunked GEMV's contraction chunk


def read_array():
    """A 2 GiB float32 array [V', D] of ones (D = 2,880: the unembedding's shape) to time streaming reads of."""
    import jax
    import jax.numpy as jnp

    n = 2 * GiB // 4 // (READ_ROWS * READ_CHUNK) * READ_CHUNK
    return jax.jit(lambda: jnp.full((n, READ_ROWS), 1.0, jnp.float32))()


def gemv_reads(x) -> dict:
    """The two JAX reads of a `read_array` x, by name, as functions of x: a GEMV [1, D] x [V', D] and a GEMV
    [V'] x [V', D] taken 180 rows of the contraction at a time, as the CPU expert product of one row is
    (`moe._switch_dot`): [V'/C, C, D], one batched product of C-term dots, summed. (The vectors are arguments of the
    jitted products: as constants of the trace, XLA could rewrite a product with ones into a reduction.)"""
    import jax
    import jax.numpy as jnp

    g = x.shape[0] // READ_CHUNK
    gemv = jax.jit(lambda v, x: jnp.einsum("BD,VD->BV", v, x))
    chunked = jax.jit(lambda v, x: jnp.einsum("GC,GCD->GD", v, x.reshape(g, READ_CHUNK, READ_ROWS)).sum(0))
    return {"jax_gemv": functools.partial(gemv, jnp.ones((1, READ_ROWS), x.dtype)),
            "jax_chunked_gemv": functools.partial(chunked, jnp.ones((g, READ_CHUNK), x.dtype))}


def read_gbps(fn, x, reps: int, warm: bool = True) -> float:
    """Best GB/s of `fn(x)` reading x whole, over `reps` calls (after one warm-up call unless not `warm`)."""
    import jax

    if warm:
        jax.block_until_ready(fn(x))
    return x.nbytes / best_time(lambda: jax.block_until_ready(fn(x)), reps) / 1e9


def faster_read(reads: dict, x) -> float:
    """GB/s of the faster of `reads` (`gemv_reads`), each called once on x."""
    return max(read_gbps(fn, x, 1, warm=False) for fn in reads.values())


def worker_bandwidth(args) -> dict:
    import jax
    import jax.numpy as jnp

    x = read_array()
    res = {"jax_sum_GBps": read_gbps(jax.jit(jnp.sum), x, 5)}
    res.update({f"{name}_GBps": read_gbps(fn, x, 5) for name, fn in gemv_reads(x).items()})
    n = x.size
    x.delete()
    res["numpy_sum_GBps"] = read_gbps(np.sum, np.ones(n, np.float32), 3)
    res["best_GBps"] = max(res.values())
    return res


class LazyParams(Mapping):
    """Model parameters by name, each converted from the checkpoint when asked for (float32 numpy, then dropped).

    `convert.reader.load_params` holds every float32 parameter at once and `model_from_params` then copies them:
    ~2x the model's 11 GB at the 20b-slice shape. Read one at a time, the peak stays near one copy. `packed`: MXFP4
    expert kernels as their stored blocks and scales (`NAME.blocks`, `NAME.scales`), for packed experts.
    """

    def __init__(self, path: Path, packed: bool = False):
        from convert import layouts
        from convert.reader import CheckpointReader

        self.reader = CheckpointReader(path)
        self.reader.validate()
        self.rules = {r.param: r for r in layouts.hf_rules(self.reader.config, packed=self.reader.packed)}
        self.raw = {f"{r.param}.{part}": source for r in self.rules.values() if packed and len(r.sources) == 2
                    for part, source in zip(("blocks", "scales"), r.sources, strict=True)}
        self.names = [n for n in self.rules if f"{n}.blocks" not in self.raw] + list(self.raw)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.raw:
            return np.asarray(self.reader.get_hf(self.raw[name]))
        rule = self.rules[name]
        sources = [np.asarray(self.reader.get_hf(s)) for s in rule.sources]
        sources = [s if s.dtype == np.uint8 else s.astype(np.float32) for s in sources]
        return rule.load(self.reader.config, *sources)


def expert_tiles(ids: np.ndarray, num_experts: int) -> tuple[int, int, int]:
    """The expert products `oss_jax.moe.grouped_matmul` runs on CPU for expert ids [A] (one layer, one step, all A
    rows routed, as in `moe_local`): -> (rows multiplied, padding included; expert weight reads; distinct experts
    routed). With a head (`moe.head_rows`), every expert's first `head` rows are one batched product (E x head rows,
    each weight read once) and the rest go to tiles; the tiles: each expert's rows make full tiles of `row_tile` rows
    and one tile of the smallest of `tile_sizes` that holds the remainder."""
    from oss_jax.moe import head_rows, row_tile, tile_sizes

    head = head_rows(ids.size, num_experts)
    tile = row_tile(ids.size, num_experts)
    sizes = np.bincount(ids.reshape(-1), minlength=num_experts)
    tail = np.maximum(sizes - head, 0)
    full, rem = tail // tile, tail % tile
    rounded = np.asarray(tile_sizes(tile))[np.searchsorted(tile_sizes(tile), rem)]
    rows = full * tile + np.where(rem > 0, rounded, 0)
    reads = (num_experts if head else 0) + int(np.sum(full + (rem > 0)))
    return int(rows.sum()) + num_experts * head, reads, int(np.count_nonzero(sizes))


def worker_ours(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from oss_jax import generate, moe
    from oss_jax.cache import Caches, init_cache
    from oss_jax.model import model_from_params
    from oss_jax.moe import route
    from oss_jax.unstacked import Unstacked

    cfg = bench_config(args.tiny)
    work = {k: np.asarray(v) for k, v in np.load(args.tokens).items()}
    t0 = time.perf_counter()
    packed = args.worker_experts == "packed"
    model = model_from_params(cfg, LazyParams(args.ckpt, packed), dtype=jnp.float32, packed_experts=packed)
    res: dict = {"load_s": time.perf_counter() - t0, "rss_after_load": peak_rss()}
    res["param_bytes"] = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    prefill, decode = generate.prefill_step, generate.decode_step
    steps_model = generate.split_model(model)  # split once, as generate() does

    def cost_of(compiled) -> dict:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0))}

    def cost(step, *inputs) -> dict:
        """XLA's cost analysis of `step(model, *inputs)` compiled (one jit around the package's own, public API)."""
        graph = steps_model.graph
        return cost_of(jax.jit(lambda leaves, *a: step(graph.merge(leaves), *a)).lower(steps_model.leaves, *inputs)
                       .compile())

    views = any(isinstance(leaf, Unstacked) for leaf in steps_model.leaves)  # the steps' form of expert kernels

    def grouped_matmul_cost(rows: int) -> dict:
        """XLA's cost analysis of one layer's two expert grouped matmuls, compiled alone for `rows` assignments in the
        steps' form (stacked kernels, or views of each expert; the head and the bound on rows per expert that
        `moe.moe_local` passes, so the same loops): what it counts for them inside a step (each loop body once)."""
        d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
        gmm = functools.partial(moe.grouped_matmul, head=moe.head_rows(rows, e),
                                max_group=rows // cfg.experts_per_token)

        def kernels(k: int, n: int):
            if views:
                return Unstacked(tuple(jax.ShapeDtypeStruct((k, n), jnp.float32) for _ in range(e)))
            return jax.ShapeDtypeStruct((e, k, n), jnp.float32)

        both = [cost_of(jax.jit(gmm).lower(
            jax.ShapeDtypeStruct((rows, k), jnp.float32), kernels(k, n),
            jax.ShapeDtypeStruct((e,), jnp.int32)).compile()) for k, n in [(d, 2 * f), (f, d)]]
        return {key: both[0][key] + both[1][key] for key in both[0]}

    @nnx.jit(graph_updates=False)  # (the default would return, so copy, every parameter)
    def routing(model, tokens, positions):
        """Each layer's routed expert ids [L, B, T, k] (full recomputation, no cache: same as the cached steps)."""
        x = jnp.take(model.embed[...], tokens, axis=0).astype(jnp.float32)
        ids = []
        for block in model.layers:
            h, _ = block.attn(block.attn_norm(x), positions, None)
            x = x + h
            xn = block.mlp_norm(x)
            logits = jnp.einsum("BTD,DE->BTE", xn, block.moe.router_kernel[...]) + block.moe.router_bias[...]
            ids.append(route(logits.reshape(-1, cfg.num_experts), cfg.experts_per_token)[0].reshape(
                *tokens.shape, -1))
            x = x + block.moe(xn)
        return jnp.stack(ids)

    def bucket(n: int) -> int:
        return max(64, 1 << (n - 1).bit_length())  # as oss_jax.generate sizes a cache

    # prefill: one chunk, batch 1, empty cache sized as generate() would for this prompt + 64 new tokens
    p = args.prefill
    tokens = jnp.asarray(work["prefill"], jnp.int32)
    positions = jnp.arange(p, dtype=jnp.int32)[None]

    def empty() -> Caches:  # a fresh one per call: the prefill step donates the cache it is given
        return init_cache(cfg, 1, bucket(p + 64))

    res["prefill_cost"] = cost(prefill, tokens, positions, empty())
    t0 = time.perf_counter()
    _, caches = jax.block_until_ready(prefill(steps_model, tokens, positions, empty()))
    res["prefill_compile_s"] = time.perf_counter() - t0
    res["prefill_cache_slots"] = [int(c.pos.shape[1]) for c in caches]
    timer = Timer()
    for _ in range(args.reps):
        caches = jax.block_until_ready(empty())
        with timer:
            jax.block_until_ready(prefill(steps_model, tokens, positions, caches))
    res["prefill"] = timer.summary()
    res["prefill_tok_s"] = p / res["prefill"]["best_s"]
    res["prefill_gmm_cost"] = grouped_matmul_cost(p * cfg.experts_per_token)
    res["prefill_routing"] = np.asarray(routing(model, tokens, positions)).tolist()

    for b in args.batches:
        prompt = jnp.asarray(work[f"prompt{b}"], jnp.int32)
        steps = work[f"steps{b}"].astype(np.int32)
        c = prompt.shape[1]
        caches = init_cache(cfg, b, bucket(c + len(steps)))
        slots = [int(x.pos.shape[1]) for x in caches]
        cost_d = cost(decode, jnp.asarray(steps[0]), jnp.full((b,), c, jnp.int32), caches)
        _, caches = prefill(steps_model, prompt, jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c)), caches)
        # batch 1: streaming reads of a separate array before and after each timed step, for the bandwidth bound;
        # this machine's read bandwidth moves by 1.5x within minutes, so a step is held against the reads next to it
        x = read_array() if b == 1 else None
        read = functools.partial(faster_read, gemv_reads(x), x) if x is not None else None
        if read:
            read()  # compiles the reads
        timer, around = Timer(), []
        for s, tok in enumerate(steps):
            if s == args.warmup:  # the warm-up steps (the first compiles) are not counted
                timer, around = Timer(), [read()] if read else []
            with timer:
                logits, caches = decode(steps_model, jnp.asarray(tok), jnp.full((b,), c + s, jnp.int32), caches)
                logits.block_until_ready()
            if read and s >= args.warmup:
                around.append(read())
        if x is not None:
            x.delete()
        full = jnp.concatenate([prompt, jnp.asarray(steps.T)], axis=1)
        ids = np.asarray(routing(model, full, jnp.broadcast_to(jnp.arange(full.shape[1], dtype=jnp.int32),
                                                               full.shape)))[:, :, c + args.warmup:]
        res[f"decode{b}"] = {**timer.summary(), "tok_s": b / timer.summary()["best_s"], "cost": cost_d,
                             "times_s": timer.times, "reads_GBps": around,
                             "gmm_cost": grouped_matmul_cost(b * cfg.experts_per_token),
                             "routing": ids.tolist(), "cache_slots": slots, "context": c}
        caches = None
    res["peak_rss"] = peak_rss()
    return res


def worker_hf(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # without avx512_bf16/AMX, torch's bf16 matmuls fall back to a scalar reference GEMM: minutes per prefill
        return {"skipped": f"torch has no fast bf16 GEMM on this CPU ({torch.backends.cpu.get_cpu_capability()}, "
                           "mkldnn bf16 unsupported)"}
    work = {k: np.asarray(v) for k, v in np.load(args.tokens).items()}
    t0 = time.perf_counter()
    model = hf_model(args.ckpt, dtype, args.hf_experts)
    res: dict = {"load_s": time.perf_counter() - t0, "rss_after_load": peak_rss(), "threads": torch.get_num_threads(),
                 "experts_implementation": str(getattr(model.config, "_experts_implementation", None))}

    def cache_of(out):
        return out.cache if getattr(out, "cache", None) is not None else out.past_key_values

    with torch.inference_mode():
        tokens = torch.as_tensor(work["prefill"], dtype=torch.long)
        model(input_ids=tokens, use_cache=True, logits_to_keep=1)
        timer = Timer()
        for _ in range(args.reps):
            with timer:
                model(input_ids=tokens, use_cache=True, logits_to_keep=1)
        res["prefill"] = timer.summary()
        res["prefill_tok_s"] = tokens.shape[1] / res["prefill"]["best_s"]
        for b in args.batches:
            prompt = torch.as_tensor(work[f"prompt{b}"], dtype=torch.long)
            steps = torch.as_tensor(work[f"steps{b}"], dtype=torch.long)
            cache = cache_of(model(input_ids=prompt, use_cache=True, logits_to_keep=1))
            timer = Timer()
            for s, tok in enumerate(steps):
                if s == args.warmup:
                    timer = Timer()
                with timer:
                    cache = cache_of(model(input_ids=tok[:, None], cache=cache, use_cache=True))
            res[f"decode{b}"] = {**timer.summary(), "tok_s": b / timer.summary()["best_s"]}
            cache = None
    res["peak_rss"] = peak_rss()
    return res


# ------------------------------------------------------------------ theory


def loop_flops_bytes(cfg: ModelConfig, routing: np.ndarray, counted: dict
                     ) -> tuple[float, float, list[int], list[int]]:
    """For routing [L, B, T, k] (one step = the B*T tokens): FLOPs and bytes of the expert tiles the grouped matmuls
    run, less what XLA's cost analysis counts for one layer's two grouped matmuls (`counted`), summed over layers;
    tiles per layer; distinct experts per layer."""
    d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    extra_flops = extra_bytes = 0.0
    tiles, distinct = [], []
    for ids in routing:
        rows, t, n = expert_tiles(np.asarray(ids).reshape(-1), e)
        tiles.append(t)
        distinct.append(n)
        extra_flops += 2 * rows * (d * 2 * f + f * d) - counted["flops"]  # mlp1 and mlp2
        extra_bytes += (t * (d * 2 * f + f * d) + rows * (d + 2 * f + f + d)) * 4 - counted["bytes"]
    return extra_flops, extra_bytes, tiles, distinct


def gather_overcount(cfg: ModelConfig, rows: int) -> float:
    """XLA's cost analysis counts a gather's whole operand: the embedding lookup of `rows` > 1 tokens "reads" the
    entire [V, D] float32 table (one row lowers to a dynamic slice, counted as one row)."""
    return 0.0 if rows == 1 else float(cfg.vocab_size - rows) * cfg.hidden_size * 4


# ------------------------------------------------------------------ report


def run_worker(role: str, args, out_dir: Path, extra: list[str] = ()) -> dict:
    out = out_dir / f"{role}{'-' + extra[-1] if extra else ''}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", role, "--out", str(out), "--ckpt", str(args.ckpt),
           "--tokens", str(args.tokens), "--prefill", str(args.prefill), "--context", str(args.context),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--reps", str(args.reps),
           "--batches", ",".join(map(str, args.batches)), "--threads", str(args.threads),
           "--hf-experts", args.hf_experts, *extra]
    if args.tiny:
        cmd.append("--tiny")
    before = load()
    t0 = time.perf_counter()
    print(f"[{role} {' '.join(extra)}] running (load average {before})", flush=True)
    subprocess.run(cmd, check=True)
    res = json.loads(out.read_text())
    if "skipped" in res:
        print(f"[{role} {' '.join(extra)}] skipped: {res['skipped']}", flush=True)
        return res
    res["wall_s"], res["load_before"], res["load_after"] = time.perf_counter() - t0, before, load()
    print(f"[{role} {' '.join(extra)}] done in {res['wall_s']:.0f} s, peak RSS {res['peak_rss'] / GiB:.2f} GiB, "
          f"load average {res['load_after']}", flush=True)
    return res


def report(cfg: ModelConfig, args, bw: dict, ours: dict, hf: dict[str, dict]) -> dict:
    s = sizes(cfg)
    k, layers = cfg.experts_per_token, cfg.num_hidden_layers
    print()
    print(f"config: {'tiny preset' if args.tiny else 'gpt-oss-20b slice'}: {layers} layers {cfg.layer_types}, "
          f"D {cfg.hidden_size}, {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads of {cfg.head_dim}, "
          f"{cfg.num_experts} experts top-{k}, F {cfg.intermediate_size}, V {cfg.vocab_size}; "
          f"{os.cpu_count()} CPU cores, torch threads {args.threads}")
    print(f"ours: oss_jax.generate.prefill_step / decode_step, parameters {ours['param_bytes'] / GiB:.2f} GiB float32")
    print(f"workload: prefill {args.prefill} tokens (batch 1, one chunk, best of {args.reps}); decode after a "
          f"{args.context}-token prompt, best of {args.steps} steps after {args.warmup} warm-up. Best, not median: "
          "other processes share this machine (CPU share = CPU time / wall time / cores while timed)")
    cols = {"ours fp32": ours, **{f"HF {d}": r for d, r in hf.items()}}
    rows = [("prefill tok/s", lambda r: r["prefill_tok_s"])]
    rows += [(f"decode b{b} tok/s", lambda r, b=b: r[f"decode{b}"]["tok_s"]) for b in args.batches]
    rows += [("prefill CPU share", lambda r: r["prefill"]["cpu_share"])]
    rows += [(f"decode b{b} CPU share", lambda r, b=b: r[f"decode{b}"]["cpu_share"]) for b in args.batches]
    rows += [("peak RSS GiB", lambda r: r["peak_rss"] / GiB), ("load s", lambda r: r["load_s"])]
    head = f"{'':<18}" + "".join(f"{c:>12}" for c in cols)
    head += "".join(f"{'ours/' + c:>16}" for c in cols if c != "ours fp32")
    print(head)
    summary: dict = {"tok_s": {}, "ratios": {}}
    for name, get in rows:
        vals = {c: get(r) for c, r in cols.items()}
        line = f"{name:<18}" + "".join(f"{v:>12.2f}" for v in vals.values())
        if "tok/s" in name:
            for c in cols:
                if c != "ours fp32":
                    ratio = vals["ours fp32"] / vals[c]
                    summary["ratios"][f"{name} ours/{c}"] = round(ratio, 3)
                    line += f"{ratio:>16.2f}"
            summary["tok_s"][name] = {c: round(v, 2) for c, v in vals.items()}
        print(line)
    print("load average (1/5/15 min) around each run: " + "; ".join(
        f"{c} {r['load_before']} -> {r['load_after']}" for c, r in cols.items()))
    if hf:
        print(f"HF experts implementation: {next(iter(hf.values()))['experts_implementation']}")

    # ----- bandwidth bound, decode batch 1
    print()
    print(f"streaming read: JAX sum {bw['jax_sum_GBps']:.1f} GB/s, JAX GEMV {bw['jax_gemv_GBps']:.1f} GB/s, "
          f"JAX GEMV in chunks of the contraction {bw.get('jax_chunked_gemv_GBps', float('nan')):.1f} GB/s, "
          f"numpy sum {bw['numpy_sum_GBps']:.1f} GB/s (2 GiB float32; best {bw['best_GBps']:.1f} used)")
    d1 = ours.get("decode1")
    if d1:
        c = d1["context"]
        pos = [c + args.warmup + i for i in range(args.steps)]
        need = lambda itemsize: min_bytes(cfg, itemsize, [k] * layers, 1, pos[:1])  # noqa: E731
        for name, r, itemsize in [("ours fp32", ours, 4), *[(f"HF {d}", hf[d], 2 if d == "bf16" else 4) for d in hf]]:
            nbytes = need(itemsize)
            bound = bw["best_GBps"] * 1e9 / nbytes
            frac = r["decode1"]["tok_s"] / bound
            summary["ratios"][f"decode b1 bandwidth fraction {name} (separate run)"] = round(frac, 3)
            print(f"decode b1 {name:<10}: {nbytes / 1e9:.3f} GB/token must be read (unembedding "
                  f"{s['vocab'] * itemsize / 1e9:.3f}, {k} experts x {layers} layers "
                  f"{k * layers * (s['expert'] * itemsize + s['expert_b'] * 4) / 1e9:.3f}, attention+router "
                  f"{layers * (s['attn'] + s['router']) * itemsize / 1e9:.3f}) -> bound {bound:.2f} tok/s at the "
                  f"separate run's {bw['best_GBps']:.1f} GB/s; best step {r['decode1']['tok_s']:.2f} = {frac:.2f}")
        # step i ran between reads i and i + 1: its bound time is bytes / bandwidth, averaged over the two
        reads, times, nbytes = d1["reads_GBps"], d1["times_s"], need(4)
        fracs = [(nbytes / reads[i] + nbytes / reads[i + 1]) / 2e9 / t for i, t in enumerate(times)]
        b1_fraction = statistics.median(fracs)
        summary["ratios"]["decode b1 bandwidth fraction ours fp32"] = round(b1_fraction, 3)
        print(f"decode b1 ours fp32, each step against the streaming reads just before and after it: reads "
              f"{min(reads):.1f}-{max(reads):.1f} GB/s, steps {min(times) * 1e3:.1f}-{max(times) * 1e3:.1f} ms; "
              f"fraction of the bound median {b1_fraction:.2f} (steps {min(fracs):.2f}-{max(fracs):.2f})")

    # ----- cost analysis vs minimum
    print()
    print("per token            XLA CA    CA + loops     minimum   CA/min  (CA+loops)/min   expert weight reads per "
          "layer (routed distinct)")
    p = args.prefill
    extra_f, extra_b, gemms, distinct = loop_flops_bytes(cfg, np.asarray(ours["prefill_routing"]),
                                                         ours["prefill_gmm_cost"])
    extra_b -= gather_overcount(cfg, p)
    ca = ours["prefill_cost"]
    entries = [("prefill FLOPs", ca["flops"] / p, (ca["flops"] + extra_f) / p, min_flops(cfg, list(range(p)), 1) / p,
                gemms, distinct),
               ("prefill bytes", ca["bytes"] / p, (ca["bytes"] + extra_b) / p,
                min_bytes(cfg, 4, distinct, p, list(range(p))) / p, gemms, distinct)]
    for b in args.batches:
        dec = ours[f"decode{b}"]
        routing = np.asarray(dec["routing"])  # [L, B, steps, k]
        c = dec["context"]
        per = [loop_flops_bytes(cfg, routing[:, :, i], dec["gmm_cost"]) for i in range(routing.shape[2])]
        ef = statistics.mean(x[0] for x in per)
        eb = statistics.mean(x[1] for x in per) - gather_overcount(cfg, b)
        g = [round(statistics.mean(x[2][layer] for x in per), 1) for layer in range(layers)]
        n = [round(statistics.mean(x[3][layer] for x in per), 1) for layer in range(layers)]
        pos = [c + args.warmup + i for i in range(routing.shape[2])]
        fmin = statistics.mean(min_flops(cfg, [q] * b, b) for q in pos) / b
        bmin = statistics.mean(min_bytes(cfg, 4, x[3], b, [q] * b) for q, x in zip(pos, per, strict=True)) / b
        ca = dec["cost"]
        entries += [(f"decode b{b} FLOPs", ca["flops"] / b, (ca["flops"] + ef) / b, fmin, g, n),
                    (f"decode b{b} bytes", ca["bytes"] / b, (ca["bytes"] + eb) / b, bmin, g, n)]
    for name, v, vl, vmin, g, n in entries:
        summary["ratios"][f"{name} CA/min"] = round(v / vmin, 3)
        summary["ratios"][f"{name} (CA+loops)/min"] = round(vl / vmin, 3)
        print(f"{name:<18}{v:>10.3g}{vl:>14.3g}{vmin:>12.3g}{v / vmin:>9.2f}{vl / vmin:>17.2f}   {g} ({n})")
    print("(XLA counts each while-loop body once; 'CA + loops' replaces what it counts for the grouped matmuls by the "
          "products (head and tiles) the actual routing makes, and takes out the embedding table XLA counts whole "
          "for a gather of more "
          "than one row. "
          "Cache slots: prefill " + str(ours["prefill_cache_slots"]) + ", decode "
          + str({b: ours[f"decode{b}"]["cache_slots"] for b in args.batches}) + ")")

    # ----- targets
    print()
    targets = []
    if "fp32" in hf:
        targets += [("prefill >= 2x HF fp32", ours["prefill_tok_s"] / hf["fp32"]["prefill_tok_s"], 2.0, ">=")]
        if 8 in args.batches:
            targets += [("decode b8 >= 2x HF fp32", ours["decode8"]["tok_s"] / hf["fp32"]["decode8"]["tok_s"], 2.0,
                         ">=")]
    if d1:
        targets += [("decode b1 >= 0.8 of bandwidth bound", b1_fraction, 0.8, ">=")]
    for name, _, vl, vmin, _, _ in entries:
        if "FLOPs" in name or name.startswith("decode b1 bytes"):
            targets.append((f"{name} (CA+loops)/min <= 1.15", vl / vmin, 1.15, "<="))
    for name, value, goal, op in targets:
        # a count under the minimum is no success: "CA + loops" then took out more than the step holds
        under = op == "<=" and value < BELOW_MINIMUM
        ok = value >= goal if op == ">=" else not under and value <= goal
        print(f"{'MET   ' if ok else 'MISSED'} {name}: {value:.2f}"
              + (" (under the minimum: the accounting is off)" if under else ""))
    summary["targets"] = {name: round(value, 3) for name, value, _, _ in targets}
    summary["bandwidth"] = {kk: round(v, 2) for kk, v in bw.items() if kk.endswith("GBps")}
    summary["peak_rss_GiB"] = {c: round(r["peak_rss"] / GiB, 2) for c, r in cols.items()}
    summary["load"] = {c: [r["load_before"], r["load_after"]] for c, r in cols.items()}
    return summary


def report_packed(args, dense: dict, packed: dict) -> dict:
    """Ours with packed MXFP4 experts vs ours with dense float32 experts (same process layout, same workload)."""
    rows = [("prefill tok/s", lambda r: r["prefill_tok_s"])]
    rows += [(f"decode b{b} tok/s", lambda r, b=b: r[f"decode{b}"]["tok_s"]) for b in args.batches]
    rows += [(f"decode b{b} CPU share", lambda r, b=b: r[f"decode{b}"]["cpu_share"]) for b in args.batches]
    rows += [("parameters GiB", lambda r: r["param_bytes"] / GiB), ("peak RSS GiB", lambda r: r["peak_rss"] / GiB)]
    print()
    print(f"{'ours, experts':<18}{'dense fp32':>12}{'packed':>12}{'packed/dense':>14}")
    out = {}
    for name, get in rows:
        d, p = get(dense), get(packed)
        out[name] = {"dense": round(d, 3), "packed": round(p, 3), "ratio": round(p / d, 3)}
        print(f"{name:<18}{d:>12.2f}{p:>12.2f}{p / d:>14.2f}")
    print(f"load average around the runs: dense {dense['load_before']} -> {dense['load_after']}; packed "
          f"{packed['load_before']} -> {packed['load_after']}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny preset instead of the 20b-shaped 2-layer slice")
    p.add_argument("--skip-hf", action="store_true", help="only this project (no torch)")
    p.add_argument("--skip-bf16", action="store_true", help="HF in fp32 only")
    p.add_argument("--prefill", type=int, default=512, help="prefill chunk length (batch 1)")
    p.add_argument("--context", type=int, default=64, help="prompt length before the decode steps")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps, median (default 16, 20b slice 8)")
    p.add_argument("--warmup", type=int, default=2, help="decode steps before timing (the first compiles)")
    p.add_argument("--reps", type=int, default=3, help="timed prefill runs (median) after one warm-up")
    p.add_argument("--batches", default="1,2,8", help="decode batch sizes (2: the rows XLA:CPU once ran 20x slower)")
    p.add_argument("--hf-experts", default="eager",
                   help="HF experts_implementation: 'eager' (a loop over the routed experts; default), 'grouped_mm' "
                        "(transformers' default, which on CPU falls back to a slow reference GEMM in bf16), "
                        "'batched_mm', or 'default' (whatever transformers picks)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--experts", choices=["bf16", "both"], default="bf16",
                   help="ours with dense experts (dequantized, float32: the default); 'both' also runs ours with "
                        "packed MXFP4 experts (decoded inside the step) and prints packed vs dense")
    p.add_argument("--worker-experts", choices=["bf16", "packed"], default="bf16", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the checkpoint and the raw results here (reused by the next run; default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    p.add_argument("--worker", choices=["bandwidth", "ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.steps = args.steps or (16 if args.tiny else 8)

    if args.worker:
        fn = {"bandwidth": worker_bandwidth, "ours": worker_ours, "hf": worker_hf}[args.worker]
        res = fn(args)
        res.setdefault("peak_rss", peak_rss())
        args.out.write_text(json.dumps(res))
        return

    from convert.synthetic import make_checkpoint

    cfg = bench_config(args.tiny)
    with tempfile.TemporaryDirectory(prefix="oss-jax-genbench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        args.ckpt = work / ("hf-tiny" if args.tiny else "hf-20b-slice")
        if (args.ckpt / "config.json").is_file():
            print(f"reusing the checkpoint in {args.ckpt}", flush=True)
        else:
            t0 = time.perf_counter()
            print(f"writing a random checkpoint to {args.ckpt} (load average {load()})", flush=True)
            make_checkpoint(cfg, args.ckpt, seed=0, overwrite=True)
            print(f"  {sum(f.stat().st_size for f in args.ckpt.glob('*.safetensors')) / 1e9:.2f} GB in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        args.tokens = work / "tokens.npz"
        np.savez(args.tokens, **workload(cfg, args))
        bw = run_worker("bandwidth", args, work)
        ours = run_worker("ours", args, work)
        packed = run_worker("ours", args, work, ["--worker-experts", "packed"]) if args.experts == "both" else None
        hf, skipped = {}, []
        if not args.skip_hf:
            for dtype in ["fp32"] + ([] if args.skip_bf16 else ["bf16"]):
                res = run_worker("hf", args, work, ["--dtype", dtype])
                if "skipped" in res:
                    skipped.append(f"HF {dtype} skipped: {res['skipped']}")
                else:
                    hf[dtype] = res
        summary = report(cfg, args, bw, ours, hf)
        if packed is not None:
            summary["packed_experts"] = report_packed(args, ours, packed)
        for note in skipped:
            print(note)
        summary["skipped"] = skipped
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
