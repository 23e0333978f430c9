"""Fetching what a user asks for by name: official YOLOv5 checkpoints and dataset archives.

Nothing else in the project touches the network. A download goes to a temporary file beside its target, is
checked (size, not an HTML page, the right kind of file) and only then renamed into place, so an interrupted
or refused download never leaves something that looks like the real file. Offline (no network, or
YOLO_OFFLINE=1) the request fails with one line naming the file and where to get it.

Every fetch is bounded: by size (twice the release size of an official checkpoint, a bound per known dataset
archive, a general cap, the free disk), by speed (a stall or a trickle is abandoned) and, for an archive, by
what it unpacks to (declared sizes, compression ratio, free disk). A dataset yaml's `download:` value is data
from others: it may name a .zip URL or a script shipped in data/scripts/, and nothing else acts.
"""
from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
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
ATTEMPTS = 2  # one retry, as YOLOv5 does (a refused file is not fetched again)
TIMEOUT_S = 30.0  # seconds without data before a connection counts as dead
# A trickle never trips TIMEOUT_S, so the average rate is also watched: under MIN_RATE bytes/s over any
# RATE_WINDOW_S seconds the transfer is abandoned. Module constants, so that a test can shrink them.
MIN_RATE = 10_000
RATE_WINDOW_S = 60.0
CHUNK = 1 << 16
MIB = 1 << 20
GIB = 1 << 30
# the v7.0 release assets' sizes in MiB, rounded up; a checkpoint may be at most WEIGHTS_SLACK times that
WEIGHTS_MIB = {"yolov5n.pt": 4, "yolov5s.pt": 15, "yolov5m.pt": 41, "yolov5l.pt": 90, "yolov5x.pt": 167,
               "yolov5n6.pt": 7, "yolov5s6.pt": 25, "yolov5m6.pt": 69, "yolov5l6.pt": 148, "yolov5x6.pt": 271}
WEIGHTS_SLACK = 2
# generous bounds for the dataset archives the shipped yamls and scripts fetch (several times their size), and a
# cap for any other archive a user's yaml names
ZIP_BOUNDS = {"coco128.zip": 64 * MIB, "coco2017labels.zip": 1 * GIB, "train2017.zip": 40 * GIB,
              "val2017.zip": 2 * GIB, "test2017.zip": 16 * GIB, "VOCtrainval_06-Nov-2007.zip": 2 * GIB,
              "VOCtest_06-Nov-2007.zip": 2 * GIB, "VOCtrainval_11-May-2012.zip": 8 * GIB}
ZIP_CAP = 64 * GIB
# Images barely compress and label text about 3-5x; zeros deflate about 1000x. Members under RATIO_MIN_BYTES are
# judged only through the archive's total (a tiny repetitive text file can compress well).
MAX_RATIO = 100
RATIO_MIN_BYTES = MIB
DISK_RESERVE = 64 * MIB  # left free on the disk after a download or an unpacking
STALE_S = 600.0  # a partial file nobody wrote to for this long is a leftover (a live fetch writes every TIMEOUT_S)
PART, UNPACK = ".part", ".unpack"
SCRIPT_LAUNCHERS = ("python", "python3")  # `python data/scripts/x.py` as YOLOv5's yamls write it


class _Failed(Exception):
    """Why one attempt failed; `retry` False when trying again cannot help (a refused file)."""

    def __init__(self, reason: str, retry: bool = True) -> None:
        super().__init__(reason)
        self.retry = retry


class _Terminated(BaseException):
    """SIGTERM, raised inside a download so that its finally clauses remove what it wrote."""


def assets_base() -> str:
    """The release-download base: $YOLOV5KD_ASSETS_URL, else YOLOv5's GitHub releases."""
    return os.environ.get(ASSETS_URL_ENV, "").rstrip("/") or RELEASES_URL


def offline() -> bool:
    """True when YOLO_OFFLINE asks for no network access."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _one_line(text: object) -> str:
    # urllib's texts (a redirect loop's among them) span lines; a UserError is one
    return " ".join(str(text).split())


def _size(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def _free_bytes(folder: Path) -> int:
    """Free space on the disk holding `folder` (a function, so that a test can pretend a full disk)."""
    return shutil.disk_usage(folder).free


def _html(head: bytes) -> bool:
    start = head.lstrip()[:15].lower()
    return start.startswith((b"<!doctype", b"<html", b"<head", b"<body"))


@contextlib.contextmanager
def _cleanup_on_sigterm() -> Iterator[None]:
    """While a download runs, SIGTERM raises, so its temp files go; then the process dies of SIGTERM as before."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield  # someone else's handler decides what SIGTERM does (or an outer download already turned it)
        return

    def _raise(signum, frame):
        raise _Terminated()

    signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # the default action: the exit status says SIGTERM, as it would have
        raise SystemExit(128 + signal.SIGTERM) from None  # only if the signal is blocked
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ------------------------------------------------------------------------------------------- temp files and leftovers
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _temp_name(folder: Path, name: str, suffix: str) -> Path:
    # the owner in the name lets a later fetch tell a leftover from a live download of another process (a DDP rank)
    return folder / f".{name}.{os.getpid()}@{_host()}.{secrets.token_hex(4)}{suffix}"


