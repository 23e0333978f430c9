"""AutoAnchor: measure how well the model's anchors fit a dataset's boxes and re-fit them if needed."""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn as nn

from utils.core.distributed import de_parallel

LOGGER = logging.getLogger("yolov5kd")
PREFIX = "AutoAnchor: "


def _pixel_shapes(dataset, img_size: int) -> np.ndarray:
    """Image (w, h) scaled so the longer side equals img_size."""
    shapes = np.asarray(dataset.shapes, dtype=np.float64)
    return img_size * shapes / shapes.max(1, keepdims=True)


def _label_wh(dataset, shapes: np.ndarray) -> np.ndarray:
    """All label (w, h) in pixels of the given per-image shapes."""
    parts = [np.asarray(lb)[:, 3:5] * s for s, lb in zip(shapes, dataset.labels)]
    return np.concatenate(parts, 0) if parts else np.zeros((0, 2))


def _ratio_metric(k: torch.Tensor, wh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (label, anchor) worse-side size ratio in (0, 1], and the best anchor's ratio per label."""
    r = wh[:, None] / k[None]
    x = torch.min(r, 1 / r).min(2).values
    return x, x.max(1).values


def _fit_stats(k: torch.Tensor, wh: torch.Tensor, thr: float) -> tuple[float, float]:
    """(best possible recall, anchors above threshold per label) for anchors k against wh."""
    x, best = _ratio_metric(k, wh)
    bpr = (best > 1 / thr).float().mean()
    aat = (x > 1 / thr).float().sum(1).mean()
    return float(bpr), float(aat)


def check_anchors(dataset, model: nn.Module, thr: float = 4.0, imgsz: int = 640, gen: int = 1000,
                  rng: np.random.Generator | None = None) -> bool:
    """Re-fit the Detect anchors with k-means + evolution when their BPR is <= 0.98; True if they changed."""
    rng = np.random.default_rng() if rng is None else rng
    m = de_parallel(model).model[-1]
    shapes = _pixel_shapes(dataset, imgsz)
    jitter = rng.uniform(0.9, 1.1, size=(shapes.shape[0], 1))  # augmentation-like scale spread
    wh = torch.tensor(_label_wh(dataset, shapes * jitter), dtype=torch.float32)

    stride = m.stride.to(m.anchors.device).view(-1, 1, 1)
    current = (m.anchors.clone() * stride).cpu().view(-1, 2)
    bpr, aat = _fit_stats(current, wh, thr)
    msg = f"{PREFIX}{aat:.2f} anchors/target, BPR {bpr:.3f}"
    if bpr > 0.98:
        LOGGER.info(f"{msg} (current anchors are a good fit to the dataset)")
        return False

    LOGGER.info(f"{msg} (BPR <= 0.98, attempting to improve anchors)")
    na = m.anchors.numel() // 2
    new = kmean_anchors(dataset, n=na, img_size=imgsz, thr=thr, gen=gen, verbose=False, rng=rng)
    new_bpr, _ = _fit_stats(torch.tensor(new, dtype=torch.float32), wh, thr)
    if new_bpr <= bpr:
        LOGGER.info(f"{PREFIX}new anchors not better (BPR {new_bpr:.3f}), keeping the original ones")
        return False
    m.set_pixel_anchors(torch.tensor(new))
    LOGGER.info(f"{PREFIX}done, BPR {new_bpr:.3f}; the new anchors are saved in the model, "
                f"update your model yaml to reuse them")
    return True


def kmean_anchors(dataset, n: int = 9, img_size: int = 640, thr: float = 4.0, gen: int = 1000, verbose: bool = True,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Anchors (n, 2) in pixels, sorted by area: k-means on label sizes refined by a genetic mutation search."""
    from scipy.cluster.vq import kmeans

    rng = np.random.default_rng() if rng is None else rng
    inv_thr = 1 / thr

    wh0 = _label_wh(dataset, _pixel_shapes(dataset, img_size))
    tiny = int((wh0 < 3.0).any(1).sum())
    if tiny:
        LOGGER.warning(f"{PREFIX}WARNING ⚠️ extremely small objects found: {tiny} of {len(wh0)} labels "
                       f"are < 3 pixels in size")
    wh = wh0[(wh0 >= 2.0).any(1)].astype(np.float32)  # drop labels under 2 px on both sides

    try:
        if n > len(wh):
            raise ValueError(f"{n} anchors requested but only {len(wh)} usable labels")
        sd = wh.std(0)
        sd[sd == 0] = 1.0  # all sizes equal along one side: nothing to whiten, and no division by zero
        k = kmeans(wh / sd, n, iter=30, seed=rng)[0] * sd
        if len(k) != n:  # scipy drops empty clusters
            raise ValueError(f"k-means returned {len(k)} of {n} anchors")
    except Exception as e:
        LOGGER.warning(f"{PREFIX}WARNING ⚠️ k-means failed ({e}), switching to random init")
        k = np.sort(rng.random(n * 2)).reshape(n, 2) * img_size

    wh_t, wh0_t = torch.tensor(wh), torch.tensor(wh0, dtype=torch.float32)

    def fit(anchors: np.ndarray) -> float:
        # mean best ratio, counting only labels some anchor can match
        _, best = _ratio_metric(torch.tensor(anchors, dtype=torch.float32), wh_t)
        return float((best * (best > inv_thr).float()).mean())

    def report(anchors: np.ndarray, log: bool) -> np.ndarray:
        anchors = anchors[np.argsort(anchors.prod(1))]
        if log:
            x, best = _ratio_metric(torch.tensor(anchors, dtype=torch.float32), wh0_t)
            bpr = float((best > inv_thr).float().mean())
            aat = float((x > inv_thr).float().mean()) * n
            LOGGER.info(f"{PREFIX}thr={inv_thr:.2f}: {bpr:.4f} best possible recall, {aat:.2f} anchors past thr; "
                        f"n={n}, img_size={img_size}, anchors="
                        + ", ".join(f"{round(w)},{round(h)}" for w, h in anchors))
        return anchors

    k = report(k, verbose)
    best_f, shape = fit(k), k.shape
    p_mut, sigma = 0.9, 0.1
    for _ in range(gen):
        v = np.ones(shape)
        while (v == 1).all():  # a generation must change at least one value
            u = rng.random()
            v = ((rng.random(shape) < p_mut) * u * rng.standard_normal(shape) * sigma + 1).clip(0.3, 3.0)
        cand = (k * v).clip(min=2.0)
        f = fit(cand)
        if f > best_f:
            best_f, k = f, cand
    return report(k, verbose).astype(np.float32)
