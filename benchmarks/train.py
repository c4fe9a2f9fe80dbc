"""Training speed: train-step tokens/s of oss-jax vs HF transformers (torch), fp32 both, same weights, same batch;
and the compiled step's FLOPs per token (XLA's cost analysis) against 6 x active parameters.

A train step, on both sides: forward on [B, T] tokens, masked next-token cross-entropy (mean over the kept
positions), backward, global-norm clipping and an AdamW step (lr 1e-5 constant, betas 0.9/0.95, weight decay 0.01
on matrices only).
  ours   `oss_jax.train.Trainer.step` (one jitted, donated step; remat none; aux loss coefficient 0)
  HF     transformers GptOssForCausalLM (eager attention, --hf-experts), `.train()`, torch cross-entropy on the
         logits, `.backward()`, `torch.nn.utils.clip_grad_norm_`, `torch.optim.AdamW` (--hf-adamw); torch threads =
         cores
Both load one random checkpoint (`convert.synthetic.make_checkpoint`, dense bfloat16 experts: HF trains those) in
float32, each side in its own subprocess so that one model is in memory at a time (peak RSS printed). tok/s = B * T
/ the median of --steps timed steps after --warmup untimed ones (the first compiles). The machine may be shared:
each row prints the share of the cores the process got while timed and the load average around it.

Configs: the tiny preset (B x T 4 x 128, as `configs/train/tiny.json`), and a 20b-width training slice:
`benchmarks/generate.py`'s slice (D 2880, 64/8 heads of 64, F 2880, top-4, 2 layers sliding + full) with 8 experts
instead of 32 and a 16,384-token vocabulary instead of 201,088 (B x T 2 x 128). Training holds 4 float32 copies of
every parameter (weights, gradients, Adam's two moments): the generation slice's 2.8 B parameters would need ~45 GB,
this one's 0.55 B ~9 GB. Per token it does the 20b's work per layer (the same attention, router and 4 experts of
the same shape), and its unembedding is the same share of the active parameters as the full 20b's (16%).

FLOPs: active parameters per token = per layer the attention kernels (q, k, v, o) + the router + k of the E
experts' kernels (mlp1 + mlp2), plus the unembedding; not the embedding (a lookup, not a matmul), nor biases,
norms and sinks (elementwise). 6 x active = forward 2 + backward 4 FLOPs per active parameter per token; the
attention scores (QK^T and PV, causal keys) come on top and are printed as a share. XLA's cost analysis of the
compiled step (optimizer included) counts each while-loop body once, and on CPU the expert grouped matmul
(`oss_jax.moe.tiled_grouped_matmul`) loops over tiles of one expert each, forward and in both backward products
(d rows, d weights): "CA + loops" takes out what the cost analysis counts for the grouped matmuls (compiled alone at
the step's shapes, forward and backward) and adds the tiles the batch's actual routing makes (padding rows
included), 3 passes per grouped matmul with remat none, 4 with block remat (forward recomputed). Not part of CI.

    python benchmarks/train.py              # tiny, then the 20b-width slice (~20 min on 2 busy cores; RSS <= 11 GiB)
    python benchmarks/train.py --tiny-only  # ~5 min
    python benchmarks/train.py --skip-hf    # this project only
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# `python benchmarks/train.py` puts this folder first on sys.path, where benchmarks/convert.py would shadow the
# `convert` package: the repository root goes there instead (so `benchmarks.generate` imports too)
ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == ROOT / "benchmarks":
    sys.path[0] = str(ROOT)

import numpy as np  # noqa: E402

from benchmarks.generate import GiB, LazyParams, Timer, bench_config, expert_tiles, load, peak_rss, sizes  # noqa: E402
from oss_jax.config import ModelConfig  # noqa: E402

LR, B1, B2, EPS, WEIGHT_DECAY, CLIP = 1e-5, 0.9, 0.95, 1e-8, 0.01, 1.0  # both sides' optimizer
TARGET_SPEED, TARGET_FLOPS = 2.0, 1.3  # ours/HF tok/s >= ; (CA + loops) / (6 x active), remat none, <=


# ------------------------------------------------------------------ configs and workload


def train_slice(experts: int, vocab: int) -> ModelConfig:
    """generate.py's 20b-shaped slice with `experts` experts and a `vocab`-token vocabulary (fits in RAM to train)."""
    cfg = bench_config(False)
    return dataclasses.replace(cfg, num_experts=experts, vocab_size=vocab, eos_token_id=vocab - 1,
                               pad_token_id=vocab - 2)


