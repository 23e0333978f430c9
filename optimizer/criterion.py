"""The training criterion: one callable that runs a training step's forward passes and returns (loss, parts).

    loss, parts = criterion(model, imgs, targets)   # plain: {box, obj, cls}; distilled: + {dbox, dobj, dcls}

The distiller owns the teacher, the unlabelled stream and the balance report: each step it draws the
unlabelled batch, runs the teacher once on the labelled and unlabelled images together (before the student,
so the teacher's activations are freed first), then the student. The detection loss sees only the labelled
images, the distillation loss all of them. The training loop knows nothing about any of this: it logs
whatever `parts` holds.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from optimizer.config import KDConfig
from optimizer.loss import KL_OBJ_NORMS, OutputDistillationLoss
from optimizer.teacher import Teacher, load_teacher, preflight
from utils.core.errors import UserError
from utils.data.unlabeled import UnlabeledStream
from utils.training.engine import StudentForward, to_input

LOGGER = logging.getLogger("yolov5kd")

DETECTION_PARTS = ("box", "obj", "cls")
DISTILLATION_PARTS = ("dbox", "dobj", "dcls")
# A distillation part outside [LOW, HIGH] x its detection counterpart is reported once, with the knob to turn.
BALANCE_LOW, BALANCE_HIGH = 0.01, 10.0
BALANCE_BATCHES = 20  # the first-epoch balance report averages this many batches (or the whole epoch)


class DetectionCriterion:
    """YOLOv5's detection loss as a criterion: (loss, {box, obj, cls})."""

    parts = DETECTION_PARTS
    detection_parts = DETECTION_PARTS  # the parts of `parts` that come from the detection loss
    progress_note = ""  # shown beside the progress bar

    def __init__(self, compute_loss: Any, forward: StudentForward):
        """Wrap a ComputeLoss (its call gives (loss * bs, tensor([box, obj, cls]))) and how the student runs."""
        self.compute_loss = compute_loss
        self.forward = forward

    def start_epoch(self, epoch: int) -> None:
        """Called by the loop before each epoch."""

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

    def describe(self) -> list[str]:
        """Lines for the start of training (nothing for the detection loss alone)."""
        return []

    def epoch_scalars(self, mloss: Mapping[str, float]) -> dict[str, float]:
        """Extra per-epoch figures for TensorBoard, from the epoch's mean parts."""
        return {}

    def reference_model(self) -> tuple[str, nn.Module] | None:
        """(name, model) of a model whose mAP bounds the student's, measured before training; None if none."""
        return None


