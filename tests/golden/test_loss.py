"""ComputeLoss / build_targets / scale_hyp against the reference's golden numbers and facts §4, §10."""
import math

import pytest
import torch

from models.yolo import Model
from utils.core.boxes import bbox_iou
from utils.training.checkpoint import attempt_load
from utils.training.loss import ComputeLoss, FocalLoss, scale_hyp, smooth_BCE

LN2 = math.log(2.0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs() / b.abs().clamp(min=1e-12)).max().item()


@pytest.fixture(scope="module")
def student(fixtures_dir):
    return attempt_load(fixtures_dir / "student.pt", fuse=False)


@pytest.fixture(scope="module")
def yolov5s():
    m = Model("yolov5s.yaml", nc=80)
    m.hyp = {"box": 0.05, "cls": 0.5, "cls_pw": 1.0, "obj": 1.0, "obj_pw": 1.0, "anchor_t": 4.0, "fl_gamma": 0.0}
    return m


@pytest.mark.parametrize("suffix, extra", [("", {}), ("_ls0.1", {"label_smoothing": 0.1}),
                                           ("_fl1.5", {"fl_gamma": 1.5})])
def test_golden_loss(student, golden, suffix, extra):
    student.hyp = dict(golden["hyp_scaled"], **extra)
    raw = [x.clone() for x in golden["student_raw"]]
    loss, items = ComputeLoss(student)(raw, golden["targets"])
    assert loss.shape == (1,) and items.shape == (3,)
    assert not items.requires_grad
    assert rel_err(loss, golden["loss" + suffix]) < 1e-5
    assert rel_err(items, golden["loss_items" + suffix]) < 1e-5


def test_golden_build_targets(student, golden):
    student.hyp = dict(golden["hyp_scaled"])
    tcls, tbox, indices, anch = ComputeLoss(student).build_targets(golden["student_raw"], golden["targets"])
    ref = golden["build_targets"]
    assert len(tcls) == len(tbox) == len(indices) == len(anch) == 3
    for i in range(3):
        assert torch.equal(tcls[i], ref["tcls"][i])
        torch.testing.assert_close(tbox[i], ref["tbox"][i], rtol=1e-5, atol=1e-6)
        for got, want in zip(indices[i], ref["indices"][i]):
            assert got.dtype == torch.int64 and torch.equal(got, want)
        torch.testing.assert_close(anch[i], ref["anchors"][i], rtol=1e-6, atol=0)


def test_loss_backward(student, golden):
    student.hyp = dict(golden["hyp_scaled"])
    raw = [x.clone().requires_grad_(True) for x in golden["student_raw"]]
    loss, _ = ComputeLoss(student)(raw, golden["targets"])
    loss.backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in raw)


def test_scale_hyp(golden):
    hyp = dict(golden["hyp"])
    out = scale_hyp(hyp, nl=3, nc=4, imgsz=320)
    for k in ("box", "cls", "obj"):
        assert out[k] == golden["hyp_scaled"][k]
    assert out["label_smoothing"] == 0.0
    assert hyp == golden["hyp"]  # input untouched
    out = scale_hyp(hyp, nl=4, nc=80, imgsz=1280, label_smoothing=0.1)
    assert out["box"] == pytest.approx(0.05 * 0.75)
    assert out["cls"] == pytest.approx(0.5 * 0.75)
    assert out["obj"] == pytest.approx(4 * 0.75)
    assert out["label_smoothing"] == 0.1


def test_smooth_bce():
    assert smooth_BCE(0.0) == (1.0, 0.0)
    assert smooth_BCE(0.1) == pytest.approx((0.95, 0.05))


def test_worked_example(yolov5s):
    """facts §4.6: one target on a 640 input → 6 + 9 + 3 positives with exact cells, order and tbox."""
    p = [torch.zeros(1, 3, s, s, 85) for s in (80, 40, 20)]
    targets = torch.tensor([[0, 3, 0.3037, 0.6121, 0.05, 0.1]])
    tcls, tbox, indices, anch = ComputeLoss(yolov5s).build_targets(p, targets)
    assert [len(t) for t in tcls] == [6, 9, 3]
    assert all(torch.equal(t, torch.full_like(t, 3)) for t in tcls)
    want = [
        # (anchor, gj, gi, tx, ty)
        [(1, 48, 24, 0.296, 0.968), (2, 48, 24, 0.296, 0.968), (1, 48, 23, 1.296, 0.968),
         (2, 48, 23, 1.296, 0.968), (1, 49, 24, 0.296, -0.032), (2, 49, 24, 0.296, -0.032)],
        [(0, 24, 12, 0.148, 0.484), (1, 24, 12, 0.148, 0.484), (2, 24, 12, 0.148, 0.484),
         (0, 24, 11, 1.148, 0.484), (1, 24, 11, 1.148, 0.484), (2, 24, 11, 1.148, 0.484),
         (0, 23, 12, 0.148, 1.484), (1, 23, 12, 0.148, 1.484), (2, 23, 12, 0.148, 1.484)],
        [(0, 12, 6, 0.074, 0.242), (0, 12, 5, 1.074, 0.242), (0, 11, 6, 0.074, 1.242)],
    ]
    gwh = [(4.0, 8.0), (2.0, 4.0), (1.0, 2.0)]
    det = yolov5s.model[-1]
    for i in range(3):
        b, a, gj, gi = indices[i]
        assert b.tolist() == [0] * len(want[i])
        assert a.tolist() == [w[0] for w in want[i]]
        assert gj.tolist() == [w[1] for w in want[i]]
        assert gi.tolist() == [w[2] for w in want[i]]
        exp = torch.tensor([[w[3], w[4], *gwh[i]] for w in want[i]])
        torch.testing.assert_close(tbox[i], exp, rtol=0, atol=2e-4)
        torch.testing.assert_close(anch[i], det.anchors[i][a])


