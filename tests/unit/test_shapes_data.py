"""The shapes demo-data generator: deterministic bytes, offline, valid labels, shapes.yaml wiring."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

import utils.data.datasets as D
from optimizer.config import KD_SPECS
from tests.data_helpers import ROOT, load_generator

gen = load_generator()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generator_is_byte_identical_across_runs(tmp_path):
    a = gen.generate(tmp_path / "a", 6, 3, seed=7)
    b = gen.generate(tmp_path / "b", 6, 3, seed=7)
    fa, fb = _files(a), _files(b)
    assert len([k for k in fa if k.endswith(".jpg")]) == 9
    assert fa == fb
    c = gen.generate(tmp_path / "c", 6, 3, seed=8)
    assert _files(c) != fa


def test_generator_skips_complete_output_and_redoes_incomplete(tmp_path):
    out = gen.generate(tmp_path / "s", 4, 2)
    img = out / "images" / "train" / "train_00000.jpg"
    stamp = img.stat().st_mtime_ns
    os.utime(img, ns=(1, 1))
    gen.generate(out, 4, 2)
    assert img.stat().st_mtime_ns == 1  # untouched: nothing was regenerated
    (out / ".complete.json").unlink()
    gen.generate(out, 4, 2)
    assert img.stat().st_mtime_ns != 1 and stamp
    gen.generate(out, 2, 1)  # other size: stale extra files are removed
    assert len(list((out / "images" / "train").iterdir())) == 2


@pytest.mark.e2e
def test_generator_never_uses_the_network(tmp_path):
    code = f"""
import socket, sys
def refuse(*a, **k):
    raise RuntimeError('network used')
socket.socket = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from tests.data_helpers import load_generator
load_generator().generate({str(tmp_path / 'n')!r}, 3, 1)
bad = [m for m in ('requests', 'urllib.request', 'http.client', 'urllib3', 'ftplib') if m in sys.modules]
assert not bad, bad
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert len(list((tmp_path / "n" / "images" / "train").glob("*.jpg"))) == 3


def test_generated_labels_are_valid_and_varied(tmp_path, caplog):
    out = gen.generate(tmp_path / "v", 40, 2, seed=0)
    rows = []
    for f in sorted((out / "labels" / "train").glob("*.txt")):
        for ln in f.read_text().splitlines():
            rows.append([float(v) for v in ln.split()])
    lab = np.array(rows)
    assert lab.shape[1] == 5 and len(lab) > 100
    assert set(lab[:, 0].astype(int)) == set(range(len(gen.NAMES)))  # every class appears
    assert (lab[:, 1:] >= 0).all() and (lab[:, 1:] <= 1).all()
    side = lab[:, 3:5].max(1) * 320
    assert side.min() < 16 and side.max() > 80  # small and large objects
    caplog.set_level(logging.WARNING, logger="yolov5kd")
    ds = D.LoadImagesAndLabels(out / "images" / "train", D.DataSettings(imgsz=320, nc=len(gen.NAMES)))
    assert len(ds) == 40 and not caplog.records  # loads without a single warning
    assert sum(len(x) for x in ds.labels) == len(lab)


def test_make_image_contract():
    rng = np.random.default_rng(0)
    img, labels = gen.make_image(rng, 320)
    assert img.shape == (320, 320, 3) and img.dtype == np.uint8
    assert len(labels) <= 8


def test_shapes_yaml_resolves_through_check_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "ROOT", tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shapes.yaml").write_bytes((ROOT / "data" / "shapes.yaml").read_bytes())
    spec = yaml.safe_load((ROOT / "data" / "shapes.yaml").read_text())
    assert spec["download"] == "data/scripts/generate_shapes.py" and spec["path"] == "datasets/shapes"
    gen.generate(tmp_path / "datasets" / "shapes", 3, 2)
    d = D.check_dataset("shapes.yaml", autodownload=False)
    assert d.nc == 8 and d.names[7] == "cross" and d.names == dict(enumerate(gen.NAMES))
    assert d.val == str(tmp_path / "datasets" / "shapes" / "images" / "val")
    assert len(D.LoadImagesAndLabels(d.val, D.DataSettings(imgsz=64))) == 2


