"""The localisation term (dist_loc): zero where the student fits the label at least as well as the teacher, its
gradient reaches only the student, it matches a hand computation, and it is not built at dist_loc 0."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import ROOT
from models.yolo import Model
from optimizer.config import KD_SPECS, KDConfig
from optimizer.criterion import Distiller, Student
from optimizer.teacher import Teacher
from optimizer.terms import build_terms
from optimizer.terms.base import StepMaps, TermContext
from optimizer.terms.localisation import LOC_MARGIN, LocalisationTerm
from utils.training.forward import StudentForward
from utils.training.hyp import load_hyp
from utils.training.loss import ComputeLoss, scale_hyp

LOW = ROOT / "data/hyps/hyp.scratch-low.yaml"
TARGETS = torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.2], [1, 3, 0.3, 0.6, 0.1, 0.3], [1, 0, 0.7, 0.3, 0.45, 0.5]])
SHAPES = [(2, 3, 8, 8, 13), (2, 3, 4, 4, 13), (2, 3, 2, 2, 13)]  # 64 px, nc 8


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return Model("yolov5n.yaml", nc=8)


@pytest.fixture(scope="module")
def loss_fn(student):
    return ComputeLoss(student, hyp=scale_hyp(load_hyp(LOW, KD_SPECS), 3, 8, 64))


def _term(loss_fn, student, dist_loc=1.0, teacher_anchors=None):
    anchors = student.model[-1].anchors.clone() if teacher_anchors is None else teacher_anchors
    ctx = TermContext(loss_fn, None, student, anchors, None)
    return LocalisationTerm.build(KDConfig(t_weights="t.pt", dist_loc=dist_loc), ctx)


def _maps(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * scale for s in SHAPES]


def _hand_ciou_loss(b1, b2):
    """1 - CIoU of two (x, y, w, h) boxes, in Python floats (eps as YOLOv5's)."""
    eps = 1e-7
    (x1, y1, w1, h1), (x2, y2, w2, h2) = b1, b2
    iw = max(0.0, min(x1 + w1 / 2, x2 + w2 / 2) - max(x1 - w1 / 2, x2 - w2 / 2))
    ih = max(0.0, min(y1 + h1 / 2, y2 + h2 / 2) - max(y1 - h1 / 2, y2 - h2 / 2))
    inter = iw * ih
    iou = inter / (w1 * h1 + w2 * h2 - inter + eps)
    cw = max(x1 + w1 / 2, x2 + w2 / 2) - min(x1 - w1 / 2, x2 - w2 / 2)
    ch = max(y1 + h1 / 2, y2 + h2 / 2) - min(y1 - h1 / 2, y2 - h2 / 2)
    rho2 = (x2 - x1) ** 2 + (y2 - y1) ** 2
    v = 4 / math.pi ** 2 * (math.atan(w2 / h2) - math.atan(w1 / h1)) ** 2
    alpha = v / (v - iou + 1 + eps)
    return 1 - (iou - rho2 / (cw ** 2 + ch ** 2 + eps) - alpha * v)


def _hand_decode(logits, anchor):
    s = [1 / (1 + math.exp(-float(x))) for x in logits]
    return s[0] * 2 - 0.5, s[1] * 2 - 0.5, (s[2] * 2) ** 2 * float(anchor[0]), (s[3] * 2) ** 2 * float(anchor[1])


def test_matches_a_hand_computation(student, loss_fn):
    pred, t_maps = _maps(1), _maps(2)
    t_anchors = student.model[-1].anchors.clone() * 1.3  # the teacher's own anchors: its boxes decode with them
    term = _term(loss_fn, student, dist_loc=2.5, teacher_anchors=t_anchors)
    loss, parts = term(StepMaps(pred, TARGETS, t_maps))

    _, tbox, indices, _ = loss_fn.build_targets(pred, TARGETS)  # the detection loss's own assignment
    s_anchors = student.model[-1].anchors
    want, pulled = 0.0, 0
    for i in range(3):
        b, a, gj, gi = (x.tolist() for x in indices[i])
        excess = []
        for n in range(len(b)):
            label = tbox[i][n].tolist()
            l_s = _hand_ciou_loss(_hand_decode(pred[i][b[n], a[n], gj[n], gi[n], :4], s_anchors[i][a[n]]), label)
            l_t = _hand_ciou_loss(_hand_decode(t_maps[i][b[n], a[n], gj[n], gi[n], :4], t_anchors[i][a[n]]), label)
            excess.append(max(0.0, l_s - l_t + LOC_MARGIN))
        if excess:
            want += sum(excess) / len(excess)
            pulled += sum(e > 0 for e in excess)
    want *= loss_fn.hyp["box"] * 2.5 * 2  # x dist_loc x the box gain x batch size
    assert 0 < pulled and want > 0
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    assert float(parts["dloc"]) == pytest.approx(want / 2, rel=1e-5)


def test_zero_where_the_student_fits_at_least_as_well(student, loss_fn):
    term = _term(loss_fn, student)
    pred = [p.clone().requires_grad_() for p in _maps(1)]
    # the teacher's maps are the student's: equal fits everywhere, so nothing to pull (at the tie, too)
    loss, _ = term(StepMaps(pred, TARGETS, [p.detach().clone() for p in pred]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in pred)
    # a student that decodes to the label on every assigned cell, a teacher that does not: the student fits
    # better everywhere, so nothing pulls
    exact = [p.detach().clone() for p in pred]
    _, tbox, indices, anch = loss_fn.build_targets(exact, TARGETS)
    for i, (b, a, gj, gi) in enumerate(indices):
        xy = (tbox[i][:, :2] + 0.5) / 2
        wh = (tbox[i][:, 2:] / anch[i]).sqrt() / 2
        exact[i][b, a, gj, gi, :4] = torch.logit(torch.cat((xy, wh), 1).double()).float()
    exact = [e.requires_grad_() for e in exact]
    loss, parts = term(StepMaps(exact, TARGETS, _maps(2)))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(parts["dloc"]) == 0.0
    assert all(e.grad is None or float(e.grad.abs().sum()) == 0.0 for e in exact)
    # and the other way round the term is positive
    loss, _ = term(StepMaps(_maps(2), TARGETS, [e.detach() for e in exact]))
    assert float(loss.detach()) > 0
    # without labels there are no assigned cells
    loss, _ = term(StepMaps(pred, torch.zeros(0, 6), _maps(2)))
    assert float(loss.detach()) == 0.0


def test_gradient_reaches_only_the_student(student, loss_fn):
    term = _term(loss_fn, student)
    s_leaf = [p.clone().requires_grad_() for p in _maps(1)]
    t_param = [torch.nn.Parameter(t) for t in _maps(2)]  # a teacher whose maps carry a graph
    t_maps = [t * 1.0 for t in t_param]
    loss, _ = term(StepMaps(s_leaf, TARGETS, t_maps))
    assert float(loss.detach()) > 0
    loss.backward()
    assert all(t.grad is None for t in t_param)
    grads = [p.grad for p in s_leaf if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(float(g[..., 4:].abs().sum()) == 0.0 for g in grads)  # only the box channels move


def _distiller(student, loss_fn, **settings):
    torch.manual_seed(5)
    teacher = Teacher(Model("yolov5n.yaml", nc=8).fuse())
    return Distiller(KDConfig(t_weights="t.pt", **settings), teacher,
                     Student(student, loss_fn, StudentForward(torch.device("cpu")), 64))


def test_off_at_zero_and_a_part_of_its_own_when_on(student, loss_fn):
    ctx = TermContext(loss_fn, None, student, student.model[-1].anchors.clone(), None)
    assert not any(isinstance(t, LocalisationTerm) for t in build_terms(KDConfig(t_weights="t.pt"), ctx))
    off = _distiller(student, loss_fn)
    on = _distiller(student, loss_fn, dist_loc=1.0)
    assert "dloc" not in off.parts and on.parts == ("box", "obj", "cls", "dbox", "dobj", "dcls", "dloc")
    imgs = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    student.train()
    l_off, p_off = off(student, imgs, TARGETS)
    l_on, p_on = on(student, imgs, TARGETS)
    assert all(torch.equal(p_on[k], v) for k, v in p_off.items())  # the other parts are untouched
    assert torch.allclose(l_on, l_off + p_on["dloc"] * 2)
    assert any("Localisation distillation" in line for line in on.describe())
    lines, ratios = on.terms[1].balance({"box": 0.2, "dloc": 0.05}, 20)
    assert "dloc 0.05 / box 0.2 = 0.25" in lines[0] and not ratios


def test_refused_when_the_anchor_shapes_differ(student, loss_fn):
    from utils.core.errors import UserError

    with pytest.raises(UserError, match="anchor shapes differ"):
        _term(loss_fn, student, teacher_anchors=torch.ones(3, 4, 2))


def test_the_detection_loss_assignment_is_reused_exactly(student, loss_fn):
    from optimizer.terms.localisation import assignment

    term = _term(loss_fn, student)
    pred, t_maps = _maps(1), _maps(2)
    fresh, _ = term(StepMaps(pred, TARGETS, t_maps))
    before = loss_fn(pred, TARGETS)  # the detection loss runs first in a step, and keeps its assignment
    assert assignment(loss_fn, pred, TARGETS) is loss_fn.last_assignment[2]
    reused, _ = term(StepMaps(pred, TARGETS, t_maps))
    assert torch.equal(fresh, reused)
    assert all(torch.equal(a, b) for a, b in zip(before, loss_fn(pred, TARGETS)))  # its numbers unchanged
    # other labels (or map sizes) than the last call's are assigned anew
    other = TARGETS.clone()
    assert assignment(loss_fn, pred, other) is not loss_fn.last_assignment[2]
    assert assignment(loss_fn, pred[:2] + [torch.zeros(2, 3, 4, 4, 13)], TARGETS) is not loss_fn.last_assignment[2]
