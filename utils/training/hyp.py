"""Hyperparameter files: one table of every key's default and valid range, checked once at start-up."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.core.config import find_file, read_yaml
from utils.core.errors import UserError

LOGGER = logging.getLogger("yolov5kd")
ROOT = Path(__file__).resolve().parents[2]
HYP_DIR = ROOT / "data" / "hyps"


@dataclass(frozen=True)
class HypSpec:
    """Default and closed/open bounds of one hyp key; `required` keys have no sensible default; `evolve` is
    its part in train.py --evolve: (mutation gain, lower bound, upper bound), gain 0 = carried in evolve.csv but
    never mutated, None = never evolved. A categorical key (with `choices`) is switched between its choices,
    so only its gain counts (EVOLVE_SWITCH)."""

    default: Any
    lo: float = 0.0
    hi: float = math.inf
    lo_open: bool = False
    required: bool = False
    kind: type = float
    choices: tuple = ()
    evolve: tuple[float, float, float] | None = None


# the evolve marker of a categorical key: switched to another choice, its bounds unused
EVOLVE_SWITCH: tuple[float, float, float] = (1, 0.0, 0.0)

# Defaults are hyp.scratch-low's values. Keys marked required are the ones the loss and the optimizer
# cannot run without; the augmentation keys fall back to their default with one warning. The evolve ranges
# are YOLOv5 v7.0's and lie inside each key's valid range (tests/unit/test_evolve.py checks it).
HYP_SPECS: dict[str, HypSpec] = {
    "lr0": HypSpec(0.01, 0.0, 10.0, lo_open=True, required=True, evolve=(1, 1e-5, 1e-1)),
    "lrf": HypSpec(0.01, 0.0, 1.0, lo_open=True, required=True, evolve=(1, 0.01, 1.0)),
    "momentum": HypSpec(0.937, 0.0, 1.0, required=True, evolve=(0.3, 0.6, 0.98)),
    "weight_decay": HypSpec(0.0005, 0.0, 1.0, required=True, evolve=(1, 0.0, 0.001)),
    "warmup_epochs": HypSpec(3.0, 0.0, 1e4, required=True, evolve=(1, 0.0, 5.0)),
    "warmup_momentum": HypSpec(0.8, 0.0, 1.0, required=True, evolve=(1, 0.0, 0.95)),
    "warmup_bias_lr": HypSpec(0.1, 0.0, 10.0, required=True, evolve=(1, 0.0, 0.2)),
    "box": HypSpec(0.05, required=True, evolve=(1, 0.02, 0.2)),
    "cls": HypSpec(0.5, required=True, evolve=(1, 0.2, 4.0)),
    "cls_pw": HypSpec(1.0, lo_open=True, required=True, evolve=(1, 0.5, 2.0)),
    "obj": HypSpec(1.0, required=True, evolve=(1, 0.2, 4.0)),
    "obj_pw": HypSpec(1.0, lo_open=True, required=True, evolve=(1, 0.5, 2.0)),
    "iou_t": HypSpec(0.2, 0.0, 1.0, evolve=(0, 0.1, 0.7)),
    "anchor_t": HypSpec(4.0, 1.0, 100.0, lo_open=True, required=True, evolve=(1, 2.0, 8.0)),
    "anchors": HypSpec(3, 1, 100, kind=int, evolve=(2, 2.0, 10.0)),
    "fl_gamma": HypSpec(0.0, 0.0, 100.0, required=True, evolve=(0, 0.0, 2.0)),
    "hsv_h": HypSpec(0.015, 0.0, 1.0, evolve=(1, 0.0, 0.1)),
    "hsv_s": HypSpec(0.7, 0.0, 1.0, evolve=(1, 0.0, 0.9)),
    "hsv_v": HypSpec(0.4, 0.0, 1.0, evolve=(1, 0.0, 0.9)),
    "degrees": HypSpec(0.0, 0.0, 360.0, evolve=(1, 0.0, 45.0)),
    "translate": HypSpec(0.1, 0.0, 1.0, evolve=(1, 0.0, 0.9)),
    "scale": HypSpec(0.5, 0.0, 1.0, evolve=(1, 0.0, 0.9)),
    "shear": HypSpec(0.0, 0.0, 90.0, evolve=(1, 0.0, 10.0)),
    "perspective": HypSpec(0.0, 0.0, 0.01, evolve=(0, 0.0, 0.001)),
    "flipud": HypSpec(0.0, 0.0, 1.0, evolve=(1, 0.0, 1.0)),
    "fliplr": HypSpec(0.5, 0.0, 1.0, evolve=(0, 0.0, 1.0)),
    "mosaic": HypSpec(1.0, 0.0, 1.0, evolve=(1, 0.0, 1.0)),
    "mixup": HypSpec(0.0, 0.0, 1.0, evolve=(1, 0.0, 1.0)),
    "copy_paste": HypSpec(0.0, 0.0, 1.0, evolve=(1, 0.0, 1.0)),
}
OPTIONAL_NO_DEFAULT = ("anchors",)  # absent means "keep the model's anchors"


def _bounds_text(s: HypSpec) -> str:
    lo = f"{'>' if s.lo_open else '>='} {s.lo:g}"
    return lo if math.isinf(s.hi) else f"{lo} and <= {s.hi:g}"


def check_value(key: str, value: Any, spec: HypSpec, where: str) -> Any:
    """The value converted to its kind, or a one-line UserError naming where it came from."""
    if spec.choices:
        if value not in spec.choices:
            raise UserError(f"{where}: {key} {value!r} must be one of {', '.join(map(str, spec.choices))}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: {key} {value!r} must be a number")
    if spec.kind is int and float(value) != int(value):
        raise UserError(f"{where}: {key} {value!r} must be a whole number")
    v = float(value)
    if not math.isfinite(v) or v < spec.lo or (spec.lo_open and v == spec.lo) or v > spec.hi:
        raise UserError(f"{where}: {key} {value!r} must be finite, {_bounds_text(spec)}")
    return int(v) if spec.kind is int else v


def validate_hyp(hyp: dict, where: str = "hyp", extra_specs: dict[str, HypSpec] | None = None) -> dict:
    """A checked copy: every known key typed and in range, missing optional keys defaulted (one warning),
    unknown keys (typos such as lr00) reported in one warning and kept. `extra_specs` adds the keys other
    parts of the project own (the distillation settings), so they are checked here too, once; those the file
    lacks are left out for their owner to default."""
    specs = {**HYP_SPECS, **(extra_specs or {})}
    out = dict(hyp)
    missing_required = [k for k, s in specs.items() if s.required and k not in hyp]
    if missing_required:
        raise UserError(f"{where}: missing {', '.join(missing_required)}")
    defaulted = []
    for k, s in specs.items():
        if k in hyp:
            if k == "anchors" and isinstance(hyp[k], list):
                continue  # explicit anchor lists are checked by the model builder
            out[k] = check_value(k, hyp[k], s, where)
        elif k not in OPTIONAL_NO_DEFAULT and k in HYP_SPECS:
            # an extra key the file lacks stays absent: its owner resolves its default and says so in its own
            # line (an official YOLOv5 hyp yaml has no distillation keys, which is no mistake)
            out[k] = s.default
            defaulted.append(k)
    if defaulted:
        LOGGER.warning(f"WARNING: {where}: no value for {', '.join(defaulted)}; using the defaults "
                       f"({', '.join(f'{k}={specs[k].default}' for k in defaulted)})")
    unknown = [k for k in hyp if k not in specs]
    if unknown:
        LOGGER.warning(f"WARNING: {where}: unknown key(s) {', '.join(unknown)} are ignored (a typo?)")
    return out


def load_hyp(hyp: str | Path | dict, extra_specs: dict[str, HypSpec] | None = None) -> dict:
    """A validated hyp dict from a yaml path (short names resolve to data/hyps/) or a dict."""
    if isinstance(hyp, dict):
        return validate_hyp(hyp, "hyp", extra_specs)
    path = find_file(hyp, [HYP_DIR], "hyp yaml")
    return validate_hyp(read_yaml(path, "hyp yaml"), str(path), extra_specs)
