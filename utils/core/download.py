"""Fetching what a user asks for by name: official YOLOv5 checkpoints and dataset archives.

Nothing else in the project touches the network. A download goes to a temporary file beside its target, is
checked (size, not an HTML page, the right kind of file) and only then renamed into place, so an interrupted
or refused download never leaves something that looks like the real file. Offline (no network, or
YOLO_OFFLINE=1) the request fails with one line naming the file and where to get it.
"""
from __future__ import annotations

import http.client
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from utils.core.errors import UserError

LOGGER = logging.getLogger("yolov5kd")

RELEASES_URL = "https://github.com/ultralytics/yolov5/releases/download"  # YOLOv5's release assets
ASSETS_URL_ENV = "YOLOV5KD_ASSETS_URL"  # replaces RELEASES_URL (a mirror, or a local server in the tests)
OFFLINE_ENV = "YOLO_OFFLINE"
WEIGHTS_TAG = "v7.0"
# the detection checkpoints of the v7.0 release (the -cls and -seg assets are not detection models)
OFFICIAL_WEIGHTS = tuple(f"yolov5{size}{p6}.pt" for p6 in ("", "6") for size in "nsmlx")
MIN_BYTES = 100_000  # a smaller download is an error page or a cut connection, never a checkpoint
ATTEMPTS = 2  # one retry, as YOLOv5 does
TIMEOUT_S = 30.0  # seconds without data before a connection counts as dead
CHUNK = 1 << 16


def assets_base() -> str:
    """The release-download base: $YOLOV5KD_ASSETS_URL, else YOLOv5's GitHub releases."""
    return os.environ.get(ASSETS_URL_ENV, "").rstrip("/") or RELEASES_URL


