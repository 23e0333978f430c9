"""Logging set-up and run-folder naming."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from utils.core.errors import UserError

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


@contextlib.contextmanager
def hold_run_folder(path: str | Path, hold: bool = True) -> Iterator[Path]:
    """Create `path` if needed and hold an exclusive lock on it for the duration, so a second process cannot write
    into the same run folder (its results.csv and weights would interleave with ours).

    The lock is flock() on the folder itself: no lock file is left in the run, and the kernel releases it when
    the process dies, so a killed run never leaves a stale lock. A folder this call created and nothing was
    written into is removed again (with the parents it created) if the block fails. hold=False (DDP ranks other than 0) does nothing.
    """
    path = Path(path)
    if not hold:
        yield path
        return
    new = [p for p in (path, *path.parents) if not p.exists()]  # what mkdir creates, deepest first
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise UserError(f"{path}: another process is writing into this run folder; wait for it to finish, or "
                            f"give another --name (or drop --exist-ok)") from None
        ok = False
        try:
            yield path
            ok = True
        finally:
            if not ok:
                with contextlib.suppress(OSError):  # rmdir fails on the first folder that is not empty
                    for p in new:
                        p.rmdir()
    finally:
        os.close(fd)
