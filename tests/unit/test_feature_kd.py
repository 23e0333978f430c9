"""Feature distillation (optimizer/features.py): adapters for any widths, each form against a numpy hand
computation, detached weights, zero loss through an identity adapter, where the gradients go, and the
distiller's parts and balance report with features on."""
from __future__ import annotations

import copy
import functools
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import ROOT
from models.yolo import Model
from optimizer.config import FEAT_FORMS, KD_SPECS, KDConfig
from optimizer.balance import FEATURE_GRAD, balance_warnings
from optimizer.criterion import DetectionCriterion, Distiller, Student
from optimizer.features import (Adapter, FeatureAdapters, FeatureDistillationLoss, build_adapters, head_channels,
                                teacher_weights)
from optimizer.teacher import Teacher
from optimizer.terms.base import StepMaps
from optimizer.terms.features import FEAT_WARMUP_EPOCHS, FeatureTerm
from utils.core.errors import UserError
from utils.training.forward import StudentForward
from utils.training.hyp import load_hyp
from utils.training.loss import ComputeLoss, scale_hyp

LOW = ROOT / "data/hyps/hyp.scratch-low.yaml"
GAINS = {"box": 0.05, "obj": 1.0, "cls": 0.5}


@functools.lru_cache(maxsize=None)
def _built(cfg: str, nc: int, seed: int) -> Model:
    torch.manual_seed(seed)
    return Model(cfg, nc=nc)


def _model(cfg: str, nc: int = 3, seed: int = 0) -> Model:
    """A fresh copy of a seeded model (building one costs seconds; copying it, milliseconds)."""
    return copy.deepcopy(_built(cfg, nc, seed))


def _neck(model: nn.Module, imgs: torch.Tensor) -> list[torch.Tensor]:
    model.train()
    return model(imgs, features=True)[1]


# ---------------------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("student_cfg,teacher_cfg", [("yolov5n.yaml", "yolov5s.yaml"), ("yolov5s.yaml", "yolov5n.yaml"),
                                                     ("yolov5n.yaml", "yolov5m.yaml")], ids=["n<-s", "s<-n", "n<-m"])
def test_adapters_map_the_student_widths_to_the_teachers(student_cfg, teacher_cfg):
    student, teacher = _model(student_cfg), _model(teacher_cfg)
    imgs = torch.rand(2, 3, 64, 64)
    s, t = _neck(student, imgs), _neck(teacher, imgs)
    assert [f.shape[1] for f in s] == head_channels(student) != head_channels(teacher) == [f.shape[1] for f in t]
    out = build_adapters(student, teacher, seed=0)(s)
    assert [o.shape for o in out] == [f.shape for f in t]


def test_adapters_map_pruned_widths():
    # a pruned student: odd channel counts that no yaml width multiple gives
    widths, teacher_widths = [37, 61, 129], [128, 256, 512]
    feats = [torch.rand(2, c, 8 >> i, 8 >> i) for i, c in enumerate(widths)]
    out = FeatureAdapters(widths, teacher_widths)(feats)
    assert [o.shape[1] for o in out] == teacher_widths and [o.shape[2:] for o in out] == [f.shape[2:] for f in feats]
    with pytest.raises(UserError, match="3 input levels, the teacher's 2"):
        FeatureAdapters(widths, teacher_widths[:2])


def test_adapters_are_seeded_without_moving_the_global_random_state():
    student, teacher = _model("yolov5n.yaml"), _model("yolov5s.yaml")
    torch.manual_seed(5)
    a = build_adapters(student, teacher, seed=1)
    after = torch.rand(3)
    torch.manual_seed(5)
    b = build_adapters(student, teacher, seed=1)
    assert torch.equal(torch.rand(3), after)  # the run's own draws are untouched
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_adapters(student, teacher, seed=2)
    assert not torch.equal(a.levels[0][0].weight, c.levels[0][0].weight)


# ----------------------------------------------------------------------------------------- forms, by hand (numpy)
def _sig(x):
    return 1 / (1 + np.exp(-x))


def _maps(bs=2, na=3, nc=4, sizes=(8, 4, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, na, s, s, 5 + nc, generator=g) * 2 for s in sizes]


def _feats(channels, bs=2, sizes=(8, 4, 2), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, c, s, s, generator=g) for c, s in zip(channels, sizes)]


