"""The `iou` distillation box term's hand-written autograd node against bbox_iou on decoded boxes (float64)."""
import pytest
import torch

from optimizer.box_ciou import decoded_ciou_loss
from utils.core.boxes import bbox_iou

MIN_WH = 1e-6


def reference(p: torch.Tensor, t: torch.Tensor, a_s: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """1 - CIoU from utils.core.boxes.bbox_iou on boxes decoded as Detect decodes them, all through autograd."""
    def decode(x, a):
        s = x.sigmoid()
        wh = ((s[..., 2:] * 2).square() * a.view(1, -1, 1, 1, 2)).clamp(min=MIN_WH)
        return torch.cat((s[..., :2] * 2 - 0.5, wh), -1)
    b1, b2 = decode(p, a_s), decode(t, a_t)
    return 1 - bbox_iou(b1.reshape(-1, 4), b2.reshape(-1, 4), CIoU=True).view(p.shape[:-1])


def logits(seed: int, shape=(2, 3, 5, 6, 4), scale: float = 2.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("same_anchors", [True, False])
def test_value_and_gradient_match_bbox_iou(seed, same_anchors):
    # scale 2 logits: nested, overlapping and disjoint boxes, and either side of every min/max
    p, t = logits(seed), logits(seed + 100)
    g = torch.Generator().manual_seed(seed + 200)
    a_s = torch.rand(3, 2, generator=g, dtype=torch.float64) * 3 + 0.5
    a_t = a_s if same_anchors else torch.rand(3, 2, generator=g, dtype=torch.float64) * 3 + 0.5
    w = torch.rand(p.shape[:-1], generator=g, dtype=torch.float64)  # an upstream gradient of any shape
    p1, p2 = p.clone().requires_grad_(True), p.clone().requires_grad_(True)
    ours, ref = decoded_ciou_loss(p1, t, a_s, a_t, MIN_WH), reference(p2, t, a_s, a_t)
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    assert p1.grad.abs().sum() > 0
    assert torch.allclose(p1.grad, p2.grad, rtol=1e-8, atol=1e-12)


def test_branches_are_all_exercised():
    """The random cases above cover every branch the backward distinguishes (so the match is not by luck)."""
    p, t = logits(0), logits(100)
    a = torch.rand(3, 2, generator=torch.Generator().manual_seed(200), dtype=torch.float64) * 3 + 0.5
    dec = lambda x: (x.sigmoid()[..., :2] * 2, (x.sigmoid()[..., 2:] * 2).square() * a.view(1, -1, 1, 1, 2))  # noqa
    (c1, wh1), (c2, wh2) = dec(p), dec(t)
    near = (wh1 + wh2) / 2 - (c1 - c2).abs()
    far = (wh1 + wh2) / 2 + (c1 - c2).abs()
    assert (near < torch.minimum(wh1, wh2)).any() and (near >= torch.minimum(wh1, wh2)).any()
    assert (near <= 0).any()  # disjoint along an axis
    assert (far > torch.maximum(wh1, wh2)).any() and (far <= torch.maximum(wh1, wh2)).any()  # nested ones too


def test_gradcheck_where_alpha_does_not_matter():
    """Against numerical derivatives: alpha is held constant in the gradient (as in YOLOv5), which is the true
    derivative wherever both boxes share an aspect ratio (v = 0 and dv = 0 there); sizes differ by 1.3x."""
    t = logits(4, (1, 3, 2, 2, 4))
    p = t.clone()
    p[..., :2] = logits(3, (1, 3, 2, 2, 2))
    p.requires_grad_(True)
    a = torch.tensor([[1.0, 2.0], [2.5, 1.5], [0.7, 0.9]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: decoded_ciou_loss(x, t, a * 1.3, a, MIN_WH), (p,))


def test_saturated_sizes_stay_finite_and_match():
    p, t = logits(5), logits(6)
    p[..., 2:][p[..., 2:] > 2] = -1e4  # sigmoid underflows to 0: sizes clamp at MIN_WH
    t[..., 3] = -1e4
    a = torch.ones(3, 2, dtype=torch.float64)
    p1, p2 = p.clone().requires_grad_(True), p.clone().requires_grad_(True)
    ours, ref = decoded_ciou_loss(p1, t, a, a, MIN_WH), reference(p2, t, a, a)
    ours.sum().backward()
    ref.sum().backward()
    assert torch.isfinite(ours).all() and torch.isfinite(p1.grad).all()
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(p1.grad, p2.grad, rtol=1e-8, atol=1e-12)


def test_identical_boxes_give_zero_loss():
    p = logits(7, scale=0.5)  # boxes of about an anchor's size: the eps in the union is ~1e-7 of their area
    a = torch.ones(3, 2, dtype=torch.float64)
    assert decoded_ciou_loss(p, p.clone(), a, a, MIN_WH).abs().max() < 1e-6


def test_teacher_gets_no_gradient():
    p, t = logits(8).requires_grad_(True), logits(9).requires_grad_(True)
    a = torch.ones(3, 2, dtype=torch.float64)
    decoded_ciou_loss(p, t, a, a, MIN_WH).sum().backward()
    assert t.grad is None and p.grad is not None
