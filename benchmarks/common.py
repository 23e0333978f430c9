"""Shared set-up for the benchmarks: demo data, models, a training step with or without distillation."""
from __future__ import annotations

import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from models.yolo import Model  # noqa: E402
from optimizer.config import KDConfig  # noqa: E402
from optimizer.criterion import DetectionCriterion, Distiller  # noqa: E402
from optimizer.loss import OutputDistillationLoss  # noqa: E402
from optimizer.teacher import Teacher, load_teacher  # noqa: E402
from utils.datasets import check_dataset  # noqa: E402
from utils.engine import ModelEMA, build_optimizer  # noqa: E402
from utils.loss import ComputeLoss, scale_hyp  # noqa: E402

DEMO_TEACHER = ROOT / "checkpoint" / "yolov5s-shapes.pt"
torch.set_flush_denormal(True)  # as train.py does


def demo_data() -> dict:
    """The demo dataset dict (generated offline on first use)."""
    return check_dataset(ROOT / "data" / "shapes.yaml")


def load_hyp() -> dict:
    """hyp.scratch-low as a dict."""
    return yaml.safe_load((ROOT / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())


def student(nc: int, imgsz: int, hyp: dict, device: torch.device, cfg: str = "yolov5n.yaml") -> torch.nn.Module:
    """A from-scratch student with the train-time hyp attached, as train.py builds it."""
    m = Model(cfg, nc=nc).to(device).to(memory_format=torch.channels_last)
    m.nc, m.hyp = nc, scale_hyp(hyp, 3, nc, imgsz)
    return m


def teacher(nc: int, device: torch.device) -> Teacher:
    """The shipped demo teacher, or a random yolov5s of the same shape when it is absent."""
    if DEMO_TEACHER.exists():
        t = load_teacher(DEMO_TEACHER, device=device)
    else:
        t = Teacher(Model("yolov5s.yaml", nc=nc).to(device).eval().fuse(), path="random yolov5s",
                    half=device.type == "cuda")
    t.model.to(memory_format=torch.channels_last)  # as train.py sets it up
    return t


def criterion_for(model: torch.nn.Module, imgsz: int, device: torch.device, kd: bool) -> DetectionCriterion:
    """train.py's criterion: the detection loss, or detection + distillation from the demo teacher."""
    if not kd:
        return DetectionCriterion(ComputeLoss(model))
    t = teacher(int(model.nc), device)
    return Distiller(KDConfig(t_weights=t.path), ComputeLoss(model), t, model, imgsz)


class Stepper:
    """One optimizer step of train.py's loop (no accumulation), optionally with distillation."""

    def __init__(self, model, hyp: dict, device: torch.device, teacher: Teacher | None = None, amp: bool = False):
        self.model, self.device, self.teacher, self.amp = model, device, teacher, amp
        self.opt = build_optimizer(model, "SGD", hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
        self.loss = ComputeLoss(model)
        self.kd = OutputDistillationLoss(model) if teacher is not None else None
        self.ema = ModelEMA(model)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def __call__(self, imgs: torch.Tensor, targets: torch.Tensor) -> float:
        imgs = imgs.to(self.device, non_blocking=True, memory_format=torch.channels_last).float() / 255
        t_maps = self.teacher(imgs) if self.kd is not None else None  # teacher first, as train_one_epoch does
        with torch.autocast(device_type=self.device.type, enabled=self.amp):
            pred = self.model(imgs)
            loss, _ = self.loss(pred, targets.to(self.device))
        if self.kd is not None:
            loss = loss + self.kd(pred, t_maps)[0]
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.model)
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
