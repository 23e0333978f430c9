"""Output-distillation loss: golden totals, hand-computed modes, edge cases."""
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import distillation_loss
from optimizer.config import DIST_NORMS
from optimizer.loss import compute_distillation_output_loss
from utils.core.errors import UserError

GOLDEN_CASES = [("distill_l2_T1", "l2", 1.0), ("distill_l2_T5", "l2", 5.0),
                ("distill_kl_T1", "kl", 1.0), ("distill_kl_T5", "kl", 5.0)]
HYP = {"box": 0.05, "obj": 0.25, "cls": 0.025}


def fake_student(nc: int, hyp: dict, anchors: torch.Tensor | None = None) -> SimpleNamespace:
    """Just what the loss reads from a student: nc, hyp and the Detect anchors."""
    return SimpleNamespace(nc=nc, hyp=hyp, model=[SimpleNamespace(anchors=anchors, nc=nc)])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() / b.double().abs().max().item()


@pytest.mark.parametrize("key,mode,T", GOLDEN_CASES)
def test_golden_object(golden, key, mode, T):
    model = fake_student(4, golden["hyp_scaled"])
    loss = distillation_loss(model, dist_loss=mode, T=T, distill_ratio=0.5)
    total, parts = loss(golden["student_raw"], golden["teacher_raw"])
    assert total.shape == (1,) and total.dtype == torch.float32
    assert rel(total, golden[key]) < 1e-5
    assert torch.allclose(parts["dbox"] + parts["dobj"] + parts["dcls"], total[0], rtol=1e-6)
    assert all(v.ndim == 0 and not v.requires_grad for v in parts.values())


@pytest.mark.parametrize("key,mode,T", GOLDEN_CASES)
def test_golden_seed_entry_point(golden, key, mode, T):
    model = fake_student(4, golden["hyp_scaled"])
    total = compute_distillation_output_loss(golden["student_raw"], golden["teacher_raw"], model,
                                             dist_loss=mode, T=T, distill_ratio=0.5)
    assert total.shape == (1,)
    assert rel(total, golden[key]) < 1e-5


def test_golden_ddp_like_wrapper(golden):
    """de_parallel is applied: a DataParallel-style wrapper exposes the same hyp/nc."""
    inner = torch.nn.Module()
    inner.nc, inner.hyp = 4, golden["hyp_scaled"]
    wrapped = torch.nn.DataParallel(inner)
    total = compute_distillation_output_loss(golden["student_raw"], golden["teacher_raw"], wrapped, T=5)
    assert rel(total, golden["distill_l2_T5"]) < 1e-5


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_bce_hand_built():
    # one level, bs 2, na 1, 1x1 grid, nc 2: every number below is checked against scalar maths
    p = torch.tensor([[0.3, -0.2, 0.1, 0.4, 0.5, 1.0, -2.0],
                      [0.0, 0.0, 0.0, 0.0, -1.0, 3.0, 0.5]]).view(2, 1, 1, 1, 7)
    t = torch.tensor([[0.1, 0.1, 0.2, 0.2, 2.0, -1.0, 4.0],
                      [0.5, -0.5, 0.0, 1.0, 0.0, 2.0, 2.0]]).view(2, 1, 1, 1, 7)
    T, ratio = 2.0, 0.5
    total, parts = distillation_loss(fake_student(2, HYP), "bce", T=T, distill_ratio=ratio)([p], [t])

    box = obj = cls = 0.0
    for b in range(2):
        pv, tv = p.view(2, 7)[b].tolist(), t.view(2, 7)[b].tolist()
        w = _sig(tv[4])
        box += sum((pv[j] - tv[j]) ** 2 * w for j in range(4)) / 8
        obj += (pv[4] - tv[4]) ** 2 * w / 2
        for j in (5, 6):
            x, y = pv[j] / T, _sig(tv[j] / T)
            bce = -(y * math.log(_sig(x)) + (1 - y) * math.log(1 - _sig(x)))
            cls += T * T * bce * w / 4
    bs = 2
    want = {"dbox": box * HYP["box"] * ratio * bs, "dobj": obj * HYP["obj"] * ratio * bs,
            "dcls": cls * HYP["cls"] * ratio * bs}
    for k, v in want.items():
        assert parts[k].item() == pytest.approx(v, rel=1e-5), k
    assert total.item() == pytest.approx(sum(want.values()), rel=1e-5)


def test_bce_targets_are_probabilities():
    """Equal student and teacher logits are the BCE minimum (not so with raw-logit targets)."""
    t = torch.randn(1, 3, 2, 2, 9)
    p = t.clone().requires_grad_(True)
    total, _ = distillation_loss(fake_student(4, HYP), "bce", T=3.0)([p], [t])
    total.backward()
    cls_grad = p.grad[..., 5:]
    assert cls_grad.abs().max() < 1e-6


def test_reg_norm_hand_built():
    p = torch.tensor([0.3, -0.2, 0.1, 0.4, 0.5, 1.0, -2.0]).view(1, 1, 1, 1, 7)
    t = torch.tensor([0.1, 0.1, 0.2, 0.7, 2.0, -1.0, 4.0]).view(1, 1, 1, 1, 7)
    rn = torch.tensor([[1.5, 0.5]])
    hyp = {"box": 1.0, "obj": 0.0, "cls": 0.0}
    total = compute_distillation_output_loss([p], [t], fake_student(2, hyp), reg_norm=[rn], distill_ratio=1.0)
    pv, tv, w = p.flatten().tolist(), t.flatten().tolist(), _sig(2.0)
    xy = ((_sig(pv[0]) - _sig(tv[0])) ** 2 + (_sig(pv[1]) - _sig(tv[1])) ** 2) * w / 2
    wh = ((_sig(pv[2]) - _sig(tv[2]) * 1.5) ** 2 + (_sig(pv[3]) - _sig(tv[3]) * 0.5) ** 2) * w / 2
    assert total.item() == pytest.approx(xy + wh, rel=1e-5)


