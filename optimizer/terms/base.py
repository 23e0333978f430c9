"""The term protocol: what a distillation term is to the distiller, and the one value a step hands every term."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from optimizer.config import KDConfig
from utils.training.forward import StudentForward


@dataclass(frozen=True)
class StepMaps:
    """One step's maps, as the distiller ran them (teacher first, then the student).

    The unlabelled fields are None when the run has no unlabelled images, the feature fields when no term
    needs features. `det_loss` and `measuring` are filled in by the distiller before the terms run."""

    pred: list[torch.Tensor]  # the student's raw maps of the labelled images
    targets: torch.Tensor  # their labels [image, class, x, y, w, h], on the student's device
    t_maps: list[torch.Tensor]  # the teacher's raw maps of the labelled images, then the unlabelled ones
    u_pred: list[torch.Tensor] | None = None  # the student's raw maps of the unlabelled images
    s_feats: list[torch.Tensor] | None = None  # the student's head inputs (P3-P5) of the labelled images
    t_feats: list[torch.Tensor] | None = None  # the teacher's head inputs, labelled then unlabelled
    u_feats: list[torch.Tensor] | None = None  # the student's head inputs of the unlabelled images
    u_imgs: torch.Tensor | None = None  # the unlabelled images (NCHW, float, the labelled images' size)
    det_loss: torch.Tensor | None = None  # the detection loss of `pred` (x batch size), with its graph
    measuring: bool = False  # the first-epoch balance report is still averaging: a term may measure extra figures

    @property
    def batch(self) -> int:
        """The labelled batch size: every part is a per-labelled-image value, like the detection parts."""
        return self.pred[0].shape[0]


@dataclass(frozen=True)
class TermContext:
    """What a term may need to build itself."""

    compute_loss: Any  # the detection loss (its `hyp` holds the train-time rescaled box/obj/cls gains)
    teacher: nn.Module  # the teacher model: fused, frozen, on the device
    student: nn.Module
    teacher_anchors: torch.Tensor  # the teacher's Detect anchors, as the pre-flight check read them
    forward: StudentForward  # the student's device, autocast and DDP world size
    unlabelled: bool = False  # whether the run draws unlabelled images
    seed: int = 0  # for what a term initialises at random (the feature adapters)


class Term:
    """One distillation term. A subclass sets `parts` (and the flags it needs), builds itself from the config
    (`build` gives None when the config leaves it off) and returns (loss, parts) for a step; the rest has
    defaults. Every loss is a sum x the labelled batch size, like the detection loss it is added to, and
    every part is that loss's share per labelled image (so that sum(parts) x batch size == loss)."""

    parts: tuple[str, ...] = ()  # the names it adds to a step's parts (progress columns, results.csv)
    figures: Mapping[str, str] = {}  # those parts that are counts, not losses: {part: results.csv column}
    needs_features = False  # the head inputs of student and teacher (StepMaps.s_feats, t_feats, u_feats)
    scheduled = False  # multiplied by the teacher's weight schedule (--distill_decay; optimizer/schedule.py)
    needs_unlabelled = False  # runs only on steps with unlabelled images (its parts then always have them)
    note = ""  # shown beside the progress bar after the unlabelled images
    unlabelled_use = ""  # what it does with the unlabelled images, for the start-of-training line

    @classmethod
    def build(cls, config: KDConfig, ctx: TermContext) -> Term | None:
        """The term a run's config asks for, or None when it leaves the term off."""
        raise NotImplementedError

    def __call__(self, step: StepMaps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss with its graph, {part: detached value}) for one step."""
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        """Called before each epoch."""

    def trainable(self) -> nn.Module | None:
        """Modules it trains beside the student (in the optimizer and last.pt, never in the student's weights)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What an exact --resume needs of it (keys unique among the terms)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore its part of the criterion's state_dict()."""

    def describe(self) -> list[str]:
        """Lines for the start of training."""
        return []

    def balance(self, means: Mapping[str, float], batches: int) -> tuple[list[str], dict[str, float]]:
        """For the first epoch's balance report, from the parts' means over `batches` batches: lines to log, and
        {name: ratio} to check against [BALANCE_LOW, BALANCE_HIGH] (optimizer/balance.py)."""
        return [], {}

    def samples(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Images the last step trained on beyond the loader's batch, with their boxes, by mosaic name suffix."""
        return {}