class Distiller(DetectionCriterion):
    """Detection loss plus output distillation from a frozen teacher; owns the teacher, the pre-flight, the
    unlabelled stream and the balance report."""

    parts = DETECTION_PARTS + DISTILLATION_PARTS

    def __init__(self, config: KDConfig, compute_loss: Any, teacher: Teacher, student: nn.Module, imgsz: int,
                 forward: StudentForward, unlabeled: UnlabeledStream | None = None):
        """Check the pair once (raises UserError naming both values) and build the loss from the result."""
        super().__init__(compute_loss, forward)
        self.config = config
        self.teacher = teacher
        self.unlabeled = unlabeled
        checks = preflight(teacher, student, imgsz)
        # the output terms use the detection loss's own (train-time rescaled) box/obj/cls gains
        self.loss = OutputDistillationLoss(student, dist_loss=config.dist_loss, T=config.temperature,
                                           distill_ratio=config.distill_ratio, norm=config.dist_norm,
                                           gains=compute_loss.hyp, teacher_anchors=checks["teacher_anchors"])
        self._sums: dict[str, float] = {}
        self._seen = 0
        self.reported = False
        if unlabeled is not None:
            self.progress_note = f"+{unlabeled.batch_size} of {len(unlabeled)} unlabelled/step"

    @classmethod
    def build(cls, config: KDConfig, compute_loss: Any, student: nn.Module, imgsz: int, forward: StudentForward,
              trust: bool = False, unlabeled: UnlabeledStream | None = None) -> Distiller:
        """Load the teacher named by the config (safe loader, fused, frozen) and check it against the student."""
        if not config.enabled:
            raise UserError("distillation needs a teacher checkpoint (--t_weights)")
        teacher = load_teacher(config.t_weights, device=forward.device, trust=trust,
                               precision=config.teacher_precision)
        teacher.model.to(memory_format=torch.channels_last)  # same NHWC layout as the student's input
        return cls(config, compute_loss, teacher, student, imgsz, forward, unlabeled)

    def start_epoch(self, epoch: int) -> None:
        """The unlabelled stream's shuffle for this epoch."""
        if self.unlabeled is not None:
            self.unlabeled.start_epoch(epoch)

    def __call__(self, model: nn.Module, imgs: torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher on labelled + unlabelled images, then the student; detection loss on the labelled images,
        distillation loss on all of them, and the six parts."""
        u_imgs = self._unlabeled_batch(imgs)
        # The teacher runs first: its activations are freed before the student's fill memory (measured on 2 CPU
        # cores, the KD step then costs ~2% over plain step + teacher forward, instead of ~6%).
        t_maps = self.teacher(imgs if u_imgs is None else torch.cat((imgs, u_imgs), 0))
        with self.forward.autocast():
            pred = self.forward(model, imgs)
            targets = targets.to(self.forward.device)
            # the student runs the unlabelled images in a second pass, so that batch-norm statistics, and with
            # them the detection loss of the labelled images, are exactly what they would be without them
            u_pred = None if u_imgs is None else self.forward.second_pass(model, u_imgs)
            return self.losses(pred, targets, t_maps, u_pred)

    def losses(self, pred: list[torch.Tensor], targets: torch.Tensor, t_maps: list[torch.Tensor],
               u_pred: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Detection loss on `pred` (the labelled images) + distillation loss on `pred` and `u_pred` together
        against the teacher's maps of both, and the six parts."""
        loss, parts = self._detection(pred, targets)
        bs = pred[0].shape[0]
        if u_pred is not None:
            pred = [torch.cat((p, u), 0) for p, u in zip(pred, u_pred)]
        kd_loss, kd_parts = self.loss(pred, t_maps)  # fp32 inside, whatever the autocast state
        # The detection parts are per-image means (the loss is their sum x batch size) while the seed's KD
        # parts already carry the batch size: put them on the detection parts' scale, so that logged columns
        # and balance ratios compare what each part weighs in the gradient (sum(parts) x bs == loss).
        parts.update({k: v / bs for k, v in kd_parts.items()})
        if not self.reported:
            self._accumulate(parts)
        return loss + kd_loss.to(loss.dtype), parts

    def _unlabeled_batch(self, imgs: torch.Tensor) -> torch.Tensor | None:
        if self.unlabeled is None:
            return None
        u_imgs = to_input(self.unlabeled.next_batch(), self.forward.device)
        if u_imgs.shape[2:] != imgs.shape[2:]:  # multi-scale: one size for the teacher's combined batch
            u_imgs = F.interpolate(u_imgs, size=imgs.shape[2:], mode="bilinear", align_corners=False)
        return u_imgs

    def describe(self) -> list[str]:
        """The unlabelled stream, when there is one."""
        if self.unlabeled is None:
            return []
        u = self.unlabeled
        return [f"Unlabelled images: {len(u)} ({u.batch_size} per step beside {u.labelled_batch} labelled, "
                f"unlabeled_ratio {self.config.unlabeled_ratio:g}), distillation only"]

    def epoch_scalars(self, mloss: Mapping[str, float]) -> dict[str, float]:
        """Each distillation part over its detection counterpart."""
        return {f"kd_balance/{k}": v for k, v in balance_ratios(mloss).items()}

    def reference_model(self) -> tuple[str, nn.Module] | None:
        """The teacher: the student's ceiling."""
        return f"Teacher {self.config.t_weights}", self.teacher.model

    def _accumulate(self, parts: Mapping[str, torch.Tensor]) -> None:
        vals = {k: float(v) for k, v in parts.items()}
        if not all(map(_finite, vals.values())):
            return
        for k, v in vals.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._seen += 1
        if self._seen >= BALANCE_BATCHES:
            self.report_balance()

    def end_epoch(self) -> None:
        """A first epoch shorter than BALANCE_BATCHES still gets its balance report."""
        if not self.reported and self._seen:
            self.report_balance()

    def report_balance(self) -> None:
        """Once: each distillation part next to its detection counterpart, and a warning per part out of range."""
        means = {k: v / self._seen for k, v in self._sums.items()}
        ratios = balance_ratios(means)
        LOGGER.info("Distillation balance over the first %d batches (%s norm): %s", self._seen,
                    self.config.dist_norm, ", ".join(f"{d} {means[d]:.4g} / {c} {means[c]:.4g} = {r:.3g}"
                                                     for (d, c), r in zip(_PAIRS, ratios.values())))
        for line in balance_warnings(ratios, self.config):
            LOGGER.warning(line)
        self.reported = True


_PAIRS = tuple(zip(DISTILLATION_PARTS, DETECTION_PARTS))


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def balance_ratios(parts: Mapping[str, float]) -> dict[str, float]:
    """{dbox/box, dobj/obj, dcls/cls} from part values (NaN where the detection part is 0)."""
    out = {}
    for d, c in _PAIRS:
        den = float(parts.get(c, 0.0))
        out[f"{d}/{c}"] = float(parts.get(d, 0.0)) / den if den > 0 else float("nan")
    return out


def balance_warnings(ratios: Mapping[str, float], config: KDConfig) -> list[str]:
    """One line for each distillation part below 1% or above 10x its detection counterpart, naming the knob."""
    lines = []
    for name, r in ratios.items():
        if not _finite(r):
            continue
        if r < BALANCE_LOW:
            if config.dist_norm == "mean":
                fix = ("use --dist_norm soft (or weighted), which averages over the teacher's objects instead of "
                       "every cell, or raise distill_ratio")
            elif name == "dobj/obj" and config.dist_norm in KL_OBJ_NORMS:
                # a KL is ~0 wherever the student already agrees with the teacher, unlike the detection BCE
                # beside it, so a small ratio here is no imbalance by itself; raising the ratio for it alone
                # would push the class term (already ~1.5x its counterpart at the default) past 10x
                fix = ("its objectness term is a KL over every cell, near 0 where the student already agrees "
                       "with the teacher; raise distill_ratio only if the other parts are low too")
            else:
                fix = "raise distill_ratio"
            lines.append(f"WARNING: distillation part {name} = {r:.3g} is below {BALANCE_LOW:g}: the teacher "
                         f"hardly counts there; {fix}")
        elif r > BALANCE_HIGH:
            fix = "lower distill_ratio" + (" or use --dist_norm soft" if config.dist_norm == "weighted" else "")
            lines.append(f"WARNING: distillation part {name} = {r:.3g} is above {BALANCE_HIGH:g}: the teacher "
                         f"outweighs the labels there; {fix}")
    return lines