def _new_part(dest: Path) -> tuple[Path, object]:
    """A new, empty temp file beside `dest`, open for writing; created with the umask's mode (mkstemp gives 0600)."""
    while True:
        tmp = _temp_name(dest.parent, dest.name, PART)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        return tmp, os.fdopen(fd, "wb")


def _new_unpack_dir(path: Path) -> Path:
    """A new, empty folder beside `path`, with the umask's mode (mkdtemp gives 0700)."""
    while True:
        work = _temp_name(path.parent, path.name, UNPACK)
        try:
            work.mkdir()
        except FileExistsError:
            continue
        return work


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _stale(p: Path, prefix: str, suffix: str, by_age: bool) -> bool:
    owner = p.name[len(prefix):-len(suffix)].rpartition(".")[0]
    pid, _, host = owner.partition("@")
    if host == _host() and pid.isdigit() and not _alive(int(pid)):
        return True
    if not by_age:
        return False
    try:
        return time.time() - p.stat().st_mtime > STALE_S
    except OSError:
        return False


def _clear_stale(folder: Path, name: str, suffix: str) -> None:
    """Remove temp files (or unpacking folders) of `name` left by a process that was killed."""
    prefix = f".{name}."
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if not (p.name.startswith(prefix) and p.name.endswith(suffix)):
            continue
        # an unpacking folder's mtime does not move while files go into its subfolders: judged by its owner only
        if _stale(p, prefix, suffix, by_age=suffix == PART):
            LOGGER.info(f"{folder / name}: removing {p.name}, left by an interrupted download")
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- download
def download(url: str, dest: Path, what: str, check: Callable[[Path], str | None] | None = None,
             min_bytes: int = MIN_BYTES, max_bytes: int = ZIP_CAP, progress: bool = True) -> Path:
    """Fetch `url` into `dest` (a temp file beside it, renamed once complete and checked); returns `dest`.

    `check(tmp)` may return a reason to refuse the file. Raises UserError with one line on failure (offline,
    unreachable, cut short, stalled or too slow, over `max_bytes` or the free disk, too small, an HTML page,
    refused by `check`); nothing is left at `dest` then, nor any temp file (SIGTERM and Ctrl-C included)."""
    dest = Path(dest)
    if offline():
        raise UserError(f"{dest.name}: {what} is not here and {OFFLINE_ENV} is set; download it from {url} into "
                        f"{dest.parent.resolve()}")
    if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
        raise UserError(f"{dest.name}: {what} would come from {url!r}, which is not an http(s) URL")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(dest.parent, dest.name, PART)
    failure = _Failed("")
    with _cleanup_on_sigterm():
        for attempt in range(1, ATTEMPTS + 1):
            tmp, f = _new_part(dest)
            try:
                with f:
                    _fetch(url, f, dest, progress, max_bytes)
                _inspect(tmp, min_bytes, check)
                os.replace(tmp, dest)
                return dest
            except _Failed as e:
                failure = e
            finally:
                tmp.unlink(missing_ok=True)
            if not failure.retry:
                raise UserError(f"{dest.name}: refused {what} from {url}: {_one_line(failure)}")
            if attempt < ATTEMPTS:
                LOGGER.warning(f"WARNING: {dest.name}: download failed ({_one_line(failure)}); retrying")
    raise UserError(f"{dest.name}: could not download {what} from {url} ({_one_line(failure)}); download it by "
                    f"hand into {dest.parent.resolve()}")


def _inspect(tmp: Path, min_bytes: int, check: Callable[[Path], str | None] | None) -> None:
    """Raise _Failed if the complete file `tmp` is not what was asked for."""
    size = tmp.stat().st_size
    with open(tmp, "rb") as f:
        head = f.read(512)
    if _html(head):
        raise _Failed("the server sent an HTML page, not the file")
    if size < min_bytes:
        raise _Failed(f"only {size} bytes arrived (a real one has at least {min_bytes})")
    reason = check(tmp) if check is not None else None
    if reason:
        raise _Failed(reason)


def _content_length(r) -> int | None:
    try:
        n = int(r.headers.get("Content-Length") or "")
    except ValueError:
        return None
    return n if n >= 0 else None


