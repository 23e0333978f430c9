"""Augmentation invariants: letterbox geometry, warps keep boxes inside, flips and mosaic keep labels right."""
from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import utils.data.augment as A
from tests.data_helpers import solid, write_label, write_png
from utils.core.boxes import scale_boxes, xywh2xyxy, xywhn2xyxy
from utils.data.datasets import DataSettings, LoadImagesAndLabels

NO_AUG = {"hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0, "degrees": 0.0, "translate": 0.0, "scale": 0.0, "shear": 0.0,
          "perspective": 0.0, "flipud": 0.0, "fliplr": 0.0, "mosaic": 0.0, "mixup": 0.0}
# one distinct, saturated colour per class (BGR)
COLOURS = [(0, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255)]


def test_letterbox_spec_example_and_padding_split():
    im = np.zeros((480, 640, 3), np.uint8)
    out, ratio, (dw, dh) = A.letterbox(im, 640, auto=False)
    assert out.shape == (640, 640, 3) and ratio == (1.0, 1.0) and (dw, dh) == (0.0, 80.0)
    assert (out[:80] == 114).all() and (out[80:560] == 0).all() and (out[560:] == 114).all()
    out, _, (dw, dh) = A.letterbox(im, 640, auto=True, stride=32)
    assert out.shape == (480, 640, 3) and (dw, dh) == (0.0, 0.0)
    # odd padding total: the extra pixel goes to the bottom
    out, _, (dw, dh) = A.letterbox(np.zeros((101, 200, 3), np.uint8), (104, 200), auto=False)
    assert dh == 1.5 and out.shape == (104, 200, 3)
    assert (out[:1] == 114).all() and (out[1:102] == 0).all() and (out[102:] == 114).all()
    # scaleup=False never enlarges
    out, ratio, _ = A.letterbox(np.zeros((100, 50, 3), np.uint8), 640, auto=False, scaleup=False)
    assert ratio == (1.0, 1.0) and out.shape == (640, 640, 3)
    out, ratio, _ = A.letterbox(np.zeros((100, 50, 3), np.uint8), (64, 64), scaleFill=True, auto=False)
    assert out.shape == (64, 64, 3) and ratio == (64 / 50, 64 / 100)


@pytest.mark.parametrize("h0,w0,new,auto", [(333, 517, 640, False), (517, 333, 640, True), (97, 1001, 320, False)])
def test_letterbox_then_scale_boxes_round_trips_within_a_pixel(h0, w0, new, auto):
    rng = np.random.default_rng(h0)
    xy = rng.uniform(0, 1, (20, 2)) * (w0, h0)
    wh = rng.uniform(5, 80, (20, 2))
    boxes0 = np.concatenate([xy, xy + wh], 1).clip(0, [w0, h0, w0, h0])
    out, (r, _), (dw, dh) = A.letterbox(np.zeros((h0, w0, 3), np.uint8), new, auto=auto)
    boxes1 = boxes0 * r + [dw, dh, dw, dh]
    back = scale_boxes(out.shape[:2], torch.tensor(boxes1), (h0, w0), ratio_pad=((r, r), (dw, dh))).numpy()
    assert np.abs(back - boxes0).max() < 1.0
    back2 = scale_boxes(out.shape[:2], torch.tensor(boxes1), (h0, w0)).numpy()  # ratio_pad inferred
    assert np.abs(back2 - boxes0).max() < 1.0


def test_box_candidates():
    before = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 100, 1]], float).T
    after = np.array([[0, 0, 9, 9], [0, 0, 2, 10], [0, 0, 3, 3], [0, 0, 100, 3]], float).T
    assert A.box_candidates(before, after).tolist() == [True, False, False, True]
    # aspect ratio 111 > 100 is rejected, 50 is kept
    assert not A.box_candidates(np.array([[0, 0, 500, 4.5]], float).T, np.array([[0, 0, 500, 4.5]], float).T)[0]
    assert A.box_candidates(np.array([[0, 0, 500, 10]], float).T, np.array([[0, 0, 500, 10]], float).T)[0]


