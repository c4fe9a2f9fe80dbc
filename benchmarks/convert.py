"""Conversion throughput and memory on a full-size gpt-oss-20b-shaped checkpoint (random bytes, ~13.8 GB).

Prints, from one run: plain sequential read throughput of the source files, conversion throughput
(`python -m convert`, in its own process), their ratio (target >= 0.8) and the converter's peak RSS
(target <= 3 GB). Needs ~30 GB free disk. Not part of CI.

    python benchmarks/convert.py [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# `python benchmarks/convert.py` puts this folder first on sys.path, where this file would shadow the package
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from configs import preset_path  # noqa: E402
from convert.synthetic import make_checkpoint  # noqa: E402
from oss_jax.config import ModelConfig  # noqa: E402

CHUNK = 64 << 20


def drop_page_cache() -> bool:
    """Drop the OS page cache so both measurements start cold (needs root; returns whether it worked)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def sequential_read(files: list[Path]) -> tuple[int, float]:
    """Bytes and seconds to read every file start to end in 64 MB chunks."""
    total, t0 = 0, time.perf_counter()
    buf = bytearray(CHUNK)
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total, time.perf_counter() - t0


def sequential_write(path: Path, nbytes: int = 2 << 30) -> float:
    """Bytes/s writing `nbytes` to a new file and syncing it: the ceiling for anything that writes its output here."""
    buf = np.zeros(CHUNK, np.uint8)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(nbytes // CHUNK):
            f.write(buf)
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return nbytes / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None, help="where to write the ~28 GB (default: a temp dir)")
    p.add_argument("--config", default="gpt-oss-20b", help="preset or config.json (default gpt-oss-20b)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="oss-jax-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src, dst = work / "hf", work / "orbax"
    try:
        cfg = ModelConfig.from_file(preset_path(args.config))
        if not (src / "config.json").is_file():
            print(f"writing a random {args.config}-shaped HF checkpoint (published names, shapes, dtypes) to {src}")
            make_checkpoint(cfg, src, seed=0, progress=True)
        files = sorted(src.glob("*.safetensors"))
        cold = drop_page_cache()
        nbytes, read_s = sequential_read(files)
        drop_page_cache()
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "convert", str(src), str(dst), "--overwrite"], check=True)
        convert_s = time.perf_counter() - t0
        summary = json.loads((dst / "conversion.json").read_text())
        read_bps, convert_bps = nbytes / read_s, summary["bytes_read"] / convert_s
        write_bps = sequential_write(work / "write-probe.bin")
        result = {
            "config": args.config, "source_bytes": nbytes, "page_cache_dropped": cold,
            "sequential_read_MBps": round(read_bps / 1e6, 1), "convert_MBps": round(convert_bps / 1e6, 1),
            "ratio_convert_to_read": round(convert_bps / read_bps, 3),
            "sequential_write_MBps": round(write_bps / 1e6, 1),
            "ratio_convert_to_write": round(convert_bps / write_bps, 3),
            "convert_wall_s": round(convert_s, 1), "convert_peak_rss_GiB": round(summary["peak_rss"] / 2**30, 2),
        }
        print(json.dumps(result, indent=2))
        print(f"conversion throughput / sequential read: {result['ratio_convert_to_read']:.2f} (target >= 0.8); "
              f"converter peak RSS {result['convert_peak_rss_GiB']:.2f} GiB (target <= 3); "
              f"to a plain synced write of the same disk: {result['ratio_convert_to_write']:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
