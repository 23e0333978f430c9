"""Non-maximum suppression with YOLOv5's semantics, on torchvision.ops.batched_nms."""
from __future__ import annotations

import logging
import time

import torch
import torchvision

from utils.core.boxes import xywh2xyxy

LOGGER = logging.getLogger("yolov5kd")

MAX_WH = 7680  # class offset YOLOv5 adds to boxes; kept so ties resolve as in the reference
MAX_NMS = 30000  # candidates kept per image before NMS


def non_max_suppression(prediction, conf_thres: float = 0.25, iou_thres: float = 0.45, classes=None,
                        agnostic: bool = False, multi_label: bool = False, labels=(), max_det: int = 300,
                        nm: int = 0, time_limit: float | None = None) -> list[torch.Tensor]:
    """Filter decoded predictions (bs, N, 5+nc+nm) to a list of (n, 6+nm) [x1, y1, x2, y2, conf, cls, ...].

    The reference aborts after 0.5 + 0.05*bs seconds; here that limit is off unless `time_limit` is given,
    because a slow CPU should not silently change the metrics.
    """
    if not 0 <= conf_thres <= 1:
        raise ValueError(f"conf_thres {conf_thres} must be in [0, 1]")
    if not 0 <= iou_thres <= 1:
        raise ValueError(f"iou_thres {iou_thres} must be in [0, 1]")
    if isinstance(prediction, (list, tuple)):
        prediction = prediction[0]
    bs = prediction.shape[0]
    nc = prediction.shape[2] - nm - 5
    mi = 5 + nc  # first mask column
    multi_label &= nc > 1
    candidates = prediction[..., 4] > conf_thres
    t0 = time.time()
    output = [torch.zeros((0, 6 + nm), device=prediction.device)] * bs
    for xi, x in enumerate(prediction):
        x = x[candidates[xi]]
        if labels and len(labels[xi]):
            lb = labels[xi]
            v = torch.zeros((len(lb), nc + nm + 5), device=x.device)
            v[:, :4] = lb[:, 1:5]
            v[:, 4] = 1.0
            v[range(len(lb)), lb[:, 0].long() + 5] = 1.0
            x = torch.cat((x, v), 0)
        if not x.shape[0]:
            continue
        x[:, 5:mi] *= x[:, 4:5]  # conf = obj * cls
        box = xywh2xyxy(x[:, :4])
        mask = x[:, mi:]
        if multi_label:
            i, j = (x[:, 5:mi] > conf_thres).nonzero(as_tuple=False).T
            x = torch.cat((box[i], x[i, 5 + j, None], j[:, None].float(), mask[i]), 1)
        else:
            conf, j = x[:, 5:mi].max(1, keepdim=True)
            x = torch.cat((box, conf, j.float(), mask), 1)[conf.view(-1) > conf_thres]
        if classes is not None:
            x = x[(x[:, 5:6] == torch.tensor(classes, device=x.device)).any(1)]
        n = x.shape[0]
        if not n:
            continue
        x = x[x[:, 4].argsort(descending=True)[:MAX_NMS]]
        c = x[:, 5:6] * (0 if agnostic else MAX_WH)
        # the offset trick, not batched_nms' own split, so float rounding matches the reference
        i = _offset_nms(x[:, :4] + c, x[:, 4], None if agnostic else x[:, 5], iou_thres)[:max_det]
        output[xi] = x[i]
        if time_limit is not None and time.time() - t0 > time_limit:
            LOGGER.warning(f"NMS time limit {time_limit:.3f}s exceeded")
            break
    return output


def _offset_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor | None, iou_thres: float,
                split_above: int = 1000) -> torch.Tensor:
    """torchvision NMS over class-offset boxes sorted by descending score: kept indices, best first.

    Offset boxes of different classes never overlap, so NMS over all of them equals NMS run class by class
    on the same coordinates. Above `split_above` boxes the per-class runs are much cheaper (NMS compares each
    kept box with every box after it), as torchvision's batched_nms also splits on CPU; the indices are merged
    back into score order, which is index order since the input is sorted."""
    if classes is None or len(boxes) <= split_above:
        return torchvision.ops.nms(boxes, scores, iou_thres)
    keep = []
    for cls in classes.unique():
        idx = (classes == cls).nonzero().view(-1)
        keep.append(idx[torchvision.ops.nms(boxes[idx], scores[idx], iou_thres)])
    return torch.cat(keep).sort().values