def configs(args) -> dict[str, tuple[ModelConfig, int, int]]:
    """name -> (model config, B, T)."""
    out = {"tiny": (bench_config(True), *args.tiny_shape)}
    if not args.tiny_only:
        out["20b-slice"] = (train_slice(args.slice_experts, args.slice_vocab), *args.slice_shape)
    return out


def make_batch(cfg: ModelConfig, b: int, t: int) -> dict[str, np.ndarray]:
    """Seeded rows [B, T]: tokens, next-token targets, loss mask (80% of the positions kept)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (b, t + 1))
    return {"tokens": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": rng.random((b, t)) < 0.8}


def active_params(cfg: ModelConfig) -> int:
    """Matmul parameters one token meets: per layer attention kernels + router + k experts; the unembedding."""
    s = sizes(cfg)
    return cfg.num_hidden_layers * (s["attn"] + s["router"] + cfg.experts_per_token * s["expert"]) + s["vocab"]


def attention_flops(cfg: ModelConfig, t: int) -> float:
    """Forward + backward FLOPs per token of the attention scores (QK^T, PV) over causal (windowed) keys."""
    keys = [min(p + 1, cfg.window(layer) or t) for layer in range(cfg.num_hidden_layers) for p in range(t)]
    return 3 * 4 * cfg.num_attention_heads * cfg.head_dim * sum(keys) / t


# ------------------------------------------------------------------ workers (each in its own process)


def train_config(b: int, t: int, remat: str):
    from oss_jax.train import TrainConfig

    return TrainConfig(steps=1000, batch_size=b, seq_len=t, learning_rate=LR, warmup_steps=0, min_lr_ratio=1.0,
                       weight_decay=WEIGHT_DECAY, b1=B1, b2=B2, eps=EPS, clip_norm=CLIP, remat=remat)


def flops_of(compiled) -> float:
    ca = compiled.cost_analysis()
    return float((ca[0] if isinstance(ca, list) else ca).get("flops", 0.0))


def grouped_matmul_counted(cfg: ModelConfig, rows: int) -> dict[str, float]:
    """What XLA's cost analysis counts for one layer's two expert grouped matmuls (mlp1, mlp2) compiled alone for
    `rows` assignments: forward, and backward (d rows + d weights)."""
    import jax
    import jax.numpy as jnp

    from oss_jax.moe import grouped_matmul

    def fwd_bwd(lhs, rhs, group_sizes, g):
        out, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, group_sizes), lhs, rhs)
        return out, vjp(g)

    d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    fwd = both = 0.0
    for k, n in [(d, 2 * f), (f, d)]:
        shapes = (jax.ShapeDtypeStruct((rows, k), jnp.float32), jax.ShapeDtypeStruct((e, k, n), jnp.float32),
                  jax.ShapeDtypeStruct((e,), jnp.int32))
        fwd += flops_of(jax.jit(grouped_matmul).lower(*shapes).compile())
        both += flops_of(jax.jit(fwd_bwd).lower(*shapes, jax.ShapeDtypeStruct((rows, n), jnp.float32)).compile())
    return {"fwd": fwd, "bwd": both - fwd}


def routed_rows(trainer, state, batch) -> list[int]:
    """Per layer, the rows the tiled grouped matmul multiplies (padding included) for this batch's routing."""
    import jax
    from flax import nnx

    from oss_jax.checkpoint import nest

    @jax.jit
    def expert_ids(params, mb):
        model = nnx.merge(trainer.graphdef, nest(params))
        _, logits = model.train_hidden(mb["tokens"], mb["positions"], mb["segments"])
        return jax.lax.top_k(logits, model.cfg.experts_per_token)[1]  # [L, B, T, k]

    ids = np.asarray(expert_ids(trainer.params(state), jax.tree.map(lambda a: a[0], batch)))
    return [expert_tiles(layer.reshape(-1), trainer.cfg.num_experts)[0] for layer in ids]


def jax_batch(batch: dict[str, np.ndarray]) -> dict:
    """The Trainer's batch: [1, B, T] arrays of every BATCH_KEYS entry (one micro-batch, one segment per row)."""
    import jax.numpy as jnp

    b, t = batch["tokens"].shape
    positions = np.broadcast_to(np.arange(t), (b, t))
    out = {"tokens": batch["tokens"], "targets": batch["targets"], "loss_mask": batch["loss_mask"].astype(np.float32),
           "positions": positions, "segments": np.ones((b, t))}
    return {k: jnp.asarray(v[None], jnp.float32 if k == "loss_mask" else jnp.int32) for k, v in out.items()}


