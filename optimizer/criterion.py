"""The training criterion: one callable that runs a training step's forward passes and returns (loss, parts).

    loss, parts = criterion(model, imgs, targets)   # plain: {box, obj, cls}; distilled: + each term's parts
                                                    # ({dbox, dobj, dcls}, + {dfeat} with feature distillation,
                                                    # + {pseudo, pboxes} with pseudo-labels)

The distiller owns the teacher, the unlabelled stream, the balance report and its terms (optimizer/terms/: one
file per term): each step it draws the unlabelled batch, runs the teacher once on the labelled and unlabelled
images together (before the student, so the teacher's activations are freed first), then the student, and hands
the maps to every term in one StepMaps. The detection loss sees only the labelled images; each term adds its
loss and its parts. The training loop knows nothing about any of this: it logs whatever `parts` holds.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from optimizer.balance import DETECTION_PARTS, BalanceReport, balance_ratios
from optimizer.config import KDConfig
from optimizer.schedule import DistillSchedule
from optimizer.teacher import Teacher, load_teacher, preflight
from optimizer.terms import build_terms
from optimizer.terms.base import StepMaps, TermContext
from utils.core.errors import UserError
from utils.data.unlabeled import UnlabeledStream
from utils.training.forward import StudentForward, to_input

LOGGER = logging.getLogger("yolov5kd")


class DetectionCriterion:
    """YOLOv5's detection loss as a criterion: (loss, {box, obj, cls})."""

    parts = DETECTION_PARTS
    # the parts that are counts, not losses: progress column under the part's name, results.csv column
    # train/<value>
    figures: Mapping[str, str] = {}
    progress_note = ""  # shown beside the progress bar
    columns: tuple[str, ...] = ()  # results.csv x/<name> columns it adds after x/lr0..2 (column_values())

    def __init__(self, compute_loss: Any, forward: StudentForward):
        """Wrap a ComputeLoss (its call gives (loss * bs, tensor([box, obj, cls]))) and how the student runs."""
        self.compute_loss = compute_loss
        self.forward = forward

    def plan(self, epochs: int) -> None:
        """Called once before the first epoch with the run's total number of epochs."""

    def start_epoch(self, epoch: int) -> None:
        """Called by the loop before each epoch."""

    def column_values(self) -> dict[str, float]:
        """The x/ columns' values ({name: value} for `columns`) of the epoch last started."""
        return {}

    def __call__(self, model: nn.Module, imgs: torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student's forward on `imgs`, then the total loss (for backward) and its detached parts."""
        with self.forward.autocast():
            pred = self.forward(model, imgs)
            return self._detection(pred, targets.to(self.forward.device))

    def _detection(self, pred: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss, items = self.compute_loss(pred, targets)
        return loss, dict(zip(DETECTION_PARTS, items.detach()))

    def end_epoch(self) -> None:
        """Called by the loop after each epoch."""

    def nonfinite_advice(self, parts: Sequence[str]) -> str:
        """What to do when training stops on a non-finite loss; `parts` are the non-finite parts (none when only
        the total was)."""
        fix = "lower lr0 in the hyp file, and check the labels and the starting weights"
        return f"the detection loss is at fault: {fix}" if parts else fix

    def describe(self) -> list[str]:
        """Lines for the start of training (nothing for the detection loss alone)."""
        return []

    def epoch_scalars(self, mloss: Mapping[str, float]) -> dict[str, float]:
        """Extra per-epoch figures for TensorBoard, from the epoch's mean parts."""
        return {}

    def reference_model(self) -> tuple[str, nn.Module] | None:
        """(name, model) of a model whose mAP bounds the student's, measured before training; None if none."""
        return None

    def trainable(self) -> nn.Module | None:
        """Modules the criterion trains beside the student (in the optimizer, in last.pt, never in the
        student's checkpoint); None when there are none."""
        return None

    def samples(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Images the last step trained on beyond the loader's batch, with their targets, by mosaic name suffix."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What an exact --resume needs of the criterion (saved in last.pt only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what state_dict() gave."""


@dataclass(frozen=True)
class Student:
    """The student side of a distillation: the model, its detection loss, how it runs, and the training size."""

    model: nn.Module
    compute_loss: Any  # ComputeLoss: its call gives (loss * bs, tensor([box, obj, cls]))
    forward: StudentForward
    imgsz: int


class Distiller(DetectionCriterion):
    """Detection loss plus the distillation terms from a frozen teacher; owns the teacher, the pre-flight, the
    unlabelled stream, the terms and the balance report."""

    def __init__(self, config: KDConfig, teacher: Teacher, student: Student, unlabeled: UnlabeledStream | None = None,
                 seed: int = 0):
        """Check the pair once (raises UserError naming both values) and build the terms the config asks for
        (`seed` initialises what they draw at random: the feature adapters)."""
        super().__init__(student.compute_loss, student.forward)
        self.config = config
        self.teacher = teacher
        self.unlabeled = unlabeled
        checks = preflight(teacher, student.model, student.imgsz)
        self.terms = build_terms(config, TermContext(student.compute_loss, teacher.model, student.model,
                                                     checks["teacher_anchors"], student.forward,
                                                     unlabeled is not None, seed))
        self.parts = DETECTION_PARTS + tuple(p for t in self.terms for p in t.parts)
        self.figures = {k: v for t in self.terms for k, v in t.figures.items()}
        self.needs_features = any(t.needs_features for t in self.terms)
        self.balance = BalanceReport(config)
        self.schedule = DistillSchedule(config.distill_decay, config.distill_floor)  # --distill_decay
        self.columns = self.schedule.columns
        if unlabeled is not None:
            self.progress_note = "".join([f"+{unlabeled.batch_size} of {len(unlabeled)} unlabelled/step",
                                          *(f", {t.note}" for t in self.terms if t.note)])

    @classmethod
    def build(cls, config: KDConfig, student: Student, trust: bool = False, unlabeled: UnlabeledStream | None = None,
              seed: int = 0) -> Distiller:
        """Load the teacher named by the config (safe loader, fused, frozen) and check it against the student."""
        if not config.enabled:
            raise UserError("distillation needs a teacher checkpoint (--t_weights)")
        teacher = load_teacher(config.t_weights, device=student.forward.device, trust=trust,
                               precision=config.teacher_precision)
        teacher.model.to(memory_format=torch.channels_last)  # same NHWC layout as the student's input
        return cls(config, teacher, student, unlabeled, seed)

    def plan(self, epochs: int) -> None:
        """The run's total epochs, which the teacher's weight schedule falls over."""
        self.schedule.plan(epochs)

    def start_epoch(self, epoch: int) -> None:
        """The unlabelled stream's shuffle for this epoch, each term's (the feature term's warm-up), and the
        schedule's multiplier, from the epoch alone (so a resumed run gets the same)."""
        self.schedule.start_epoch(epoch)
        if self.unlabeled is not None:
            self.unlabeled.start_epoch(epoch)
        for term in self.terms:
            term.start_epoch(epoch)

    def __call__(self, model: nn.Module, imgs: torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher on labelled + unlabelled images, then the student (the unlabelled images in a second pass);
        then the losses of the step's maps."""
        u_imgs = None if self.unlabeled is None else _unlabeled_batch(self.unlabeled, imgs, self.forward.device)
        feat = self.needs_features
        # The teacher runs first: its activations are freed before the student's fill memory (measured on 2 CPU
        # cores, the KD step then costs ~2% over plain step + teacher forward, instead of ~6%).
        t_maps, t_feats = self.teacher.run(imgs if u_imgs is None else torch.cat((imgs, u_imgs), 0), features=feat)
        with self.forward.autocast():
            pred, s_feats = _split(self.forward(model, imgs, features=feat), feat)
            targets = targets.to(self.forward.device)
            # the student runs the unlabelled images in a second pass, so that batch-norm statistics, and with
            # them the detection loss of the labelled images, are exactly what they would be without them
            u_pred = u_feats = None
            if u_imgs is not None:
                u_pred, u_feats = _split(self.forward.second_pass(model, u_imgs, features=feat), feat)
            return self.losses(StepMaps(pred, targets, t_maps, u_pred, s_feats, t_feats, u_feats, u_imgs))

    def losses(self, step: StepMaps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The detection loss of `step.pred` plus every term's loss, added in the terms' order, and the parts
        (the detection parts, then each term's); the balance report's batch while it averages."""
        loss, parts = self._detection(step.pred, step.targets)
        step = dataclasses.replace(step, det_loss=loss, measuring=not self.balance.reported)
        total = loss
        for term in self.terms:
            if term.needs_unlabelled and step.u_pred is None:
                continue
            term_loss, term_parts = term(step)
            if term.scheduled:
                term_loss, term_parts = self.schedule.apply(term_loss, term_parts, term.figures)
            parts.update(term_parts)
            total = total + term_loss.to(loss.dtype)
        if step.measuring and self.balance.add(parts, step.t_maps):
            self.report_balance()
        return total, parts

    def column_values(self) -> dict[str, float]:
        """x/distill: the schedule's multiplier in effect (with --distill_decay)."""
        return self.schedule.values()

    def describe(self) -> list[str]:
        """Each term's lines, then the unlabelled stream's, when there is one."""
        lines = [line for t in self.terms for line in t.describe()]
        lines += self.schedule.describe([p for t in self.terms if t.scheduled for p in t.parts])
        if self.unlabeled is not None:
            u, uses = self.unlabeled, [t.unlabelled_use for t in self.terms if t.unlabelled_use]
            use = "distillation and " + " and ".join(uses) if uses else "distillation only"
            lines.append(f"Unlabelled images: {len(u)} ({u.batch_size} per step beside {u.labelled_batch} labelled, "
                         f"unlabeled_ratio {self.config.unlabeled_ratio:g}), {use}")
        return lines

    def nonfinite_advice(self, parts: Sequence[str]) -> str:
        """The teacher and the distillation knobs when only distillation parts are non-finite; else the detection
        loss's advice."""
        if parts and not any(k in DETECTION_PARTS for k in parts):
            return ("the distillation loss is at fault: check the teacher checkpoint, and lower distill_ratio or "
                    "temperature")
        return super().nonfinite_advice(parts)

    def samples(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The terms' extra images of the last step (the pseudo-labelled ones, under 'pseudo')."""
        return {k: v for t in self.terms for k, v in t.samples().items()}

    def epoch_scalars(self, mloss: Mapping[str, float]) -> dict[str, float]:
        """Each distillation part over its detection counterpart."""
        return {f"kd_balance/{k}": v for k, v in balance_ratios(mloss).items()}

    def reference_model(self) -> tuple[str, nn.Module] | None:
        """The teacher: the student's ceiling."""
        return f"Teacher {self.config.t_weights}", self.teacher.model

    def trainable(self) -> nn.Module | None:
        """What the terms train beside the student (the feature adapters); None when nothing."""
        mods = [m for m in (t.trainable() for t in self.terms) if m is not None]
        return None if not mods else mods[0] if len(mods) == 1 else nn.ModuleList(mods)

    def state_dict(self) -> dict[str, Any]:
        """The terms' states (the adapters' weights), for an exact --resume."""
        return {k: v for t in self.terms for k, v in t.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Each term picks its part of a resumed run's state."""
        for term in self.terms:
            term.load_state_dict(state)

    def end_epoch(self) -> None:
        """A first epoch shorter than BALANCE_BATCHES still gets its balance report."""
        if not self.balance.reported and self.balance.seen:
            self.report_balance()

    def report_balance(self) -> None:
        """Once: each term's balance lines, and a warning per part out of range (optimizer/balance.py)."""
        self.balance.report(self.terms)


def _unlabeled_batch(stream: UnlabeledStream, imgs: torch.Tensor, device: torch.device) -> torch.Tensor:
    u_imgs = to_input(stream.next_batch(), device)
    if u_imgs.shape[2:] != imgs.shape[2:]:  # multi-scale: one size for the teacher's combined batch
        u_imgs = F.interpolate(u_imgs, size=imgs.shape[2:], mode="bilinear", align_corners=False)
    return u_imgs


def _split(out: Any, features: bool) -> tuple[Any, Any]:
    return out if features else (out, None)
