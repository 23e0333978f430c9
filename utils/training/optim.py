"""What updates the student's weights, and when training stops: optimizer groups, gradient accumulation to the
nominal batch, the LR schedule, one optimizer step (clip, step, EMA), the EMA itself and early stopping."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass

import torch
import torch.nn as nn

from utils.core.distributed import de_parallel
from utils.core.errors import UserError

LOGGER = logging.getLogger("yolov5kd")
NBS = 64  # nominal batch size: gradients are accumulated up to it


def accumulate_steps(batch_size: float) -> int:
    """Batches whose gradients are summed before each optimizer step, so every step sees ~NBS images."""
    return max(round(NBS / batch_size), 1)


def build_optimizer(model: nn.Module, name: str = "SGD", lr: float = 0.001, momentum: float = 0.9,
                    decay: float = 1e-5, extra: nn.Module | None = None) -> torch.optim.Optimizer:
    """Three groups in YOLOv5's order: biases (no decay), other weights (decay), norm weights (no decay). The
    parameters of `extra` (what a criterion trains beside the model) join the same groups, after the model's."""
    biases, weights, norm_weights = [], [], []
    norm_types = tuple(v for k, v in nn.__dict__.items() if "Norm" in k and isinstance(v, type))
    modules = list(de_parallel(model).modules()) + (list(extra.modules()) if extra is not None else [])
    for module in modules:
        for p_name, p in module.named_parameters(recurse=False):
            if p_name == "bias":
                biases.append(p)
            elif p_name == "weight" and isinstance(module, norm_types):
                norm_weights.append(p)
            else:
                weights.append(p)
    if name == "Adam":
        opt = torch.optim.Adam(biases, lr=lr, betas=(momentum, 0.999))
    elif name == "AdamW":
        opt = torch.optim.AdamW(biases, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    elif name == "SGD":
        opt = torch.optim.SGD(biases, lr=lr, momentum=momentum, nesterov=True)
    else:
        raise UserError(f"--optimizer {name}: unknown (choose SGD, Adam or AdamW)")
    opt.add_param_group({"params": weights, "weight_decay": decay})
    opt.add_param_group({"params": norm_weights, "weight_decay": 0.0})
    LOGGER.info(f"optimizer: {name}(lr={lr}) with parameter groups {len(norm_weights)} weight(decay=0.0), "
                f"{len(weights)} weight(decay={decay}), {len(biases)} bias")
    return opt


def lr_lambda(epochs: int, lrf: float, cos_lr: bool = False) -> Callable[[int], float]:
    """The per-epoch LR multiplier: linear from 1 to lrf, or a half cosine."""
    if cos_lr:
        return lambda x: ((1 - math.cos(x * math.pi / epochs)) / 2) * (lrf - 1) + 1
    return lambda x: (1 - x / epochs) * (1.0 - lrf) + lrf


def build_scheduler(optimizer: torch.optim.Optimizer, lf: Callable[[int], float], start_epoch: int = 0,
                    optimizer_state: dict | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepped per epoch; when resuming, the optimizer state (with its LRs) is loaded after it."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lf)
    if optimizer_state is not None:
        # LambdaLR's constructor resets every group's lr to lf(0)*initial_lr: restore the saved ones after it
        optimizer.load_state_dict(optimizer_state)
    scheduler.last_epoch = start_epoch - 1
    return scheduler


class ModelEMA:
    """Exponential moving average of the model's float state (parameters and buffers)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0):
        self.ema = deepcopy(de_parallel(model)).eval()
        self.updates = updates
        self.decay_fn = lambda x: decay * (1 - math.exp(-x / tau))
        for p in self.ema.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the current model into the average (one optimizer step)."""
        self.updates += 1
        d = self.decay_fn(self.updates)
        msd = de_parallel(model).state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)

    def update_attr(self, model: nn.Module, include=("yaml", "nc", "hyp", "names", "stride")) -> None:
        """Copy the plain attributes train.py attaches to the model."""
        src = de_parallel(model)
        for k in include:
            if hasattr(src, k):
                setattr(self.ema, k, getattr(src, k))


@dataclass(frozen=True)
class Optim:
    """What a step updates: the optimizer, its gradient scaler, and the EMA (None outside the main process)."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None = None
    extra: tuple[nn.Parameter, ...] = ()  # trained beside the model (a criterion's adapters), not in the EMA


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler, ema: ModelEMA | None,
                   extra: tuple[nn.Parameter, ...] = ()) -> None:
    """Unscale, clip the gradient norm to 10 (the model's, and `extra`'s on their own), step, zero the gradients
    and update the EMA."""
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
    if extra:  # clipped apart, so the student's own clipping is what it would be without them
        torch.nn.utils.clip_grad_norm_(extra, max_norm=10.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model)


class EarlyStopping:
    """Stop when fitness has not improved for `patience` epochs (0 = never)."""

    def __init__(self, patience: int = 30):
        self.best_fitness = -1.0
        self.best_epoch = 0
        self.patience = patience or float("inf")
        self.possible_stop = False

    def __call__(self, epoch: int, fitness: float) -> bool:
        if fitness > self.best_fitness:
            self.best_epoch = epoch
            self.best_fitness = fitness
        delta = epoch - self.best_epoch
        self.possible_stop = delta >= (self.patience - 1)
        stop = delta >= self.patience
        if stop:
            LOGGER.info(f"Stopping training early as no improvement observed in last {self.patience} epochs. "
                        f"Best results observed at epoch {self.best_epoch}.")
        return stop
