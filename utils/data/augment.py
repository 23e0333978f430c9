"""Image/label augmentations with YOLOv5 semantics: letterbox, random perspective, HSV, flips, mixup.

Labels handled here are numpy float arrays [cls, x1, y1, x2, y2] in pixels unless stated otherwise.
Random draws use Python's `random` (geometry, flips) and numpy's global RNG (HSV, mixup) in the
same order as the reference pipeline, so seeded runs see the same sequence of decisions.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import cv2
import numpy as np

GRAY = 114  # letterbox / mosaic / warp border value


def letterbox(im: np.ndarray, new_shape: int | Sequence[int] = (640, 640), color=(GRAY, GRAY, GRAY),
              auto: bool = True, scaleFill: bool = False, scaleup: bool = True, stride: int = 32):
    """Resize keeping aspect ratio and pad to new_shape (h, w); returns (image, (rx, ry), (dw, dh))."""
    h, w = im.shape[:2]
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    new_h, new_w = int(new_shape[0]), int(new_shape[1])

    r = min(new_h / h, new_w / w)
    if not scaleup:  # only shrink: upscaling a val image would invent detail and hurt mAP
        r = min(r, 1.0)
    ratio = (r, r)
    unpad_w, unpad_h = int(round(w * r)), int(round(h * r))
    dw, dh = new_w - unpad_w, new_h - unpad_h
    if auto:
        dw, dh = dw % stride, dh % stride
    elif scaleFill:
        dw, dh = 0.0, 0.0
        unpad_w, unpad_h = new_w, new_h
        ratio = (new_w / w, new_h / h)
    dw /= 2
    dh /= 2

    if (w, h) != (unpad_w, unpad_h):
        im = cv2.resize(im, (unpad_w, unpad_h), interpolation=cv2.INTER_LINEAR)
    # the +-0.1 splits an odd padding total so the extra pixel goes bottom/right, as the reference does
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    if top or bottom or left or right:
        im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return im, ratio, (dw, dh)


def box_candidates(box1: np.ndarray, box2: np.ndarray, wh_thr: float = 2, ar_thr: float = 100,
                   area_thr: float = 0.1, eps: float = 1e-16) -> np.ndarray:
    """Boolean mask of boxes worth keeping after a warp; box1 (before, scaled) and box2 (after) are (4, n) xyxy."""
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1]
    w2, h2 = box2[2] - box2[0], box2[3] - box2[1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def _resample_segments(segments: Sequence[np.ndarray], n: int = 1000) -> list[np.ndarray]:
    """Interpolate each closed polygon to n points so warped outlines give tight boxes."""
    out = []
    for s in segments:
        s = np.concatenate((s, s[:1]), axis=0)
        x = np.linspace(0, len(s) - 1, n)
        xp = np.arange(len(s))
        out.append(np.stack([np.interp(x, xp, s[:, 0]), np.interp(x, xp, s[:, 1])], axis=1).astype(np.float32))
    return out


def random_affine_matrix(h: int, w: int, degrees: float = 10, translate: float = 0.1, scale: float = 0.1,
                         shear: float = 10, perspective: float = 0.0, border: Sequence[int] = (0, 0)):
    """Draw the 3x3 warp for an (h, w) input; returns (M, scale s, out_width, out_height)."""
    height = h + border[0] * 2
    width = w + border[1] * 2

    C = np.eye(3)
    C[0, 2] = -w / 2
    C[1, 2] = -h / 2

    P = np.eye(3)
    P[2, 0] = random.uniform(-perspective, perspective)
    P[2, 1] = random.uniform(-perspective, perspective)

    R = np.eye(3)
    a = random.uniform(-degrees, degrees)
    s = random.uniform(1 - scale, 1 + scale)
    R[:2] = cv2.getRotationMatrix2D(angle=a, center=(0, 0), scale=s)

    S = np.eye(3)
    S[0, 1] = math.tan(random.uniform(-shear, shear) * math.pi / 180)
    S[1, 0] = math.tan(random.uniform(-shear, shear) * math.pi / 180)

    T = np.eye(3)
    T[0, 2] = random.uniform(0.5 - translate, 0.5 + translate) * width
    T[1, 2] = random.uniform(0.5 - translate, 0.5 + translate) * height

    M = T @ S @ R @ P @ C  # right to left: centre, perspective, rotate/scale, shear, translate
    return M, s, width, height


def warp_image(im: np.ndarray, M: np.ndarray, width: int, height: int, perspective: bool,
               border: Sequence[int] = (0, 0)) -> np.ndarray:
    """Apply M with the reference interpolation/border; skipped when it would be a no-op."""
    if (border[0] != 0) or (border[1] != 0) or (M != np.eye(3)).any():
        if perspective:
            return cv2.warpPerspective(im, M, dsize=(width, height), borderValue=(GRAY, GRAY, GRAY))
        return cv2.warpAffine(im, M[:2], dsize=(width, height), borderValue=(GRAY, GRAY, GRAY))
    return im


def warp_targets(targets: np.ndarray, segments: Sequence[np.ndarray], M: np.ndarray, s: float, width: int,
                 height: int, perspective: bool):
    """Move [cls, x1, y1, x2, y2] targets through M, clip, and drop boxes that became degenerate."""
    targets = np.asarray(targets, dtype=np.float32).reshape(-1, 5) if len(targets) else np.zeros((0, 5), np.float32)
    n = len(targets)
    if not n:
        return targets, []
    use_segments = len(segments) == n and all(len(sg) for sg in segments)
    if use_segments:
        pts = np.concatenate(_resample_segments(segments), axis=0)  # (n*1000, 2)
        xy = np.concatenate([pts, np.ones((len(pts), 1), np.float32)], axis=1) @ M.T
        xy = xy[:, :2] / xy[:, 2:3] if perspective else xy[:, :2]
        xy = xy.reshape(n, -1, 2)
        inside = (xy[..., 0] >= 0) & (xy[..., 1] >= 0) & (xy[..., 0] <= width) & (xy[..., 1] <= height)
        big = np.float64(1e9)
        new = np.stack([np.where(inside, xy[..., 0], big).min(1), np.where(inside, xy[..., 1], big).min(1),
                        np.where(inside, xy[..., 0], -big).max(1), np.where(inside, xy[..., 1], -big).max(1)], 1)
        new[~inside.any(1)] = 0  # fully outside: zero box, removed by the candidate filter
        segments = [sg for sg in xy.astype(np.float32)]
    else:
        # the 4 corners of every box at once: (n*4, 3) homogeneous points
        corners = np.ones((n * 4, 3))
        corners[:, :2] = targets[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(n * 4, 2)
        xy = corners @ M.T
        xy = (xy[:, :2] / xy[:, 2:3] if perspective else xy[:, :2]).reshape(n, 8)
        x, y = xy[:, [0, 2, 4, 6]], xy[:, [1, 3, 5, 7]]
        new = np.stack([x.min(1), y.min(1), x.max(1), y.max(1)], 1)
    new[:, [0, 2]] = new[:, [0, 2]].clip(0, width)
    new[:, [1, 3]] = new[:, [1, 3]].clip(0, height)

    keep = box_candidates(box1=targets[:, 1:5].T * s, box2=new.T, area_thr=0.01 if use_segments else 0.10)
    targets = targets[keep]
    targets[:, 1:5] = new[keep]
    segments = [sg for sg, k in zip(segments, keep) if k] if use_segments else []
    return targets, segments


def random_perspective(im: np.ndarray, targets: np.ndarray = (), segments: Sequence[np.ndarray] = (),
                       degrees: float = 10, translate: float = 0.1, scale: float = 0.1, shear: float = 10,
                       perspective: float = 0.0, border: Sequence[int] = (0, 0)):
    """Random affine/perspective warp of an image and its [cls, x1, y1, x2, y2] pixel targets."""
    M, s, width, height = random_affine_matrix(im.shape[0], im.shape[1], degrees, translate, scale, shear,
                                               perspective, border)
    im = warp_image(im, M, width, height, bool(perspective), border)
    targets, segments = warp_targets(targets, segments, M, s, width, height, bool(perspective))
    return im, targets, segments


def augment_hsv(im: np.ndarray, hgain: float = 0.5, sgain: float = 0.5, vgain: float = 0.5) -> None:
    """Random hue/saturation/value gains applied in place to a BGR uint8 image."""
    if not (hgain or sgain or vgain):
        return
    r = np.random.uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1
    x = np.arange(0, 256, dtype=r.dtype)
    # one 3-channel table lets a single cv2.LUT call remap H, S and V together
    lut = np.empty((256, 1, 3), np.uint8)
    lut[:, 0, 0] = ((x * r[0]) % 180).astype(np.uint8)
    lut[:, 0, 1] = np.clip(x * r[1], 0, 255).astype(np.uint8)
    lut[:, 0, 2] = np.clip(x * r[2], 0, 255).astype(np.uint8)
    hsv = cv2.cvtColor(im, cv2.COLOR_BGR2HSV)
    cv2.LUT(hsv, lut, dst=hsv)
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=im)


def mixup(im: np.ndarray, labels: np.ndarray, im2: np.ndarray, labels2: np.ndarray):
    """Blend two equally sized images with r ~ Beta(32, 32) and concatenate their labels."""
    r = np.random.beta(32.0, 32.0)
    im = (im * r + im2 * (1 - r)).astype(np.uint8)  # truncation, not rounding, matches the reference
    return im, np.concatenate((labels, labels2), 0)


def fliplr(im: np.ndarray, labels: np.ndarray):
    """Mirror left-right; labels are normalised [cls, x, y, w, h] and updated in place."""
    if len(labels):
        labels[:, 1] = 1 - labels[:, 1]
    return np.fliplr(im), labels


def flipud(im: np.ndarray, labels: np.ndarray):
    """Mirror top-bottom; labels are normalised [cls, x, y, w, h] and updated in place."""
    if len(labels):
        labels[:, 2] = 1 - labels[:, 2]
    return np.flipud(im), labels