def worker_ours(args, cfg: ModelConfig, batch: dict[str, np.ndarray]) -> dict:
    import jax

    from oss_jax import train
    from oss_jax.model import model_from_params

    b, t = batch["tokens"].shape
    t0 = time.perf_counter()
    model = model_from_params(cfg, LazyParams(args.ckpt))
    trainer = train.Trainer(model, train_config(b, t, "none"))
    state, batch = trainer.init_state(model), jax_batch(batch)
    del model  # its arrays are the state's, donated by the first step
    res: dict = {"load_s": time.perf_counter() - t0, "params": sum(a.size for a in state.trainable.values()),
                 "rows": routed_rows(trainer, state, batch)}
    losses, timer = [], Timer()
    for s in range(args.warmup + args.steps):
        if s == args.warmup:
            timer = Timer()  # the warm-up steps (the first compiles) are not counted
        with timer:
            state, metrics = trainer.step(state, batch)
            jax.block_until_ready((state, metrics))
        losses.append(float(metrics["loss"]))
        res.setdefault("first_s", timer.times[0])
    res.update(step=timer.summary(), cpu_per_step=timer.cpu / len(timer.times), losses=losses)
    # remat none: the executable the timed steps ran (its compilation is cached); block: the same step, remat on
    tc = train_config(b, t, "block")
    block = jax.jit(functools.partial(train._train_step, trainer.graphdef, train.optimizer(tc), tc))
    res["flops"] = {"none": flops_of(trainer._step.lower(state, batch).compile()),
                    "block": flops_of(block.lower(state, batch).compile())}
    res["gmm_counted"] = grouped_matmul_counted(cfg, b * t * cfg.experts_per_token)
    res["backend"] = jax.default_backend()
    return res


def worker_hf(args, cfg: ModelConfig, batch: dict[str, np.ndarray]) -> dict:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = transformers.GptOssForCausalLM.from_pretrained(
        str(args.ckpt), dtype=torch.float32, attn_implementation="eager", experts_implementation=args.hf_experts)
    model.train()
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[args.hf_adamw]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(B1, B2), eps=EPS, **impl)
    res: dict = {"load_s": time.perf_counter() - t0, "threads": torch.get_num_threads(),
                 "params": sum(p.numel() for p in params)}
    tokens = torch.as_tensor(batch["tokens"], dtype=torch.long)
    labels = torch.as_tensor(batch["targets"], dtype=torch.long).masked_fill(
        torch.as_tensor(~batch["loss_mask"]), -100)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        return loss.detach()

    losses, timer = [], Timer()
    for s in range(args.warmup + args.steps):
        if s == args.warmup:
            timer = Timer()
        with timer:
            loss = step()
        losses.append(float(loss))
        res.setdefault("first_s", timer.times[0])
    res.update(step=timer.summary(), cpu_per_step=timer.cpu / len(timer.times), losses=losses)
    return res


# ------------------------------------------------------------------ driver


def prepare(cfg: ModelConfig, b: int, t: int, work: Path) -> tuple[Path, Path]:
    """The random checkpoint (reused when one of this config is there) and the batch file."""
    from convert.synthetic import make_checkpoint

    ckpt = work / "hf"
    if (ckpt / "config.json").is_file() and ModelConfig.from_file(ckpt) == cfg:
        print(f"reusing the checkpoint in {ckpt}", flush=True)
    else:
        t0 = time.perf_counter()
        print(f"writing a random checkpoint to {ckpt} (load average {load()})", flush=True)
        make_checkpoint(cfg, ckpt, seed=0, packed=False, overwrite=True)
        print(f"  {sum(f.stat().st_size for f in ckpt.glob('*.safetensors')) / 1e9:.2f} GB in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    batch = work / f"batch-{b}x{t}.npz"
    np.savez(batch, **make_batch(cfg, b, t))
    return ckpt, batch


def run_worker(role: str, name: str, ckpt: Path, batch: Path, args) -> dict:
    out = ckpt.parent / f"{role}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", role, "--config", name, "--ckpt", str(ckpt),
           "--batch", str(batch), "--out", str(out), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--threads", str(args.threads), "--hf-experts", args.hf_experts, "--hf-adamw", args.hf_adamw,
           "--slice-experts", str(args.slice_experts), "--slice-vocab", str(args.slice_vocab)]
    before, t0 = load(), time.perf_counter()
    print(f"[{name} {role}] running (load average {before})", flush=True)
    subprocess.run(cmd, check=True)
    res = json.loads(out.read_text())
    res.update(wall_s=time.perf_counter() - t0, load_before=before, load_after=load())
    print(f"[{name} {role}] done in {res['wall_s']:.0f} s, median step {res['step']['median_s']:.3f} s, peak RSS "
          f"{res['peak_rss'] / GiB:.2f} GiB, load average {res['load_after']}", flush=True)
    return res


