"""Finding and reading the project's yaml files (models, datasets, hyperparameters)."""
from __future__ import annotations

from pathlib import Path

import yaml

from utils.errors import UserError


def find_file(name: str | Path, folders: list[Path], what: str) -> Path:
    """The file as given if it exists, else the first match by name in `folders` (short names like 'shapes.yaml')."""
    p = Path(name)
    if p.is_file():
        return p
    if not p.is_absolute():
        for folder in folders:
            for cand in (folder / p, folder / p.name, (folder / p.name).with_suffix(".yaml")):
                if cand.is_file():
                    return cand
    raise UserError(f"{name}: {what} not found")


def read_yaml(path: Path, what: str, required: tuple[str, ...] = ()) -> dict:
    """A yaml mapping from `path`; unreadable files, non-mappings and missing keys are one-line UserErrors."""
    try:
        d = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read {what} ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: {what} must be a mapping")
    missing = [k for k in required if k not in d]
    if missing:
        raise UserError(f"{path}: {what} is missing {', '.join(repr(k) for k in missing)}")
    return d


def yaml_save(file: str | Path, data: dict) -> None:
    """Write a dict as yaml (paths as strings)."""
    with open(file, "w") as f:
        yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in data.items()}, f, sort_keys=False)
