"""Box maths on hand-built tensors and NMS against the golden detections."""
import math

import numpy as np
import pytest
import torch

from utils.core.boxes import bbox_iou, box_iou, clip_boxes, scale_boxes, xywh2xyxy, xywhn2xyxy, xyxy2xywh, xyxy2xywhn
from utils.evaluation.nms import MAX_WH, _offset_nms, non_max_suppression


def test_conversions_roundtrip():
    b = torch.tensor([[10.0, 20.0, 4.0, 8.0]])
    assert xywh2xyxy(b).tolist() == [[8.0, 16.0, 12.0, 24.0]]
    assert torch.equal(xyxy2xywh(xywh2xyxy(b)), b)
    n = np.array([[0.5, 0.5, 0.2, 0.4]])
    px = xywhn2xyxy(n, w=100, h=50, padw=3, padh=4)
    assert np.allclose(px, [[43, 19, 63, 39]])
    assert np.allclose(xyxy2xywhn(px - [3, 4, 3, 4], w=100, h=50), n)


def test_clip_and_scale():
    b = torch.tensor([[-5.0, -1.0, 700.0, 300.0]])
    clip_boxes(b, (200, 640))
    assert b.tolist() == [[0.0, 0.0, 640.0, 200.0]]
    # a 320x640 (h, w) image letterboxed into 640x640: gain 1, vertical pad 160
    boxes = torch.tensor([[10.0, 170.0, 20.0, 180.0]])
    scale_boxes((640, 640), boxes, (320, 640))
    assert boxes.tolist() == [[10.0, 10.0, 20.0, 20.0]]
    boxes = torch.tensor([[10.0, 170.0, 20.0, 180.0]])
    scale_boxes((640, 640), boxes, (320, 640), ratio_pad=((1.0, 1.0), (0.0, 160.0)))
    assert boxes.tolist() == [[10.0, 10.0, 20.0, 20.0]]


def test_box_iou():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    iou = box_iou(a, b)
    assert iou.shape == (1, 3)
    assert torch.allclose(iou, torch.tensor([[1.0, 50 / 150, 0.0]]), atol=1e-6)


def test_ciou_identical_and_disjoint():
    a = torch.tensor([[5.0, 5.0, 2.0, 4.0]])
    assert abs(bbox_iou(a, a, CIoU=True).item() - 1.0) < 1e-6
    b = torch.tensor([[9.0, 5.0, 2.0, 4.0]])  # same size, 4 to the right, disjoint
    c2 = (4 + 2) ** 2 + 4 ** 2  # enclosing box 6 x 4
    assert math.isclose(bbox_iou(a, b, CIoU=True).item(), -16 / c2, rel_tol=1e-5)


@pytest.mark.parametrize("key,kw", [("nms_val", dict(conf_thres=0.001, iou_thres=0.6, multi_label=True, max_det=300)),
                                    ("nms_detect", dict(conf_thres=0.25, iou_thres=0.45, max_det=1000))])
def test_nms_golden(key, kw, golden):
    out = non_max_suppression(golden["student_inference"].clone(), **kw)
    assert [len(o) for o in out] == [len(o) for o in golden[key]]
    for a, b in zip(out, golden[key]):
        assert torch.allclose(a, b, atol=1e-4, rtol=0)


def test_nms_semantics_hand_built():
    # two overlapping boxes of class 0 and one of class 1 at the same place; nc = 2
    pred = torch.zeros(1, 3, 7)
    pred[0, :, :4] = torch.tensor([[50, 50, 20, 20], [51, 50, 20, 20], [50, 50, 20, 20]], dtype=torch.float)
    pred[0, :, 4] = torch.tensor([0.9, 0.8, 0.7])
    pred[0, :, 5:] = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    out = non_max_suppression(pred.clone(), conf_thres=0.25, iou_thres=0.45)[0]
    assert out[:, 5].tolist() == [0.0, 1.0]  # class offset keeps the class-1 box
    out = non_max_suppression(pred.clone(), conf_thres=0.25, iou_thres=0.45, agnostic=True)[0]
    assert out[:, 5].tolist() == [0.0]
    out = non_max_suppression(pred.clone(), conf_thres=0.25, iou_thres=0.45, max_det=1)[0]
    assert len(out) == 1 and math.isclose(out[0, 4].item(), 0.9, rel_tol=1e-6)
    out = non_max_suppression(pred.clone(), conf_thres=0.85, iou_thres=0.45)[0]
    assert len(out) == 1
    with pytest.raises(ValueError):
        non_max_suppression(pred, conf_thres=1.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_split_keeps_exactly_what_one_nms_keeps(seed):
    """Above the split size NMS runs class by class on the same offset boxes; it must keep the same boxes
    in the same order as one torchvision NMS over all of them, ties in score included."""
    g = torch.Generator().manual_seed(seed)
    n = 3000
    xy = torch.rand(n, 2, generator=g) * 300
    wh = torch.rand(n, 2, generator=g) * 60 + 2
    cls = torch.randint(0, 8, (n,), generator=g).float()
    scores = (torch.rand(n, generator=g) * 50).round() / 50  # many exact ties
    order = scores.argsort(descending=True)
    boxes = torch.cat((xy, xy + wh), 1)[order] + cls[order, None] * MAX_WH
    scores, cls = scores[order], cls[order]
    whole = _offset_nms(boxes, scores, cls, 0.45, split_above=10**9)
    split = _offset_nms(boxes, scores, cls, 0.45, split_above=0)
    assert 100 < len(whole) < n - 100  # the premise: a real suppression problem, not all kept or all dropped
    assert torch.equal(whole, split)
