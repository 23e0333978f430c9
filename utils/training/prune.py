"""Structured channel pruning of a YOLOv5 DetectionModel, on Torch-Pruning's dependency graph.

Torch-Pruning traces the model once and groups every set of channels that must go together (a C3's
residual chain, the inputs of a Concat, SPPF's pooled copies, the Detect convs' inputs); this module only
chooses what to prune and checks the result. The Detect output convolutions are never pruned, so nc,
anchors, strides and the output shapes stay as they were.

prune.py (the command line) wires it: load, measure, `prune_model`, measure, `save_pruned`.
"""
from __future__ import annotations

import hashlib
import logging
import statistics
import time
from copy import deepcopy
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from models.yolo import Detect, model_gflops
from utils.core.config import yaml_save
from utils.core.errors import UserError
from utils.training.checkpoint import build_checkpoint, model_from_ckpt, save_checkpoint, torch_load
from utils.training.loss import ComputeLoss, scale_hyp

LOGGER = logging.getLogger("yolov5kd")

IMPORTANCE = ("l1", "l2", "bn", "lamp", "taylor")
RECIPE_KEY = "prune"  # the checkpoint key (a plain dict) and the name of the yaml written beside the file


def check_options(ratio: float, importance: str, round_to: int | None, has_data: bool) -> None:
    """Refuse option values that cannot give a pruned model, before anything is loaded."""
    if not 0.0 < ratio < 1.0:
        raise UserError(f"--ratio {ratio}: must be between 0 and 1 (the share of channels removed), exclusive")
    if importance not in IMPORTANCE:
        raise UserError(f"--importance {importance}: not one of {', '.join(IMPORTANCE)}")
    if round_to is not None and round_to < 1:
        raise UserError(f"--round-to {round_to}: must be a positive number of channels")
    if importance == "taylor" and not has_data:
        raise UserError("--importance taylor ranks channels by gradients of the detection loss, so it needs "
                        "labelled images: give --data")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def load_detection_model(path: str | Path, trust: bool = False) -> nn.Module:
    """The fp32 DetectionModel of a checkpoint (EMA first), through the safe loader; refuses anything else."""
    model = model_from_ckpt(torch_load(path, trust=trust), path)
    layers = getattr(model, "model", None)
    last = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    if not isinstance(last, Detect):
        what = type(last).__name__ if last is not None else type(model).__name__
        raise UserError(f"{path}: holds no detection model (its last layer is {what}, not a YOLOv5 Detect head)")
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def raw_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The Detect convolutions' outputs, before the head reshapes and decodes them.

    This is what Torch-Pruning traces: the model's own forward ends in Detect's view/permute (and, in eval mode,
    grid decoding and a tuple), none of which carries channel structure worth tracing, while these maps keep
    the Detect convs in the graph, so the channels feeding them are pruned with their producers."""
    cache: list[Any] = []
    for layer in model.model[:-1]:
        if layer.f != -1:
            x = cache[layer.f] if isinstance(layer.f, int) else [x if j == -1 else cache[j] for j in layer.f]
        x = layer(x)
        cache.append(x)
    head = model.model[-1]
    inputs = [x if j == -1 else cache[j] for j in head.f]
    return [conv(t) for conv, t in zip(head.m, inputs)]


def tracing_input(model: nn.Module) -> torch.Tensor:
    """A small blank image: two cells of the coarsest level on each side."""
    s = 2 * int(model.stride.max())
    ch = model.yaml.get("ch", 3) if isinstance(getattr(model, "yaml", None), dict) else 3
    p = next(model.parameters())
    return torch.zeros(1, ch, s, s, device=p.device, dtype=p.dtype)


def make_importance(name: str):
    """Torch-Pruning's importance criterion for one of IMPORTANCE."""
    import torch_pruning as tp

    imp = tp.importance
    table = {
        "l1": lambda: imp.MagnitudeImportance(p=1),
        "l2": lambda: imp.MagnitudeImportance(p=2),
        "bn": imp.BNScaleImportance,
        "lamp": lambda: imp.LAMPImportance(p=2),
        "taylor": imp.TaylorImportance,
    }
    return table[name]()


