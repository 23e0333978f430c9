"""Safe checkpoint loading (weights_only + allow-list), official-format atomic saving, stripping."""
from __future__ import annotations

import argparse
import collections
import logging
import os
import pathlib
import pickle
import pickletools
import zipfile
from copy import deepcopy
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from models import common, yolo
from utils.core.config import atomic_write
from utils.core.distributed import de_parallel  # re-exported: older callers import it from here
from utils.core.errors import UserError

LOGGER = logging.getLogger("yolov5kd")

# Everything an official YOLOv5 (v5.0 … v7.0) or our own checkpoint may reference. Nothing else is
# unpickled unless the user passes --trust-checkpoint.
_TORCH_NN = [nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Conv2d, nn.BatchNorm2d, nn.SiLU, nn.Hardswish,
             nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.Mish, nn.GELU, nn.Identity, nn.MaxPool2d, nn.Upsample]
_OURS = [yolo.DetectionModel, yolo.Detect, common.Conv, common.DWConv, common.Bottleneck,
         common.BottleneckCSP, common.C3, common.SPP, common.SPPF, common.Focus, common.Concat]
_NUMPY: list[Any] = [np.ndarray, np.dtype]
for _mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
    for _fn in ("_reconstruct", "scalar"):
        _obj = getattr(getattr(np, "_core", np.core).multiarray, _fn)
        _NUMPY.append((_obj, f"{_mod}.{_fn}"))
_NUMPY += [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "bool")]
_OTHER: list[Any] = [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath,
                     set, collections.OrderedDict, argparse.Namespace, (yolo.DetectionModel, "models.yolo.Model")]
ALLOWED_GLOBALS: list[Any] = _TORCH_NN + _OURS + _NUMPY + _OTHER


def _allowed_names() -> set[str]:
    names = set()
    for g in ALLOWED_GLOBALS:
        if isinstance(g, tuple):
            names.add(g[1])
        else:
            names.add(f"{g.__module__}.{g.__qualname__}")
    return names


def torch_load(path: str | Path, trust: bool = False, map_location: str | torch.device = "cpu") -> Any:
    """Load a torch file; weights_only with the allow-list unless trust=True. Bad files raise UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file, not a checkpoint")
    if trust:
        LOGGER.warning(f"{path}: loading with full unpickling (--trust-checkpoint); only do this for files you trust")
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e:
            raise UserError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    # Name the offending class before anything is unpickled (these scans read opcodes, run nothing).
    if zipfile.is_zipfile(path):
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - _allowed_names()
        except Exception:
            unsafe = set()
    else:  # a raw pickle or torch's legacy (pre-1.6) format: a few pickles one after another
        # torch's own tensor-rebuild functions and storage types are what weights_only accepts natively
        unsafe = {g for g in _pickle_globals(path) - _allowed_names() if not g.startswith("torch.")}
    if unsafe:
        raise UserError(f"{path}: refused: it references {', '.join(sorted(unsafe))}, which is not on the "
                        f"checkpoint allow-list; pass --trust-checkpoint only if you trust this file")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's text advises weights_only=False; ours names the cause and the explicit opt-in instead
        raise UserError(f"{path}: refused by the safe loader ({_weights_only_reason(e)}); pass --trust-checkpoint "
                        f"only if you trust this file") from None
    except Exception as e:  # torch raises many types for damaged files; all mean the same to the user
        raise UserError(f"{path}: truncated or not a torch checkpoint ({_first_line(e)})") from None


def _pickle_globals(path: Path, max_pickles: int = 8) -> set[str]:
    """'module.name' of every global the pickle stream(s) in a file would import, read without running it."""
    found: set[str] = set()
    try:
        with open(path, "rb") as f:
            for _ in range(max_pickles):
                strings: list[str] = []
                for op, arg, _pos in pickletools.genops(f):
                    if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                        strings.append(str(arg))
                    elif op.name == "GLOBAL":
                        found.add(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.add(f"{strings[-2]}.{strings[-1]}")
                if not f.peek(1):
                    break
    except Exception:
        pass  # damaged or not a pickle: torch.load below reports that
    return found


def _weights_only_reason(e: BaseException) -> str:
    """The line of torch's weights_only error that says what was refused, without its weights_only advice."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(("Trying to load", "Unsupported", "Unsupported global", "WeightsUnpickler error:")) \
                and ln != "WeightsUnpickler error:":
            return ln.rstrip(".")
    return "not a checkpoint it can read without running code"


