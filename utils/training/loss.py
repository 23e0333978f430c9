"""YOLOv5-compatible detection loss: target assignment, CIoU box loss, objectness and class BCE."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.core.boxes import bbox_iou
from utils.core.distributed import de_parallel

# Objectness weight per detection level, small strides first.
BALANCE_3 = [4.0, 1.0, 0.4]
BALANCE_N = [4.0, 1.0, 0.25, 0.06, 0.02]

# Cell offsets tried for every target: own cell, then left, above, right, below (in that order,
# because the order of the positives decides which duplicate objectness write survives).
_NEIGHBOURS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))


def smooth_BCE(eps: float = 0.1) -> tuple[float, float]:
    """Positive and negative BCE targets for label smoothing eps."""
    return 1.0 - 0.5 * eps, 0.5 * eps


def scale_hyp(hyp: dict, nl: int, nc: int, imgsz: int, label_smoothing: float = 0.0) -> dict:
    """Train-time rescaling of the loss gains for the number of levels, classes and image size."""
    out = dict(hyp)
    # factors are evaluated left to right exactly as train.py writes them, so floats agree to the last bit
    out["box"] *= 3 / nl
    out["cls"] *= nc / 80 * 3 / nl
    out["obj"] *= (imgsz / 640) ** 2 * 3 / nl
    out["label_smoothing"] = label_smoothing
    return out


class FocalLoss(nn.Module):
    """Focal modulation (gamma, alpha) around a BCEWithLogitsLoss criterion."""

    def __init__(self, loss_fcn: nn.BCEWithLogitsLoss, gamma: float = 1.5, alpha: float = 0.25):
        super().__init__()
        self.loss_fcn = loss_fcn
        self.gamma = gamma
        self.alpha = alpha
        # the wrapped criterion must give per-element values; its own reduction is applied at the end
        self.reduction = loss_fcn.reduction
        self.loss_fcn.reduction = "none"

    def forward(self, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        loss = self.elementwise(pred, true)
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss

    def elementwise(self, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        """The focal loss of every element, unreduced."""
        bce = self.loss_fcn(pred, true)
        prob = torch.sigmoid(pred)
        p_t = true * prob + (1 - true) * (1 - prob)
        alpha_t = true * self.alpha + (1 - true) * (1 - self.alpha)
        return bce * alpha_t * (1.0 - p_t) ** self.gamma


class ComputeLoss:
    """Callable YOLOv5 loss bound to a model's Detect head and hyperparameters."""

    sort_obj_iou = False

    def __init__(self, model: nn.Module, autobalance: bool = False, hyp: Mapping[str, Any] | None = None):
        """Bind to the model's Detect head; `hyp` holds the train-time rescaled gains (YOLOv5's own callers leave it
        out, and the loss reads model.hyp as YOLOv5 does)."""
        bare = de_parallel(model)
        device = next(bare.parameters()).device
        h = dict(hyp) if hyp is not None else bare.hyp
        det = bare.model[-1]

        self.hyp = h
        self.device = device
        bce_cls = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([h["cls_pw"]], device=device))
        bce_obj = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([h["obj_pw"]], device=device))
        self.cp, self.cn = smooth_BCE(eps=h.get("label_smoothing", 0.0))
        gamma = h.get("fl_gamma", 0.0)
        if gamma > 0:
            bce_cls, bce_obj = FocalLoss(bce_cls, gamma), FocalLoss(bce_obj, gamma)
        self.BCEcls, self.BCEobj = bce_cls, bce_obj

        self.nl, self.na, self.nc = det.nl, det.na, det.nc
        self.balance = list(BALANCE_3 if det.nl == 3 else BALANCE_N[:det.nl])
        # autobalance normalises every level to the stride-16 one
        self.ssi = [float(s) for s in det.stride].index(16.0) if autobalance else 0
        self.autobalance = autobalance
        self.gr = 1.0
        self.anchors = det.anchors
        self.last_assignment: tuple | None = None  # (targets, map shapes, build_targets' result) of the last call

    def __call__(self, p: list[torch.Tensor], targets: torch.Tensor,
                 ignore: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Total loss (1,) multiplied by batch size, and detached [lbox, lobj, lcls]. `ignore` (per level, a
        (bs, na, ny, nx) bool mask) leaves those cells out of the objectness term unless they are positives; the
        mean still divides by every cell, so the other cells weigh exactly what they would without the mask."""
        # bf16 (CPU --amp) keeps 8 bits of mantissa, too coarse for CIoU and the BCE sums: compute in fp32.
        # fp16 maps (CUDA AMP) are left as they are, as in the reference.
        p = [pi.float() if pi.dtype == torch.bfloat16 else pi for pi in p]
        dev = targets.device
        lbox = torch.zeros(1, device=dev)
        lobj = torch.zeros(1, device=dev)
        lcls = torch.zeros(1, device=dev)
        tcls, tbox, indices, anch = self.build_targets(p, targets)
        # the assignment of the last call, for whatever else reads the same step's labelled cells (the
        # localisation term: optimizer/terms/localisation.py); kept beside, never changing, the loss
        self.last_assignment = (targets, tuple(pi.shape[:4] for pi in p), (tcls, tbox, indices, anch))

        for i, pi in enumerate(p):
            b, a, gj, gi = indices[i]
            tobj = torch.zeros(pi.shape[:4], dtype=pi.dtype, device=pi.device)
            n = b.shape[0]
            if n:
                pxy, pwh, _, pcls = pi[b, a, gj, gi].split((2, 2, 1, self.nc), 1)
                pxy = pxy.sigmoid() * 2 - 0.5
                pwh = (pwh.sigmoid() * 2) ** 2 * anch[i]
                iou = bbox_iou(torch.cat((pxy, pwh), 1), tbox[i], CIoU=True).squeeze()
                lbox = lbox + (1.0 - iou).mean()

                score = iou.detach().clamp(0).type(tobj.dtype)
                if self.sort_obj_iou:
                    order = score.argsort()
                    b, a, gj, gi, score = b[order], a[order], gj[order], gi[order], score[order]
                if self.gr < 1:
                    score = (1.0 - self.gr) + self.gr * score
                tobj[b, a, gj, gi] = score

                if self.nc > 1:
                    t = torch.full_like(pcls, self.cn)
                    t[torch.arange(n, device=t.device), tcls[i]] = self.cp
                    lcls = lcls + self.BCEcls(pcls, t)

            if ignore is None:
                obji = self.BCEobj(pi[..., 4], tobj)
            else:
                skip = ignore[i].clone()
                skip[b, a, gj, gi] = False  # a positive is always learnt
                obji = self._obj_elements(pi[..., 4], tobj).masked_fill(skip, 0.0).mean()
            lobj = lobj + obji * self.balance[i]
            if self.autobalance:
                self.balance[i] = self.balance[i] * 0.9999 + 0.0001 / obji.detach().item()

        if self.autobalance:
            ref = self.balance[self.ssi]
            self.balance = [x / ref for x in self.balance]
        lbox = lbox * self.hyp["box"]
        lobj = lobj * self.hyp["obj"]
        lcls = lcls * self.hyp["cls"]
        bs = p[-1].shape[0]
        return (lbox + lobj + lcls) * bs, torch.cat((lbox, lobj, lcls)).detach()

    def _obj_elements(self, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        if isinstance(self.BCEobj, FocalLoss):
            return self.BCEobj.elementwise(pred, true)
        return F.binary_cross_entropy_with_logits(pred, true, pos_weight=self.BCEobj.pos_weight, reduction="none")

    def build_targets(self, p: list[torch.Tensor], targets: torch.Tensor):
        """Assign targets to (image, anchor, cell) positives per level: (tcls, tbox, indices, anch)."""
        na, nt = self.na, targets.shape[0]
        dev = targets.device
        tcls, tbox, indices, anch = [], [], [], []

        # (na, nt, 7): every target once per anchor, anchor id appended, so that the filter below keeps
        # anchor-major order
        anchor_id = torch.arange(na, device=dev, dtype=targets.dtype).view(na, 1).expand(na, nt)
        base = torch.cat((targets.unsqueeze(0).expand(na, nt, 6), anchor_id.unsqueeze(-1)), 2)
        g = 0.5
        off = torch.tensor(_NEIGHBOURS, device=dev, dtype=targets.dtype) * g
        scale = torch.ones(7, device=dev, dtype=targets.dtype)

        for i in range(self.nl):
            anchors_i = self.anchors[i]
            ny, nx = p[i].shape[2], p[i].shape[3]
            scale[2:6] = torch.tensor([nx, ny, nx, ny], device=dev, dtype=targets.dtype)
            t = base * scale  # xywh in grid cells

            if nt:
                ratio = t[..., 4:6] / anchors_i[:, None]
                fits = torch.max(ratio, 1 / ratio).max(2).values < self.hyp["anchor_t"]
                t = t[fits]

                xy = t[:, 2:4]
                xy_inv = scale[2:4] - xy
                near_lo = (xy % 1 < g) & (xy > 1)  # columns: left neighbour, upper neighbour
                near_hi = (xy_inv % 1 < g) & (xy_inv > 1)  # columns: right neighbour, lower neighbour
                use = torch.stack((torch.ones_like(near_lo[:, 0]), near_lo[:, 0], near_lo[:, 1],
                                   near_hi[:, 0], near_hi[:, 1]))  # (5, m), neighbour-major
                t = t.unsqueeze(0).expand(5, *t.shape)[use]
                offsets = off[:, None, :].expand(5, use.shape[1], 2)[use]
            else:
                t = base[0]
                offsets = torch.zeros_like(t[:, 2:4])

            img, cls = t[:, 0].long(), t[:, 1].long()
            xy, wh, a = t[:, 2:4], t[:, 4:6], t[:, 6].long()
            cell = (xy - offsets).long()
            # clamping the cell before forming the box target matches the reference, whose in-place
            # clamp on views also altered the cell used for the xy offset
            cell[:, 0].clamp_(0, nx - 1)
            cell[:, 1].clamp_(0, ny - 1)
            gi, gj = cell[:, 0], cell[:, 1]

            indices.append((img, a, gj, gi))
            tbox.append(torch.cat((xy - cell, wh), 1))
            anch.append(anchors_i[a])
            tcls.append(cls)

        return tcls, tbox, indices, anch
