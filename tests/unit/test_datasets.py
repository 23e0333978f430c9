"""Dataset verification, label cache, rect batches, collate, loaders and check_dataset."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import utils.data.datasets as D
import utils.data.labels as L
from tests.data_helpers import solid, write_jpg, write_label, write_png
from utils.core.errors import UserError

GOOD1 = "0 0.5 0.5 0.2 0.2\n1 0.25 0.3 0.1 0.12\n"


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    """A folder holding one example of every kind of broken input, next to good images."""
    im, lb = tmp_path / "ds" / "images" / "train", tmp_path / "ds" / "labels" / "train"
    write_jpg(im / "good1.jpg", solid(40, 60))
    write_label(lb / "good1.txt", GOOD1)
    write_png(im / "good2.png", solid(30, 30))
    write_label(lb / "good2.txt", "2 0.1 0.2 0.05 0.06\n")
    data = write_jpg(im / "trunc.jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (im / "trunc.jpg").write_bytes(data[: len(data) * 2 // 3])  # no FFD9 end marker any more
    write_label(lb / "trunc.txt", "2 0.5 0.5 0.5 0.5\n")
    write_png(im / "png_as.jpg", solid(20, 20))  # PNG bytes behind a .jpg name: readable, kept
    write_label(lb / "png_as.txt", "1 0.5 0.5 1 1\n")
    (im / "zero.jpg").write_bytes(b"")
    (im / "random.jpg").write_bytes(np.random.default_rng(1).integers(0, 255, 500, dtype=np.uint8).tobytes())
    write_jpg(im / "tiny.jpg", solid(8, 30))  # 8 px side: below the 10 px minimum
    write_jpg(im / "emptylab.jpg", solid(20, 20))
    write_label(lb / "emptylab.txt", "")
    write_jpg(im / "badrows.jpg", solid(20, 20))
    write_label(lb / "badrows.txt", "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n1 -0.1 0.5 0.2 0.2\n"
                                    "2 0.5 1.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n1 a 0.5 0.2 0.2\n\n2 0.9 0.9 0.1 0.1\n")
    write_jpg(im / "dups.jpg", solid(20, 20))
    write_label(lb / "dups.txt", "1 0.5 0.5 0.2 0.2\n0 0.3 0.3 0.1 0.1\n1 0.5 0.5 0.2 0.2\n")
    write_jpg(im / "nolabel.jpg", solid(20, 20))
    write_label(lb / "orphan.txt", "0 0.5 0.5 0.1 0.1\n")  # label without image
    write_jpg(im / "nonutf8.jpg", solid(20, 20))
    write_label(lb / "nonutf8.txt", b"\xff\xfe0 0.5 0.5 0.1\xe9\n")
    (im / "unreadable.jpg").mkdir()  # stands in for a permission-denied file (tests run as root)
    (im / "notes.md").write_text("not an image")
    return im


def test_broken_inputs_are_reported_and_good_images_keep_labels(broken, caplog):
    caplog.set_level(logging.INFO, logger="yolov5kd")
    ds = D.LoadImagesAndLabels(broken, D.DataSettings(imgsz=64, batch_size=4, nc=3))
    names = {Path(f).name for f in ds.im_files}
    assert names == {"good1.jpg", "good2.png", "trunc.jpg", "png_as.jpg", "emptylab.jpg", "badrows.jpg",
                     "dups.jpg", "nolabel.jpg"}
    lab = {Path(f).name: lb for f, lb in zip(ds.im_files, ds.labels)}
    np.testing.assert_array_equal(lab["good1.jpg"], np.array([[0, .5, .5, .2, .2], [1, .25, .3, .1, .12]], np.float32))
    np.testing.assert_array_equal(lab["good2.png"], np.array([[2, .1, .2, .05, .06]], np.float32))
    np.testing.assert_array_equal(lab["badrows.jpg"], np.array([[0, .5, .5, .2, .2], [2, .9, .9, .1, .1]], np.float32))
    # duplicates removed, survivors in sorted row order
    np.testing.assert_array_equal(lab["dups.jpg"], np.array([[0, .3, .3, .1, .1], [1, .5, .5, .2, .2]], np.float32))
    assert lab["emptylab.jpg"].shape == (0, 5) and lab["nolabel.jpg"].shape == (0, 5)
    assert all(lb.dtype == np.float32 for lb in ds.labels)
    shapes = {Path(f).name: tuple(s) for f, s in zip(ds.im_files, ds.shapes)}
    assert shapes["good1.jpg"] == (60, 40)  # (w, h)

    lines = _lines(caplog)
    warn = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for name in ("trunc.jpg", "zero.jpg", "random.jpg", "tiny.jpg", "badrows.txt", "dups.txt", "nonutf8.txt",
                 "unreadable.jpg"):
        assert any(name in m for m in warn), f"no warning names {name}"
    assert all("\n" not in m for m in warn)
    bad = next(m for m in warn if "badrows.txt" in m)
    assert "5 bad label row" in bad and "class 7 >= nc 3" in bad and "expected 5" in bad
    assert any("restored" in m for m in warn if "trunc.jpg" in m)
    summary = next(m for m in lines if "Scanning" in m)
    assert "13 images found, 1 missing labels, 1 empty, 5 corrupt" in summary
    assert "1 labels without image" in summary
    # the truncated JPEG was rewritten with an end marker and decodes
    assert (broken / "trunc.jpg").read_bytes()[-2:] == b"\xff\xd9"

    # every kept image loads and yields its labels
    for i in range(len(ds)):
        img, labels, path, shapes = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 64, 64)
        assert labels.shape[1] == 6


def test_no_usable_image_is_a_user_error(tmp_path):
    im = tmp_path / "images"
    im.mkdir()
    (im / "a.jpg").write_bytes(b"")
    (im / "b.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match=str(im)):
        D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32))
    with pytest.raises(UserError, match="does not exist"):
        D.LoadImagesAndLabels(tmp_path / "nope", D.DataSettings(imgsz=32))


def _small_ds(root: Path, n: int = 3) -> Path:
    im, lb = root / "images" / "train", root / "labels" / "train"
    for k in range(n):
        write_jpg(im / f"{k}.jpg", solid(24 + 8 * k, 32))
        write_label(lb / f"{k}.txt", f"{k % 2} 0.5 0.5 0.25 0.5\n")
    return im


def test_cache_is_reused_and_rebuilt_when_stale_or_damaged(tmp_path, monkeypatch, caplog):
    im = _small_ds(tmp_path)
    cache = tmp_path / "labels" / "train.cache"
    first = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32))
    assert cache.is_file()
    assert not list(cache.parent.glob(".*tmp"))  # atomic write leaves no temp file behind

    calls = []
    real_build = L.build_cache

    def counting_build(*a, **k):
        calls.append(1)
        return real_build(*a, **k)

    monkeypatch.setattr(L, "build_cache", counting_build)
    caplog.set_level(logging.INFO, logger="yolov5kd")
    second = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32))
    assert calls == [] and any("(cached)" in m for m in _lines(caplog))
    for a, b in zip(first.labels, second.labels):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(first.shapes, second.shapes)

    good = cache.read_bytes()
    for damaged in (b"not a cache at all", good[: len(good) // 2], b""):
        cache.write_bytes(damaged)
        D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32))
        assert len(calls) == 1
        calls.clear()
        assert L.load_cache(cache, L.files_hash(second.label_files + second.im_files, "nc=None")) is not None

    # a cache written by another version is not trusted
    ours = L.CACHE_VERSION
    monkeypatch.setattr(L, "CACHE_VERSION", "someone-else-0.6")
    D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32))
    monkeypatch.setattr(L, "CACHE_VERSION", ours)
    D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32))
    assert len(calls) == 2
    calls.clear()

    # changed file list / changed label content size
    write_jpg(im / "9.jpg", solid(20, 20))
    ds = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32))
    assert len(calls) == 1 and len(ds) == 4
    write_label(tmp_path / "labels" / "train" / "0.txt", "1 0.5 0.5 0.25 0.5\n0 0.1 0.1 0.1 0.1\n")
    ds = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32))
    assert len(calls) == 2 and len(ds.labels[0]) == 2
    # nc changes which rows are valid, so it is part of the key
    D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32, nc=1))
    assert len(calls) == 3


def test_txt_image_list_and_its_cache(tmp_path):
    im = _small_ds(tmp_path / "d")
    lst = tmp_path / "d" / "train.txt"
    lst.write_text("./images/train/0.jpg\n./images/train/2.jpg\n")
    ds = D.LoadImagesAndLabels(lst, D.DataSettings(imgsz=32))
    assert [Path(f).name for f in ds.im_files] == ["0.jpg", "2.jpg"]
    assert lst.with_suffix(".cache").is_file()
    assert D.img2label_paths([str(im / "0.jpg")]) == [str(tmp_path / "d" / "labels" / "train" / "0.txt")]
    assert D.img2label_paths(["/a/images/b/images/c.x.png"]) == ["/a/images/b/labels/c.x.txt"]


def test_getitem_output_format_and_collate(tmp_path):
    im = _small_ds(tmp_path)
    ds = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32, batch_size=3))
    img, labels, path, shapes = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and img.is_contiguous()
    # BGR (40, 80, 160) on disk -> RGB in the tensor
    c = img[:, 16, 16].int()
    assert abs(c[0].item() - 160) < 6 and abs(c[2].item() - 40) < 6
    (h0, w0), ((gh, gw), (dw, dh)) = shapes
    assert (h0, w0) == (24, 32) and (gh, gw) == (1.0, 1.0) and (dw, dh) == (0.0, 4.0)
    # label normalised to the padded 32x32 image: height 0.5*24/32
    torch.testing.assert_close(labels, torch.tensor([[0, 0, 0.5, 0.5, 0.25, 0.375]]))
    batch = [ds[i] for i in range(3)]
    ims, targets, paths, shp = D.LoadImagesAndLabels.collate_fn(batch)
    assert ims.shape == (3, 3, 32, 32) and ims.dtype == torch.uint8
    assert targets.shape == (3, 6) and targets.dtype == torch.float32
    assert targets[:, 0].tolist() == [0, 1, 2] and targets[:, 1].tolist() == [0, 1, 0]
    assert isinstance(paths, tuple) and len(paths) == 3 and isinstance(shp, tuple)


def test_rect_batch_shape_example_from_spec(tmp_path):
    im, lb = tmp_path / "images", tmp_path / "labels"
    write_jpg(im / "a.jpg", solid(480, 640))  # h/w = 0.75
    write_label(lb / "a.txt", "0 0.5 0.5 0.5 0.5\n")
    write_jpg(im / "b.jpg", solid(400, 640))  # h/w = 0.625: sorts first
    ds = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=640, batch_size=2, rect=True, pad=0.5))
    assert [Path(f).name for f in ds.im_files] == ["b.jpg", "a.jpg"]
    assert ds.batch_shapes.tolist() == [[512, 672]]
    img, labels, _, shapes = ds[1]
    assert img.shape == (3, 512, 672)
    assert shapes == ((480, 640), ((1.0, 1.0), (16.0, 16.0)))
    # box of 320x240 px centred at (320, 240) + 16 px padding on each side
    torch.testing.assert_close(labels[0, 2:], torch.tensor([336 / 672, 256 / 512, 320 / 672, 240 / 512]))
    # training rect: pad 0 gives the tight shape
    ds = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=640, batch_size=2, rect=True, pad=0.0))
    assert ds.batch_shapes.tolist() == [[480, 640]]


def test_ram_and_disk_cache_give_same_pixels(tmp_path):
    im = _small_ds(tmp_path)
    plain = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32))
    ram = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32, cache="ram"))
    disk = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32, cache="disk"))
    assert all(os.path.exists(f) for f in disk.npy_files)
    for i in range(len(plain)):
        a = plain[i][0]
        assert torch.equal(a, ram[i][0]) and torch.equal(a, disk[i][0])
    with pytest.raises(UserError):
        D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32, cache="gpu"))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_create_dataloader_workers_and_seeding(tmp_path, monkeypatch):
    im = _small_ds(tmp_path, n=4)
    ds = {b: D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32, batch_size=b)) for b in (1, 2, 4)}
    loader = D.create_dataloader(ds[2], workers=0)
    assert loader.num_workers == 0 and loader.batch_size == 2 and not loader.persistent_workers
    assert loader.generator.initial_seed() == 6148914691236517205
    loader = D.create_dataloader(ds[2], workers=0, seed=3)
    assert loader.generator.initial_seed() == 6148914691236517205 + 3
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    loader = D.create_dataloader(ds[1], workers=8)
    assert loader.num_workers == 0  # batch 1: no worker processes
    loader = D.create_dataloader(ds[4], workers=8)
    assert loader.num_workers == 4 and loader.persistent_workers
    # DDP: each rank sees its own half, generator offset by rank
    loader = D.create_dataloader(ds[2], workers=0, rank=1, world_size=2, shuffle=True, seed=5)
    assert isinstance(loader.sampler, torch.utils.data.DistributedSampler) and len(loader.sampler) == 2
    assert loader.sampler.seed == 5 and loader.generator.initial_seed() == 6148914691236517205 + 5 + 1


def test_loader_with_worker_processes_mosaic(tmp_path):
    im = _small_ds(tmp_path, n=4)
    hyp = {"mosaic": 1.0, "scale": 0.5, "translate": 0.1, "fliplr": 0.5, "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4}
    loader = D.create_dataloader(D.LoadImagesAndLabels(im, D.DataSettings(imgsz=64, batch_size=2, augment=True,
                                                                          hyp=hyp)), workers=2, shuffle=True)
    assert loader.num_workers == min(2, os.cpu_count())
    seen = 0
    for _ in range(2):  # two epochs on persistent workers
        for ims, targets, paths, shapes in loader:
            assert ims.shape == (2, 3, 64, 64) and ims.dtype == torch.uint8
            assert targets.shape[1] == 6 and shapes == (None, None)
            if len(targets):
                assert targets[:, 2:].min() >= 0 and targets[:, 2:].max() <= 1
            seen += len(ims)
    assert seen == 8


def test_single_cls(tmp_path):
    im = _small_ds(tmp_path)
    ds = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32, single_cls=True))
    assert all((lb[:, 0] == 0).all() for lb in ds.labels)


# ------------------------------------------------------------------------------------------- check_dataset
@pytest.fixture
def fake_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(D, "ROOT", tmp_path)
    (tmp_path / "data").mkdir()
    return tmp_path


def test_check_dataset_short_name_and_paths(fake_root):
    _small_ds(fake_root / "datasets" / "toy")
    (fake_root / "datasets" / "toy" / "images" / "val").mkdir()
    (fake_root / "data" / "toy.yaml").write_text(
        "path: datasets/toy\ntrain: images/train\nval: [images/val, ../toy/images/train]\nnames: [a, b]\nnc: 2\n")
    for name in ("toy.yaml", "toy", "data/toy.yaml"):
        d = D.check_dataset(name, autodownload=False)
        assert d.nc == 2 and d.names == {0: "a", 1: "b"}
        assert d.path == fake_root / "datasets" / "toy"
        assert d.train == str(fake_root / "datasets" / "toy" / "images" / "train")
        assert d.val[0] == str(fake_root / "datasets" / "toy" / "images" / "val")
    (fake_root / "data" / "dict.yaml").write_text(
        "path: datasets/toy\ntrain: images/train\nval: images/val\nnames: {1: y, 0: x}\n")
    assert D.check_dataset("dict.yaml").names == {0: "x", 1: "y"}


def test_check_dataset_errors_name_the_file(fake_root):
    with pytest.raises(UserError, match="missing.yaml"):
        D.check_dataset("missing.yaml")
    bad = fake_root / "data" / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml"):
        D.check_dataset(bad)
    (fake_root / "data" / "nonames.yaml").write_text("train: a\nval: b\n")
    with pytest.raises(UserError, match="names"):
        D.check_dataset("nonames.yaml")


def test_check_dataset_download_rules(fake_root, monkeypatch):
    y = fake_root / "data" / "dl.yaml"
    base = "path: datasets/dl\ntrain: images/train\nval: images/val\nnames: [a]\n"
    # a zip URL is fetched (tests/unit/test_download.py serves one); offline it is one line naming the URL
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    y.write_text(base + "download: https://example.com/dl.zip\n")
    with pytest.raises(UserError, match="download it from https://example.com/dl.zip"):
        D.check_dataset(y)
    y.write_text(base + "download: https://example.com/get_data.sh\n")  # only a zip is fetched
    with pytest.raises(UserError, match="only a .zip URL or a shipped script is fetched"):
        D.check_dataset(y)
    y.write_text(base + "download: https://example.com/dl.zip\n")
    with pytest.raises(UserError, match="not found"):
        D.check_dataset(y, autodownload=False)
    # arbitrary python text is never executed
    marker = fake_root / "pwned"
    y.write_text(base + f"download: |\n  open('{marker}', 'w').write('x')\n")
    with pytest.raises(UserError, match="refusing"):
        D.check_dataset(y)
    assert not marker.exists()
    # a shipped script runs from the repo root with this interpreter
    (fake_root / "data" / "scripts").mkdir()
    (fake_root / "data" / "scripts" / "mk.py").write_text(
        "from pathlib import Path\nPath('datasets/dl/images/val').mkdir(parents=True)\n")
    y.write_text(base + "download: data/scripts/mk.py\n")
    d = D.check_dataset(y)
    assert Path(d.val).is_dir()
    (fake_root / "data" / "scripts" / "fail.py").write_text("import sys\nsys.exit(3)\n")
    y.write_text(base.replace("dl", "dl2") + "download: python data/scripts/fail.py\n")
    with pytest.raises(UserError, match="exit code 3"):
        D.check_dataset(y)
    # anything else is refused before it runs (tests/unit/test_download_commands.py tries many forms)
    y.write_text(base.replace("dl", "dl2") + "download: python -c 'import sys; sys.exit(3)'\n")
    with pytest.raises(UserError, match="refusing download"):
        D.check_dataset(y)


def test_polygon_labels_become_boxes_and_survive_mosaic(tmp_path, caplog):
    im, lb = tmp_path / "images", tmp_path / "labels"
    for k in range(2):
        write_jpg(im / f"{k}.jpg", solid(64, 64))
        write_label(lb / f"{k}.txt", "1 0.1 0.2 0.5 0.2 0.3 0.6\n0 0.6 0.6 0.9 0.6 0.9 0.9 0.6 0.9\n")
    hyp = {"mosaic": 1.0, "scale": 0.5, "degrees": 10, "copy_paste": 0.1}
    ds = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=64, augment=True, hyp=hyp))
    assert any("copy_paste" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(ds.labels[0], [[1, 0.3, 0.4, 0.4, 0.4], [0, 0.75, 0.75, 0.3, 0.3]], atol=1e-6)
    assert [len(s) for s in ds.segments[0]] == [3, 4]
    again = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=64))  # from the cache: polygons round-trip
    for a, b in zip(ds.segments[1], again.segments[1]):
        np.testing.assert_array_equal(a, b)
    import random
    random.seed(0)
    for _ in range(10):
        img, labels = ds.load_mosaic(0)
        assert img.shape == (64, 64, 3)
        if len(labels):
            assert (labels[:, 1:] >= 0).all() and (labels[:, 1:] <= 64).all()


def test_permission_denied_files_are_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    """chmod 000 cannot be tested as root, so the open calls are made to fail for two chosen files."""
    im = _small_ds(tmp_path, n=3)
    real_image_open, real_open = L.Image.open, open

    def image_open(fp, *a, **k):
        if str(fp).endswith("0.jpg"):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_image_open(fp, *a, **k)

    def file_open(fp, *a, **k):
        if str(fp).endswith("1.txt"):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(L.Image, "open", image_open)
    monkeypatch.setattr(L, "open", file_open, raising=False)
    caplog.set_level(logging.WARNING, logger="yolov5kd")
    ds = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32))
    assert [Path(f).name for f in ds.im_files] == ["2.jpg"]
    warn = [r.getMessage() for r in caplog.records]
    assert any("0.jpg" in m and "Permission denied" in m for m in warn)
    assert any("1.txt" in m and "Permission denied" in m for m in warn)


def test_image_vanishing_after_scan_is_skipped(tmp_path, caplog):
    """A file deleted mid-run is skipped with one warning; a training loader keeps serving samples."""
    from data.scripts.generate_shapes import generate
    from utils.data.datasets import DataSettings, LoadImagesAndLabels

    root = generate(tmp_path / "s", n_train=4, n_val=1, seed=2, imgsz=64)
    ds = LoadImagesAndLabels(root / "images" / "train", DataSettings(imgsz=64, augment=False, nc=8,
                                                                     substitute_failed=True))
    victim = Path(ds.im_files[1])
    victim.unlink()
    with caplog.at_level("WARNING", logger="yolov5kd"):
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == 4 and all(it[0].shape == (3, 64, 64) for it in items)
    assert items[1][2] == ds.im_files[2]  # the next sample stood in
    msgs = [r.getMessage() for r in caplog.records if victim.name in r.getMessage()]
    assert len(msgs) == 1 and "skipped" in msgs[0]
