"""Adding a distillation term is one class and one line: a test-only term that adds 0 x the sum of the student's
maps is registered in TERMS, and one training step shows its part beside the others and the loss unchanged."""
from __future__ import annotations

import copy

import torch

import optimizer.terms as terms
from conftest import ROOT
from models.yolo import Model
from optimizer.config import KD_SPECS, KDConfig
from optimizer.criterion import Distiller, Student
from optimizer.teacher import Teacher
from optimizer.terms.base import StepMaps, Term, TermContext
from utils.training.forward import StudentForward
from utils.training.hyp import load_hyp
from utils.training.loss import ComputeLoss, scale_hyp
from utils.training.optim import build_optimizer

LOW = ROOT / "data/hyps/hyp.scratch-low.yaml"
TARGETS = torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.2], [1, 3, 0.3, 0.6, 0.1, 0.3]])


class ToyTerm(Term):
    """0 x the sum of the student's labelled maps, logged as 'toy'."""

    parts = ("toy",)

    @classmethod
    def build(cls, config: KDConfig, ctx: TermContext) -> ToyTerm:
        return cls()

    def __call__(self, step: StepMaps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = 0.0 * sum(p.float().sum() for p in step.pred)
        return loss, {"toy": loss.detach() / step.batch}


def _step(feat_kd: str):
    """One training step (the criterion on a tiny batch, backward, SGD) of a fresh seeded student; the loss, the
    parts, the columns and the weights after the step."""
    torch.manual_seed(0)
    student = Model("yolov5n.yaml", nc=8)
    teacher = Teacher(Model("yolov5s.yaml", nc=8).fuse())
    loss_fn = ComputeLoss(student, hyp=scale_hyp(load_hyp(LOW, KD_SPECS), 3, 8, 64))
    crit = Distiller(KDConfig(t_weights="t.pt", feat_kd=feat_kd), teacher,
                     Student(student, loss_fn, StudentForward(torch.device("cpu")), 64))
    opt = build_optimizer(student, "SGD", 0.01, 0.9, 5e-4, extra=crit.trainable())
    crit.start_epoch(1)
    loss, parts = crit(student, torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), TARGETS)
    loss.backward()
    opt.step()
    return loss.detach(), parts, crit.parts, copy.deepcopy(student.state_dict())


def test_a_registered_toy_term_trains_and_changes_nothing(monkeypatch):
    for feat_kd in ("none", "mse"):
        loss, parts, columns, weights = _step(feat_kd)
        with monkeypatch.context() as m:
            m.setattr(terms, "TERMS", (*terms.TERMS, ToyTerm))  # the one line that adds the term
            toy_loss, toy_parts, toy_columns, toy_weights = _step(feat_kd)
        assert toy_columns == (*columns, "toy") and list(toy_parts) == list(toy_columns)
        assert float(toy_parts["toy"]) == 0.0 and torch.equal(toy_loss, loss)
        assert all(torch.equal(toy_parts[k], v) for k, v in parts.items())
        assert all(torch.equal(toy_weights[k], v) for k, v in weights.items())
