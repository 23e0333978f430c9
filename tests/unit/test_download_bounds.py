"""The bounds on a download (utils/core/download.py), against the local asset server on 127.0.0.1: a trickle or a
stall is abandoned, a file over its size bound (announced or sent) is refused at once and not fetched again, a zip
bomb or an archive the disk cannot hold is never unpacked, an interrupted download leaves no partial file (and the
next one clears old ones), what is fetched gets the umask's modes, and a redirect loop is one line. Bounds are
shrunk with monkeypatch so that each test takes well under a few seconds."""
from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from asset_server import CKPT, WEIGHTS_PATH, Route, wait_for
from conftest import DEMO_NAMES
from data_helpers import zip_folder
from utils.core import download as dl
from utils.core.errors import UserError

ZIP_PATH = "/data/tinyset.zip"



def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _refused(call, *args) -> str:
    """The one-line UserError message of call(*args)."""
    with pytest.raises(UserError) as e:
        call(*args)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _yaml(tmp_path: Path, url: str) -> Path:
    f = tmp_path / "tinyset.yaml"
    f.write_text(f"path: {tmp_path / 'datasets' / 'tinyset'}\ntrain: images/train\nval: images/val\n"
                 f"names: {DEMO_NAMES}\ndownload: {url}\n")
    return f


def _check(tmp_path: Path, url: str) -> object:
    from utils.data.datasets import check_dataset

    return check_dataset(_yaml(tmp_path, url))


def _dataset(tmp_path: Path) -> Path:
    from data.scripts.generate_shapes import generate

    src = tmp_path / "src"
    if not src.exists():
        generate(src, n_train=2, n_val=2, seed=1, imgsz=32)
    return src


