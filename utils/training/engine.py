"""The training loop pieces: seeds, optimizer groups, LR schedule, EMA, early stopping, train_one_epoch."""
from __future__ import annotations

import ctypes
import logging
import math
import os
import random
import sys
from collections.abc import Callable, Mapping
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils.core.distributed import de_parallel
from utils.core.errors import UserError
from utils.core.hardware import cpu_supports_bf16

LOGGER = logging.getLogger("yolov5kd")
NBS = 64  # nominal batch size: gradients are accumulated up to it


def init_seeds(seed: int = 0, deterministic: bool = False) -> None:
    """Seed random, numpy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        os.environ["PYTHONHASHSEED"] = str(seed)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers, from glibc's malloc.h


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Let glibc keep freed blocks under `limit` bytes for reuse; True where that took effect (Linux, glibc)."""
    # PyTorch's CPU allocator mallocs every activation and gradient afresh each step. glibc serves blocks
    # above its mmap threshold (32 MB at most by default) with new pages and unmaps them on free, so every
    # step page-faults and zero-fills its whole working set again. Kept in the heap, the pages are reused:
    # YOLOv5n, batch 16, imgsz 320, 2 threads: one step alone 501 -> 396 ms with 4x fewer page faults; a whole
    # 2-epoch training process 0.965x the time at a peak RSS about 180 MB (10 %) higher.
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc: leave its defaults alone
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))


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

    def update_attr(self, model: nn.Module, include=("yaml", "nc", "hyp", "names", "stride", "class_weights")) -> None:
        """Copy the plain attributes train.py attaches to the model."""
        src = de_parallel(model)
        for k in include:
            if hasattr(src, k):
                setattr(self.ema, k, getattr(src, k))


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


_AMP_NAMES = {torch.float16: "fp16 autocast with GradScaler", torch.bfloat16: "bf16 autocast", None: "off (fp32)"}


AMP_CHOICES = ("auto", "on", "off")  # --amp values; --amp alone means on, --no-amp means off


def resolve_amp(flag: str | bool | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp: auto (the default) is fp16 on CUDA and bf16 on a CPU that runs bf16
    natively, fp32 elsewhere; on/off force it. None is what runs recorded before auto, resumed as they began."""
    if isinstance(flag, bool):  # recorded by runs before auto (--amp / --no-amp)
        flag = "on" if flag else "off"
    if flag not in (*AMP_CHOICES, None):
        raise UserError(f"--amp {flag}: must be one of {', '.join(AMP_CHOICES)}")
    why = "auto" if flag == "auto" else "requested" if flag else "as the run was recorded"
    if device.type == "cuda":
        dtype = None if flag == "off" else torch.float16
    elif device.type == "cpu":
        # bf16 autocast is only a default where the CPU has bf16 instructions: oneDNN emulates it elsewhere,
        # slower than fp32. None (the default before auto) stays fp32 on the CPU so a resumed run keeps its dtype.
        native = cpu_supports_bf16()
        dtype = torch.bfloat16 if flag == "on" or (flag == "auto" and native) else None
        if flag == "auto":
            why = "auto: CPU runs bf16 natively" if native else "auto: CPU has no native bf16"
        elif flag == "on" and not native:
            why = "requested; this CPU emulates bf16, which may be slower than fp32"
    else:
        if flag == "on":
            LOGGER.warning(f"WARNING: --amp is not supported on {device.type}; training in fp32")
        dtype = None
    LOGGER.info(f"AMP: {_AMP_NAMES[dtype]} ({why})")
    return dtype


class CompiledForward:
    """The student's forward through torch.compile; if compiling is unavailable or fails (no C++ compiler,
    unsupported platform or Python, old torch) one warning is logged and the forward runs eagerly.

    Only this callable holds the compiled wrapper: the module itself stays plain, so the EMA, the state_dict
    keys and the pickled checkpoints never see it."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.compiled: Callable | None = None
        try:
            self.compiled = torch.compile(model)
        except Exception as e:  # torch.compile missing (AttributeError) or refusing this platform
            self._fall_back(e)

    def _fall_back(self, e: BaseException) -> None:
        self.compiled = None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        LOGGER.warning(f"WARNING: --compile: torch.compile is unavailable or failed here ({type(e).__name__}: "
                       f"{first}); training eagerly")

    def __call__(self, x: torch.Tensor, **kwargs: Any):
        if self.compiled is not None:
            try:
                return self.compiled(x, **kwargs)
            except Exception as e:  # compilation is lazy: a missing compiler shows up at the first call
                self._fall_back(e)
        return self.model(x, **kwargs)


def accumulate_steps(batch_size: float) -> int:
    """Batches whose gradients are summed before each optimizer step, so every step sees ~NBS images."""
    return max(round(NBS / batch_size), 1)


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


