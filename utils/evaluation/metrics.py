"""Detection metrics: detection/label matching, per-class AP, fitness and the confusion matrix."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from utils.core.boxes import box_iou
from utils.core.smoothing import smooth

LOGGER = logging.getLogger("yolov5kd")

# numpy 2 renamed trapz; both integrate identically
_trapezoid = getattr(np, "trapezoid", None) or getattr(np, "trapz")


def fitness(x: np.ndarray) -> np.ndarray:
    """Model fitness per row of [P, R, mAP@0.5, mAP@0.5:0.95, ...]: 0.1*mAP50 + 0.9*mAP50-95."""
    w = np.array([0.0, 0.0, 0.1, 0.9])
    return (np.asarray(x)[:, :4] * w).sum(1)


def compute_ap(recall: np.ndarray, precision: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AP as the 101-point interpolated area under the precision envelope; returns (ap, mpre, mrec)."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    # envelope: best precision achievable at this recall or any higher one
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    x = np.linspace(0, 1, 101)
    ap = _trapezoid(np.interp(x, mrec, mpre), x)
    return ap, mpre, mrec


def _plot_fns():
    try:
        from utils.reporting.plots import plot_mc_curve, plot_pr_curve
    except ImportError:
        LOGGER.warning("WARNING ⚠️ utils.reporting.plots unavailable, metric curves not plotted")
        return None, None
    return plot_pr_curve, plot_mc_curve


def ap_per_class(tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray, plot: bool = False,
                 save_dir: Path | str = Path("."), names=(), eps: float = 1e-16, prefix: str = ""):
    """Per-class P, R, F1 at the best mean-F1 confidence and AP per IoU column.

    Returns (tp, fp, p, r, f1, ap (nc, n_iou), unique_classes) over the classes present in target_cls.
    """
    tp = np.asarray(tp)
    conf, pred_cls, target_cls = np.asarray(conf), np.asarray(pred_cls), np.asarray(target_cls)
    # default (unstable) argsort on purpose: the reference orders confidence ties the same way
    order = np.argsort(-conf)
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]

    classes, nt = np.unique(target_cls, return_counts=True)
    n_cls, n_iou = classes.shape[0], tp.shape[1]
    px = np.linspace(0, 1, 1000)
    py = []
    ap = np.zeros((n_cls, n_iou))
    p_curve = np.zeros((n_cls, 1000))
    r_curve = np.zeros((n_cls, 1000))
    for ci, c in enumerate(classes):
        sel = pred_cls == c
        n_l, n_p = nt[ci], sel.sum()
        if n_p == 0 or n_l == 0:
            continue
        tpc = tp[sel].cumsum(0)
        fpc = (1 - tp[sel]).cumsum(0)
        recall = tpc / (n_l + eps)
        precision = tpc / (tpc + fpc)
        # np.interp wants increasing x; confidence decreases along the detections
        r_curve[ci] = np.interp(-px, -conf[sel], recall[:, 0], left=0)
        p_curve[ci] = np.interp(-px, -conf[sel], precision[:, 0], left=1)
        for j in range(n_iou):
            ap[ci, j], mpre, mrec = compute_ap(recall[:, j], precision[:, j])
            if plot and j == 0:
                py.append(np.interp(px, mrec, mpre))

    f1_curve = 2 * p_curve * r_curve / (p_curve + r_curve + eps)
    if n_cls == 0:  # no labels at all: nothing to pick a confidence for (and avoid a mean of nothing)
        empty = np.zeros(0)
        return empty, empty, empty, empty, empty, ap, classes.astype(int)
    if plot:
        plot_pr_curve, plot_mc_curve = _plot_fns()
        if plot_pr_curve is not None:
            if isinstance(names, dict):
                kept = [v for k, v in names.items() if k in classes]
            else:
                kept = [v for k, v in enumerate(names) if k in classes]
            kept = dict(enumerate(kept))
            save_dir = Path(save_dir)
            plot_pr_curve(px, py, ap, save_dir / f"{prefix}PR_curve.png", kept)
            plot_mc_curve(px, f1_curve, save_dir / f"{prefix}F1_curve.png", kept, ylabel="F1")
            plot_mc_curve(px, p_curve, save_dir / f"{prefix}P_curve.png", kept, ylabel="Precision")
            plot_mc_curve(px, r_curve, save_dir / f"{prefix}R_curve.png", kept, ylabel="Recall")

    best = smooth(f1_curve.mean(0), 0.1).argmax()
    p, r, f1 = p_curve[:, best], r_curve[:, best], f1_curve[:, best]
    tp_n = (r * nt).round()
    fp_n = (tp_n / (p + eps) - tp_n).round()
    return tp_n, fp_n, p, r, f1, ap, classes.astype(int)


def _unique_first(rows: np.ndarray, col: int) -> np.ndarray:
    """Rows keeping the first occurrence of each value in column col, ordered by that value."""
    return rows[np.unique(rows[:, col], return_index=True)[1]]


def _pairs_by_iou(iou: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """(k, 3) float array [label, detection, iou] of masked pairs, highest IoU first."""
    li, di = torch.nonzero(mask, as_tuple=True)
    rows = torch.stack((li.float(), di.float(), iou[li, di].float()), 1).cpu().numpy()
    if rows.shape[0] > 1:
        # reversed default argsort, as the reference: equal IoUs keep its tie order
        rows = rows[rows[:, 2].argsort()[::-1]]
    return rows


def process_batch(detections: torch.Tensor, labels: torch.Tensor, iouv: torch.Tensor) -> torch.Tensor:
    """Correct-prediction matrix (n, len(iouv)) for detections [x1,y1,x2,y2,conf,cls] vs labels [cls,x1,y1,x2,y2]."""
    correct = np.zeros((detections.shape[0], iouv.shape[0]), dtype=bool)
    iou = box_iou(labels[:, 1:], detections[:, :4])
    same_cls = labels[:, 0:1] == detections[:, 5]
    for k, thr in enumerate(iouv):
        rows = _pairs_by_iou(iou, (iou >= thr) & same_cls)
        if rows.shape[0] > 1:
            # unique detections first (leaves them sorted by detection index), then unique labels in that
            # order: a label goes to its lowest-index (highest-confidence) candidate, not its best IoU
            rows = _unique_first(_unique_first(rows, 1), 0)
        correct[rows[:, 1].astype(int), k] = True
    return torch.tensor(correct, dtype=torch.bool, device=iouv.device)


class ConfusionMatrix:
    """Detection confusion matrix; rows predicted class, columns true class, index nc = background."""

    def __init__(self, nc: int, conf: float = 0.25, iou_thres: float = 0.45):
        self.matrix = np.zeros((nc + 1, nc + 1))
        self.nc = nc
        self.conf = conf
        self.iou_thres = iou_thres

    def process_batch(self, detections: torch.Tensor | None, labels: torch.Tensor) -> None:
        """Add one image: detections (n, 6) [x1,y1,x2,y2,conf,cls] or None, labels (m, 5) [cls,x1,y1,x2,y2]."""
        bg = self.nc
        if detections is None:
            # no predictions at all: labels holds class ids only (or full rows); all are missed
            gt = (labels if labels.ndim == 1 else labels[:, 0]).int().cpu().numpy()
            np.add.at(self.matrix, (bg, gt), 1)
            return
        detections = detections[detections[:, 4] > self.conf]
        gt = labels[:, 0].int().cpu().numpy()
        dc = detections[:, 5].int().cpu().numpy()
        iou = box_iou(labels[:, 1:], detections[:, :4])
        rows = _pairs_by_iou(iou, iou > self.iou_thres)
        if rows.shape[0] > 1:
            rows = _unique_first(rows, 1)
            rows = rows[rows[:, 2].argsort()[::-1]]
            rows = _unique_first(rows, 0)
        m_lab, m_det = rows[:, 0].astype(int), rows[:, 1].astype(int)

        # after the unique steps each label has at most one match
        hits = np.bincount(m_lab, minlength=len(gt))[:len(gt)] == 1
        det_of_label = np.full(len(gt), -1)
        det_of_label[m_lab] = m_det
        np.add.at(self.matrix, (dc[det_of_label[hits]], gt[hits]), 1)
        np.add.at(self.matrix, (bg, gt[~hits]), 1)
        # facts 8.8: every detection left unmatched is a background false positive
        unmatched = np.ones(len(dc), bool)
        unmatched[m_det] = False
        np.add.at(self.matrix, (dc[unmatched], bg), 1)

    def tp_fp(self) -> tuple[np.ndarray, np.ndarray]:
        """True and false positives per class (background excluded)."""
        tp = self.matrix.diagonal()
        fp = self.matrix.sum(1) - tp
        return tp[:-1], fp[:-1]

    def plot(self, normalize: bool = True, save_dir: Path | str = "", names: Sequence[str] | dict = ()) -> None:
        """Save confusion_matrix.png via utils.reporting.plots (skipped with a warning if plotting is unavailable)."""
        try:
            from utils.reporting.plots import plot_confusion_matrix
        except ImportError:
            LOGGER.warning("WARNING ⚠️ utils.reporting.plots unavailable, confusion matrix not plotted")
            return
        plot_confusion_matrix(self.matrix, self.nc, Path(save_dir), names, normalize=normalize)

    def print(self) -> None:
        """Log the raw matrix row by row."""
        for row in self.matrix:
            LOGGER.info(" ".join(map(str, row)))