def test_teacher_weights_and_mse_match_numpy():
    t_maps = _maps()
    s, t = _feats((6, 6, 6), seed=1), _feats((6, 6, 6), seed=2)
    ratio, bs = 0.7, 2
    want = 0.0
    for sf, tf, m in zip(s, t, t_maps):
        m = m.numpy()
        w = (_sig(m[..., 4]) * _sig(m[..., 5:]).max(-1)).max(1)  # (bs, ny, nx)
        np.testing.assert_allclose(teacher_weights(torch.from_numpy(m)).numpy(), w, rtol=1e-6)
        d = ((sf.numpy() - tf.numpy()) ** 2).mean(1)
        want += (w * d).sum() / max(w.sum(), 1.0)
    loss = FeatureDistillationLoss("mse", ratio, _model("yolov5n.yaml"))(s, t, t_maps)
    assert loss.shape == () and float(loss) == pytest.approx(want * ratio * bs, rel=1e-5)


def test_pkd_matches_numpy():
    s, t = _feats((5, 7, 9), seed=3), _feats((5, 7, 9), seed=4)
    s = [x * 3 + 2 for x in s]  # standardisation removes scale and offset
    ratio, bs = 0.3, 2
    want = 0.0
    for sf, tf in zip(s, t):
        def std(x):
            x = x.numpy().astype(np.float64)
            mu = x.mean(axis=(0, 2, 3), keepdims=True)
            var = x.var(axis=(0, 2, 3), keepdims=True)
            return (x - mu) / np.sqrt(var + 1e-6)
        want += ((std(sf) - std(tf)) ** 2).mean()
    loss = FeatureDistillationLoss("pkd", ratio, _model("yolov5n.yaml"))(s, t, _maps())
    assert float(loss) == pytest.approx(want * ratio * bs, rel=1e-5)
    # scale and offset of the student's maps do not matter
    again = FeatureDistillationLoss("pkd", ratio, _model("yolov5n.yaml"))([(x - 2) / 3 for x in s], t, _maps())
    assert float(again) == pytest.approx(float(loss), rel=1e-4)


def test_cross_matches_numpy_through_the_teachers_head():
    nc, bs, ratio = 3, 2, 0.4
    teacher = _model("yolov5s.yaml", nc=nc).eval()
    detect = teacher.model[-1]
    na, no = detect.na, detect.no
    sizes = (8, 4, 2)
    s = _feats(head_channels(teacher), sizes=sizes, seed=5)
    t_maps = _maps(nc=nc, sizes=sizes, seed=6)
    loss = FeatureDistillationLoss("cross", ratio, teacher, {"dist_loss": "l2", "T": 5.0, "norm": "weighted",
                                                             "gains": GAINS})(s, [x.clone() for x in s], t_maps)
    lbox = lobj = lcls = 0.0
    for i, (f, t) in enumerate(zip(s, t_maps)):
        w_conv = detect.m[i].weight.detach().numpy()[:, :, 0, 0]
        b_conv = detect.m[i].bias.detach().numpy()
        y = np.einsum("oc,bchw->bohw", w_conv, f.numpy()) + b_conv[None, :, None, None]
        p = y.reshape(bs, na, no, *y.shape[2:]).transpose(0, 1, 3, 4, 2)  # (bs, na, ny, nx, no)
        t = t.numpy()
        w = _sig(t[..., 4])
        den = max(w.sum(), 1.0)
        lbox += (((p[..., :4] - t[..., :4]) ** 2).mean(-1) * w).sum() / den
        lobj += (((p[..., 4] - t[..., 4]) ** 2) * w).sum() / den
        lcls += (((p[..., 5:] - t[..., 5:]) ** 2).mean(-1) * w).sum() / den
    want = (lbox * GAINS["box"] + lobj * GAINS["obj"] + lcls * GAINS["cls"]) * bs * ratio
    assert float(loss) == pytest.approx(want, rel=1e-5)


def test_the_weights_are_detached():
    t_maps = [m.requires_grad_(True) for m in _maps()]
    assert not teacher_weights(t_maps[0]).requires_grad
    s = [f.requires_grad_(True) for f in _feats((6, 6, 6), seed=1)]
    loss = FeatureDistillationLoss("mse", 1.0, _model("yolov5n.yaml"))(s, _feats((6, 6, 6), seed=2), t_maps)
    grads = torch.autograd.grad(loss, [*s, *t_maps], allow_unused=True)
    assert all(g is not None for g in grads[:3]) and all(g is None for g in grads[3:])