def detection_gradients(model: nn.Module, batches: Iterable, hyp: dict, imgsz: int) -> int:
    """Accumulate the detection loss's gradients over labelled batches (for the taylor criterion).

    BatchNorm stays in eval mode (running statistics untouched, as the deployed model computes); only the Detect
    head runs its training branch, which returns the raw maps the loss reads. Returns the images seen."""
    head = model.model[-1]
    gains = scale_hyp(hyp, head.nl, head.nc, imgsz)
    criterion = ComputeLoss(model, hyp=gains)
    device = next(model.parameters()).device
    model.eval()
    head.train()
    model.zero_grad(set_to_none=True)
    seen = 0
    try:
        for imgs, targets, *_ in batches:
            if not len(imgs):
                continue
            imgs = imgs.to(device).float() / 255
            loss, _ = criterion(model(imgs), targets.to(device))
            loss.backward()
            seen += len(imgs)
    finally:
        head.eval()
    if not seen:
        raise UserError("--importance taylor: the dataset's train split gave no images to compute gradients on")
    return seen


def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


def _channels(module: nn.Module) -> int | None:
    for attr in ("out_channels", "num_features", "out_features"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    return None


def prune_model(model: nn.Module, ratio: float, importance: str = "l1", global_pruning: bool = False,
                round_to: int | None = None, batches: Iterable | None = None, hyp: dict | None = None,
                imgsz: int = 640) -> nn.Module:
    """Remove `ratio` of the prunable channels of `model` in place and return it (fp32, eval mode).

    Local pruning (the default) removes `ratio` of every coupled channel group; --global ranks all groups'
    channels together, so some layers lose more and others less. `round_to` keeps each pruned group's width a
    multiple of that number. taylor needs `batches` (labelled loader batches) and `hyp` (loss gains).
    Raises UserError, leaving the model partly pruned, when a group would lose every channel."""
    import torch_pruning as tp

    if importance == "taylor" and (batches is None or hyp is None):
        raise UserError("--importance taylor needs labelled batches (give --data)")
    model.float().eval()
    for p in model.parameters():
        p.requires_grad_(True)  # the tracer follows autograd; a stripped checkpoint has requires_grad off
    head = model.model[-1]
    example = tracing_input(model)
    with torch.no_grad():
        shapes_before = [t.shape for t in raw_maps(model, example)]
    kept = {"nc": head.nc, "na": head.na, "no": head.no, "anchors": head.anchors.clone(),
            "stride": head.stride.clone()}

    pruner_class = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner  # MetaPruner before 1.6
    pruner = pruner_class(
        model, example, make_importance(importance), global_pruning=global_pruning, pruning_ratio=ratio,
        ignored_layers=[head.m], round_to=round_to, forward_fn=raw_maps)
    if importance == "taylor":
        detection_gradients(model, batches, hyp, imgsz)

    # Torch-Pruning silently leaves alone a group it would empty; that is a refusal here, so wrap its check
    emptied: list[Any] = []
    check = pruner.DG.check_pruning_group

    def check_and_note(group) -> bool:
        ok = check(group)
        if not ok:
            emptied.append(group)
        return ok

    pruner.DG.check_pruning_group = check_and_note
    try:
        with torch.no_grad():
            for group in pruner.step(interactive=True):
                group.prune()
    finally:
        pruner.DG.check_pruning_group = check
        model.zero_grad(set_to_none=True)
    if emptied:
        raise UserError(_emptied_message(model, emptied[0], ratio, round_to, global_pruning))

    finish_pruned(model)
    with torch.no_grad():
        shapes_after = [t.shape for t in raw_maps(model, example)]
    if shapes_after != shapes_before or head.nc != kept["nc"] or head.na != kept["na"] or head.no != kept["no"] \
            or not torch.equal(head.anchors, kept["anchors"]) or not torch.equal(head.stride, kept["stride"]):
        raise RuntimeError("pruning changed the Detect head; this is a bug, please report it")  # never expected
    return model


def _emptied_message(model: nn.Module, group, ratio: float, round_to: int | None, global_pruning: bool) -> str:
    """Which layer a group refused by Torch-Pruning belongs to, and which option to change."""
    dep, idxs = group[0]
    module = dep.target.module
    name = _module_names(model).get(module, type(module).__name__)
    width = _channels(module)
    left = "" if width is None else f" ({width} channels, {len(idxs)} to remove)"
    keep = None if width is None else int(width * (1 - ratio))
    if round_to and not global_pruning and keep:
        return (f"--round-to {round_to} would leave {name} with no channel{left}: keeping {keep} of them, rounded "
                f"down to a multiple of {round_to}, is none; use a smaller --round-to or a lower --ratio")
    if global_pruning:
        return (f"--ratio {ratio} with --global would leave {name} with no channel{left}; use a lower --ratio "
                f"or drop --global")
    return f"--ratio {ratio} would leave {name} with no channel{left}; use a lower --ratio"


def finish_pruned(model: nn.Module) -> None:
    """Bring the attributes that record sizes up to date after pruning.

    Conv, C3, SPPF, Bottleneck and Concat keep no width of their own (the tensors and Torch-Pruning's updated
    Conv2d/BatchNorm2d attributes are the truth; Bottleneck's `add` stays right because both sides of a residual
    sum are one channel group); only the builder's per-layer parameter count `np` is stale.
    The yaml dict no longer gives the widths: it is marked pruned, so nothing rebuilds the model from it
    believing it would get these tensors' shapes."""
    for layer in model.model:
        if hasattr(layer, "np"):
            layer.np = sum(p.numel() for p in layer.parameters())
    if isinstance(getattr(model, "yaml", None), dict):
        model.yaml = {**model.yaml, "pruned": True}


def measure_latency(models: list[nn.Module], imgsz: int, runs: int = 10, warmup: int = 2) -> list[float | None]:
    """Median CPU milliseconds of one batch-1 forward at imgsz for each model, on fused fp32 copies (as val.py
    and detect.py run a checkpoint). The models take turns, run by run, so a load that comes and goes on the
    machine weighs on all of them alike. All None when runs is 0."""
    if runs <= 0:
        return [None] * len(models)
    copies = []
    for model in models:
        m = deepcopy(model).float().cpu().eval()
        copies.append(m.fuse() if hasattr(m, "fuse") else m)
    times: list[list[float]] = [[] for _ in copies]
    with torch.inference_mode():
        for i in range(warmup + runs):
            for m, t in zip(copies, times):
                ch = m.yaml.get("ch", 3) if isinstance(getattr(m, "yaml", None), dict) else 3
                x = torch.zeros(1, ch, imgsz, imgsz)
                t0 = time.perf_counter()
                m(x)
                if i >= warmup:
                    t.append((time.perf_counter() - t0) * 1000)
    return [statistics.median(t) for t in times]


def summarise(model: nn.Module, imgsz: int) -> dict:
    """Parameters and GFLOPs at imgsz of a model."""
    return {"params": parameter_count(model), "gflops": model_gflops(model, imgsz)}


def make_recipe(source: str | Path, ratio: float, importance: str, global_pruning: bool, round_to: int | None,
                imgsz: int, before: dict, after: dict, data: str | None = None, extra: dict | None = None) -> dict:
    """What was done, as plain values (the safe loader reads it back without an allow-list entry)."""
    import torch_pruning as tp

    recipe = {
        "source": str(source),
        "source_sha256": file_sha256(source),
        "ratio": float(ratio),
        "importance": importance,
        "global": bool(global_pruning),
        "round_to": None if round_to is None else int(round_to),
        "imgsz": int(imgsz),
        "data": None if data is None else str(data),
        "date": datetime.now().isoformat(timespec="seconds"),
        "torch_pruning": str(getattr(tp, "__version__", "unknown")),
        "params_before": int(before["params"]),
        "params_after": int(after["params"]),
        "gflops_before": round(float(before["gflops"]), 3),
        "gflops_after": round(float(after["gflops"]), 3),
    }
    for k in ("latency_ms",):
        if before.get(k) is not None and after.get(k) is not None:
            recipe[f"{k}_before"] = round(float(before[k]), 2)
            recipe[f"{k}_after"] = round(float(after[k]), 2)
    recipe.update(extra or {})
    return recipe


def save_pruned(model: nn.Module, recipe: dict, save_dir: Path) -> Path:
    """Write save_dir/pruned.pt (official layout: fp16 pickled model, contiguous, epoch -1, no optimizer) with the
    recipe under RECIPE_KEY, and save_dir/prune.yaml with the same recipe. Returns the checkpoint path."""
    m = deepcopy(model).float()
    for p in m.parameters():
        p.requires_grad_(False)  # an inference-ready file, as strip_optimizer leaves a finished run's
        p.grad = None
    ckpt = build_checkpoint(m, epoch=-1, extra={RECIPE_KEY: dict(recipe)})
    save_dir.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(ckpt, save_dir / "pruned.pt")
    yaml_save(save_dir / f"{RECIPE_KEY}.yaml", dict(recipe))
    return path
