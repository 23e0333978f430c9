"""Finding and reading the project's yaml files (models, datasets, hyperparameters)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import yaml

from utils.core.errors import UserError


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


# Far above any real project yaml (a COCO dataset yaml expands to ~200 nodes, a model yaml to ~400), far
# below what an alias bomb expands to: aliases are shared on load, but str(), copies and pickling expand them.
MAX_YAML_NODES = 100_000


def expanded_size(obj: object, limit: int = MAX_YAML_NODES) -> int:
    """Number of nodes `obj` would have with every alias expanded; stops counting past `limit`.

    Counted once per distinct object and memoised, so a billion-node alias bomb costs one pass over its few
    distinct nodes; a self-referencing structure counts as over the limit.
    """
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(x: object) -> int:
        if not isinstance(x, (dict, list, tuple)):
            return 1
        key = id(x)
        if key in memo:
            return memo[key]
        if key in active:  # recursive alias: infinite once expanded
            return limit + 1
        active.add(key)
        n = 1
        for c in (list(x.keys()) + list(x.values())) if isinstance(x, dict) else x:
            n += size(c)
            if n > limit:
                break
        active.discard(key)
        memo[key] = n
        return n

    return size(obj)


def read_yaml(path: Path, what: str, required: tuple[str, ...] = ()) -> dict:
    """A yaml mapping from `path`; unreadable files, non-mappings and missing keys are one-line UserErrors."""
    try:
        # utf-8-sig: a byte-order mark that an editor put in front must not become part of the first key
        d = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read {what} ({' '.join(str(e).split())[:200]})") from None
    except RecursionError:
        raise UserError(f"{path}: cannot read {what} (nested too deeply)") from None
    if expanded_size(d) > MAX_YAML_NODES:
        raise UserError(f"{path}: {what} expands to more than {MAX_YAML_NODES} values once its aliases (&/*) are "
                        f"resolved; refusing it (an alias bomb?)")
    if not isinstance(d, dict):
        raise UserError(f"{path}: {what} must be a mapping")
    missing = [k for k in required if k not in d]
    if missing:
        raise UserError(f"{path}: {what} is missing {', '.join(repr(k) for k in missing)}")
    return d


def _read_umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# Read once at import: swapping the umask to read it is process-wide, and writes happen from thread pools.
FILE_MODE = 0o666 & ~_read_umask()


def atomic_write(path: str | Path, data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write bytes, text or a writer's output to a temp file beside `path`, fsync, then rename over it.

    Readers never see half a file, an interrupted write leaves the old file intact, and the result gets the
    mode a plain open() would give it (mkstemp's own 0600 would hide a run's files from its other users).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def yaml_save(file: str | Path, data: dict) -> None:
    """Write a dict as yaml (paths as strings)."""
    with open(file, "w") as f:
        yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in data.items()}, f, sort_keys=False)