def _fetch(url: str, f, dest: Path, progress: bool, max_bytes: int) -> None:
    """Stream `url` into the open file `f` (the temp file of `dest`), within the size and rate bounds; raises
    _Failed saying why not."""
    name, room = dest.name, _free_bytes(dest.parent) - DISK_RESERVE

    def over(n: int, announced: bool) -> None:
        lead = f"announces {_size(n)}, more than" if announced else "sent more than"
        if n > max_bytes:
            raise _Failed(f"the server {lead} the {_size(max_bytes)} {name} can be", retry=False)
        if n > room:
            raise _Failed(f"the server {lead} the {_size(max(room, 0))} the disk has to spare (keeping "
                          f"{_size(DISK_RESERVE)} free)", retry=False)

    try:
        req = urllib.request.Request(url, headers={"User-Agent": "yolov5kd"})
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            total = _content_length(r)
            if total is not None:
                over(total, announced=True)  # refused before a byte is written
            got = window_got = 0
            window_start = time.monotonic()
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"Downloading {name}",
                      disable=not progress) as bar:
                while True:
                    # read1 returns whatever arrived: read(n) would wait for all n bytes, and a trickle for ever
                    chunk = r.read1(CHUNK)
                    if not chunk:
                        break
                    got += len(chunk)
                    over(got, announced=False)  # an endless body, with or without a Content-Length
                    f.write(chunk)
                    bar.update(len(chunk))
                    window_got += len(chunk)
                    elapsed = time.monotonic() - window_start
                    if elapsed >= RATE_WINDOW_S:
                        if window_got < MIN_RATE * elapsed:
                            raise _Failed(f"the transfer was too slow: {window_got} bytes in {elapsed:.1f} s, under "
                                          f"the {MIN_RATE / 1000:g} kB/s it must keep", retry=False)
                        window_start, window_got = time.monotonic(), 0
            if total is not None and got != total:
                raise _Failed(f"the connection closed after {got} of {total} bytes")
    except _Failed:
        raise
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400 and "loop" in str(e.reason):
            raise _Failed(f"a redirect loop (HTTP {e.code})", retry=False) from None
        raise _Failed(f"HTTP {e.code} {_one_line(e.reason)}") from None
    except urllib.error.URLError as e:
        raise _Failed(f"no connection: {_one_line(e.reason)}") from None
    except http.client.IncompleteRead as e:
        raise _Failed(f"the connection closed after {len(e.partial)} more bytes, short of the announced size") from None
    except TimeoutError:
        raise _Failed(f"no data for {TIMEOUT_S:g} s") from None
    except (http.client.HTTPException, OSError, ValueError) as e:
        raise _Failed(f"{type(e).__name__}: {_one_line(e)}") from None


def _is_checkpoint(path: Path) -> str | None:
    # torch.save's format is a zip archive; the safe loader reads it afterwards, as any local checkpoint
    return None if zipfile.is_zipfile(path) else "not a PyTorch checkpoint (no zip archive)"


def official_weights_url(name: str) -> str:
    """Where YOLOv5 publishes the official checkpoint `name`."""
    return f"{assets_base()}/{WEIGHTS_TAG}/{name}"


def weights_bound(name: str) -> int:
    """The most bytes a download of the official checkpoint `name` may have (WEIGHTS_SLACK times its release size)."""
    return WEIGHTS_SLACK * WEIGHTS_MIB[name] * MIB


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
             check=_is_checkpoint, max_bytes=weights_bound(p.name))


# ---------------------------------------------------------------------------------------------------- datasets
def dataset_download_plan(value: str, root: Path, yaml_file: Path, path: Path) -> str | list[str]:
    """What a dataset yaml's `download:` value may do: an http(s) URL of a .zip (returned as is), or a script shipped
    in root/data/scripts/, named by its path or name (returned as [script, *args], to run with this Python, no
    shell). Anything else raises UserError (one line) before anything runs: a yaml is data, and none of it runs."""
    scripts = (Path(root) / "data" / "scripts").resolve()

    def refuse(why: str) -> UserError:
        return UserError(f"{yaml_file}: refusing download {value!r} ({why}); only a .zip URL or a shipped script is "
                         f"fetched (an http(s) URL ending in .zip, or a .py file in data/scripts/ with its arguments); "
                         f"get the dataset by hand into {path}")

    text = value.strip()
    if not text:
        raise refuse("it is empty")
    if "\n" in text or "\r" in text:
        raise refuse("several lines are code, and no code in a yaml is run")
    url = urllib.parse.urlsplit(text)
    if "://" in text or url.scheme.lower() in ("http", "https"):
        if url.scheme.lower() not in ("http", "https") or not url.netloc or any(c.isspace() for c in text):
            raise refuse("not an http(s) URL")
        if not url.path.lower().endswith(".zip"):
            raise refuse("the URL is not of a .zip")
        return text
    try:
        argv = shlex.split(text)
    except ValueError as e:
        raise refuse(f"unparsable: {_one_line(e)}") from None
    if argv and argv[0] in SCRIPT_LAUNCHERS:
        argv = argv[1:]
    if not argv:
        raise refuse("no script named")
    named = Path(argv[0])
    # a bare name is looked up in data/scripts/; a path is relative to the repository, where the script runs
    target = scripts / named if len(named.parts) == 1 else named if named.is_absolute() else Path(root) / named
    target = target.resolve()  # '..' and symbolic links are followed before the folder is compared
    if target.suffix != ".py" or target.parent != scripts or not target.is_file():
        raise refuse(f"{argv[0]} is not a script in data/scripts/")
    return [str(target), *argv[1:]]


