"""The `iou` distillation box term as one autograd node: 1 - CIoU of the student's decoded boxes against the
teacher's, with its gradient written out.

The term is evaluated on every cell of every map at every step (~100k boxes at batch 16, 320 px). Built from
autograd ops (utils.core.boxes.bbox_iou on decoded boxes) it costs ~70 forward and ~150 backward passes over those
cells, most of them min/max/clamp backward masks; this form is ~30 passes each way on x and y together, and
gives the same value and gradient (tests/test_box_ciou.py checks both against bbox_iou in float64).
CIoU's alpha is held constant in the gradient, as YOLOv5's box loss holds it.
"""
from __future__ import annotations

import math

import torch

CIOU_EPS = 1e-7  # YOLOv5's eps in the union, the enclosing diagonal and alpha
V_SCALE = 4 / math.pi ** 2  # CIoU's aspect-ratio term: (4 / pi^2) (atan(w2/h2) - atan(w1/h1))^2


class _DecodedCIoULoss(torch.autograd.Function):
    """forward(p, c2, wh2, atan2, anchors, min_wh) -> 1 - CIoU per cell; p holds the student's box logits."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, c2: torch.Tensor, wh2: torch.Tensor, atan2: torch.Tensor,
                anchors: torch.Tensor, min_wh: float) -> torch.Tensor:
        s = p.sigmoid()
        s_wh = s[..., 2:]
        raw_wh = (s_wh * 2).square() * anchors
        wh1 = raw_wh.clamp(min=min_wh)
        d = s[..., :2] * 2 - c2  # centre offsets are 2s - 0.5 on both sides; the -0.5 cancels
        ad = d.abs()
        half_sum = (wh1 + wh2) * 0.5
        # intervals with centres c1, c2 and sizes s1, s2 overlap by min(s1, s2, (s1+s2)/2 - |d|), clamped at 0,
        # and are enclosed by max(s1, s2, (s1+s2)/2 + |d|)
        smaller = torch.minimum(wh1, wh2)
        near = half_sum - ad
        o = torch.minimum(smaller, near).clamp(min=0)
        by_near = near < smaller  # which side of each minimum / maximum carried the value, for the backward
        inter = o[..., 0] * o[..., 1]
        area1 = wh1[..., 0] * wh1[..., 1]
        union = area1 + (wh2[..., 0] * wh2[..., 1] + CIOU_EPS) - inter
        iou = inter / union
        larger = torch.maximum(wh1, wh2)
        far = half_sum + ad
        e = torch.maximum(larger, far)
        by_far = far > larger
        diag2 = e.square().sum(-1) + CIOU_EPS
        q = d.square().sum(-1) / diag2
        r1 = wh1[..., 0] / wh1[..., 1]
        dat = atan2 - torch.atan(r1)
        v = V_SCALE * dat.square()
        alpha = v / (v - iou + (1 + CIOU_EPS))
        ctx.save_for_backward(s, raw_wh >= min_wh, wh1, wh2, d, o, by_near, by_far, e, iou, union, diag2, q, r1,
                              dat, alpha, anchors)
        return 1 - iou + q + alpha * v

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (s, unclamped, wh1, wh2, d, o, by_near, by_far, e, iou, union, diag2, q, r1, dat, alpha,
         anchors) = ctx.saved_tensors
        sd = d.sign()
        # -iou: inter and area1 move iou by (1 + iou) / union and -iou / union
        g_inter = (g * (1 + iou) / union).neg().unsqueeze(-1)
        g_o = g_inter * o.flip(-1) * (o > 0)
        g_wh1 = torch.where(by_near, 0.5 * g_o, g_o * (wh1 <= wh2))
        g_d = torch.where(by_near, g_o * sd.neg(), 0)
        g_wh1 = g_wh1 + (g * iou / union).unsqueeze(-1) * wh1.flip(-1)
        # + rho^2 / diag^2: d directly, and the enclosing extent e
        g_d = g_d + (2 * g / diag2).unsqueeze(-1) * d
        g_e = (-2 * g * q / diag2).unsqueeze(-1) * e
        g_wh1 = g_wh1 + torch.where(by_far, 0.5 * g_e, g_e * (wh1 >= wh2))
        g_d = g_d + torch.where(by_far, g_e * sd, 0)
        # + alpha v, alpha constant: v depends on r1 = w1 / h1
        g_r1 = g * alpha * (-2 * V_SCALE) * dat / (1 + r1.square())
        h1 = wh1[..., 1]
        g_wh1 = g_wh1 + torch.stack((g_r1 / h1, -g_r1 * r1 / h1), -1)
        # through the clamp, wh = 4 s^2 a and c = 2 s, then the sigmoid
        s_wh = s[..., 2:]
        g_swh = g_wh1 * unclamped * 8 * s_wh * anchors
        g_s = torch.cat((2 * g_d, g_swh), -1)
        return g_s * s * (1 - s), None, None, None, None, None


def decoded_ciou_loss(p: torch.Tensor, t: torch.Tensor, anchors_s: torch.Tensor, anchors_t: torch.Tensor,
                      min_wh: float) -> torch.Tensor:
    """1 - CIoU per cell (bs, na, ny, nx) between boxes decoded from student logits p and teacher logits t
    (bs, na, ny, nx, 4), each with its own anchors (na, 2) in grid units, sizes clamped at min_wh."""
    with torch.no_grad():
        st = t.sigmoid()
        c2 = st[..., :2] * 2
        wh2 = ((st[..., 2:] * 2).square() * anchors_t.view(1, -1, 1, 1, 2)).clamp(min=min_wh)
        atan2 = torch.atan(wh2[..., 0] / wh2[..., 1])
    return _DecodedCIoULoss.apply(p, c2, wh2, atan2, anchors_s.view(1, -1, 1, 1, 2), min_wh)