def test_random_perspective_keeps_boxes_inside_and_sane():
    random.seed(0)
    rng = np.random.default_rng(0)
    for trial in range(30):
        h, w = 200, 300
        xy = rng.uniform(0, 1, (15, 2)) * (w, h)
        boxes = np.concatenate([xy, xy + rng.uniform(3, 120, (15, 2))], 1)
        targets = np.concatenate([rng.integers(0, 5, (15, 1)), boxes], 1).astype(np.float32)
        border = (-50, -60) if trial % 2 else (0, 0)
        out, t, _ = A.random_perspective(np.zeros((h, w, 3), np.uint8), targets, degrees=15, translate=0.2,
                                         scale=0.5, shear=5, perspective=0.0005 if trial % 3 == 0 else 0.0,
                                         border=border)
        H, W = h + 2 * border[0], w + 2 * border[1]
        assert out.shape == (H, W, 3)
        if len(t):
            assert (t[:, [1, 3]] >= 0).all() and (t[:, [1, 3]] <= W).all()
            assert (t[:, [2, 4]] >= 0).all() and (t[:, [2, 4]] <= H).all()
            assert ((t[:, 3] - t[:, 1]) > 2).all() and ((t[:, 4] - t[:, 2]) > 2).all()
            assert set(t[:, 0].astype(int)) <= set(targets[:, 0].astype(int))


def test_random_perspective_identity_and_pure_translation():
    random.seed(1)
    im = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    t = np.array([[3, 10, 10, 30, 40]], np.float32)
    out, t2, _ = A.random_perspective(im, t.copy(), degrees=0, translate=0, scale=0, shear=0)
    assert np.array_equal(out, im) and np.allclose(t2, t)


def test_random_perspective_segments_refit_boxes():
    random.seed(2)
    # a diamond polygon: its box after a 45 degree turn must hug the rotated outline, not the corner box
    seg = np.array([[50, 30], [70, 50], [50, 70], [30, 50]], np.float32)
    t = np.array([[0, 30, 30, 70, 70]], np.float32)
    _, t2, segs = A.random_perspective(np.zeros((100, 100, 3), np.uint8), t, [seg], degrees=0, translate=0,
                                       scale=0, shear=0, border=(0, 0))
    assert len(t2) == 1 and len(segs) == 1
    np.testing.assert_allclose(t2[0, 1:], [30, 30, 70, 70], atol=0.5)


def test_augment_hsv_in_place_and_zero_gain_is_identity():
    np.random.seed(0)
    im = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    ref = im.copy()
    A.augment_hsv(im, 0, 0, 0)
    assert np.array_equal(im, ref)
    A.augment_hsv(im, 0.5, 0.7, 0.4)
    assert im.dtype == np.uint8 and not np.array_equal(im, ref)
    # same gains drawn again reproduce the same result (pure function of the RNG draw)
    np.random.seed(0)
    im2 = ref.copy()
    A.augment_hsv(im2, 0.5, 0.7, 0.4)
    assert np.array_equal(im, im2)


def test_augment_hsv_matches_split_lut_reference():
    """The single 3-channel LUT must equal per-channel tables applied separately."""
    np.random.seed(5)
    im = np.random.default_rng(2).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    ours = im.copy()
    A.augment_hsv(ours, 0.015, 0.7, 0.4)
    np.random.seed(5)
    r = np.random.uniform(-1, 1, 3) * [0.015, 0.7, 0.4] + 1
    x = np.arange(256, dtype=r.dtype)
    h, s, v = cv2.split(cv2.cvtColor(im, cv2.COLOR_BGR2HSV))
    h = ((x * r[0]) % 180).astype(np.uint8)[h]
    s = np.clip(x * r[1], 0, 255).astype(np.uint8)[s]
    v = np.clip(x * r[2], 0, 255).astype(np.uint8)[v]
    expect = cv2.cvtColor(cv2.merge((h, s, v)), cv2.COLOR_HSV2BGR)
    assert np.array_equal(ours, expect)