def _first_line(e: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception's text, whole: cut at a sentence end, or at a word with '...'."""
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    end = text.find(". ")
    if 0 < end < limit:
        return text[:end]
    if len(text) <= limit:
        return text.rstrip(".")
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


def model_from_ckpt(ckpt: Any, path: str | Path, prefer_ema: bool = True) -> nn.Module:
    """Pick the model object out of a loaded checkpoint dict (EMA first), as float32."""
    if isinstance(ckpt, nn.Module):
        model = ckpt
    else:
        if not isinstance(ckpt, dict):
            raise UserError(f"{path}: not a YOLOv5 checkpoint (holds a {type(ckpt).__name__}, expected a dict)")
        model = (ckpt.get("ema") if prefer_ema else None) or ckpt.get("model")
        if model is None and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise UserError(f"{path}: holds a bare state_dict ({len(ckpt)} tensors), not a YOLOv5 checkpoint; a "
                            f"state_dict has no architecture, so save the model object (or give --cfg for a "
                            f"training that starts from it)")
        if model is None:
            keys = [str(k) for k in ckpt]
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} keys)" if len(keys) > 8 else "")
            raise UserError(f"{path}: checkpoint has no 'model' or 'ema' entry (keys: {shown})")
        if not isinstance(model, nn.Module):
            raise UserError(f"{path}: checkpoint 'model' is a {type(model).__name__}, not a YOLOv5 model")
    if not isinstance(model, yolo.DetectionModel) and not hasattr(model, "model"):
        raise UserError(f"{path}: checkpoint model is a {type(model).__name__}, not a YOLOv5 DetectionModel")
    model = model.float()
    update_legacy(model)
    return model


def update_legacy(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Bring models pickled by older YOLOv5 releases (and older torch) up to the current attributes. Official
    checkpoints' models also carry `class_weights` (YOLOv5's train.py attaches it for --image-weights): it is
    left as loaded, and nothing here reads or writes it."""
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    names = getattr(model, "names", None)
    if isinstance(names, (list, tuple)):
        model.names = dict(enumerate(names))
    for m in model.modules():
        t = type(m)
        if t in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU, yolo.Detect, yolo.DetectionModel):
            m.inplace = inplace
        if t is yolo.Detect and not isinstance(m.anchor_grid, list):
            # v5.0 kept pixel anchor grids as a buffer; they are rebuilt from `anchors` on the next forward
            delattr(m, "anchor_grid")
            m.anchor_grid = [torch.zeros(1)] * m.nl
        if t is yolo.Detect and not isinstance(getattr(m, "grid", None), list):
            m.grid = [torch.zeros(1)] * m.nl
        if t is nn.Upsample and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None
    return model


def attempt_load(weights: str | Path, device: str | torch.device = "cpu", inplace: bool = True, fuse: bool = True,
                 trust: bool = False) -> nn.Module:
    """Load a YOLOv5 checkpoint for inference: float32, EMA preferred, optionally fused, eval mode."""
    ckpt = torch_load(weights, trust=trust)
    model = model_from_ckpt(ckpt, weights).to(device)
    update_legacy(model, inplace)
    if fuse and hasattr(model, "fuse"):
        model.eval().fuse()
    return model.eval()


def plain_opt(opt: Any) -> dict:
    """Options as a dict of plain Python values (paths → str) so the pickle stays allow-listable."""
    d = vars(opt) if isinstance(opt, argparse.Namespace) else dict(opt or {})
    out = {}
    for k, v in d.items():
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, (list, tuple)):
            v = [str(x) if isinstance(x, Path) else x for x in v]
        out[k] = v
    return out


def make_contiguous(model: nn.Module) -> nn.Module:
    """Put every parameter and buffer in the standard contiguous layout, in place.

    Training runs channels_last, and torch pickles a tensor's strides as they are; official YOLOv5 fuses
    Conv+BN with ``weight.view(out, -1)``, which fails on channels_last storage, so nothing we save keeps it.
    """
    for t in list(model.parameters()) + list(model.buffers()):
        if not t.is_contiguous():
            t.data = t.data.contiguous()
    return model


def _as_saved(model: nn.Module) -> nn.Module:
    """A copy as YOLOv5 pickles it: fp16, contiguous, in-place activations (training runs them out of place)."""
    return make_contiguous(yolo.set_inplace_activations(model, True).half())


def build_checkpoint(model: nn.Module, ema: nn.Module | None = None, updates: int | None = None,
                     optimizer: torch.optim.Optimizer | None = None, epoch: int = -1,
                     best_fitness: float | None = None, opt: Any = None, extra: dict | None = None) -> dict:
    """The official checkpoint dict: fp16 pickled models plus training state."""
    ckpt = {
        "epoch": epoch,
        "best_fitness": None if best_fitness is None else float(best_fitness),
        "model": _as_saved(deepcopy(de_parallel(model))),
        "ema": _as_saved(deepcopy(ema)) if ema is not None else None,
        "updates": updates,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "opt": plain_opt(opt),
        "git": {},
        "date": datetime.now().isoformat(),
    }
    if extra:
        ckpt.update(extra)
    return ckpt


def save_checkpoint(ckpt: dict, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, then rename: an interrupted save never damages `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(ckpt, f))
    return path


def strip_optimizer(f: str | Path, s: str | Path | None = None) -> Path:
    """Make a final, inference-only checkpoint: EMA as model, no optimizer, fp16, epoch -1."""
    x = torch_load(f)
    if x.get("ema"):
        x["model"] = x["ema"]
    for k in ("optimizer", "best_fitness", "ema", "updates"):
        x[k] = None
    x.pop("resume_state", None)  # fp32 copies kept only so an interrupted run can resume exactly
    x["epoch"] = -1
    make_contiguous(x["model"].half())  # also converts files written channels_last by earlier versions
    for p in x["model"].parameters():
        p.requires_grad = False
    out = save_checkpoint(x, s or f)
    mb = os.path.getsize(out) / 1e6
    LOGGER.info(f"Optimizer stripped from {f},{f' saved as {s},' if s else ''} {mb:.1f}MB")
    return out