def zip_bound(name: str) -> int:
    """The most bytes a dataset archive named `name` may have: its entry in ZIP_BOUNDS, else ZIP_CAP."""
    return ZIP_BOUNDS.get(name, ZIP_CAP)


def download_zip_dataset(url: str, path: Path, yaml_name: str) -> None:
    """Fetch a dataset zip and unpack it to `path` (the yaml's root): into a temp folder beside it, renamed
    into place only when the whole archive is unpacked, so a broken archive never counts as the dataset."""
    path = Path(path)
    name = Path(urllib.parse.urlsplit(url).path).name
    zip_path = path.parent / name
    with _cleanup_on_sigterm():
        # no size floor: a small dataset makes a small zip, and the archive check catches a broken one
        download(url, zip_path, f"the dataset archive of {yaml_name}", check=_is_good_zip, min_bytes=1,
                 max_bytes=zip_bound(name))
        try:
            _clear_stale(path.parent, path.name, UNPACK)
            work = _new_unpack_dir(path)
            try:
                with zipfile.ZipFile(zip_path) as z:
                    reason = _unpack_refusal(z, zip_path)  # checked at download too; the disk may have filled since
                    if reason:
                        raise UserError(reason)
                    _safe_extract(z, work)
                entries = [e for e in work.iterdir() if not e.name.startswith("__MACOSX")]
                # coco128.zip holds one folder named like the dataset: its content is the dataset root
                one = len(entries) == 1 and entries[0].is_dir() and entries[0].name == path.name
                _move_into(entries[0] if one else work, path)
            except (zipfile.BadZipFile, OSError, UserError) as e:
                raise UserError(f"{yaml_name}: the archive from {url} could not be unpacked ({_one_line(e)}); nothing "
                                f"was kept") from None
            finally:
                shutil.rmtree(work, ignore_errors=True)
        finally:
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


def _unpack_refusal(z: zipfile.ZipFile, zip_path: Path) -> str | None:
    """Why unpacking `z` would be a zip bomb or fill the disk, from the declared sizes alone; None if it may go."""
    infos = z.infolist()
    # zipfile stops each member at its declared size (and its CRC check fails), so these sums bound the writing
    total = sum(i.file_size for i in infos)
    packed = max(zip_path.stat().st_size, 1)
    if total > MAX_RATIO * packed:
        return (f"a zip bomb: {_size(packed)} declares {_size(total)} unpacked, more than {MAX_RATIO}x its size; "
                f"nothing was unpacked")
    for i in infos:
        if i.file_size > RATIO_MIN_BYTES and i.file_size > MAX_RATIO * max(i.compress_size, 1):
            return (f"a zip bomb: member {i.filename!r} declares {_size(i.file_size)} from "
                    f"{_size(i.compress_size)}, more than {MAX_RATIO}x; nothing was unpacked")
    free = _free_bytes(zip_path.parent)
    if total + DISK_RESERVE > free:
        return (f"unpacking needs {_size(total)} and the disk has {_size(free)} free (keeping "
                f"{_size(DISK_RESERVE)}); nothing was unpacked")
    return None


def _is_good_zip(path: Path) -> str | None:
    if not zipfile.is_zipfile(path):
        return "not a zip archive"
    try:
        with zipfile.ZipFile(path) as z:
            refusal = _unpack_refusal(z, path)
            if refusal:  # before testzip, which would inflate the bomb; and a bomb is not fetched twice
                raise _Failed(refusal, retry=False)
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        return f"a broken zip archive ({_one_line(e)})"
    return f"a broken zip archive (member {bad} fails its CRC)" if bad else None


def _safe_extract(z: zipfile.ZipFile, dest: Path) -> None:
    """Extract every member inside `dest`; a member whose path leaves it is refused."""
    root = dest.resolve()
    for member in z.namelist():
        target = (dest / member).resolve()
        if root != target and root not in target.parents:
            raise UserError(f"member {member!r} would be written outside the dataset folder")
    z.extractall(dest)
