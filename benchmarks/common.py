"""Shared set-up for the benchmarks: demo data, models, a training step with or without distillation."""
from __future__ import annotations

import resource
from pathlib import Path

import torch
import yaml

from models.yolo import Model, to_training_layout
from optimizer.config import KDConfig
from optimizer.criterion import DetectionCriterion, Distiller, Student
from optimizer.teacher import Teacher, load_teacher, resolve_teacher_precision
from optimizer.terms.features import FEAT_WARMUP_EPOCHS
from utils.core.runtime import keep_freed_memory
from utils.data.datasets import DatasetSpec, check_dataset
from utils.data.unlabeled import UnlabeledStream
from utils.training.forward import StudentForward, resolve_amp, to_input
from utils.training.loss import ComputeLoss, scale_hyp
from utils.training.optim import ModelEMA, build_optimizer, optimizer_step

ROOT = Path(__file__).resolve().parents[1]

DEMO_TEACHER = ROOT / "checkpoint" / "yolov5s-shapes.pt"
torch.set_flush_denormal(True)  # as train.py does
keep_freed_memory()  # likewise


def demo_data() -> DatasetSpec:
    """The demo dataset (generated offline on first use)."""
    return check_dataset(ROOT / "data" / "shapes.yaml")


def load_hyp() -> dict:
    """hyp.scratch-low as a dict."""
    return yaml.safe_load((ROOT / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())


def student(nc: int, imgsz: int, hyp: dict, device: torch.device, cfg: str = "yolov5n.yaml") -> torch.nn.Module:
    """A from-scratch student with the train-time hyp attached, as train.py builds it."""
    m = to_training_layout(Model(cfg, nc=nc).to(device))
    m.nc, m.hyp = nc, scale_hyp(hyp, 3, nc, imgsz)
    return m


def teacher(nc: int, device: torch.device, precision: str = "auto") -> Teacher:
    """The shipped demo teacher at `precision` (as --teacher-precision), or a random yolov5s of the same shape
    when it is absent."""
    if DEMO_TEACHER.exists():
        t = load_teacher(DEMO_TEACHER, device=device, precision=precision)
    else:
        t = Teacher(Model("yolov5s.yaml", nc=nc).to(device).eval().fuse(), path="random yolov5s",
                    precision=resolve_teacher_precision(precision, device)[0])
    t.model.to(memory_format=torch.channels_last)  # as train.py sets it up
    return t


def criterion_for(model: torch.nn.Module, imgsz: int, forward: StudentForward, kd: bool,
                  teacher_precision: str = "auto", unlabeled: UnlabeledStream | None = None) -> DetectionCriterion:
    """train.py's criterion: the detection loss, or detection + distillation from the demo teacher."""
    if not kd:
        return DetectionCriterion(ComputeLoss(model), forward)
    t = teacher(int(model.nc), forward.device, teacher_precision)
    return Distiller(KDConfig(t_weights=t.path), t, Student(model, ComputeLoss(model), forward, imgsz), unlabeled)


class Stepper:
    """One optimizer step of train.py's loop (the criterion's step and optim's optimizer_step, no accumulation),
    with the plain criterion or, given a teacher, the distilling one."""

    def __init__(self, model, hyp: dict, device: torch.device, teacher: Teacher | None = None, amp: bool = False,
                 imgsz: int = 320, feat_kd: str = "none", feat_ratio: float = 1.0):
        self.model, self.device, self.amp = model, device, amp
        forward = StudentForward(device, resolve_amp("on", device) if amp else None)
        self.criterion = (DetectionCriterion(ComputeLoss(model), forward) if teacher is None else
                          Distiller(KDConfig(t_weights=teacher.path, feat_kd=feat_kd, feat_ratio=feat_ratio), teacher,
                                    Student(model, ComputeLoss(model), forward, imgsz)))
        # the steady state: past the feature adapters' warm-up epoch, and without the first-epoch balance report
        # (its extra gradients, for feature terms)
        self.criterion.start_epoch(FEAT_WARMUP_EPOCHS)
        if teacher is not None:
            self.criterion.balance.reported = True
        extra = self.criterion.trainable()
        self.extra = tuple(extra.parameters()) if extra is not None else ()
        self.opt = build_optimizer(model, "SGD", hyp["lr0"], hyp["momentum"], hyp["weight_decay"], extra=extra)
        self.ema = ModelEMA(model)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")

    def __call__(self, imgs: torch.Tensor, targets: torch.Tensor) -> float:
        loss, _ = self.criterion(self.model, to_input(imgs, self.device), targets)
        self.scaler.scale(loss).backward()
        optimizer_step(self.model, self.opt, self.scaler, self.ema, self.extra)
        return float(loss.detach())


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MB: CUDA max allocated, or peak RSS on CPU (loader workers excluded)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize()