def flops_per_token(cfg: ModelConfig, b: int, t: int, ours: dict, remat: str) -> tuple[float, float]:
    """(XLA's cost analysis, CA + loops) per token of the step with `remat`."""
    ca = ours["flops"][remat]
    if ours["backend"] != "cpu":  # ragged_dot, no loops to correct
        return ca / (b * t), ca / (b * t)
    fwd_passes = 2 if remat == "block" else 1
    counted = fwd_passes * ours["gmm_counted"]["fwd"] + ours["gmm_counted"]["bwd"]
    d, f = cfg.hidden_size, cfg.intermediate_size
    actual = sum((fwd_passes + 2) * 2 * rows * (d * 2 * f + f * d) for rows in ours["rows"])
    return ca / (b * t), (ca - len(ours["rows"]) * counted + actual) / (b * t)


def describe(name: str, cfg: ModelConfig, b: int, t: int, ours: dict) -> None:
    print(f"{name}: {cfg.num_hidden_layers} layers {list(cfg.layer_types)}, D {cfg.hidden_size}, "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads of {cfg.head_dim}, {cfg.num_experts} experts "
          f"top-{cfg.experts_per_token}, F {cfg.intermediate_size}, V {cfg.vocab_size}; {ours['params'] / 1e6:.1f} M "
          f"parameters ({ours['params'] * 4 / GiB:.2f} GiB float32), {active_params(cfg) / 1e6:.1f} M active per "
          f"token; B x T {b} x {t}; expert rows multiplied per layer {ours['rows']} (routed: "
          f"{b * t * cfg.experts_per_token}, the rest is tile padding)")


def side_numbers(r: dict, tokens: int) -> dict:
    """One side's timings, memory, losses and the load around its run."""
    step = r["step"]
    return {"tok_s": tokens / step["median_s"], "cpu_s_per_step": r["cpu_per_step"], "median_s": step["median_s"],
            "best_s": step["best_s"], "first_s": r["first_s"], "cpu_share": step["cpu_share"],
            "peak_rss_GiB": r["peak_rss"] / GiB, "losses": r["losses"], "load": r["load_after"]}


def summarize(cfg: ModelConfig, b: int, t: int, ours: dict, hf: dict | None) -> dict:
    """One config's numbers: both sides', their ratios, FLOPs per token."""
    sides = {side: side_numbers(r, b * t) for side, r in (("ours", ours), ("HF", hf)) if r}
    six_a = 6 * active_params(cfg)
    flops = {remat: flops_per_token(cfg, b, t, ours, remat) for remat in ("none", "block")}
    nan = float("nan")
    return {"shape": f"{b} x {t}", "sides": sides, "six_active": six_a, "attention_flops": attention_flops(cfg, t),
            "ratio": sides["ours"]["tok_s"] / sides["HF"]["tok_s"] if hf else nan,
            "cpu_ratio": sides["HF"]["cpu_s_per_step"] / sides["ours"]["cpu_s_per_step"] if hf else nan,
            "flops_per_token": {r: {"ca": v[0], "ca_loops": v[1], "over_6A": round(v[1] / six_a, 3)}
                                for r, v in flops.items()}}


def report(results: dict, args) -> dict:
    print()
    print(f"train step, float32 both, {os.cpu_count()} CPU cores, torch threads {args.threads}, HF experts "
          f"'{args.hf_experts}', HF AdamW '{args.hf_adamw}'; median of {args.steps} steps after {args.warmup} warm-up")
    for name, (cfg, b, t, ours, _) in results.items():
        describe(name, cfg, b, t, ours)
    summary = {name: summarize(*r) for name, r in results.items()}
    print()
    print(f"{'config':<11}{'B x T':>9}{'ours tok/s':>12}{'HF tok/s':>10}{'ours/HF':>9}{'by CPU time':>13}"
          f"{'FLOPs/token / 6A':>18}{'CPU share ours/HF':>19}   load average (1/5/15) ours; HF")
    for name, s in summary.items():
        sides = s["sides"]
        hf_tok = sides["HF"]["tok_s"] if "HF" in sides else float("nan")
        share = "/".join(f"{v['cpu_share']:.2f}" for v in sides.values())
        print(f"{name:<11}{s['shape']:>9}{sides['ours']['tok_s']:>12.1f}{hf_tok:>10.1f}{s['ratio']:>9.2f}"
              f"{s['cpu_ratio']:>13.2f}{s['flops_per_token']['none']['over_6A']:>18.3f}{share:>19}   "
              + "; ".join(str(v["load"]) for v in sides.values()))
    print("(ours/HF: tokens per wall-clock second; by CPU time: HF's CPU seconds per timed step / ours, less disturbed "
          "by other processes on the machine, though spinning threads count too)")
    flops_table(summary)
    details(summary, args)
    return summary