def test_nc1_skips_class_term():
    torch.manual_seed(0)
    p, t = torch.randn(2, 3, 4, 4, 6), torch.randn(2, 3, 4, 4, 6)
    loss = distillation_loss(fake_student(1, HYP), "l2")
    total, parts = loss([p], [t])
    assert parts["dcls"].item() == 0.0
    p2 = p.clone()
    p2[..., 5] += 10  # the only class logit: must not matter
    assert torch.equal(loss([p2], [t])[0], total)
    assert total.item() == pytest.approx((parts["dbox"] + parts["dobj"]).item(), rel=1e-6)


@pytest.mark.parametrize("norm", DIST_NORMS)
@pytest.mark.parametrize("mode", ["l2", "kl", "bce", "reg_norm", "decoded"])
@pytest.mark.parametrize("T", [1.0, 20.0])
def test_extreme_logits_finite(mode, T, norm):
    torch.manual_seed(1)
    shape = (2, 3, 4, 4, 9)
    sign = torch.randint(0, 2, shape).float() * 2 - 1
    p = (sign * 1e4).requires_grad_(True)
    t = -sign * 1e4
    anchors = torch.rand(1, 3, 2) + 0.5
    kw = {}
    if mode == "reg_norm":
        kw["reg_norm"] = [torch.ones(3, 2)]
    if mode == "decoded":
        kw["teacher_anchors"] = anchors * 2
    loss = distillation_loss(fake_student(4, HYP, anchors), "l2" if mode in ("reg_norm", "decoded") else mode,
                             T=T, norm=norm, **kw)
    assert loss.decoded_box == (mode == "decoded")
    total, parts = loss([p], [t])
    assert torch.isfinite(total).all() and all(torch.isfinite(v) for v in parts.values())
    total.backward()
    assert torch.isfinite(p.grad).all()


def test_decoded_box_zero_for_identical_boxes_under_different_anchors():
    torch.manual_seed(2)
    a_t = torch.rand(3, 3, 2) * 3 + 0.5
    a_s = a_t * torch.tensor([2.0, 3.0])  # student anchors larger, so the matching sigmoid stays < 1
    ts = [torch.randn(2, 3, n, n, 9) for n in (8, 4, 2)]
    ps = []
    for i, t in enumerate(ts):
        p = torch.randn_like(t)  # objectness/class logits differ on purpose
        p[..., :2] = t[..., :2]
        # (2·σ(p))²·a_s = (2·σ(t))²·a_t  ⇔  σ(p) = σ(t)·sqrt(a_t / a_s)
        sp = t[..., 2:4].sigmoid() * (a_t[i] / a_s[i]).sqrt().view(1, 3, 1, 1, 2)
        p[..., 2:4] = torch.logit(sp.double()).float()
        ps.append(p)
    decoded = distillation_loss(fake_student(4, HYP, a_s), "l2", teacher_anchors=a_t)
    assert decoded.decoded_box
    _, parts = decoded(ps, ts)
    assert parts["dbox"].item() < 1e-9
    assert parts["dobj"].item() > 0
    # the raw-logit form would have penalised the same, correctly matching, boxes
    _, raw_parts = distillation_loss(fake_student(4, HYP, a_s), "l2")(ps, ts)
    assert raw_parts["dbox"].item() > 1e-3


def test_same_anchors_keep_raw_box_term(golden):
    a = torch.rand(3, 3, 2) + 1
    loss = distillation_loss(fake_student(4, golden["hyp_scaled"], a), "l2", T=1,
                             teacher_anchors=a.half().float())
    assert not loss.decoded_box
    assert rel(loss(golden["student_raw"], golden["teacher_raw"])[0], golden["distill_l2_T1"]) < 1e-5


def test_fp32_under_autocast(golden):
    p = [x.to(torch.bfloat16) for x in golden["student_raw"]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = distillation_loss(fake_student(4, golden["hyp_scaled"]), "kl", T=5)(p, golden["teacher_raw"])
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in parts.values())
    assert rel(total, golden["distill_kl_T5"]) < 2e-2  # only the bf16 rounding of the student input


def test_gradient_only_to_student():
    t = torch.randn(1, 3, 2, 2, 9, requires_grad=True)  # even a teacher map that tracks grad is a constant
    p = torch.randn(1, 3, 2, 2, 9, requires_grad=True)
    distillation_loss(fake_student(4, HYP), "kl")([p], [t])[0].backward()
    assert t.grad is None and p.grad is not None and p.grad.abs().sum() > 0


def test_bad_arguments():
    # values are validated once, where they enter: a run's KDConfig, or the seed entry point for its callers
    p = t = [torch.zeros(1, 3, 2, 2, 9)]
    with pytest.raises(UserError,
                       match=r"^compute_distillation_output_loss: dist_loss 'mse' must be one of l2, kl, bce$"):
        compute_distillation_output_loss(p, t, fake_student(4, HYP), dist_loss="mse")
    with pytest.raises(UserError, match="temperature 0"):
        compute_distillation_output_loss(p, t, fake_student(4, HYP), dist_loss="kl", T=0)
    with pytest.raises(UserError, match="no .hyp"):
        compute_distillation_output_loss(p, t, SimpleNamespace(nc=4), dist_loss="l2")
    loss = distillation_loss(fake_student(4, HYP), "l2")
    with pytest.raises(UserError, match="does not match"):
        loss([torch.zeros(1, 3, 2, 2, 9)], [torch.zeros(1, 3, 4, 4, 9)])
