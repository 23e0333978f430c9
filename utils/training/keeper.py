"""A run's weights/ folder: what a resumed run restores from it, and the last/best/periodic saves into it."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from utils.core.distributed import de_parallel
from utils.core.errors import UserError
from utils.reporting.loggers import trim_results_csv
from utils.training.checkpoint import build_checkpoint, save_checkpoint, strip_optimizer
from utils.training.optim import ModelEMA

LOGGER = logging.getLogger("yolov5kd")


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run picks up: its first epoch, its total epochs and the best fitness so far."""

    start_epoch: int = 0
    epochs: int = 0
    best_fitness: float = 0.0

    @classmethod
    def plan(cls, ckpt: dict, epochs: Any, where: str) -> ResumePoint:
        """The counters of a last.pt resumed to the `epochs` recorded in `where` (a finished checkpoint has been
        refused before). One-line UserErrors for a record that is not a whole number >= 1, and for one under
        which the resume would train nothing, unless the checkpoint holds the final epoch of the run as it was
        started (a run killed during its final strip: the resume finishes that)."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise UserError(f"{where}: epochs {epochs!r} is not a whole number >= 1, so the record is corrupt; "
                            f"restore it, or start a new run from the checkpoint with --weights")
        start_epoch = int(ckpt["epoch"]) + 1
        # YOLOv5: a record below the epochs already trained means "that many more" (fine-tuning)
        total = epochs if epochs >= start_epoch else epochs + start_epoch - 1
        started_with = (ckpt.get("opt") or {}).get("epochs")
        if total <= start_epoch and started_with != start_epoch:
            raise UserError(f"{where}: epochs {epochs}, but the checkpoint has trained {start_epoch} epoch(s), so the "
                            f"resume would train nothing and strip its optimizer; set epochs above {start_epoch} "
                            f"to train on")
        return cls(start_epoch, total, float(ckpt.get("best_fitness") or 0.0))

    @classmethod
    def from_checkpoint(cls, ckpt: dict, weights: Any, epochs: int) -> ResumePoint:
        """The counters of a last.pt being resumed (prepare_resume has already checked them with plan())."""
        point = cls.plan(ckpt, epochs, str(weights))
        LOGGER.info(f"Resuming training from {weights} from epoch {point.start_epoch} to {epochs} total epochs")
        if point.epochs != epochs:
            LOGGER.info(f"{weights} has been trained for {ckpt['epoch']} epochs. Fine-tuning for {epochs} more epochs.")
        return point


def restore_ema(ckpt: dict, ema: ModelEMA) -> None:
    """EMA weights (fp32 when the checkpoint carries them) and its update count."""
    exact = (ckpt.get("resume_state") or {}).get("ema")
    if exact is not None:
        ema.ema.load_state_dict(exact)
    elif ckpt.get("ema") is not None:
        ema.ema.load_state_dict(ckpt["ema"].float().state_dict())
    ema.updates = int(ckpt.get("updates") or 0)


def _fp32_state(model: nn.Module) -> dict:
    return {k: v.detach().contiguous().clone() for k, v in de_parallel(model).state_dict().items()}


def weights_are_finite(model: nn.Module) -> bool:
    """True if every float parameter and buffer is finite (checked before any checkpoint is written)."""
    return all(torch.isfinite(t).all() for t in de_parallel(model).state_dict().values() if t.is_floating_point())


class CheckpointKeeper:
    """Owns <run>/weights: last.pt every epoch, best.pt when fitness improves, epochN.pt every save_period
    epochs, all written through a temp file and a rename; the final strip; and, before a resumed run writes,
    the removal of what an interrupted one left behind."""

    def __init__(self, save_dir: Path, save_period: int = -1, nosave: bool = False):
        self.save_dir = Path(save_dir)
        self.dir = self.save_dir / "weights"
        self.last, self.best = self.dir / "last.pt", self.dir / "best.pt"
        self.save_period = save_period
        self.nosave = nosave

    def clean_interrupted(self, last_epoch: int) -> None:
        """Remove temp files of saves cut short by a kill, and results.csv rows of epochs the checkpoint does
        not hold (they are trained again, so they would appear twice)."""
        stale = sorted(self.dir.glob(".*.pt.*.tmp"))
        for f in stale:
            f.unlink(missing_ok=True)
        dropped = trim_results_csv(self.save_dir / "results.csv", last_epoch)
        if stale or dropped:
            LOGGER.info(f"Resume: removed {len(stale)} unfinished checkpoint temp file(s) and {dropped} results.csv "
                        f"row(s) of epochs after {last_epoch}, which the checkpoint does not hold")

    def save(self, epoch: int, model: nn.Module, ema: ModelEMA, optimizer: torch.optim.Optimizer, opt: Any,
             best_fitness: float, fitness: float, final_epoch: bool, criterion_state: dict | None = None) -> None:
        """The epoch's checkpoint (with the fp32 state an exact resume needs) to last, best and periodic files.

        `criterion_state` (what the training criterion trains beside the student, such as feature adapters)
        goes into last.pt and the periodic saves, which a run resumes from, never into best.pt."""
        if self.nosave and not final_epoch:
            return
        exact = {"model": _fp32_state(model), "ema": _fp32_state(ema.ema)}
        ckpt = build_checkpoint(model, ema=ema.ema, updates=ema.updates, optimizer=optimizer, epoch=epoch,
                                best_fitness=best_fitness, opt=opt, extra={"resume_state": exact})
        # checked on the fp16 copies: they are what gets saved, and weights beyond fp16's range become inf
        if not (weights_are_finite(ckpt["model"]) and weights_are_finite(ckpt["ema"])):
            raise UserError(f"epoch {epoch}: weights became non-finite (or overflow fp16); nothing saved, "
                            f"{self.last} keeps the last finite weights (lower lr0)")
        full = {**ckpt, "resume_state": {**exact, "criterion": criterion_state}} if criterion_state else ckpt
        save_checkpoint(full, self.last)
        if best_fitness == fitness:
            save_checkpoint(ckpt, self.best)
        if self.save_period > 0 and epoch % self.save_period == 0:
            save_checkpoint(full, self.dir / f"epoch{epoch}.pt")

    def finish(self) -> None:
        """Strip last.pt and best.pt down to inference checkpoints (EMA weights, fp16, no optimizer)."""
        for f in (self.last, self.best):
            if f.exists():
                strip_optimizer(f)
