"""A fine-tuning run: data -> jitted steps -> metrics.jsonl, periodic async Orbax saves, exact resume, final weights.

RUN_DIR holds `train_config.json` (the run's settings, fixed at its start), `metrics.jsonl` (one object per step),
`checkpoints/<step>/` (Orbax CheckpointManager: train state + data-iterator position, the last K kept) and, when
the run completes, `final/`: a converted checkpoint (LoRA merged in) that `oss-jax generate/export` read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh
from tqdm import tqdm

from oss_jax import checkpoint, data
from oss_jax.files import write_text_atomic
from oss_jax.plan import batch_sharding
from oss_jax.train import BATCH_KEYS, TrainConfig, Trainer, TrainState

CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
FINAL = "final"


class RunError(ValueError):
    """A run directory that cannot be started or resumed as asked."""


def _run_config(run: Path, tc: TrainConfig, ckpt: Path, data_path: Path, resume: bool) -> TrainConfig:
    """The settings this run uses: new ones on a fresh run; on --resume, the stored ones (which must agree)."""
    stored = run / CONFIG
    if not resume:
        if (run / CHECKPOINTS).exists() and any((run / CHECKPOINTS).iterdir()):
            raise RunError(f"{run} already holds checkpoints: pass --resume to continue it, or choose a new --out")
        run.mkdir(parents=True, exist_ok=True)
        write_text_atomic(stored, json.dumps({"train": tc.to_dict(), "ckpt": str(ckpt), "data": str(data_path)},
                                              indent=2) + "\n")
        return tc
    if not stored.is_file():
        raise RunError(f"{run}: nothing to resume (no {CONFIG}); start the run without --resume")
    saved = json.loads(stored.read_text())
    saved_tc = TrainConfig.from_dict(saved["train"], str(stored))
    if saved_tc != tc:
        changed = sorted(k for k, v in tc.to_dict().items() if saved_tc.to_dict()[k] != v)
        raise RunError(f"{run}: --resume with settings that differ from the run's own {CONFIG}: {changed}")
    return saved_tc


def _manager(run: Path, tc: TrainConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=tc.keep, enable_async_checkpointing=True)
    return ocp.CheckpointManager(run.absolute() / CHECKPOINTS, options=options, item_names=("state", "data"))


def _saved(state: TrainState) -> dict[str, Any]:
    """What a checkpoint holds of the state: the frozen base is re-read from the source checkpoint instead."""
    return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state}


def _restore(mngr: ocp.CheckpointManager, step: int, state: TrainState) -> tuple[TrainState, dict[str, int]]:
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), _saved(state))
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                     data=ocp.args.JsonRestore()))
    s = out["state"]
    return TrainState(s["step"], s["trainable"], state.frozen, s["opt_state"]), out["data"]


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drop metric lines past `step` (written after the checkpoint a resumed run restarts from)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        write_text_atomic(path, "".join(ln + "\n" for ln in lines))


def _device_batch(batches: Iterator[dict[str, np.ndarray]], tc: TrainConfig, mesh: Mesh | None
                  ) -> tuple[dict[str, jax.Array], int]:
    """The next grad_accum batches stacked [A, B, T] (batch split over the mesh's data axes) and their token count."""
    micro = [next(batches) for _ in range(tc.grad_accum)]
    stacked = {k: np.stack([m[k] for m in micro]) for k in BATCH_KEYS}
    tokens = int(np.sum(stacked["positions"] >= 0))
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in stacked.items()}, tokens
    return {k: jax.device_put(v, batch_sharding(mesh, v.shape, dim=1)) for k, v in stacked.items()}, tokens


def fit(ckpt: str | Path, data_path: str | Path, run: str | Path, tc: TrainConfig, *, mesh: Mesh | None = None,
        resume: bool = False, skip_bad: bool = False, progress: bool = True,
        on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train from a converted checkpoint on a data file into RUN_DIR; returns the last step's metrics."""
    ckpt, data_path, run = Path(ckpt), Path(data_path), Path(run)
    if mesh is not None:
        batch_sharding(mesh, (tc.batch_size, tc.seq_len))  # a batch the mesh cannot split fails before any work
    tc = _run_config(run, tc, ckpt, data_path, resume)
    examples, stats = data.load_examples(data_path, ckpt, max_len=tc.seq_len + 1, train_on=tc.train_on,
                                         skip_bad=skip_bad)
    if not examples:
        raise RunError(f"{data_path}: no usable examples ({stats.skipped} skipped)")
    model = checkpoint.load(ckpt, mesh, jnp.float32)
    trainer = Trainer(model, tc)
    state = trainer.init_state(model)
    del model
    mngr = _manager(run, tc)
    batch_state = None
    if resume and mngr.latest_step() is not None:
        state, batch_state = _restore(mngr, mngr.latest_step(), state)
    start = int(state.step)
    _keep_metrics_until(run / METRICS, start)
    batches = data.Batches(examples, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=tc.seed, state=batch_state)
    last: dict[str, Any] = {}
    try:
        with open(run / METRICS, "a") as log, \
                tqdm(total=tc.steps, initial=start, desc="train", unit="step", disable=not progress) as bar:
            for step in range(start + 1, tc.steps + 1):
                batch, tokens = _device_batch(batches, tc, mesh)
                t0 = time.perf_counter()
                state, metrics = trainer.step(state, batch)
                metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
                seconds = time.perf_counter() - t0
                last = {"step": step, **metrics, "tokens": tokens, "tokens_per_s": tokens / seconds,
                        "step_s": seconds}
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                tok_s=f"{last['tokens_per_s']:.0f}")
                bar.update()
                if on_step is not None:
                    on_step(last)
                if step % tc.save_every == 0 or step == tc.steps:
                    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_saved(state)),
                                                            data=ocp.args.JsonSave(batches.state())))
        mngr.wait_until_finished()
        checkpoint.save(run / FINAL, trainer.cfg, trainer.params(state), tokenizer_from=ckpt, overwrite=True)
    finally:
        mngr.wait_until_finished()
        mngr.close()
    return last | {"examples": stats.examples, "skipped": stats.skipped}