def offline() -> bool:
    """True when YOLO_OFFLINE asks for no network access."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _html(head: bytes) -> bool:
    start = head.lstrip()[:15].lower()
    return start.startswith((b"<!doctype", b"<html", b"<head", b"<body"))


def download(url: str, dest: Path, what: str, check: Callable[[Path], str | None] | None = None,
             min_bytes: int = MIN_BYTES, progress: bool = True) -> Path:
    """Fetch `url` into `dest` (a temp file beside it, renamed once complete and checked); returns `dest`.

    `check(tmp)` may return a reason to refuse the file. Raises UserError with one line on failure (offline,
    unreachable, cut short, too small, an HTML page, refused by `check`); nothing is left at `dest` then."""
    dest = Path(dest)
    if offline():
        raise UserError(f"{dest.name}: {what} is not here and {OFFLINE_ENV} is set; download it from {url} into "
                        f"{dest.parent.resolve()}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    reason = ""
    for attempt in range(1, ATTEMPTS + 1):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                reason = _fetch(url, f, dest.name, progress)
            if not reason:
                size = tmp.stat().st_size
                with open(tmp, "rb") as f:
                    head = f.read(512)
                if _html(head):
                    reason = "the server sent an HTML page, not the file"
                elif size < min_bytes:
                    reason = f"only {size} bytes arrived (a real one has at least {min_bytes})"
                elif check is not None:
                    reason = check(tmp) or ""
            if not reason:
                os.replace(tmp, dest)
                return dest
        finally:
            tmp.unlink(missing_ok=True)
        if attempt < ATTEMPTS:
            LOGGER.warning(f"WARNING: {dest.name}: download failed ({reason}); retrying")
    raise UserError(f"{dest.name}: could not download {what} from {url} ({reason}); download it by hand into "
                    f"{dest.parent.resolve()}")


def _fetch(url: str, f, name: str, progress: bool) -> str:
    """Stream `url` into the open file `f`; returns '' on success, else why it failed."""
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "yolov5kd"})
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            got = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"Downloading {name}",
                      disable=not progress) as bar:
                while True:
                    chunk = r.read(CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            if total is not None and got != total:
                return f"the connection closed after {got} of {total} bytes"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:
        return f"no connection: {e.reason}"
    except http.client.IncompleteRead as e:
        return f"the connection closed after {len(e.partial)} more bytes, short of the announced size"
    except (http.client.HTTPException, OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return ""


def _is_checkpoint(path: Path) -> str | None:
    # torch.save's format is a zip archive; the safe loader reads it afterwards, as any local checkpoint
    return None if zipfile.is_zipfile(path) else "not a PyTorch checkpoint (no zip archive)"


def official_weights_url(name: str) -> str:
    """Where YOLOv5 publishes the official checkpoint `name`."""
    return f"{assets_base()}/{WEIGHTS_TAG}/{name}"


def ensure_weights(weights: str | Path | None) -> None:
    """If `weights` is a bare official name (yolov5s.pt, yolov5m6.pt, ...) that is not a local file, download it
    into the current directory under that name, as YOLOv5 does. Any other value is left alone."""
    if not weights:
        return
    p = Path(str(weights))
    bare = "/" not in str(weights) and os.sep not in str(weights)  # a path with a folder is the user's own file
    if p.exists() or not bare or p.name not in OFFICIAL_WEIGHTS:
        return
    LOGGER.info(f"{p.name}: not found locally; downloading the official YOLOv5 {WEIGHTS_TAG} checkpoint")
    download(official_weights_url(p.name), Path.cwd() / p.name, "the official YOLOv5 checkpoint",
             check=_is_checkpoint)


def download_zip_dataset(url: str, path: Path, yaml_name: str) -> None:
    """Fetch a dataset zip and unpack it to `path` (the yaml's root): into a temp folder beside it, renamed
    into place only when the whole archive is unpacked, so a broken archive never counts as the dataset."""
    path = Path(path)
    zip_path = path.parent / Path(url.split("?")[0]).name
    # no size floor: a small dataset makes a small zip, and the archive check below catches a broken one
    download(url, zip_path, f"the dataset archive of {yaml_name}", check=_is_good_zip, min_bytes=1)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with zipfile.ZipFile(zip_path) as z:
            _safe_extract(z, work)
        entries = [e for e in work.iterdir() if not e.name.startswith("__MACOSX")]
        # coco128.zip holds one folder named like the dataset: its content is the dataset root
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() and entries[0].name == path.name else work
        _move_into(root, path)
    except (zipfile.BadZipFile, OSError, UserError) as e:
        raise UserError(f"{yaml_name}: the archive from {url} could not be unpacked ({e}); nothing was kept") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        zip_path.unlink(missing_ok=True)
    LOGGER.info(f"{yaml_name}: dataset unpacked to {path}")


def _move_into(src: Path, path: Path) -> None:
    """`src`'s content becomes `path`'s. An existing `path` keeps what it has: folders merge, and a file it already
    holds is refused before anything moves (nothing of the user's is overwritten)."""
    if not path.exists():
        os.replace(src, path)
        return
    clash = _clashes(src, path)
    if clash:
        raise UserError(f"{path} already holds {', '.join(clash[:3])}, which the archive also has; move it away "
                        f"and try again")
    _merge(src, path)


def _clashes(src: Path, dest: Path) -> list[str]:
    out = []
    for e in sorted(src.iterdir()):
        d = dest / e.name
        if d.exists():
            out += _clashes(e, d) if e.is_dir() and d.is_dir() else [str(d)]
    return out


def _merge(src: Path, dest: Path) -> None:
    for e in src.iterdir():
        d = dest / e.name
        if d.exists():
            _merge(e, d)
        else:
            os.replace(e, d)


def _is_good_zip(path: Path) -> str | None:
    if not zipfile.is_zipfile(path):
        return "not a zip archive"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        return f"a broken zip archive ({e})"
    return f"a broken zip archive (member {bad} fails its CRC)" if bad else None


def _safe_extract(z: zipfile.ZipFile, dest: Path) -> None:
    """Extract every member inside `dest`; a member whose path leaves it is refused."""
    root = dest.resolve()
    for member in z.namelist():
        target = (dest / member).resolve()
        if root != target and root not in target.parents:
            raise UserError(f"member {member!r} would be written outside the dataset folder")
    z.extractall(dest)
