"""Bad label rows, images lost after the scan, nc mismatches and dataset yaml cross-checks."""
from __future__ import annotations

import logging
import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest

import utils.data.datasets as D
from conftest import DEMO_NAMES, ROOT, random_checkpoint, run_cli
from tests.data_helpers import solid, write_jpg, write_label
from utils.core.errors import UserError

GOOD = "0 0.5 0.5 0.2 0.2\n"


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _one_image(root: Path, text: str, name: str = "a") -> Path:
    """images/<name>.jpg + labels/<name>.txt under root; returns the images folder."""
    write_jpg(root / "images" / f"{name}.jpg", solid(32, 32))
    write_label(root / "labels" / f"{name}.txt", text)
    return root / "images"


@pytest.mark.parametrize("augment", [False, True])
def test_class_id_outside_dataset_is_dropped_with_a_warning(tmp_path, caplog, augment):
    caplog.set_level(logging.WARNING, logger="yolov5kd")
    im = _one_image(tmp_path, GOOD + "9 0.5 0.5 0.2 0.2\n3 0.25 0.25 0.1 0.1\n")
    ds = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32, augment=augment, nc=4))
    np.testing.assert_array_equal(ds.labels[0], np.array([[0, .5, .5, .2, .2], [3, .25, .25, .1, .1]], np.float32))
    warn = [m for m in _warnings(caplog) if "a.txt" in m]
    assert len(warn) == 1 and "1 bad label row" in warn[0] and "row 2: class 9 >= nc 4" in warn[0]


def test_negative_and_fractional_class_ids_are_dropped(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="yolov5kd")
    im = _one_image(tmp_path, "2.5 0.5 0.5 0.2 0.2\n-1 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.2 0.2\n")
    ds = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32, nc=4))
    np.testing.assert_array_equal(ds.labels[0], np.array([[1, .3, .3, .2, .2]], np.float32))
    warn = next(m for m in _warnings(caplog) if "a.txt" in m)
    assert "2 bad label row" in warn and "row 1: class 2.5 is not an integer" in warn
    assert "row 2: class -1 is negative" in warn
    # without nc the same rows are still refused: a fractional id would otherwise create a phantom class
    caplog.clear()
    ds = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32))
    assert ds.labels[0][:, 0].tolist() == [1]


def test_polygon_is_decided_per_row(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="yolov5kd")
    root = tmp_path
    # box, triangle, 6 values (neither), 8 values (even: neither), box
    _one_image(root, "0 0.5 0.5 0.2 0.2\n1 0.1 0.2 0.5 0.2 0.3 0.6\n2 0.1 0.1 0.2 0.2 0.3\n"
                     "3 0.1 0.1 0.2 0.2 0.3 0.3 0.4\n2 0.8 0.8 0.1 0.1\n", "mixed")
    _one_image(root, "1 0.1 0.2 0.5 0.2 0.3 0.6\n0 0.6 0.6 0.9 0.6 0.9 0.9 0.6 0.9\n", "polys")
    ds = D.LoadImagesAndLabels(root / "images",
                               D.DataSettings(imgsz=64, augment=True, hyp={"mosaic": 1.0, "scale": 0.5}, nc=4))
    lab = {Path(f).stem: (lb, sg) for f, lb, sg in zip(ds.im_files, ds.labels, ds.segments)}
    # box rows stay boxes, the polygon becomes its bounding box
    np.testing.assert_allclose(lab["mixed"][0], [[0, .5, .5, .2, .2], [1, .3, .4, .4, .4], [2, .8, .8, .1, .1]],
                               atol=1e-6)
    assert lab["mixed"][1] == []  # not every row has a polygon: no segments, so none can be misaligned
    assert [len(s) for s in lab["polys"][1]] == [3, 4] and len(lab["polys"][0]) == 2
    warn = next(m for m in _warnings(caplog) if "mixed.txt" in m)
    assert "2 bad label row" in warn and "row 3: 6 values" in warn and "row 4: 8 values" in warn
    random.seed(1)
    for _ in range(8):  # mosaics mixing both files: the segment-aware refit must not index past the boxes
        img, labels = ds.load_mosaic(0)
        assert img.shape == (64, 64, 3) and (labels[:, 1:] >= 0).all() and (labels[:, 1:] <= 64).all()


