"""AutoAnchor (facts §7.9) on small synthetic datasets."""
import logging

import numpy as np
import pytest
import torch

from models.yolo import Detect
from utils.training.anchors import check_anchors, kmean_anchors

DEFAULT_ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))


class FakeDataset:
    """Just the two attributes AutoAnchor reads."""

    def __init__(self, wh_px: np.ndarray, img: int = 640, per_image: int = 4):
        n_img = len(wh_px) // per_image
        self.shapes = np.tile(np.array([[img, img]]), (n_img, 1))
        self.labels = []
        for i in range(n_img):
            wh = wh_px[i * per_image:(i + 1) * per_image] / img
            lb = np.zeros((len(wh), 5), dtype=np.float32)
            lb[:, 1:3] = 0.5
            lb[:, 3:5] = wh
            self.labels.append(lb)


def _model() -> torch.nn.Module:
    det = Detect(nc=4, anchors=DEFAULT_ANCHORS, ch=(4, 4, 4))
    det.stride = torch.tensor([8.0, 16.0, 32.0])
    det.anchors /= det.stride.view(-1, 1, 1)
    m = torch.nn.Module()
    m.model = torch.nn.Sequential(det)
    return m


def _bpr(anchors_px: np.ndarray, wh: np.ndarray, thr: float = 4.0) -> float:
    r = wh[:, None] / anchors_px[None]
    best = np.minimum(r, 1 / r).min(2).max(1)
    return float((best > 1 / thr).mean())


def test_good_fit_keeps_anchors(caplog):
    rng = np.random.default_rng(0)
    pix = np.array(DEFAULT_ANCHORS, dtype=float).reshape(-1, 2)
    wh = pix[rng.integers(0, 9, 400)] * rng.uniform(0.8, 1.25, (400, 2))
    model = _model()
    before = model.model[-1].anchors.clone()
    with caplog.at_level(logging.INFO, logger="yolov5kd"):
        changed = check_anchors(FakeDataset(wh), model, thr=4.0, imgsz=640, rng=np.random.default_rng(1))
    assert changed is False
    assert torch.equal(model.model[-1].anchors, before)
    line = next(r.getMessage() for r in caplog.records if "anchors/target" in r.getMessage())
    assert line.startswith("AutoAnchor: ") and "BPR 1.000" in line


def test_bad_fit_refits_anchors(caplog):
    rng = np.random.default_rng(0)
    # long thin boxes (≈ 60:1) that no default anchor can match within a ratio of 4
    wh = np.stack((rng.uniform(250, 400, 300), rng.uniform(4, 7, 300)), 1)
    model = _model()
    det = model.model[-1]
    old_px = (det.anchors * det.stride.view(-1, 1, 1)).view(-1, 2).numpy()
    assert _bpr(old_px, wh) < 0.5
    with caplog.at_level(logging.INFO, logger="yolov5kd"):
        changed = check_anchors(FakeDataset(wh), model, thr=4.0, imgsz=640, gen=100, rng=np.random.default_rng(2))
    assert changed is True
    new_px = (det.anchors * det.stride.view(-1, 1, 1)).view(-1, 2).numpy()
    assert _bpr(new_px, wh) > 0.98
    area = new_px.prod(1)
    assert (np.diff(area) >= 0).all()  # ordered small → large with the strides
    assert det.anchors.shape == (3, 3, 2) and det.anchors.dtype == torch.float32
    assert any("anchors/target" in r.getMessage() for r in caplog.records)


def test_kmean_anchors_shape_order_determinism():
    rng = np.random.default_rng(3)
    wh = np.concatenate([rng.normal(m, m / 10, (100, 2)) for m in (20, 60, 150)])
    ds = FakeDataset(np.abs(wh))
    a = kmean_anchors(ds, n=9, img_size=640, gen=100, verbose=False, rng=np.random.default_rng(5))
    b = kmean_anchors(ds, n=9, img_size=640, gen=100, verbose=False, rng=np.random.default_rng(5))
    assert a.shape == (9, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert (np.diff(a.prod(1)) >= 0).all()
    assert a.min() >= 2.0
    assert _bpr(a, np.abs(wh)) > 0.99


def test_kmean_anchors_fallback_random(caplog):
    ds = FakeDataset(np.array([[30.0, 40.0]] * 4))  # fewer usable labels than anchors
    with caplog.at_level(logging.WARNING, logger="yolov5kd"):
        k = kmean_anchors(ds, n=9, img_size=320, gen=10, verbose=False, rng=np.random.default_rng(0))
    assert k.shape == (9, 2)
    assert (np.diff(k.prod(1)) >= 0).all()
    assert any("random init" in r.getMessage() for r in caplog.records)


def test_kmean_drops_tiny_labels(caplog):
    rng = np.random.default_rng(4)
    wh = np.concatenate([rng.uniform(20, 200, (40, 2)), np.full((4, 2), 1.0)])
    with caplog.at_level(logging.WARNING, logger="yolov5kd"):
        k = kmean_anchors(FakeDataset(wh), n=9, img_size=640, gen=20, verbose=True, rng=np.random.default_rng(0))
    assert k.min() >= 2.0
    assert any("4 of 44 labels" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("imgsz", [320, 640])
def test_label_sizes_scale_with_longer_side(imgsz):
    """Labels are normalised to the image, so the pixel sizes follow the longer side scaled to imgsz."""
    ds = FakeDataset(np.full((8, 2), 64.0), img=640)
    ds.shapes = np.tile(np.array([[1280, 640]]), (2, 1))  # wide images: w normalised by the long side
    k = kmean_anchors(ds, n=1, img_size=imgsz, gen=0, verbose=False, rng=np.random.default_rng(0))
    np.testing.assert_allclose(k[0], [64.0 * imgsz / 640, 64.0 * imgsz / 1280], rtol=1e-5)
