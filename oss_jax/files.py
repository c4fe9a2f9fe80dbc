"""Output files and directories written atomically, and the tokenizer files that travel with a checkpoint."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


@contextlib.contextmanager
def atomic_dir(dst: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield `.DST.partial` beside `dst`; it becomes `dst` only if the block completes (a leftover is replaced)."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial"
    if tmp.exists():  # left by an interrupted run
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """`path` holds either its old content or all of `text`, never a part (written beside it, then renamed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer/generation files of SRC (or of a Hub root above an original/ SRC) into DST."""
    copied = []
    for folder in (src, src.parent) if src.name == "original" else (src,):
        for name in TOKENIZER_FILES:
            if (folder / name).is_file() and name not in copied:
                shutil.copy2(folder / name, dst / name)
                copied.append(name)
    return copied
