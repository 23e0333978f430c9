"""The training loop: train_one_epoch (warmup, accumulation to the nominal batch, multi-scale, the non-finite
guard, the optimizer steps) and the state and settings it carries."""
from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils.core.errors import UserError
from utils.training.forward import to_input
from utils.training.optim import NBS, Optim, accumulate_steps, optimizer_step

LOGGER = logging.getLogger("yolov5kd")


@dataclass(frozen=True)
class LoopConfig:
    """The settings of train_one_epoch that stay fixed over a training."""

    epochs: int
    device: torch.device
    warmup: Mapping[str, float]  # warmup_bias_lr, warmup_momentum, momentum
    lf: Callable[[int], float]
    batch_size: int
    nw: int  # warmup iterations
    imgsz: int
    gs: int
    world_size: int = 1
    multi_scale: bool = False
    show_progress: bool = True


@dataclass
class LoopState:
    """What the loop carries from one batch (and epoch) to the next."""

    last_opt_step: int = -1
    nonfinite: int = 0  # consecutive batches whose loss was not finite


@dataclass
class EpochResult:
    """Epoch means of the criterion's loss parts (in its order), plus the LRs used in its last iteration."""

    mloss: dict[str, float]
    lrs: list[float]
    skipped: int


MAX_NONFINITE = 3  # consecutive non-finite losses tolerated (each skipped) before training stops


def train_one_epoch(model: nn.Module, loader, criterion, optim: Optim, epoch: int, state: LoopState, cfg: LoopConfig,
                    on_batch: Callable | None = None) -> EpochResult:
    """Train for one epoch (warmup, accumulation to 64 images, clipping, EMA) with one criterion.

    `criterion(model, imgs, targets)` returns (loss, parts); the parts, whatever they are, become the progress
    columns and the epoch means. How the model is run (autocast, compiled forward) is the criterion's, and so is
    the advice when non-finite losses stop the training (`criterion.nonfinite_advice(parts)`)."""
    model.train()
    criterion.start_epoch(epoch)
    optimizer, scaler, ema = optim.optimizer, optim.scaler, optim.ema
    nb = len(loader)
    names = tuple(criterion.parts)
    mloss = torch.zeros(len(names), device=cfg.device)
    skipped = 0
    accumulate = accumulate_steps(cfg.batch_size)
    pbar = enumerate(loader)
    if cfg.show_progress:
        figures = set(criterion.figures)  # counts, not losses: shown under their own name
        # a name that leaves no space in its 11-character column is shown bare (pseudo_loss as pseudo)
        cols = ("Epoch", "GPU_mem", *(k if k in figures or len(k) > 5 else f"{k}_loss" for k in names),
                "Instances", "Size")
        LOGGER.info(("\n" + "%11s" * len(cols)) % cols)
        pbar = tqdm(pbar, total=nb, bar_format="{l_bar}{bar:10}{r_bar}")
        if criterion.progress_note:
            pbar.set_postfix_str(criterion.progress_note, refresh=False)
    optimizer.zero_grad(set_to_none=True)
    i = -1
    bad: list[str] = []
    for i, (imgs, targets, paths, _) in pbar:
        ni = i + nb * epoch
        imgs = to_input(imgs, cfg.device)
        if ni <= cfg.nw:
            accumulate = _warmup(optimizer, ni, cfg.nw, epoch, cfg.lf, cfg.warmup, cfg.batch_size)
        if cfg.multi_scale:
            imgs = _multi_scale(imgs, cfg.imgsz, cfg.gs)
        loss, parts = criterion(model, imgs, targets)
        if cfg.world_size > 1:
            loss = loss * cfg.world_size  # DDP averages gradients across ranks
        items = torch.stack([parts[k].reshape(()).float() for k in names])

        if not torch.isfinite(loss).all():
            state.nonfinite += 1
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            bad = [k for k, v in zip(names, items.tolist()) if not math.isfinite(v)]
            LOGGER.warning(f"non-finite {_nonfinite_part(bad)} at epoch {epoch}, batch {i} "
                           f"({dict(zip(names, items.tolist()))}); step skipped")
            if state.nonfinite >= MAX_NONFINITE:
                raise UserError(f"training diverged: non-finite {_nonfinite_part(bad)} at epoch {epoch}, "
                                f"batch {i} ({state.nonfinite} batches in a row); {criterion.nonfinite_advice(bad)}."
                                f" Checkpoints already written keep the last finite weights")
            continue
        state.nonfinite = 0
        scaler.scale(loss).backward()

        if ni - state.last_opt_step >= accumulate:
            optimizer_step(model, optimizer, scaler, ema, optim.extra)
            state.last_opt_step = ni

        mloss = (mloss * (i - skipped) + items) / (i - skipped + 1)
        if cfg.show_progress:
            mem = f"{torch.cuda.memory_reserved(cfg.device) / 1e9 if cfg.device.type == 'cuda' else 0:.3g}G"
            pbar.set_description(("%11s" * 2 + "%11.4g" * (len(mloss) + 2)) %
                                 (f"{epoch}/{cfg.epochs - 1}", mem, *mloss.tolist(), targets.shape[0], imgs.shape[-1]))
        if on_batch is not None:
            on_batch(ni, imgs, targets, paths)

    if i >= 0 and skipped == i + 1:
        raise UserError(f"training diverged: every batch of epoch {epoch} had a non-finite "
                        f"{_nonfinite_part(bad)} ({skipped} skipped); {criterion.nonfinite_advice(bad)}. "
                        f"Checkpoints already written keep the last finite weights")
    criterion.end_epoch()
    # Step what is left of the last accumulation now, so no gradient crosses the epoch's checkpoint.
    last_ni = i + nb * epoch
    if i >= 0 and state.last_opt_step < last_ni and any(p.grad is not None for p in model.parameters()):
        optimizer_step(model, optimizer, scaler, ema, optim.extra)
        state.last_opt_step = last_ni
    lrs = [x["lr"] for x in optimizer.param_groups]
    return EpochResult(mloss=dict(zip(names, mloss.cpu().tolist())), lrs=lrs, skipped=skipped)


def _warmup(optimizer, ni: int, nw: int, epoch: int, lf, hyp: Mapping[str, float], batch_size: int) -> int:
    xi = [0, nw]
    # during warmup the accumulation ramps from 1 batch up to accumulate_steps(), like the learning rate
    accumulate = max(1, round(float(np.interp(ni, xi, [1, NBS / batch_size]))))
    for j, x in enumerate(optimizer.param_groups):
        x["lr"] = float(np.interp(ni, xi, [hyp["warmup_bias_lr"] if j == 0 else 0.0, x["initial_lr"] * lf(epoch)]))
        if "momentum" in x:
            x["momentum"] = float(np.interp(ni, xi, [hyp["warmup_momentum"], hyp["momentum"]]))
    return accumulate


def _multi_scale(imgs: torch.Tensor, imgsz: int, gs: int) -> torch.Tensor:
    sz = random.randrange(int(imgsz * 0.5), int(imgsz * 1.5) + gs) // gs * gs
    sf = sz / max(imgs.shape[2:])
    if sf != 1:
        ns = [math.ceil(x * sf / gs) * gs for x in imgs.shape[2:]]
        imgs = F.interpolate(imgs, size=ns, mode="bilinear", align_corners=False)
    return imgs


def _nonfinite_part(bad: list[str]) -> str:
    return f"loss ({', '.join(bad)})" if bad else "loss"