def _identity_adapters(channels) -> FeatureAdapters:
    """Adapters that return their input exactly: relu(x) - relu(-x) == x through a 2c hidden layer."""
    a = FeatureAdapters(channels, channels)
    for i, c in enumerate(channels):
        eye = torch.eye(c)
        a.levels[i] = Adapter(c, c, hidden=2 * c)
        with torch.no_grad():
            a.levels[i][0].weight.copy_(torch.cat((eye, -eye))[..., None, None])
            a.levels[i][0].bias.zero_()
            a.levels[i][2].weight.copy_(torch.cat((eye, -eye), 1)[..., None, None])
            a.levels[i][2].bias.zero_()
    return a


@pytest.mark.parametrize("form,norm", [("mse", "iou"), ("pkd", "iou"), ("cross", "weighted"), ("cross", "soft"),
                                       ("cross", "iou")])
def test_zero_loss_when_the_student_sees_what_the_teacher_sees(form, norm):
    teacher = _model("yolov5s.yaml").eval()
    imgs = torch.rand(2, 3, 64, 64)
    raw, t_feats = Teacher(teacher).run(imgs, features=True)
    adapters = _identity_adapters(head_channels(teacher))
    s = adapters([f.clone() for f in t_feats])
    assert all(torch.equal(a, b) for a, b in zip(s, t_feats))
    loss = FeatureDistillationLoss(form, 1.0, teacher, {"dist_loss": "l2", "T": 5.0, "norm": norm,
                                                        "gains": GAINS})(s, t_feats, raw)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-5 if norm == "iou" else 1e-6)


def test_forms_and_mismatches_are_refused_in_one_line():
    with pytest.raises(UserError, match="--feat_kd 'l1'"):
        FeatureDistillationLoss("l1", 1.0, _model("yolov5n.yaml"))
    loss = FeatureDistillationLoss("mse", 1.0, _model("yolov5n.yaml"))
    with pytest.raises(UserError, match="level 0"):
        loss(_feats((6, 6, 6)), _feats((7, 6, 6)), _maps())
    assert FEAT_FORMS == KD_SPECS["feat_kd"].choices and KDConfig().feat_kd == "none"


# ------------------------------------------------------------------------------------------ the distiller with it
def _distiller(form: str, distill_ratio: float = 0.05, nc: int = 8):
    student = _model("yolov5n.yaml", nc=nc)
    loss_hyp = scale_hyp(load_hyp(LOW, KD_SPECS), 3, nc, 64)
    teacher = Teacher(_model("yolov5s.yaml", nc=nc, seed=1).fuse())
    d = Distiller(KDConfig(t_weights="t.pt", feat_kd=form, feat_ratio=0.5, distill_ratio=distill_ratio), teacher,
                  Student(student, ComputeLoss(student, hyp=loss_hyp), StudentForward(torch.device("cpu")), 64))
    return d, student, teacher


def _feature(d: Distiller) -> FeatureTerm:
    (term,) = [t for t in d.terms if isinstance(t, FeatureTerm)]
    return term


TARGETS = torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.2], [1, 3, 0.3, 0.6, 0.1, 0.3]])


@pytest.mark.parametrize("form", ["mse", "pkd", "cross"])
def test_gradients_reach_the_neck_and_the_adapters_never_the_teacher(form):
    d, student, teacher = _distiller(form, distill_ratio=0.0)
    imgs = torch.rand(2, 3, 64, 64)
    loss, parts = d(student, imgs, TARGETS)
    assert list(parts) == ["box", "obj", "cls", "dbox", "dobj", "dcls", "dfeat"] and float(parts["dfeat"]) > 0
    ft = _feature(d)
    (parts_only,) = torch.autograd.grad(loss, [ft.adapters.levels[0][0].weight], retain_graph=True)
    assert parts_only.abs().sum() > 0
    # the feature term alone: it must reach the neck (the last layer before Detect) and the adapters
    _, s_feats = student(imgs, features=True)
    t_maps, t_feats = d.teacher.run(imgs, features=True)
    dfeat = ft.loss(ft.adapters(s_feats), t_feats, t_maps)
    student.zero_grad()
    dfeat.backward()
    neck = student.model[-2]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in neck.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ft.adapters.parameters())
    assert all(p.grad is None for p in student.model[-1].parameters())  # Detect does not see the feature term
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    if form == "cross":
        assert all(p.grad is None and not p.requires_grad for conv in ft.loss.head for p in conv.parameters())


