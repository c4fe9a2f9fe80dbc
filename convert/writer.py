"""Write checkpoint directories in either published layout, streaming and atomically.

Tensors are written one at a time into safetensors shards whose headers are planned up front from the
expected names, dtypes and shapes, so no shard is ever held in memory whole.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from convert import layouts
from convert.layouts import HF, ORIGINAL
from convert.reader import INDEX
from oss_jax.config import ModelConfig
from oss_jax.files import atomic_dir

MAX_SHARD_BYTES = 4_800_000_000  # what the published HF conversion used
ST_DTYPES = {np.dtype(np.uint8): "U8", layouts.BF16: "BF16", np.dtype(np.float32): "F32",
             np.dtype(np.float16): "F16"}

Entry = tuple[str, np.dtype, tuple[int, ...]]


def plan_shards(entries: Iterable[Entry], max_bytes: int) -> list[list[Entry]]:
    """Greedy shards in the given order, a new one when the next tensor would pass `max_bytes`."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = entry[1].itemsize * int(np.prod(entry[2]))
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def write_shards(out: Path, entries: list[Entry], tensors: Iterable[tuple[str, np.ndarray]], *, pattern: str,
                 max_bytes: int, index_offset: int = 0, progress: bool = False) -> None:
    """Stream `tensors` (in `entries` order) into shards; one shard is `model.safetensors`, more get an index."""
    shards = plan_shards(entries, max_bytes)
    last = len(shards) - 1 + index_offset
    files = ["model.safetensors"] if len(shards) == 1 else [pattern.format(i + index_offset, last)
                                                             for i in range(len(shards))]
    stream = iter(tensors)
    total = sum(d.itemsize * int(np.prod(s)) for _, d, s in entries)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not progress)
    for file, shard in zip(files, shards, strict=True):
        with open(out / file, "wb") as f:
            f.write(_header(shard))
            for name, dtype, shape in shard:
                got, array = next(stream)
                if got != name or array.dtype != dtype or tuple(array.shape) != shape:
                    raise layouts.LayoutError(f"writing {file}: expected {name} {dtype} {shape}, "
                                              f"got {got} {array.dtype} {tuple(array.shape)}")
                f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
                bar.update(array.nbytes)
    bar.close()
    if len(shards) > 1:
        weight_map = {name: file for file, shard in zip(files, shards, strict=True) for name, _, _ in shard}
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _header(shard: list[Entry]) -> bytes:
    header, offset = {}, 0
    for name, dtype, shape in shard:
        nbytes = dtype.itemsize * int(np.prod(shape))
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def params_to_hf(cfg: ModelConfig, params: Mapping[str, np.ndarray], *, packed: bool = True) -> dict[str, np.ndarray]:
    """Model parameters -> HF tensors (bf16, experts MXFP4-encoded when `packed`)."""
    out = {}
    for rule in layouts.hf_rules(cfg, packed=packed):
        values = rule.save(cfg, np.asarray(params[rule.param], np.float32))
        for name, value in zip(rule.sources, values, strict=True):
            out[name] = value if value.dtype == np.uint8 else value.astype(layouts.BF16)
    return out


def layout_entries(cfg: ModelConfig, layout: str, *, packed: bool) -> list[Entry]:
    """The (name, dtype, shape) of every tensor of `layout`, in the order they are written."""
    if layout == HF:
        expected = layouts.hf_tensors(cfg, packed=packed)
    elif layout == ORIGINAL:
        if not packed:
            raise ValueError("the original layout stores experts MXFP4-packed only")
        expected = layouts.original_tensors(cfg)
    else:
        raise ValueError(f"unknown layout {layout!r}; expected 'hf' or 'original'")
    return [(name, dtype, shape) for name, (dtype, shape) in sorted(expected.items())]


def write_checkpoint(dst: str | Path, cfg: ModelConfig, hf: Mapping[str, np.ndarray], *, layout: str = HF,
                     max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False, progress: bool = False) -> Path:
    """Write HF-named tensors `hf` (any Mapping; read once each, in order) as a `layout` checkpoint + config.json."""
    packed = any(n.endswith("_blocks") for n in hf)
    expected = layouts.hf_tensors(cfg, packed=packed)
    missing, extra = sorted(set(expected) - set(hf)), sorted(set(hf) - set(expected))
    if missing or extra:
        raise layouts.LayoutError(f"writing {layout} checkpoint: tensors missing {missing[:5]}, unexpected {extra[:5]}")
    entries = layout_entries(cfg, layout, packed=packed)
    if layout == HF:
        tensors = ((name, hf[name]) for name, _, _ in entries)
        config, pattern, offset = cfg.to_hf_config(mxfp4=packed), "model-{:05d}-of-{:05d}.safetensors", 0
    else:
        tensors = ((name, layouts.fuse_original(cfg, name, hf)) for name, _, _ in entries)
        config, pattern, offset = cfg.to_original_config(), "model--{:05d}-of-{:05d}.safetensors", 1
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_shards(tmp, entries, tensors, pattern=pattern, max_bytes=max_shard_bytes, index_offset=offset,
                     progress=progress)
    return Path(dst)