def to_input(imgs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A loader's uint8 NCHW batch as the model's input: float in [0, 1] on `device`, channels_last."""
    # channels_last: the conv kernels on CPU (oneDNN) and on GPU tensor cores run faster in NHWC
    # uint8 crosses to the device (4x less to copy), then one pass converts layout and type
    return imgs.to(device, non_blocking=True).to(torch.float32, memory_format=torch.channels_last).div_(255)


@dataclass(frozen=True)
class StudentForward:
    """How the student runs in a training step: autocast dtype (None: fp32), an optional compiled forward and the
    DDP world size. A criterion calls it; the loop never runs the model itself."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    compiled: Callable | None = None
    world_size: int = 1

    def autocast(self) -> torch.autocast:
        """The autocast region the student's forward passes and the loss run in."""
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def __call__(self, model: nn.Module, imgs: torch.Tensor, features: bool = False) -> Any:
        """The student's raw maps for `imgs` (the compiled forward when there is one); with `features`,
        (raw maps, the head's input maps)."""
        return (self.compiled or model)(imgs, **({"features": True} if features else {}))

    def second_pass(self, model: nn.Module, imgs: torch.Tensor, features: bool = False) -> Any:
        """A second forward in the same step: DDP allows one forward per backward on the wrapped module, so a
        second pass runs on the bare module; its gradients join the first pass's before DDP's all-reduce."""
        run = de_parallel(model) if self.world_size > 1 else (self.compiled or model)
        return run(imgs, **({"features": True} if features else {}))


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


@dataclass(frozen=True)
class Optim:
    """What a step updates: the optimizer, its gradient scaler, and the EMA (None outside the main process)."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None = None
    extra: tuple[nn.Parameter, ...] = ()  # trained beside the model (a criterion's adapters), not in the EMA


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


def train_one_epoch(model: nn.Module, loader, criterion, optim: Optim, epoch: int, state: LoopState, cfg: LoopConfig,
                    on_batch: Callable | None = None) -> EpochResult:
    """Train for one epoch (warmup, accumulation to 64 images, clipping, EMA) with one criterion.

    `criterion(model, imgs, targets)` returns (loss, parts); the parts, whatever they are, become the progress
    columns and the epoch means. How the model is run (autocast, compiled forward) is the criterion's."""
    model.train()
    criterion.start_epoch(epoch)
    optimizer, scaler, ema = optim.optimizer, optim.scaler, optim.ema
    nb = len(loader)
    names = tuple(criterion.parts)
    det_parts = set(criterion.detection_parts)  # the rest come from whatever else the criterion adds
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
            LOGGER.warning(f"non-finite {_nonfinite_part(bad, det_parts)} at epoch {epoch}, batch {i} "
                           f"({dict(zip(names, items.tolist()))}); step skipped")
            if state.nonfinite >= MAX_NONFINITE:
                raise UserError(f"training diverged: non-finite {_nonfinite_part(bad, det_parts)} at epoch {epoch}, "
                                f"batch {i} ({state.nonfinite} batches in a row); {_nonfinite_advice(bad, det_parts)}."
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
                        f"{_nonfinite_part(bad, det_parts)} ({skipped} skipped); {_nonfinite_advice(bad, det_parts)}. "
                        f"Checkpoints already written keep the last finite weights")
    criterion.end_epoch()
    # Step what is left of the last accumulation now, so no gradient crosses the epoch's checkpoint.
    last_ni = i + nb * epoch
    if i >= 0 and state.last_opt_step < last_ni and any(p.grad is not None for p in model.parameters()):
        optimizer_step(model, optimizer, scaler, ema, optim.extra)
        state.last_opt_step = last_ni
    lrs = [x["lr"] for x in optimizer.param_groups]
    return EpochResult(mloss=dict(zip(names, mloss.cpu().tolist())), lrs=lrs, skipped=skipped)


def _nonfinite_part(bad: list[str], det_parts: set[str]) -> str:
    groups = [g for g, hit in (("detection loss", any(k in det_parts for k in bad)),
                               ("distillation loss", any(k not in det_parts for k in bad))) if hit]
    return f"{' and '.join(groups) or 'loss'} ({', '.join(bad)})" if bad else "loss"


def _nonfinite_advice(bad: list[str], det_parts: set[str]) -> str:
    if not bad or any(k in det_parts for k in bad):
        return "lower lr0 in the hyp file, and check the labels and the starting weights"
    return ("the distillation loss is at fault: check the teacher checkpoint, and lower distill_ratio or "
            "temperature")


def weights_are_finite(model: nn.Module) -> bool:
    """True if every float parameter and buffer is finite (checked before any checkpoint is written)."""
    return all(torch.isfinite(t).all() for t in de_parallel(model).state_dict().values() if t.is_floating_point())
