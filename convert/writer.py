"""Write a checkpoint directory in either published layout, atomically (temp directory, then rename)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from convert import layouts
from convert.layouts import HF, ORIGINAL
from convert.reader import INDEX
from oss_jax.config import ModelConfig

MAX_SHARD_BYTES = 4_800_000_000  # what the published HF conversion used


@contextlib.contextmanager
def atomic_dir(dst: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `dst` that becomes `dst` only if the block completes."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def params_to_hf(cfg: ModelConfig, params: Mapping[str, np.ndarray], *, packed: bool = True) -> dict[str, np.ndarray]:
    """Model parameters -> HF tensors (bf16, experts MXFP4-encoded when `packed`)."""
    out = {}
    for rule in layouts.hf_rules(cfg, packed=packed):
        for name, value in zip(rule.sources, rule.save(cfg, np.asarray(params[rule.param], np.float32)), strict=True):
            out[name] = value if value.dtype == np.uint8 else value.astype(layouts.BF16)
    return out


def write_checkpoint(dst: str | Path, cfg: ModelConfig, hf: Mapping[str, np.ndarray], *, layout: str = HF,
                     max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Write HF-named tensors `hf` as a checkpoint in `layout` ('hf' or 'original') with its config.json."""
    packed = any(n.endswith("_blocks") for n in hf)
    if layout == HF:
        expected, tensors, config = layouts.hf_tensors(cfg, packed=packed), dict(hf), cfg.to_hf_config(mxfp4=packed)
        shard_name = "model-{:05d}-of-{:05d}.safetensors"
    elif layout == ORIGINAL:
        if not packed:
            raise ValueError("the original layout stores experts MXFP4-packed only")
        expected, config = layouts.original_tensors(cfg), cfg.to_original_config()
        tensors = {name: layouts.fuse_original(cfg, name, hf) for name in layouts.original_to_hf_names(cfg)}
        shard_name = "model--{:05d}-of-{:05d}.safetensors"
    else:
        raise ValueError(f"unknown layout {layout!r}; expected 'hf' or 'original'")
    for name, t in tensors.items():
        layouts.check_tensor(name, t.dtype, t.shape, expected, f"writing {layout} checkpoint")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise layouts.LayoutError(f"writing {layout} checkpoint: tensors missing {missing[:5]}")
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_shards(tmp, tensors, shard_name, max_shard_bytes, index_offset=1 if layout == ORIGINAL else 0)
    return Path(dst)


def _write_shards(out: Path, tensors: Mapping[str, np.ndarray], pattern: str, max_bytes: int,
                  index_offset: int) -> None:
    """Greedy shards in name order; one shard is `model.safetensors`, more get an index json."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(t)
        size += t.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"))
        return
    last = len(shards) - 1 + index_offset
    weight_map = {}
    for i, shard in enumerate(shards):
        file = pattern.format(i + index_offset, last)
        save_file(shard, str(out / file))
        weight_map |= {name: file for name in shard}
    total = sum(t.nbytes for t in tensors.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
