"""Model presets: HF-style config.json files shipped with the package."""

from __future__ import annotations

from pathlib import Path

PRESETS_DIR = Path(__file__).parent


def names() -> list[str]:
    """Preset names, e.g. 'gpt-oss-20b', 'gpt-oss-120b', 'tiny'."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def preset_path(name_or_path: str | Path) -> Path:
    """A preset name or a path to a config.json (or a directory holding one) -> the config.json path."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return path
    candidate = PRESETS_DIR / f"{name_or_path}.json"
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"{name_or_path!r} is neither a preset ({', '.join(names())}) nor a config.json path")
