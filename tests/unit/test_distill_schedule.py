"""The teacher's weight schedule (distill_decay, distill_floor): its value at the first, middle and last epoch,
what the distiller multiplies (output, feature, localisation; not pseudo-labels), and the x/distill column."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import ROOT
from models.yolo import Model
from optimizer.config import KD_SPECS, KDConfig
from optimizer.criterion import Distiller, Student
from optimizer.schedule import distill_multiplier
from optimizer.teacher import Teacher
from utils.reporting.loggers import RunLogger, read_results_csv
from utils.training.forward import StudentForward
from utils.training.hyp import load_hyp
from utils.training.loss import ComputeLoss, scale_hyp

LOW = ROOT / "data/hyps/hyp.scratch-low.yaml"
TARGETS = torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.2], [1, 3, 0.3, 0.6, 0.1, 0.3]])


@pytest.mark.parametrize("decay", ["linear", "cos"])
def test_first_middle_and_last_epoch(decay):
    epochs, floor = 11, 0.01
    values = [distill_multiplier(decay, floor, e, epochs) for e in range(epochs)]
    assert values[0] == 1.0 and values[-1] == floor  # exactly: no rounding at either end
    assert values[5] == pytest.approx(floor + (1 - floor) * 0.5, rel=1e-12)  # t = 1/2 for both forms
    assert all(a > b for a, b in zip(values, values[1:]))  # falls every epoch
    t = 2 / 10
    r = 1 - t if decay == "linear" else (1 + math.cos(math.pi * t)) / 2
    assert values[2] == pytest.approx(floor + (1 - floor) * r, rel=1e-12)
    assert distill_multiplier(decay, floor, 20, epochs) == floor  # past the last epoch: the floor
    assert distill_multiplier(decay, floor, 0, 1) == 1.0  # a one-epoch run keeps the teacher's full weight
    assert distill_multiplier(decay, 0.0, epochs - 1, epochs) == 0.0


def test_cos_holds_longer_than_linear_and_none_is_constant():
    assert distill_multiplier("cos", 0.1, 2, 11) > distill_multiplier("linear", 0.1, 2, 11)
    assert distill_multiplier("cos", 0.1, 8, 11) < distill_multiplier("linear", 0.1, 8, 11)
    assert all(distill_multiplier("none", 0.1, e, 11) == 1.0 for e in range(11))
    with pytest.raises(ValueError):
        distill_multiplier("step", 0.1, 1, 11)


def _distiller(**settings):
    torch.manual_seed(0)
    student = Model("yolov5n.yaml", nc=8)
    teacher = Teacher(Model("yolov5n.yaml", nc=8).fuse())
    loss_fn = ComputeLoss(student, hyp=scale_hyp(load_hyp(LOW, KD_SPECS), 3, 8, 64))
    d = Distiller(KDConfig(t_weights="t.pt", **settings), teacher,
                  Student(student, loss_fn, StudentForward(torch.device("cpu")), 64))
    return student, d


def _parts(epoch, epochs=5, **settings):
    student, d = _distiller(**settings)
    d.plan(epochs)
    d.start_epoch(epoch)
    imgs = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    loss, parts = d(student, imgs, TARGETS)
    return loss.detach(), parts, d


def test_the_distiller_multiplies_the_scheduled_terms_only():
    loss, ref, none = _parts(4, distill_decay="none", dist_loc=1.0, feat_kd="mse")
    assert none.columns == () and none.column_values() == {} and none.schedule.multiplier is None  # none: never applied
    loss0, first, d = _parts(0, distill_decay="linear", distill_floor=0.2, dist_loc=1.0, feat_kd="mse")
    assert d.columns == ("distill",) and d.column_values() == {"distill": 1.0}
    assert torch.equal(loss0, loss) and all(torch.equal(first[k], v) for k, v in ref.items())  # x 1.0: bit for bit
    _, last, d = _parts(4, distill_decay="linear", distill_floor=0.2, dist_loc=1.0, feat_kd="mse")
    assert d.column_values() == {"distill": 0.2}
    for k, v in ref.items():
        if k in ("box", "obj", "cls"):
            assert torch.equal(last[k], v), k  # the labels' loss is never scheduled
        else:
            assert torch.allclose(last[k], 0.2 * v, rtol=1e-6) and float(v) > 0, k
    assert any("Distillation schedule: linear from 1 at epoch 0 to 0.2 at epoch 4" in line for line in d.describe())


def test_the_pseudo_label_term_is_not_scheduled():
    from optimizer.terms.features import FeatureTerm
    from optimizer.terms.localisation import LocalisationTerm
    from optimizer.terms.output import OutputTerm
    from optimizer.terms.pseudo import PseudoTerm

    assert OutputTerm.scheduled and FeatureTerm.scheduled and LocalisationTerm.scheduled
    assert not PseudoTerm.scheduled


def test_x_distill_column_beside_the_learning_rates(tmp_path):
    lg = RunLogger(tmp_path, kd=True, tensorboard=False, plots=False, columns=("distill",))
    assert lg.keys[11:15] == ["x/lr0", "x/lr1", "x/lr2", "x/distill"] and lg.keys[-1] == "train/dcls_loss"
    for e, m in enumerate((1.0, 0.505, 0.01)):
        lg.log_epoch(e, [1, 2, 3, 4, 5, 6], [0] * 7, [0.1, 0.2, 0.3], {"distill": m})
    res = read_results_csv(tmp_path / "results.csv")
    assert res["x/distill"] == [1.0, 0.505, 0.01] and res["train/dbox_loss"] == [4, 4, 4]
    with pytest.raises(ValueError, match="distill"):
        lg.log_epoch(3, [1, 2, 3, 4, 5, 6], [0] * 7, [0.1, 0.2, 0.3])
    # without a schedule the columns are what they always were
    plain = RunLogger(tmp_path / "plain", kd=True, tensorboard=False, plots=False)
    assert "x/distill" not in plain.keys and plain.keys[13] == "x/lr2"