def test_zero_size_box_is_dropped(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="yolov5kd")
    im = _one_image(tmp_path, "0 0.5 0.5 0 0.2\n1 0.5 0.5 0.2 0.0\n2 0.1 0.1 0.5 0.1 0.9 0.1\n" + GOOD)
    ds = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32, nc=4))
    np.testing.assert_array_equal(ds.labels[0], np.array([[0, .5, .5, .2, .2]], np.float32))
    warn = next(m for m in _warnings(caplog) if "a.txt" in m)
    assert "3 bad label row" in warn and warn.count("zero-size box") == 3


def _corpus(root: Path, n: int = 4) -> Path:
    for k in range(n):
        write_jpg(root / "images" / f"{k}.jpg", solid(32, 32, (20 * k, 60, 120)))
        write_label(root / "labels" / f"{k}.txt", f"{k % 4} 0.5 0.5 0.4 0.4\n")
    return root / "images"


def test_failed_image_is_excluded_not_substituted_in_evaluation(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="yolov5kd")
    im = _corpus(tmp_path)
    ds = D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32, batch_size=2, nc=4))  # augment=False: evaluation
    assert not ds.substitute_failed
    victim = Path(ds.im_files[1])
    victim.unlink()
    items = [ds[i] for i in range(len(ds))] + [ds[1]]
    assert items[1] is None and items[4] is None
    warn = [m for m in _warnings(caplog) if victim.name in m]
    assert len(warn) == 1 and "excluded from evaluation" in warn[0]
    ims, targets, paths, _ = D.LoadImagesAndLabels.collate_fn(items[:2])
    assert ims.shape[0] == 1 and paths == (ds.im_files[0],) and targets[:, 0].tolist() == [0]
    ims, targets, paths, shapes = D.LoadImagesAndLabels.collate_fn([None, None])
    assert ims.shape[0] == 0 and targets.shape == (0, 6) and paths == () and shapes == ()
    loader = D.create_dataloader(D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32, batch_size=2, nc=4,
                                                                          substitute_failed=False)), workers=0)
    assert sum(len(p) for _, _, p, _ in loader) == 3