def test_distiller_features_with_unlabelled_images_and_balance_report(caplog):
    d, student, _ = _distiller("mse")
    imgs, u_imgs = torch.rand(2, 3, 64, 64), torch.rand(3, 3, 64, 64)
    t_maps, t_feats = d.teacher.run(torch.cat((imgs, u_imgs)), features=True)
    pred, s_feats = student(imgs, features=True)
    u_pred, u_feats = student(u_imgs, features=True)
    loss, parts = d.losses(StepMaps(pred, TARGETS, t_maps, u_pred, s_feats, t_feats, u_feats, u_imgs))
    all_feats = [torch.cat((s, u)) for s, u in zip(s_feats, u_feats)]
    ft = _feature(d)
    dfeat = ft.loss(ft.adapters(all_feats), t_feats, t_maps)
    assert float(parts["dfeat"]) == pytest.approx(float(dfeat.detach()) / 2, rel=1e-5)  # on the labelled batch's scale
    assert float(loss.detach()) == pytest.approx(sum(float(v) for v in parts.values()) * 2, rel=1e-5)
    with caplog.at_level(logging.INFO, logger="yolov5kd"):
        d.end_epoch()
    (line,) = [r.getMessage() for r in caplog.records if "Feature distillation balance" in r.getMessage()]
    assert "gradient at the neck of dfeat" in line and "of box+obj+cls" in line
    assert d.describe()[0].startswith("Feature distillation: mse on the head inputs (64->128, 128->256, 256->512")


def test_balance_warnings_name_feat_ratio():
    cfg = KDConfig(t_weights="t.pt", feat_kd="mse")
    (low,) = balance_warnings({FEATURE_GRAD: 0.001}, cfg)
    (high,) = balance_warnings({FEATURE_GRAD: 50.0}, cfg)
    assert "raise feat_ratio" in low and "lower feat_ratio" in high
    assert balance_warnings({FEATURE_GRAD: 1.0}, cfg) == []


def test_adapter_state_round_trips_and_is_contiguous():
    d, _, _ = _distiller("pkd")
    _feature(d).adapters.to(memory_format=torch.channels_last)
    state = d.state_dict()
    assert set(state) == {"adapters"} and all(v.is_contiguous() for v in state["adapters"].values())
    e, _, _ = _distiller("pkd")
    with torch.no_grad():
        for p in _feature(e).adapters.parameters():
            p.add_(1)
    e.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_feature(d).adapters.state_dict().values(),
                                                 _feature(e).adapters.state_dict().values()))
    plain, _, _ = _distiller("none")
    assert plain.state_dict() == {} and plain.trainable() is None and "dfeat" not in plain.parts


def test_adapters_train_alone_in_the_first_epoch():
    d, student, _ = _distiller("mse", distill_ratio=0.0)
    term = _feature(d)
    imgs = torch.rand(2, 3, 64, 64)
    neck = list(student.model[-2].parameters())

    def neck_grads(criterion):
        student.zero_grad()
        term.adapters.zero_grad()
        criterion(student, imgs, TARGETS)[0].backward()
        return [p.grad.clone() for p in neck], [p.grad for p in term.adapters.parameters()]

    plain, _ = neck_grads(DetectionCriterion(d.compute_loss, d.forward))
    assert FEAT_WARMUP_EPOCHS == 1
    d.start_epoch(0)
    warm, adapters = neck_grads(d)
    assert all(torch.equal(a, b) for a, b in zip(warm, plain))  # the student sees the labels alone
    assert all(g is not None and g.abs().sum() > 0 for g in adapters)  # while the adapters learn
    d.start_epoch(1)
    fed, adapters = neck_grads(d)
    assert not all(torch.equal(a, b) for a, b in zip(fed, plain))
    assert all(g is not None and g.abs().sum() > 0 for g in adapters)


def test_feature_term_under_bf16_autocast_is_fp32():
    d, student, _ = _distiller("cross")
    d.forward = StudentForward(torch.device("cpu"), torch.bfloat16)
    d.start_epoch(1)
    loss, parts = d(student, torch.rand(2, 3, 64, 64), TARGETS)
    assert parts["dfeat"].dtype == torch.float32 and torch.isfinite(parts["dfeat"])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in _feature(d).adapters.parameters())
