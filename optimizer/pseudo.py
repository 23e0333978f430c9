"""Pseudo-labels: the teacher's confident detections on the unlabelled images become detection targets.

Each step the teacher has already produced raw maps for the unlabelled part of the batch (one forward pass,
shared with the output distillation). Here they are decoded as YOLOv5's Detect decodes them in eval mode,
filtered by non-max suppression at `pseudo_conf`, and turned into the loader's target rows
[image, class, x, y, w, h] (normalised), so the student's ordinary detection loss can learn from them.

Objects the teacher half-sees (score in [pseudo_ignore, pseudo_conf)) would otherwise be pushed to background
by the objectness term: those cells form the ignore band, excluded from the objectness loss of the unlabelled
images unless they are positives of a pseudo box.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from utils.core.boxes import xyxy2xywhn
from utils.evaluation.nms import non_max_suppression

PSEUDO_IOU = 0.45  # NMS IoU threshold of the pseudo boxes: YOLOv5 detect.py's default
PSEUDO_MAX_DET = 300  # boxes kept per image at most, as in YOLOv5's NMS


def decode_maps(maps: Sequence[torch.Tensor], anchors: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """Raw Detect maps [(bs, na, ny, nx, 5 + nc)] to (bs, N, 5 + nc) rows: xywh in pixels, sigmoid obj and cls,
    in Detect's eval order (level, anchor, row, column). `anchors` are Detect's (nl, na, 2) in grid units."""
    out = []
    for i, m in enumerate(maps):
        bs, na, ny, nx, no = m.shape
        s = float(strides[i])
        y = m.float().sigmoid()
        gy, gx = torch.meshgrid(torch.arange(ny, device=m.device, dtype=y.dtype),
                                torch.arange(nx, device=m.device, dtype=y.dtype), indexing="ij")
        grid = torch.stack((gx, gy), -1).view(1, 1, ny, nx, 2)
        anchor_px = (anchors[i].to(y) * s).view(1, na, 1, 1, 2)
        xy = (y[..., :2] * 2 - 0.5 + grid) * s
        wh = (y[..., 2:4] * 2) ** 2 * anchor_px
        out.append(torch.cat((xy, wh, y[..., 4:]), -1).view(bs, -1, no))
    return torch.cat(out, 1)


def cell_scores(maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per level, the teacher's score of every cell and anchor, (bs, na, ny, nx): sigmoid(obj) x max sigmoid(cls),
    the confidence NMS ranks a box by."""
    out = []
    for m in maps:
        y = m.float().sigmoid()
        cls = y[..., 5:].amax(-1) if m.shape[-1] > 5 else torch.ones_like(y[..., 4])
        out.append(y[..., 4] * cls)
    return out


@dataclass
class PseudoBatch:
    """One step's pseudo-labels for the unlabelled images."""

    targets: torch.Tensor  # (n, 6) [image, class, x, y, w, h], normalised, as the loader's targets
    conf: torch.Tensor  # (n,) the teacher's score of each box
    ignore: list[torch.Tensor] | None  # per level, (bs, na, ny, nx) bool: cells inside the ignore band
    images: int  # unlabelled images in the batch

    def plot_targets(self) -> torch.Tensor:
        """Rows [image, class, x, y, w, h, conf] for a train_batch mosaic."""
        return torch.cat((self.targets, self.conf[:, None]), 1)


class PseudoLabeller:
    """Turns the teacher's raw maps of unlabelled images into detection targets and an ignore band."""

    def __init__(self, head: nn.Module, conf: float, ignore: float = 0.0, iou: float = PSEUDO_IOU):
        """`head` is the teacher's Detect (its anchors and strides decode the maps); boxes scoring at least `conf`
        become targets; cells scoring in [ignore, conf) are left out of the objectness loss (ignore 0: none)."""
        self.anchors = head.anchors.detach().float().clone()
        self.strides = head.stride.detach().float().clone()
        self.conf = float(conf)
        # NMS keeps boxes scoring strictly above its threshold: the float just below conf keeps a box at exactly conf
        self._nms_conf = torch.nextafter(torch.tensor(self.conf), torch.tensor(0.0)).item()
        self.ignore_below = float(ignore)
        self.iou = float(iou)

    def __call__(self, maps: Sequence[torch.Tensor], height: int, width: int) -> PseudoBatch:
        """The pseudo-labels of a batch of `height` x `width` images from the teacher's raw maps of them."""
        with torch.no_grad():
            rows = decode_maps(maps, self.anchors.to(maps[0].device), self.strides)
            dets = non_max_suppression(rows, conf_thres=self._nms_conf, iou_thres=self.iou, max_det=PSEUDO_MAX_DET)
            targets, conf = [], []
            for i, d in enumerate(dets):
                box = xyxy2xywhn(d[:, :4].clone(), w=width, h=height, clip=True)
                keep = (box[:, 2] > 0) & (box[:, 3] > 0)  # a box clipped to nothing is no target
                d, box = d[keep], box[keep]
                targets.append(torch.cat((torch.full_like(d[:, :1], i), d[:, 5:6], box), 1))
                conf.append(d[:, 4])
            ignore = None
            if 0 < self.ignore_below < self.conf:
                ignore = [(s >= self.ignore_below) & (s < self.conf) for s in cell_scores(maps)]
        return PseudoBatch(torch.cat(targets, 0), torch.cat(conf, 0), ignore, len(dets))