def test_mixup_and_flip_helpers():
    np.random.seed(0)
    a, b = np.full((8, 8, 3), 200, np.uint8), np.full((8, 8, 3), 100, np.uint8)
    la, lb = np.zeros((2, 5), np.float32), np.ones((1, 5), np.float32)
    im, lab = A.mixup(a, la, b, lb)
    assert im.dtype == np.uint8 and 130 < im[0, 0, 0] < 170 and lab.shape == (3, 5)
    labels = np.array([[0, 0.2, 0.3, 0.1, 0.1]], np.float32)
    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    im2, l2 = A.fliplr(img, labels.copy())
    assert np.array_equal(im2, img[:, ::-1]) and np.allclose(l2[0, 1:3], [0.8, 0.3])
    im3, l3 = A.flipud(img, labels.copy())
    assert np.array_equal(im3, img[::-1]) and np.allclose(l3[0, 1:3], [0.2, 0.7])


def _coloured_dataset(root: Path, n: int = 4, size: int = 96) -> Path:
    """Image k: grey background with one square of COLOURS[k] labelled class k."""
    rng = np.random.default_rng(3)
    im_dir = root / "images"
    for k in range(n):
        im = solid(size, size, (128, 128, 128))
        w = int(rng.integers(24, 48))
        x1, y1 = (int(v) for v in rng.integers(0, size - w, 2))
        im[y1:y1 + w, x1:x1 + w] = COLOURS[k]
        write_png(im_dir / f"{k}.png", im)
        cx, cy = (x1 + w / 2) / size, (y1 + w / 2) / size
        write_label(root / "labels" / f"{k}.txt", f"{k} {cx:.6f} {cy:.6f} {w / size:.6f} {w / size:.6f}\n")
    return im_dir


def _assert_boxes_cover_their_colour(img_bgr: np.ndarray, labels_xyxy: np.ndarray) -> int:
    checked = 0
    for c, x1, y1, x2, y2 in labels_xyxy:
        if x2 - x1 < 6 or y2 - y1 < 6:
            continue  # slivers: centre pixel may be interpolated with the border
        px = img_bgr[int((y1 + y2) / 2), int((x1 + x2) / 2)].astype(int)
        assert np.abs(px - COLOURS[int(c)]).max() < 40, (c, px)
        checked += 1
    return checked


def test_mosaic_keeps_classes_boxes_and_colours(tmp_path):
    im_dir = _coloured_dataset(tmp_path)
    hyp = dict(NO_AUG, mosaic=1.0, scale=0.5, translate=0.1)
    ds = LoadImagesAndLabels(im_dir, DataSettings(imgsz=96, augment=True, hyp=hyp))
    random.seed(0)
    checked = 0
    for trial in range(40):
        img, labels = ds.load_mosaic(trial % 4)
        assert img.shape == (96, 96, 3)
        if len(labels):
            assert set(labels[:, 0].astype(int)) <= {0, 1, 2, 3}
            assert (labels[:, 1:] >= 0).all() and (labels[:, [1, 3]] <= 96).all() and (labels[:, [2, 4]] <= 96).all()
            checked += _assert_boxes_cover_their_colour(img, labels)
    assert checked > 20
    # with rotation/shear boxes still stay inside the output
    ds.hyp = dict(hyp, degrees=20, shear=5)
    for trial in range(20):
        img, labels = ds.load_mosaic(trial % 4)
        if len(labels):
            assert (labels[:, 1:] >= 0).all() and (labels[:, 1:] <= 96).all()


def test_getitem_mosaic_labels_normalised(tmp_path):
    im_dir = _coloured_dataset(tmp_path)
    hyp = dict(NO_AUG, mosaic=1.0, scale=0.5, translate=0.1)
    ds = LoadImagesAndLabels(im_dir, DataSettings(imgsz=96, augment=True, hyp=hyp))
    random.seed(3)
    for i in range(12):
        img, labels, _, shapes = ds[i % 4]
        assert shapes is None and img.shape == (3, 96, 96)
        if len(labels):
            assert labels[:, 2:].min() >= 0 and labels[:, 2:].max() <= 1
            xyxy = xywhn2xyxy(labels[:, 2:].numpy(), 96, 96)
            assert (xyxy >= 0).all() and (xyxy <= 96 - 1e-3 + 1e-4).all()
            bgr = img.numpy().transpose(1, 2, 0)[..., ::-1]
            _assert_boxes_cover_their_colour(bgr, np.concatenate([labels[:, 1:2].numpy(), xyxy], 1))


