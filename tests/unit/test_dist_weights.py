"""Per-term weights (dist_box, dist_obj, dist_cls): each scales its own output term only, weights of 1 are today's
loss bit for bit; recorded, resumed and evolved with the other settings; the balance report's suggestion line."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import ROOT
from models.yolo import Model
from optimizer.balance import suggested_weight, weight_suggestions
from optimizer.config import KD_SPECS, SETTING, KDConfig
from optimizer.loss import OutputDistillationLoss
from optimizer.terms.base import StepMaps, TermContext
from optimizer.terms.output import OutputTerm
from utils.training import evolve as ev
from utils.training.hyp import HYP_SPECS, load_hyp
from utils.training.loss import ComputeLoss, scale_hyp

LOW = ROOT / "data/hyps/hyp.scratch-low.yaml"
NEW_KEYS = ("dist_box", "dist_obj", "dist_cls", "dist_loc", "distill_decay", "distill_floor")


@pytest.fixture(scope="module")
def pair():
    """A student (nc 8), its detection loss, and two sets of random maps (student, teacher) at 64 px."""
    torch.manual_seed(0)
    student = Model("yolov5n.yaml", nc=8)
    loss_fn = ComputeLoss(student, hyp=scale_hyp(load_hyp(LOW, KD_SPECS), 3, 8, 64))
    g = torch.Generator().manual_seed(3)
    shapes = [(2, 3, 8, 8, 13), (2, 3, 4, 4, 13), (2, 3, 2, 2, 13)]
    pred = [torch.randn(s, generator=g) for s in shapes]
    t_maps = [torch.randn(s, generator=g) * 2 for s in shapes]
    return student, loss_fn, pred, t_maps


def _term(pair, **settings) -> OutputTerm:
    student, loss_fn, _, _ = pair
    ctx = TermContext(loss_fn, None, student, student.model[-1].anchors.clone(), None)
    return OutputTerm.build(KDConfig(t_weights="t.pt", **settings), ctx)


@pytest.mark.parametrize("norm", ["mean", "weighted", "soft", "iou"])
def test_weights_of_one_are_todays_loss_exactly(pair, norm):
    student, loss_fn, pred, t_maps = pair
    # today's loss: the output loss without any weights, as it was built before the settings existed
    today = OutputDistillationLoss(student, dist_loss="l2", T=5.0, distill_ratio=0.05, norm=norm, gains=loss_fn.hyp,
                                   teacher_anchors=student.model[-1].anchors.clone())
    want, want_parts = today(pred, t_maps)
    for term in (_term(pair, dist_norm=norm), _term(pair, dist_norm=norm, dist_box=1.0, dist_obj=1.0, dist_cls=1.0)):
        got, got_parts = term.loss(pred, t_maps)
        assert torch.equal(got, want)
        assert all(torch.equal(got_parts[k], v) for k, v in want_parts.items())


@pytest.mark.parametrize("key,part", [("dist_box", "dbox"), ("dist_obj", "dobj"), ("dist_cls", "dcls")])
def test_each_weight_scales_only_its_term(pair, key, part):
    _, _, pred, t_maps = pair
    base = {k: v for k, v in _term(pair).loss(pred, t_maps)[1].items()}
    p = [x.clone().requires_grad_() for x in pred]
    total, parts = _term(pair, **{key: 7.0})(StepMaps(p, torch.zeros(0, 6), t_maps))
    parts = {k: v * 2 for k, v in parts.items()}  # the term's parts are per image; the loss's carry the batch
    for k, v in base.items():
        if k == part:
            assert torch.allclose(parts[k], 7.0 * v, rtol=1e-6) and float(v) > 0
        else:
            assert torch.equal(parts[k], v), k
    # the gradient is the weighted sum's: the other terms' gradients are untouched
    assert torch.allclose(total.reshape(()), sum(parts.values()), rtol=1e-6)


def test_weight_zero_switches_a_term_off(pair):
    _, _, pred, t_maps = pair
    _, parts = _term(pair, dist_obj=0.0).loss(pred, t_maps)
    assert float(parts["dobj"]) == 0.0 and float(parts["dbox"]) > 0 and float(parts["dcls"]) > 0


def test_the_rows_resolve_record_and_resume():
    for key in NEW_KEYS:
        assert SETTING[key].hyp and key in KD_SPECS
    cfg = KDConfig.resolve({"t_weights": "t.pt", "dist_box": 10.0, "distill_decay": "cos"},
                           {"dist_obj": 4.0, "dist_box": 2.0, "distill_floor": 0.1}, ["t_weights", "dist_box",
                                                                                       "distill_decay"])
    assert (cfg.dist_box, cfg.dist_obj, cfg.dist_cls, cfg.dist_loc) == (10.0, 4.0, 1.0, 0.0)
    assert (cfg.distill_decay, cfg.distill_floor) == ("cos", 0.1)
    hyp = cfg.hyp_values()
    assert all(hyp[k] == getattr(cfg, k) for k in NEW_KEYS)
    assert KDConfig.from_record(cfg.as_dict()) == cfg  # --resume reads the record, never the flags again
    # a record from before the keys trained with weights 1, no localisation term and no schedule
    old = {k: v for k, v in cfg.as_dict().items() if k not in NEW_KEYS}
    again = KDConfig.from_record(old)
    assert (again.dist_box, again.dist_loc, again.distill_decay) == (1.0, 0.0, "none")


def test_without_a_teacher_the_off_values_are_no_mistake():
    from utils.core.errors import UserError

    KDConfig.resolve({"dist_loc": 0.0, "distill_decay": "none"}, {}, ["dist_loc", "distill_decay"], strict=True)
    with pytest.raises(UserError, match="--dist_box"):
        KDConfig.resolve({"dist_box": 3.0}, {}, ["dist_box"], strict=True)


def test_evolve_mutates_the_new_keys():
    specs = {**HYP_SPECS, **KD_SPECS}
    # a run with a teacher and the localisation term on: evolve.csv carries every new key
    hyp = {**load_hyp(LOW, KD_SPECS), "dist_loc": 1.0, "distill_decay": "linear"}
    keys = ev.evolved_keys(hyp, specs, KD_SPECS, teacher=True, autoanchor=False)
    assert set(NEW_KEYS) <= set(keys)
    rng = np.random.default_rng(0)
    children = [ev.mutate(hyp, keys, specs, rng) for _ in range(300)]
    for k in ("dist_box", "dist_obj", "dist_cls", "dist_loc", "distill_floor"):
        _, lo, hi = specs[k].evolve
        assert any(c[k] != hyp[k] for c in children), k
        assert all(lo <= c[k] <= hi for c in children), k
    assert all(c["distill_decay"] == "linear" for c in children)  # carried (gain 0), never switched
    # off stays off: evolution multiplies, so a run without the localisation term never grows one
    off = {**hyp, "dist_loc": 0.0}
    assert all(ev.mutate(off, keys, specs, rng)["dist_loc"] == 0.0 for _ in range(50))
    assert not set(NEW_KEYS) & set(ev.evolved_keys(hyp, specs, KD_SPECS, teacher=False, autoanchor=False))


def test_suggested_weight():
    assert suggested_weight(0.047, 1.0) == 11.0  # 0.5 / 0.047 = 10.6, two significant digits
    assert suggested_weight(0.01, 1.0) == 50.0
    assert suggested_weight(0.05, 2.0) == 20.0  # scales from the weight in effect
    assert suggested_weight(0.0012, 1.0) == 420.0
    for ratio, weight in ((0.1, 1.0), (1.9, 1.0), (0.0, 1.0), (math.nan, 1.0), (0.05, 0.0)):
        assert suggested_weight(ratio, weight) is None, (ratio, weight)
    assert suggested_weight(1e-12, 1.0) == 1e6  # never beyond the setting's range


def test_the_balance_report_prints_the_suggestion_line(pair):
    means = {"box": 0.1, "obj": 0.2, "cls": 0.05, "dbox": 0.0047, "dobj": 0.004, "dcls": 0.08}
    lines, ratios = _term(pair, dist_obj=2.0).balance(means, 20)
    assert len(lines) == 3 and lines[0].startswith("Distillation balance over the first 20 batches")
    box, obj = lines[1:]
    assert box.startswith("Suggestion (not applied): dbox/box is 0.047") and "--dist_box 11 (now 1)" in box
    assert "dobj/obj is 0.02" in obj and "--dist_obj 50 (now 2)" in obj  # 2 x 0.5 / 0.02
    assert not any("dist_cls" in line for line in lines)  # dcls/cls 1.6: no suggestion
    assert weight_suggestions(ratios, {"dbox": 1.0, "dobj": 2.0, "dcls": 1.0}) == lines[1:]
    # a suggestion is never applied: the term's weights are what the config says
    assert _term(pair, dist_obj=2.0).loss.gains["dobj"] == 2.0 * _term(pair).loss.gains["dobj"]