def _zip(members: dict[str, bytes], base: Path | None = None, top: str = "tinyset") -> bytes:
    """A deflated zip of `members` (plus the demo dataset under `base`, stored under `top`/)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        if base is not None:
            for f in sorted(base.rglob("*")):
                if f.is_file():
                    z.write(f, f"{top}/{f.relative_to(base)}")
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- 5: trickles
@pytest.fixture
def short_window(monkeypatch):
    """At least 1000 bytes/s over any 0.5 s (the product's 10 kB/s over 60 s, shrunk)."""
    monkeypatch.setattr(dl, "RATE_WINDOW_S", 0.5)
    monkeypatch.setattr(dl, "MIN_RATE", 1000)


def test_a_trickle_is_abandoned_in_one_line_naming_the_url(server, tmp_path, short_window):
    # the probe's 1 byte every 5 s against 10 kB/s over 60 s, scaled: 1 byte every 10 ms against 1 kB/s over 0.5 s
    server.routes[WEIGHTS_PATH] = Route(CKPT[:200], trickle_s=0.01)
    start = time.monotonic()
    msg = _refused(dl.ensure_weights, "yolov5n.pt")
    assert time.monotonic() - start < 1.5
    assert f"{server.url}{WEIGHTS_PATH}" in msg and "too slow" in msg and "1 kB/s" in msg
    assert server.hits[WEIGHTS_PATH] == 1 and _left(tmp_path) == []  # not tried twice; no partial file


def test_a_fast_start_does_not_hide_a_later_trickle(server, tmp_path, short_window):
    # 200 kB at once, then 1 byte every 10 ms: an average over the whole transfer would take a long while to notice
    server.routes[WEIGHTS_PATH] = Route(CKPT[:200_150], fast=200_000, trickle_s=0.01)
    start = time.monotonic()
    msg = _refused(dl.ensure_weights, "yolov5n.pt")
    assert time.monotonic() - start < 1.4 and "too slow" in msg and _left(tmp_path) == []


def test_a_stall_is_a_timeout_and_a_full_speed_download_passes_the_rate_check(server, tmp_path, short_window,
                                                                               monkeypatch):
    monkeypatch.setattr(dl, "TIMEOUT_S", 0.3)
    server.routes[WEIGHTS_PATH] = Route(CKPT, fast=1000, trickle_s=30)  # 1000 bytes, then silence
    msg = _refused(dl.ensure_weights, "yolov5n.pt")
    assert "no data for 0.3 s" in msg and server.hits[WEIGHTS_PATH] == 2  # a stall may pass: tried again
    server.routes[WEIGHTS_PATH] = Route(CKPT)
    dl.ensure_weights("yolov5n.pt")
    assert (tmp_path / "yolov5n.pt").read_bytes() == CKPT


# ---------------------------------------------------------------------------------------------- 6: size bounds
def test_an_announced_size_over_the_bound_is_refused_at_once(server, tmp_path):
    server.routes[WEIGHTS_PATH] = Route(zeros=300_000_000)  # the probe's 300 MB of zeros as yolov5n.pt
    start = time.monotonic()
    msg = _refused(dl.ensure_weights, "yolov5n.pt")
    assert time.monotonic() - start < 2 and "announces 286.1 MiB" in msg and "8.0 MiB yolov5n.pt can be" in msg
    assert msg.startswith("yolov5n.pt: refused the official YOLOv5 checkpoint from")
    assert server.hits[WEIGHTS_PATH] == 1 and _left(tmp_path) == []


def test_a_body_without_content_length_is_cut_at_the_bound(server, tmp_path):
    server.routes[WEIGHTS_PATH] = Route(zeros=64 << 20, length=False)  # no size announced: stopped while it streams
    msg = _refused(dl.ensure_weights, "yolov5n.pt")
    assert "sent more than the 8.0 MiB yolov5n.pt can be" in msg
    assert server.hits[WEIGHTS_PATH] == 1 and _left(tmp_path) == []
    assert dl.weights_bound("yolov5x6.pt") == 2 * 271 << 20 and set(dl.WEIGHTS_MIB) == set(dl.OFFICIAL_WEIGHTS)


def test_an_endless_dataset_zip_is_cut_at_its_bound(server, tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "ZIP_CAP", 1 << 20)  # any archive without an entry of its own
    server.routes[ZIP_PATH] = Route(endless=True)
    msg = _refused(_check, tmp_path, f"{server.url}{ZIP_PATH}")
    assert "sent more than the 1.0 MiB tinyset.zip can be" in msg and server.hits[ZIP_PATH] == 1
    assert _left(tmp_path / "datasets") == []


def test_a_known_dataset_zip_has_its_own_bound(server, tmp_path, monkeypatch):
    monkeypatch.setitem(dl.ZIP_BOUNDS, "tinyset.zip", 1000)
    server.routes[ZIP_PATH] = Route(zip_folder(_dataset(tmp_path), "tinyset"))
    msg = _refused(_check, tmp_path, f"{server.url}{ZIP_PATH}")
    assert "more than the 1000 bytes tinyset.zip can be" in msg and _left(tmp_path / "datasets") == []
    assert dl.zip_bound("coco128.zip") == 64 << 20 and dl.zip_bound("other.zip") == dl.ZIP_CAP


def test_a_download_the_disk_cannot_hold_is_refused(server, tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "_free_bytes", lambda folder: dl.DISK_RESERVE + 1_000_000)
    server.routes[WEIGHTS_PATH] = Route(CKPT)
    msg = _refused(dl.ensure_weights, "yolov5n.pt")
    assert "more than the 976.6 KiB the disk has to spare" in msg
    assert server.hits[WEIGHTS_PATH] == 1 and _left(tmp_path) == []


# ----------------------------------------------------------------------------------------------- 7: zip bombs
def test_a_zip_bomb_is_refused_before_anything_is_unpacked(server, tmp_path):
    bomb = _zip({"tinyset/images/val/zeros.bin": bytes(20 << 20)}, _dataset(tmp_path))  # 20 MiB in about 20 kB
    server.routes[ZIP_PATH] = Route(bomb)
    msg = _refused(_check, tmp_path, f"{server.url}{ZIP_PATH}")
    assert "a zip bomb" in msg and "more than 100x" in msg and f"{server.url}{ZIP_PATH}" in msg
    assert server.hits[ZIP_PATH] == 1 and _left(tmp_path / "datasets") == []


def test_many_small_members_count_together(server, tmp_path):
    # each member is under RATIO_MIN_BYTES, so only the archive's total shows the bomb
    server.routes[ZIP_PATH] = Route(_zip({f"tinyset/images/val/{k}.bin": bytes(200_000) for k in range(100)}))
    msg = _refused(_check, tmp_path, f"{server.url}{ZIP_PATH}")
    assert "a zip bomb" in msg and "declares 19.1 MiB unpacked" in msg and _left(tmp_path / "datasets") == []


def test_one_bomb_member_among_incompressible_ones(server, tmp_path):
    noise = random.Random(0).randbytes(2 << 20)  # keeps the archive's total ratio near 2
    server.routes[ZIP_PATH] = Route(_zip({"tinyset/noise.bin": noise, "tinyset/zeros.bin": bytes(2 << 20)},
                                         _dataset(tmp_path)))
    msg = _refused(_check, tmp_path, f"{server.url}{ZIP_PATH}")
    assert "member 'tinyset/zeros.bin' declares 2.0 MiB" in msg and _left(tmp_path / "datasets") == []


def test_an_archive_the_disk_cannot_unpack_is_refused(server, tmp_path, monkeypatch):
    rng = random.Random(1)
    text = "".join(f"{rng.randrange(8)} {rng.random():.6f} {rng.random():.6f}\n" for _ in range(30_000)).encode()
    data = _zip({"tinyset/images/val/labels.txt": text})
    assert 3 * len(data) > len(text) > 2 * len(data)  # an ordinary ratio
    monkeypatch.setattr(dl, "_free_bytes", lambda folder: dl.DISK_RESERVE + (len(data) + len(text)) // 2)
    server.routes[ZIP_PATH] = Route(data)
    msg = _refused(_check, tmp_path, f"{server.url}{ZIP_PATH}")
    assert "unpacking needs" in msg and "nothing was unpacked" in msg and _left(tmp_path / "datasets") == []


# --------------------------------------------------------------------------------------- 8: interrupted fetches
CHILD = """
import signal, sys
from pathlib import Path
signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a fresh terminal would have them, whatever started the tests
signal.signal(signal.SIGINT, signal.default_int_handler)
from utils.core.download import download
download(sys.argv[1], Path(sys.argv[2]), "a test file", min_bytes=1)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_an_interrupted_download_leaves_no_partial_file(server, tmp_path, sig):
    server.routes["/big.bin"] = Route(bytes(400_000), fast=100_000, trickle_s=0.05)
    p = subprocess.Popen([sys.executable, "-c", CHILD, f"{server.url}/big.bin", str(tmp_path / "big.bin")],
                         cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: any(f.stat().st_size > 0 for f in tmp_path.glob(".big.bin.*.part")))
        p.send_signal(sig)
        p.wait(timeout=10)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == -sig  # the process still ends by the signal, as it would have
    assert _left(tmp_path) == []


def test_stale_partial_files_are_cleared_by_the_next_fetch(server, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = dl._host()
    old = tmp_path / ".yolov5n.pt.k2j3h4g5.part"  # as an interrupted fetch of an earlier version left it
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 2 * dl.STALE_S,) * 2)
    orphan = tmp_path / f".yolov5n.pt.{dead.pid}@{host}.0a1b2c3d.part"  # its process is gone
    orphan.write_bytes(b"x")
    live = tmp_path / f".yolov5n.pt.{os.getppid()}@{host}.0a1b2c3d.part"  # another rank, still fetching
    live.write_bytes(b"x")
    remote = tmp_path / f".yolov5n.pt.{dead.pid}@elsewhere.0a1b2c3d.part"  # another host's, written to just now
    remote.write_bytes(b"x")
    other = tmp_path / ".yolov5s.pt.k2j3h4g5.part"  # another file's
    other.write_bytes(b"x")
    os.utime(other, (time.time() - 2 * dl.STALE_S,) * 2)
    server.routes[WEIGHTS_PATH] = Route(CKPT)
    dl.ensure_weights("yolov5n.pt")
    assert _left(tmp_path) == sorted([live.name, remote.name, other.name, "yolov5n.pt"])


# ---------------------------------------------------------------------------------------------- 9: file modes
@pytest.fixture
def umask():
    """Set the process umask for one test, then put the old one back."""
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["022", "027"])
def test_fetched_files_and_folders_get_the_umask_modes(server, tmp_path, umask, mask):
    from utils.data.datasets import check_dataset

    umask(mask)
    server.routes[WEIGHTS_PATH] = Route(CKPT)
    dl.ensure_weights("yolov5n.pt")
    assert (tmp_path / "yolov5n.pt").stat().st_mode & 0o777 == 0o666 & ~mask
    src = _dataset(tmp_path)
    for top, name in (("", "flat"), ("nested", "nested")):  # the zip's content is the root, or its one folder is
        server.routes[f"/data/{name}.zip"] = Route(_zip({}, src, top) if top else _flat_zip(src))
        root = tmp_path / "datasets" / name
        y = tmp_path / f"{name}.yaml"
        y.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: {DEMO_NAMES}\n"
                     f"download: {server.url}/data/{name}.zip\n")
        check_dataset(y)
        for p in [root, *root.rglob("*")]:
            assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~mask, p


def _flat_zip(src: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                z.write(f, str(f.relative_to(src)))
    return buf.getvalue()


# -------------------------------------------------------------------------------------------- 15: redirect loop
def test_a_redirect_loop_is_one_line(server, tmp_path):
    server.routes[WEIGHTS_PATH] = Route(redirect=WEIGHTS_PATH)
    msg = _refused(dl.ensure_weights, "yolov5n.pt")
    assert "a redirect loop (HTTP 302)" in msg and f"{server.url}{WEIGHTS_PATH}" in msg and _left(tmp_path) == []


def test_a_two_step_redirect_loop_for_a_dataset_is_one_line(server, tmp_path):
    server.routes[ZIP_PATH] = Route(redirect="/data/other.zip")
    server.routes["/data/other.zip"] = Route(redirect=ZIP_PATH)
    msg = _refused(_check, tmp_path, f"{server.url}{ZIP_PATH}")
    assert "a redirect loop (HTTP 302)" in msg and _left(tmp_path / "datasets") == []