@pytest.mark.parametrize("flip", ["fliplr", "flipud"])
def test_labels_follow_flips(tmp_path, flip):
    im_dir = _coloured_dataset(tmp_path)
    plain = LoadImagesAndLabels(im_dir, DataSettings(imgsz=96, augment=True, hyp=NO_AUG))
    flipped = LoadImagesAndLabels(im_dir, DataSettings(imgsz=96, augment=True, hyp=dict(NO_AUG, **{flip: 1.0})))
    for i in range(4):
        a_img, a_lab, *_ = plain[i]
        b_img, b_lab, *_ = flipped[i]
        if flip == "fliplr":
            assert torch.equal(b_img, a_img.flip(2))
            torch.testing.assert_close(b_lab[:, 2], 1 - a_lab[:, 2])
            torch.testing.assert_close(b_lab[:, 3:], a_lab[:, 3:])
        else:
            assert torch.equal(b_img, a_img.flip(1))
            torch.testing.assert_close(b_lab[:, 3], 1 - a_lab[:, 3])
            torch.testing.assert_close(b_lab[:, [2, 4, 5]], a_lab[:, [2, 4, 5]])
        bgr = b_img.numpy().transpose(1, 2, 0)[..., ::-1]
        xyxy = xywh2xyxy(b_lab[:, 2:].numpy()) * 96
        assert _assert_boxes_cover_their_colour(bgr, np.concatenate([b_lab[:, 1:2].numpy(), xyxy], 1)) == 1


def test_mixup_in_getitem_concatenates_labels(tmp_path):
    im_dir = _coloured_dataset(tmp_path)
    hyp = dict(NO_AUG, mosaic=1.0, mixup=1.0)
    ds = LoadImagesAndLabels(im_dir, DataSettings(imgsz=96, augment=True, hyp=hyp))
    random.seed(0)
    np.random.seed(0)
    img, labels, _, _ = ds[0]
    # replay the same draws by hand: mosaic decision, first mosaic, mixup decision, partner mosaic
    random.seed(0)
    random.random()
    _, l1 = ds.load_mosaic(0)
    random.random()
    _, l2 = ds.load_mosaic(random.choice(ds.indices))
    assert img.shape == (3, 96, 96) and len(labels) == len(l1) + len(l2) > 0
    assert labels[:, 1].tolist() == np.concatenate([l1[:, 0], l2[:, 0]]).tolist()


@pytest.mark.parametrize("img_size", [96, 128, 72])
def test_fast_mosaic_matches_reference_chain(tmp_path, img_size):
    """The one-resample mosaic lands every pixel where resize+paste+warp puts it; labels are identical."""
    im_dir = _coloured_dataset(tmp_path, size=96)
    hyp = dict(NO_AUG, mosaic=1.0, scale=0.5, translate=0.1)
    ds = LoadImagesAndLabels(im_dir, DataSettings(imgsz=img_size, augment=True, hyp=hyp))
    err = np.zeros(5)  # aligned, then shifted by one pixel right/left/down/up
    for k in range(12):
        random.seed(k)
        ds.fast_mosaic = True
        fast, lf = ds.load_mosaic(k % 4)
        random.seed(k)
        ds.fast_mosaic = False
        ref, lr = ds.load_mosaic(k % 4)
        assert fast.shape == ref.shape == (img_size, img_size, 3)
        np.testing.assert_array_equal(lf, lr)
        diff = np.abs(fast.astype(int) - ref.astype(int)).max(2)
        assert diff.mean() < 2
        assert (diff > 40).mean() < 0.002  # a few pixels on tile seams at most
        for j, (ax, sh) in enumerate([(1, 1), (1, -1), (0, 1), (0, -1)]):
            err[j + 1] += np.abs(np.roll(fast, sh, axis=ax).astype(int) - ref.astype(int)).mean()
        err[0] += np.abs(fast.astype(int) - ref.astype(int)).mean()
    assert err[0] < err[1:].min() * 0.7  # sub-pixel alignment: any 1 px shift is clearly worse
