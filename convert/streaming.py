"""Streaming conversion: safetensors checkpoint (HF or original layout) -> Orbax, and Orbax -> HF safetensors.

Both directions move a bounded group of tensors at a time (Orbax partial saves / partial restores), so peak
memory is a small constant plus one group, whatever the model size.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from tqdm import tqdm

from convert import layouts
from convert.reader import CheckpointReader
from convert.writer import MAX_SHARD_BYTES, write_shards
from oss_jax.checkpoint import PARAMS, nest, restore, stored_metadata
from oss_jax.config import ModelConfig
from oss_jax.files import atomic_dir, copy_tokenizer

GROUP_BYTES = 256 << 20  # tensors handed to Orbax per partial save
DTYPES = {"bf16": layouts.BF16, "fp32": np.dtype(np.float32)}
EXPERT_FORMATS = ("packed", "bf16", "fp32")


@dataclasses.dataclass
class Summary:
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss: int

    def __str__(self) -> str:
        return (f"{self.tensors} tensors, {self.bytes_read / 1e9:.2f} GB read, {self.bytes_written / 1e9:.2f} GB "
                f"written in {self.seconds:.1f}s ({self.bytes_read / 1e6 / max(self.seconds, 1e-9):.0f} MB/s), "
                f"peak RSS {self.peak_rss / 2**30:.2f} GiB")


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _stored_leaves(reader: CheckpointReader, experts: str, dtype: np.dtype | None
                   ) -> Iterator[tuple[str, np.ndarray, int]]:
    """(stored name, array, source bytes) for every parameter, in layer order, one source tensor group at a time."""
    cfg = reader.config
    for rule in layouts.hf_rules(cfg, packed=reader.packed):
        sources = [reader.get_hf(s) for s in rule.sources]
        nbytes = sum(s.nbytes for s in sources)
        if len(sources) == 2 and experts == "packed":  # MXFP4 blocks + scales, kept byte for byte
            yield f"{rule.param}.blocks", sources[0], nbytes
            yield f"{rule.param}.scales", sources[1], 0
            continue
        is_expert = rule.param.endswith(("mlp1_kernel", "mlp2_kernel"))
        value = rule.load(cfg, *sources)
        target = DTYPES[experts] if is_expert else dtype
        yield rule.param, np.ascontiguousarray(value.astype(target) if target is not None else value), nbytes


class _GroupSaver:
    """Hands tensors to Orbax in groups of ~`group_bytes` as partial saves, writing one group while the next is
    read (at most two groups in memory); uncompressed, since weights barely compress and zstd halves throughput."""

    def __init__(self, path: Path, group_bytes: int):
        self.path, self.group_bytes = path, group_bytes
        self.group: dict[str, np.ndarray] = {}
        self.pending = None
        self.context = ocp.Context()
        self.context.array.saving.use_compression = False

    def add(self, name: str, array: np.ndarray) -> None:
        self.group[name] = array
        if sum(a.nbytes for a in self.group.values()) >= self.group_bytes:
            self._flush()

    def _flush(self) -> None:
        self._wait()
        if self.group:
            size = sum(a.nbytes for a in self.group.values())
            with self.context:
                self.pending = ocp.partial.save_async(self.path, nest(self.group))
            self.group = {}
            if size > 2 * self.group_bytes:  # one huge tensor (an embedding): Orbax copies it; don't read beside it
                self._wait()

    def _wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        self._flush()
        self._wait()
        with self.context:
            ocp.partial.finalize(self.path)


def _output_bytes(reader: CheckpointReader, sizes: dict[str, int], experts: str, dtype: str | None) -> int:
    """Roughly what the Orbax checkpoint will take: MXFP4 widens ~4x to bf16, ~8x to fp32."""
    expected = reader.expected()  # built once: it lists every tensor of the config
    packed_bytes = sum(n for name, n in sizes.items() if expected[name][0] == layouts.U8)
    other = sum(sizes.values()) - packed_bytes
    widen = {"packed": 1, "bf16": 4, "fp32": 8}[experts]
    return packed_bytes * widen + other * (2 if dtype == "fp32" else 1)


def _check_disk(dst: Path, needed: int) -> None:
    free = shutil.disk_usage(dst.parent if dst.parent.exists() else Path.cwd()).free
    if free < needed * 1.05 + (64 << 20):
        raise OSError(f"not enough free disk space for {dst}: need ~{needed / 1e9:.2f} GB, "
                      f"{free / 1e9:.2f} GB free")


def convert_checkpoint(src: str | Path, dst: str | Path, *, experts: str = "packed", dtype: str | None = None,
                       overwrite: bool = False, progress: bool = True, group_bytes: int = GROUP_BYTES) -> Summary:
    """Convert a HF or original-layout safetensors checkpoint into an Orbax checkpoint directory at `dst`."""
    src, dst = Path(src), Path(dst).absolute()  # Orbax wants absolute paths
    if experts not in EXPERT_FORMATS:
        raise ValueError(f"experts must be one of {EXPERT_FORMATS}, got {experts!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass --overwrite to replace it)")
    t0 = time.perf_counter()
    reader = CheckpointReader(src)
    reader.validate()
    if experts == "packed" and not reader.packed:
        raise ValueError(f"{src}: experts are stored dequantized; choose --experts bf16 or fp32")
    sizes = {name: int(np.prod(s)) * d.itemsize for name, (d, s) in reader.expected().items()}
    total = sum(sizes.values())
    _check_disk(dst, _output_bytes(reader, sizes, experts, dtype))
    written = count = 0
    with atomic_dir(dst, overwrite=overwrite) as tmp, \
            tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress) as bar:
        saver = _GroupSaver(tmp / PARAMS, group_bytes)
        for name, array, nbytes in _stored_leaves(reader, experts, DTYPES.get(dtype)):
            saver.add(name, array)
            count, written = count + 1, written + array.nbytes
            bar.update(nbytes)
        saver.close()
        (tmp / "config.json").write_text(json.dumps(reader.config.to_hf_config(mxfp4=experts == "packed"),
                                                    indent=2) + "\n")
        copied = copy_tokenizer(src, tmp)
        summary = Summary(count, total, written, time.perf_counter() - t0, peak_rss())
        (tmp / "conversion.json").write_text(json.dumps({
            "source": str(src.resolve()), "source_layout": reader.layout, "experts": experts, "dtype": dtype,
            "tokenizer_files": copied, **dataclasses.asdict(summary)}, indent=2) + "\n")
    return summary


def export_checkpoint(src: str | Path, dst: str | Path, *, max_shard_bytes: int = MAX_SHARD_BYTES,
                      overwrite: bool = False, progress: bool = True) -> Summary:
    """Write an Orbax checkpoint directory (from `convert` or training) as a HF-layout safetensors checkpoint."""
    src, dst = Path(src).absolute(), Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass --overwrite to replace it)")
    t0 = time.perf_counter()
    cfg = ModelConfig.from_file(src)
    meta = stored_metadata(src)
    packed = any(name.endswith(".blocks") for name in meta)
    rules = layouts.hf_rules(cfg, packed=packed)
    dtypes = _export_dtypes(rules, meta, packed)
    entries = [(name, dtypes[name], shape) for name, (_, shape) in layouts.hf_tensors(cfg, packed=packed).items()]
    entries.sort(key=lambda e: _rule_order(rules)[e[0]])
    total = sum(d.itemsize * int(np.prod(s)) for _, d, s in entries)
    _check_disk(dst, total)
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        write_shards(tmp, entries, _exported_tensors(src, cfg, rules, packed), pattern="model-{:05d}-of-{:05d}"
                     ".safetensors", max_bytes=max_shard_bytes, progress=progress)
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_config(mxfp4=packed), indent=2) + "\n")
        copy_tokenizer(src, tmp)
    return Summary(len(entries), total, total, time.perf_counter() - t0, peak_rss())


def _rule_order(rules: list[layouts.Rule]) -> dict[str, int]:
    return {source: i for i, source in enumerate(s for rule in rules for s in rule.sources)}


def _export_dtypes(rules, meta, packed: bool) -> dict[str, np.dtype]:
    """HF tensor name -> dtype written: MXFP4 stays uint8, other tensors keep their stored float dtype."""
    out = {}
    for rule in rules:
        for source in rule.sources:
            if packed and source.endswith(("_blocks", "_scales")):
                out[source] = np.dtype(np.uint8)
            else:
                out[source] = meta[rule.param][1]
    return out


def _exported_tensors(src: Path, cfg: ModelConfig, rules, packed: bool) -> Iterator[tuple[str, np.ndarray]]:
    """HF tensors in rule order, restoring one layer's parameters at a time."""
    by_layer: dict[str, list[layouts.Rule]] = {}
    for rule in rules:
        key = ".".join(rule.param.split(".")[:2]) if rule.param.startswith("layers.") else rule.param
        by_layer.setdefault(key, []).append(rule)
    for group in by_layer.values():
        names = [n for rule in group for n in _stored_names(rule, packed)]
        arrays = {k: np.asarray(v) for k, v in restore(src, names=names).items()}
        for rule in group:
            if packed and rule.sources[0].endswith("_blocks"):
                yield rule.sources[0], arrays[f"{rule.param}.blocks"]
                yield rule.sources[1], arrays[f"{rule.param}.scales"]
            else:
                yield from zip(rule.sources, rule.save(cfg, arrays[rule.param]), strict=True)


def _stored_names(rule: layouts.Rule, packed: bool) -> list[str]:
    if packed and rule.sources[0].endswith("_blocks"):
        return [f"{rule.param}.blocks", f"{rule.param}.scales"]
    return [rule.param]