def test_cell_clamp_quirk(yolov5s):
    """x = 1.0 exactly: the right neighbour is out of the grid, clamped, and tbox uses the clamped cell."""
    p = [torch.zeros(1, 3, s, s, 85) for s in (80, 40, 20)]
    targets = torch.tensor([[0, 0, 1.0, 0.5, 0.05, 0.05]])
    _, tbox, indices, _ = ComputeLoss(yolov5s).build_targets(p, targets)
    gi = indices[0][3]
    assert int(gi.max()) == 79
    assert (tbox[0][:, 0] >= 0.99).all() and (tbox[0][:, 0] <= 1.01).all()


def test_empty_targets_all_zero_logits(student):
    """facts §4.7/§10: lobj = hyp_obj·(4 + 1 + 0.4)·ln2, lbox = lcls = 0, total × bs."""
    student.hyp = {"box": 0.05, "cls": 0.5, "cls_pw": 1.0, "obj": 0.7, "obj_pw": 1.0, "anchor_t": 4.0,
                   "fl_gamma": 0.0}
    bs = 3
    p = [torch.zeros(bs, 3, s, s, 9) for s in (40, 20, 10)]
    loss, items = ComputeLoss(student)(p, torch.zeros(0, 6))
    lobj = 0.7 * 5.4 * LN2
    assert items[0].item() == 0 and items[2].item() == 0
    assert items[1].item() == pytest.approx(lobj, rel=1e-6)
    assert loss.item() == pytest.approx(lobj * bs, rel=1e-6)
    assert 5.4 * LN2 == pytest.approx(3.742995, abs=1e-6)


def _head_only_model(nc: int, hyp: dict) -> torch.nn.Module:
    """Smallest object ComputeLoss accepts: .hyp, parameters, and .model[-1] a Detect head."""
    from models.yolo import Detect
    anchors = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))
    det = Detect(nc=nc, anchors=anchors, ch=(4, 4, 4))
    det.stride = torch.tensor([8.0, 16.0, 32.0])
    det.anchors /= det.stride.view(-1, 1, 1)
    m = torch.nn.Module()
    m.model = torch.nn.Sequential(det)
    m.hyp = hyp
    return m


def test_single_class_no_cls_loss(golden):
    model = _head_only_model(1, dict(golden["hyp_scaled"]))
    p = [torch.randn(2, 3, s, s, 6, generator=torch.Generator().manual_seed(0)) for s in (40, 20, 10)]
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.2, 0.3], [1, 0, 0.25, 0.7, 0.1, 0.1]])
    loss, items = ComputeLoss(model)(p, targets)
    assert items[0] > 0 and items[1] > 0 and items[2] == 0
    assert loss.item() == pytest.approx(items.sum().item() * 2, rel=1e-6)


def test_autobalance_runs(student, golden):
    student.hyp = dict(golden["hyp_scaled"])
    cl = ComputeLoss(student, autobalance=True)
    assert cl.ssi == 1
    cl([x.clone() for x in golden["student_raw"]], golden["targets"])
    assert cl.balance[1] == pytest.approx(1.0)
    assert cl.balance != [4.0, 1.0, 0.4]


def test_ciou_identical_and_disjoint():
    box = torch.tensor([[3.0, 4.0, 2.0, 5.0]])
    assert bbox_iou(box, box.clone(), CIoU=True).item() == pytest.approx(1.0, abs=1e-6)
    b1 = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b2 = torch.tensor([[5.0, 0.0, 2.0, 2.0]])
    # enclosing box 7 × 2, centre distance 5
    assert bbox_iou(b1, b2, CIoU=True).item() == pytest.approx(-25.0 / 53.0, rel=1e-6)


def test_focal_loss_formula():
    x = torch.tensor([-2.0, 0.0, 1.5, 3.0])
    y = torch.tensor([0.0, 1.0, 1.0, 0.0])
    fl = FocalLoss(torch.nn.BCEWithLogitsLoss(), gamma=2.0, alpha=0.25)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="none")
    s = x.sigmoid()
    pt = y * s + (1 - y) * (1 - s)
    at = y * 0.25 + (1 - y) * 0.75
    torch.testing.assert_close(fl(x, y), (bce * at * (1 - pt) ** 2).mean())