def test_written_files_get_normal_permissions(tmp_path):
    m = os.umask(0)
    os.umask(m)
    want = 0o666 & ~m
    im = _corpus(tmp_path, n=1)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = write_jpg(im / "0.jpg", noise)
    (im / "0.jpg").write_bytes(data[: len(data) * 2 // 3])  # truncated: restored in place
    D.LoadImagesAndLabels(im, D.DataSettings(imgsz=32))
    for f in (im / "0.jpg", tmp_path / "labels.cache"):
        assert f.read_bytes() and stat.S_IMODE(f.stat().st_mode) == want, f


def _yaml(root: Path, body: str) -> Path:
    (root / "images" / "val").mkdir(parents=True, exist_ok=True)
    y = root / "data.yaml"
    y.write_text(f"path: {root}\ntrain: images/val\nval: images/val\n{body}")
    return y


@pytest.mark.parametrize("body, expect", [
    ("nc: 3\nnames: [a, b, c, d]\n", ["nc: 3", "4 entries"]),
    ("names: {0: a, 5: b, 9: c}\n", ["0..2", "[0, 5, 9]"]),
])
def test_dataset_yaml_cross_checks(tmp_path, body, expect):
    y = _yaml(tmp_path, body)
    with pytest.raises(UserError) as e:
        D.check_dataset(y)
    msg = str(e.value)
    assert str(y) in msg and "\n" not in msg and all(x in msg for x in expect)
    assert D.check_dataset(_yaml(tmp_path, "nc: 2\nnames: {1: b, 0: a}\n")).names == {0: "a", 1: "b"}


# ------------------------------------------------------------------------------------------------ val.py
@pytest.fixture(scope="module")
def ckpt8(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("w") / "rand8.pt", "yolov5n.yaml")


@pytest.fixture
def bad_corpus(tmp_path) -> Path:
    """8-class val set: 5 images whose labels hold every kind of bad row, 5 instances survive."""
    root = tmp_path / "bad"
    rows = {"0": "0 0.5 0.5 0.2 0.2\n9 0.5 0.5 0.2 0.2\n",  # class 9 >= nc 8
            "1": "2.5 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.2 0.2\n",  # fractional class id
            "2": "2 0.5 0.5 0.2 0.2\n3 0.1 0.2 0.5 0.2 0.3 0.6\n",  # polygon among boxes
            "3": "4 0.5 0.5 0 0.2\n5 0.6 0.6 0.3 0.3\n",  # zero-width box
            "4": "6 0.5 0.5 0.4 0.4\n"}
    for k, text in rows.items():
        write_jpg(root / "images" / f"{k}.jpg", solid(64, 64, (30 * int(k), 90, 150)))
        write_label(root / "labels" / f"{k}.txt", text)
    y = root / "data.yaml"
    y.write_text(f"path: {root}\ntrain: images\nval: images\nnames: {DEMO_NAMES}\n")
    return y


def _all_row(text: str) -> list[str]:
    return next(line.split() for line in text.splitlines() if line.split()[:1] == ["all"])


@pytest.mark.e2e
def test_val_cli_on_bad_labels_and_an_image_broken_after_caching(bad_corpus, ckpt8, tmp_path):
    root = bad_corpus.parent
    # build the cache val.py will reuse
    D.LoadImagesAndLabels(root / "images", D.DataSettings(imgsz=64, nc=len(DEMO_NAMES)))
    victim = root / "images" / "4.jpg"
    victim.write_bytes(b"\0" * victim.stat().st_size)  # same size: the cache stays valid, the read fails
    r = run_cli([str(ROOT / "val.py"), "--data", str(bad_corpus), "--weights", str(ckpt8), "--imgsz", "64",
                 "--workers", "0", "--project", str(tmp_path), "--name", "v"], cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert "(cached)" in out
    assert _all_row(out)[1:3] == ["4", "5"]  # 4 images evaluated, 5 instances left after dropping bad rows
    assert "1 of 5 images could not be read and were skipped" in out
    assert sum("4.jpg" in line and "excluded from evaluation" in line for line in out.splitlines()) == 1
    assert "class 9 >= nc 8" in out and "class 2.5 is not an integer" in out and "zero-size box" in out


def test_val_run_image_deleted_during_run(bad_corpus, ckpt8, tmp_path, monkeypatch, caplog):
    import val

    real = D.create_dataloader
    victim = bad_corpus.parent / "images" / "1.jpg"

    def build_then_delete(*a, **k):
        out = real(*a, **k)
        victim.unlink()
        return out

    monkeypatch.setattr(D, "create_dataloader", build_then_delete)
    caplog.set_level(logging.INFO, logger="yolov5kd")
    val.run(bad_corpus, weights=str(ckpt8), imgsz=64, workers=0, device="cpu", project=tmp_path, name="v",
            plots=False)
    assert _all_row("\n".join(r.getMessage() for r in caplog.records))[1:3] == ["4", "5"]
    assert any("1.jpg" in m and "excluded from evaluation" in m for m in _warnings(caplog))


def _val_error(data_yaml: Path, weights: Path, tmp_path: Path) -> list[str]:
    """val.py's ERROR lines for a run that must be refused in one line, without a traceback."""
    r = run_cli([str(ROOT / "val.py"), "--data", str(data_yaml), "--weights", str(weights), "--imgsz", "64",
                 "--project", str(tmp_path)], cwd=tmp_path)
    err = [line for line in r.stderr.splitlines() if line.startswith("ERROR")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(err) == 1
    return err


def test_val_cli_refuses_model_dataset_nc_mismatch(ckpt8, tmp_path):
    root = tmp_path / "four"
    _corpus(root)
    y = root / "data.yaml"
    y.write_text(f"path: {root}\ntrain: images\nval: images\nnames: [a, b, c, d]\n")
    err = _val_error(y, ckpt8, tmp_path)
    assert "rand8.pt" in err[0] and "nc=8" in err[0] and "nc=4" in err[0]


def test_val_cli_refuses_contradicting_yaml(ckpt8, tmp_path):
    root = tmp_path / "y"
    _corpus(root)
    y = root / "data.yaml"
    y.write_text(f"path: {root}\ntrain: images\nval: images\nnc: 3\nnames: {DEMO_NAMES}\n")
    err = _val_error(y, ckpt8, tmp_path)
    assert str(y) in err[0] and "nc: 3" in err[0] and "8 entries" in err[0]


@pytest.mark.e2e
def test_train_cli_on_bad_labels(bad_corpus, tmp_path):
    """train.py over the same corpus: bad rows dropped with their warnings, the good ones trained and evaluated."""
    r = run_cli([str(ROOT / "train.py"), "--data", str(bad_corpus), "--cfg", "yolov5n.yaml", "--imgsz", "64",
                 "--batch-size", "4", "--workers", "0", "--noautoanchor", "--noplots", "--epochs", "1",
                 "--project", str(tmp_path), "--name", "t"], cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert "class 9 >= nc 8" in out and "class 2.5 is not an integer" in out and "zero-size box" in out
    assert _all_row(out)[1:3] == ["5", "6"]  # every image evaluated; 6 instances survive (the polygon row counts)
    assert (tmp_path / "t" / "weights" / "best.pt").is_file()