def test_hyp_files():
    keys = None
    for name in ("low", "med", "high"):
        h = yaml.safe_load((ROOT / "data" / "hyps" / f"hyp.scratch-{name}.yaml").read_text())
        keys = keys or set(h)
        assert set(h) == keys and len(h) == 43
        assert h["distill_ratio"] == 0.05 and h["temperature"] == 5.0 and h["dist_norm"] == "iou"
        assert h["unlabeled_ratio"] == 1.0
        assert h["feat_kd"] == KD_SPECS["feat_kd"].default and h["feat_ratio"] == KD_SPECS["feat_ratio"].default
        assert all(h[k] == KD_SPECS[k].default for k in ("pseudo_conf", "pseudo_weight", "pseudo_ignore"))
        new = ("dist_box", "dist_obj", "dist_cls", "dist_loc", "distill_decay", "distill_floor")  # issue 51
        assert all(h[k] == KD_SPECS[k].default for k in new)
        assert h["lr0"] == 0.01 and h["momentum"] == 0.937 and h["anchor_t"] == 4.0 and h["fliplr"] == 0.5
        if name == "low":
            assert (h["lrf"], h["cls"], h["obj"], h["scale"], h["mixup"], h["copy_paste"]) == (0.01, 0.5, 1.0, 0.5, 0.0, 0.0)
        else:
            assert (h["lrf"], h["cls"], h["obj"], h["scale"], h["mixup"]) == (0.1, 0.3, 0.7, 0.9, 0.1)
            assert h["copy_paste"] == (0.1 if name == "high" else 0.0)


def _run_download_entry(yaml_name: str, tmp_path: Path, monkeypatch) -> tuple[dict, D.DatasetSpec, Path]:
    """Run a data yaml's own download entry into tmp_path (2 train, 1 val image) and resolve the yaml there:
    (the yaml as written, check_dataset's DatasetSpec, the folder the data went to)."""
    spec = yaml.safe_load((ROOT / "data" / yaml_name).read_text())
    argv = spec["download"].split()
    assert argv[:2] == ["python", "data/scripts/generate_shapes.py"]
    # the yaml's own arguments, with a tiny split and a temporary folder instead of the full 1200 images
    out = tmp_path / spec["path"]
    argv = argv[2:]
    argv[argv.index("--out") + 1] = str(out)
    assert gen.main(argv + ["--n-train", "2", "--n-val", "1"]) == 0
    monkeypatch.setattr(D, "ROOT", tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / yaml_name).write_bytes((ROOT / "data" / yaml_name).read_bytes())
    d = D.check_dataset(yaml_name, autodownload=False)
    assert d.val == str(out / "images" / "val")
    return spec, d, out


def test_shapes160_yaml_download_entry_builds_160px_data(tmp_path, monkeypatch):
    spec, d, out = _run_download_entry("shapes160.yaml", tmp_path, monkeypatch)
    assert spec["names"] == yaml.safe_load((ROOT / "data" / "shapes.yaml").read_text())["names"]
    assert cv2.imread(str(next((out / "images" / "val").glob("*.jpg")))).shape == (160, 160, 3)
    assert d.nc == 8


def test_many_variant_draws_16_valid_classes_and_leaves_v2_alone(tmp_path, caplog):
    out = gen.generate(tmp_path / "m", 60, 2, seed=0, imgsz=160, variant="many")
    rows = [[float(v) for v in ln.split()] for f in sorted((out / "labels" / "train").glob("*.txt"))
            for ln in f.read_text().splitlines()]
    lab = np.array(rows)
    assert set(lab[:, 0].astype(int)) == set(range(16)) and len(gen.MANY_NAMES) == 16
    assert (lab[:, 1:] >= 0).all() and (lab[:, 1:] <= 1).all()
    # nominal sizes from 16 px; a triangle's box spans 0.87 of its nominal size at worst (v2's reach below 12)
    assert lab[:, 3:5].max(1).min() * 160 >= 13.5
    caplog.set_level(logging.WARNING, logger="yolov5kd")
    assert len(D.LoadImagesAndLabels(out / "images" / "train", D.DataSettings(imgsz=160, nc=16))) == 60
    assert not caplog.records
    # the default variant draws exactly what it drew before the option existed
    rng_a, rng_b = np.random.default_rng([0, 0, 3]), np.random.default_rng([0, 0, 3])
    assert np.array_equal(gen.make_image(rng_a, 64)[0], gen.make_image(rng_b, 64, "v2")[0])


def test_many_variant_ring_and_frame_have_holes():
    for cls in (11, 12):  # ring, frame: the centre stays background, the body is painted
        img = np.zeros((64, 64, 3), np.float64)
        gen._fill(img, gen.object_polygons(cls, 48.0, np.random.default_rng(0)), 32, 32, (255, 255, 255),
                  holes=True)
        assert img[32, 32].max() == 0 and img[32, 8:12].max() > 200, gen.MANY_NAMES[cls]


def test_shapes16_yaml_download_entry_builds_the_many_variant(tmp_path, monkeypatch):
    spec, d, out = _run_download_entry("shapes16.yaml", tmp_path, monkeypatch)
    assert spec["names"] == dict(enumerate(gen.MANY_NAMES)) and d.nc == 16
    assert cv2.imread(str(next((out / "images" / "val").glob("*.jpg")))).shape == (160, 160, 3)
    labels = [int(ln.split()[0]) for f in (out / "labels").rglob("*.txt") for ln in f.read_text().splitlines()]
    assert labels and max(labels) < 16
