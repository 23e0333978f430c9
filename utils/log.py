"""Logging set-up and run-folder naming."""
from __future__ import annotations

import glob
import logging
import os
import sys
from pathlib import Path


LOGGER = logging.getLogger("yolov5kd")


def setup_logging(rank: int = -1, verbose: bool = True) -> logging.Logger:
    """One plain handler on stderr; ranks other than 0 only report warnings and errors."""
    level = logging.INFO if verbose and rank in (-1, 0) else logging.WARNING
    LOGGER.setLevel(level)
    if not LOGGER.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(h)
    LOGGER.propagate = False
    return LOGGER


def increment_path(path: str | Path, exist_ok: bool = False, sep: str = "", mkdir: bool = False) -> Path:
    """runs/train/exp → exp2, exp3, … (the first that does not exist), unless exist_ok."""
    path = Path(path)
    if path.exists() and not exist_ok:
        path, suffix = (path.with_suffix(""), path.suffix) if path.is_file() else (path, "")
        for n in range(2, 9999):
            p = Path(f"{path}{sep}{n}{suffix}")
            if not p.exists():
                path = p
                break
    if mkdir:
        path.mkdir(parents=True, exist_ok=True)
    return path


def get_latest_run(search_dir: str | Path = ".") -> str:
    """Path of the most recently written last*.pt under search_dir ('' if none)."""
    last_list = glob.glob(f"{search_dir}/**/last*.pt", recursive=True)
    return max(last_list, key=os.path.getctime) if last_list else ""
