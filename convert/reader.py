"""Read a safetensors checkpoint directory in either published layout, tensor by tensor (memory-mapped)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from convert import layouts
from convert.layouts import HF, ORIGINAL, LayoutError
from oss_jax.config import ModelConfig

INDEX = "model.safetensors.index.json"


class CheckpointReader:
    """Tensors of one checkpoint directory by name, with its config and layout ('hf' or 'original')."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise LayoutError(f"{self.path}: not a directory")
        self.config = ModelConfig.from_file(self.path)
        self.files = _tensor_files(self.path)
        names = set(self.files)
        if "model.embed_tokens.weight" in names or any(n.startswith("model.layers.") for n in names):
            self.layout = HF
        elif "embedding.weight" in names or any(n.startswith("block.") for n in names):
            self.layout = ORIGINAL
        else:
            raise LayoutError(f"{self.path}: tensors are neither the HF nor the original gpt-oss layout")
        self.packed = self.layout == ORIGINAL or any(n.endswith("_blocks") for n in names)
        self._hf_to_original: dict[str, str] | None = None
        self._headers: dict[Path, tuple[int, dict]] = {}
        self._last: tuple[str | None, dict[str, np.ndarray]] = (None, {})

    def expected(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """name -> (dtype, shape) that config.json implies for this layout."""
        if self.layout == HF:
            return layouts.hf_tensors(self.config, packed=self.packed)
        return layouts.original_tensors(self.config)

    def validate(self) -> None:
        """Every expected tensor present with the right shape and dtype, nothing else (headers only)."""
        expected = self.expected()
        missing = sorted(set(expected) - set(self.files))
        if missing:
            raise LayoutError(f"{self.path}: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
        by_file: dict[Path, list[str]] = {}
        for name, file in self.files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            with _open(file) as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise LayoutError(f"{file}: tensor {name!r} listed in the index is not in this shard")
                    sl = f.get_slice(name)
                    dtype = _DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise LayoutError(f"{file}: tensor {name!r} has unsupported dtype {sl.get_dtype()}")
                    layouts.check_tensor(name, dtype, tuple(sl.get_shape()), expected, str(file))

    def get(self, name: str) -> np.ndarray:
        """One tensor, read straight from its file into a fresh array (no memory map: one copy in memory)."""
        if name not in self.files:
            raise LayoutError(f"{self.path}: tensor {name!r} not found")
        file = self.files[name]
        if file not in self._headers:
            self._headers[file] = _read_header(file)
        start, entries = self._headers[file]
        entry = entries.get(name)
        if entry is None or entry["dtype"] not in _DTYPES:
            with _open(file) as f:
                return f.get_tensor(name)
        begin, end = entry["data_offsets"]
        dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
        array = np.fromfile(file, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
        if array.nbytes != end - begin:
            raise LayoutError(f"{file}: tensor {name!r} is truncated")
        return array.reshape(shape)

    def get_hf(self, name: str) -> np.ndarray:
        """One tensor by its HF name, whatever the layout (a part of the fused qkv is split out)."""
        if self.layout == HF:
            return self.get(name)
        if self._hf_to_original is None:
            self._hf_to_original = {p: o for o, parts in layouts.original_to_hf_names(self.config).items()
                                    for p in parts}
        original = self._hf_to_original[name]
        if self._last[0] != original:  # q, k and v are asked for in turn: read the fused tensor once
            self._last = (original, layouts.split_original(self.config, original, self.get(original)))
        return self._last[1][name]

    def hf_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """All tensors under HF names, one source tensor at a time (the fused qkv yields three)."""
        for name in sorted(self.files):
            tensor = self.get(name)
            if self.layout == HF:
                yield name, tensor
            else:
                yield from layouts.split_original(self.config, name, tensor).items()


def load_params(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """A checkpoint directory -> (config, float32 parameters by model name); validates names, shapes, dtypes."""
    reader = CheckpointReader(path)
    reader.validate()
    hf = {name: t for name, t in reader.hf_tensors()}
    params = {}
    for rule in layouts.hf_rules(reader.config, packed=reader.packed):
        sources = [np.asarray(hf[s]) for s in rule.sources]
        sources = [s if s.dtype == np.uint8 else s.astype(np.float32) for s in sources]
        params[rule.param] = rule.load(reader.config, *sources)
    return reader.config, params


_DTYPES = {"BF16": layouts.BF16, "U8": layouts.U8, "F32": np.dtype(np.float32), "F16": np.dtype(np.float16)}


def _read_header(file: Path) -> tuple[int, dict]:
    """(byte offset of the data, the safetensors header) of one file."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        try:
            return 8 + size, json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LayoutError(f"{file}: unreadable safetensors header ({e})") from None


def _open(file: Path):
    try:
        return safe_open(str(file), framework="np")
    except (SafetensorError, OSError) as e:
        raise LayoutError(f"{file}: unreadable safetensors file ({e})") from None


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the shard holding it, from the index json when there is one."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LayoutError(f"{index}: invalid index ({e})") from None
        for file in set(weight_map.values()):
            if not (path / file).is_file():
                raise LayoutError(f"{index}: shard {file!r} does not exist")
        files = {name: path / file for name, file in weight_map.items()}
    else:
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise LayoutError(f"{path}: no *.safetensors files and no {INDEX}")
        files = {}
        for shard in shards:
            with _open(shard) as f:
                for name in f.keys():
                    if name in files:
                        raise LayoutError(f"{shard}: tensor {name!r} also in {files[name]}")
                    files[name] = shard
    return files