def flops_table(summary: dict) -> None:
    print()
    print(f"{'FLOPs per token':<22}{'XLA CA':>10}{'CA + loops':>12}{'6 x active':>12}{'(CA+loops)/6A':>15}"
          f"{'attention scores / 6A':>23}")
    for name, s in summary.items():
        for remat, v in s["flops_per_token"].items():
            print(f"{name + ' remat ' + remat:<22}{v['ca']:>10.4g}{v['ca_loops']:>12.4g}{s['six_active']:>12.4g}"
                  f"{v['over_6A']:>15.3f}{s['attention_flops'] / s['six_active']:>23.3f}")
    print("(the step as compiled: forward, backward, clipping and AdamW; 'CA + loops' replaces what the cost analysis "
          "counts for the tiled expert grouped matmuls by the tiles the batch's routing makes)")


def details(summary: dict, args) -> None:
    print()
    for name, s in summary.items():
        print(f"{name}: " + "; ".join(
            f"{side} step median {v['median_s']:.3f} s (best {v['best_s']:.3f}, first {v['first_s']:.1f}), "
            f"{v['cpu_s_per_step']:.2f} CPU s/step, peak RSS {v['peak_rss_GiB']:.2f} GiB, loss "
            f"{v['losses'][0]:.5f} -> {v['losses'][-1]:.5f}" for side, v in s["sides"].items()))
    print()
    for name, s in summary.items():
        over = s["flops_per_token"]["none"]["over_6A"]
        targets = [(f"{name} FLOPs/token remat none (CA+loops)/6A <= {TARGET_FLOPS}", over, over <= TARGET_FLOPS)]
        if not args.skip_hf:
            targets.insert(0, (f"{name} tok/s ours/HF >= {TARGET_SPEED}", s["ratio"], s["ratio"] >= TARGET_SPEED))
        for label, value, ok in targets:
            print(f"{'MET   ' if ok else 'MISSED'} {label}: {value:.2f}")


def parse_args() -> argparse.Namespace:
    def shape(text: str) -> tuple[int, int]:
        try:
            b, t = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected B x T, e.g. 2x128") from None
        return b, t

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny-only", action="store_true", help="only the tiny preset")
    p.add_argument("--skip-hf", action="store_true", help="only this project (no torch)")
    p.add_argument("--tiny-shape", type=shape, default=(4, 128), help="B x T of the tiny config (default 4x128)")
    p.add_argument("--slice-shape", type=shape, default=(2, 128), help="B x T of the 20b slice (default 2x128)")
    p.add_argument("--slice-experts", type=int, default=8, help="experts of the 20b slice (default 8; 20b: 32)")
    p.add_argument("--slice-vocab", type=int, default=16384, help="vocabulary of the 20b slice (default 16384)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--hf-experts", default="grouped_mm", choices=["grouped_mm", "eager"],
                   help="HF experts_implementation (default grouped_mm, transformers' own default; eager loops over "
                        "the experts and was slower in a trial here; batched_mm gathers a weight copy per "
                        "assignment and does not fit)")
    p.add_argument("--hf-adamw", default="fused", choices=["fused", "foreach", "loop"],
                   help="torch AdamW implementation (default fused, the fastest on CPU)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the checkpoints and raw results here (reused by the next run; default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    for hidden in ("--worker", "--config", "--ckpt", "--batch", "--out"):
        p.add_argument(hidden, help=argparse.SUPPRESS, type=Path if hidden in ("--ckpt", "--batch", "--out") else str)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        cfg = configs(args)[args.config][0]
        batch = {k: np.asarray(v) for k, v in np.load(args.batch).items()}
        res = {"ours": worker_ours, "hf": worker_hf}[args.worker](args, cfg, batch)
        res.setdefault("peak_rss", peak_rss())
        args.out.write_text(json.dumps(res))
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="oss-jax-trainbench-") as tmp:
        for name, (cfg, b, t) in configs(args).items():
            work = (args.workdir or Path(tmp)) / name
            work.mkdir(parents=True, exist_ok=True)
            ckpt, batch = prepare(cfg, b, t, work)
            ours = run_worker("ours", name, ckpt, batch, args)
            hf = None if args.skip_hf else run_worker("hf", name, ckpt, batch, args)
            results[name] = (cfg, b, t, ours, hf)
        summary = report(results, args)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
