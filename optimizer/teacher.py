"""The distillation teacher: loading, frozen inference, fingerprint, pre-flight compatibility checks."""
from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from optimizer.config import TEACHER_PRECISIONS
from optimizer.int8 import convert_int8, int8_unavailable, prepare_int8
from utils.core.distributed import de_parallel
from utils.core.errors import UserError
from utils.core.hardware import cpu_supports_bf16
from utils.training.checkpoint import attempt_load

LOGGER = logging.getLogger("yolov5kd")

INT8_CALIBRATION_BATCHES = 8  # training batches an int8 teacher observes in fp32 before it is quantised


def resolve_teacher_precision(precision: str, device: str | torch.device) -> tuple[str, str]:
    """(fp32 | bf16 | fp16 | int8, why) for a --teacher-precision value on device; UserError for fp16 off CUDA
    and for int8 off the CPU or where this torch cannot quantise."""
    dev = torch.device(device).type
    if precision not in TEACHER_PRECISIONS:
        raise UserError(f"--teacher-precision {precision!r}: must be one of {', '.join(TEACHER_PRECISIONS)}")
    if precision == "auto":
        if dev == "cuda":
            return "fp16", "auto: CUDA device"
        if dev == "cpu":
            return ("bf16", "auto: CPU supports bf16") if cpu_supports_bf16() else \
                ("fp32", "auto: CPU has no native bf16")
        return "fp32", f"auto: {dev} device"
    if precision == "fp16" and dev != "cuda":
        raise UserError(f"--teacher-precision fp16 needs a CUDA device (this run uses {dev}); use bf16 or fp32")
    if precision == "int8":
        if dev != "cpu":
            raise UserError(f"--teacher-precision int8 is for CPU training (this run uses {dev}); use auto")
        reason = int8_unavailable()
        if reason:
            raise UserError(f"--teacher-precision int8: {reason}; use auto (bf16 or fp32)")
        return "int8", (f"requested: int8 convolutions, activation ranges observed on the first "
                        f"{INT8_CALIBRATION_BATCHES} training batches; faster, but the teacher may lose accuracy")
    if precision == "bf16" and dev == "cpu" and not cpu_supports_bf16():
        return "bf16", "requested; this CPU has no native bf16, so it is emulated and may be slower than fp32"
    return precision, "requested"


class Teacher:
    """A frozen, fused, eval-mode detection model; calling it on images gives fp32 raw maps."""

    # Deliberately not an nn.Module: it can then never become a submodule of the student, so it is never
    # wrapped in DDP, moved by student.to()/half(), switched by student.train(), or pickled into its checkpoint.

    def __init__(self, model: nn.Module, path: str | Path = "", half: bool = False, precision: str | None = None,
                 calibration_batches: int | None = None):
        """Wrap an already loaded model; freezes it and puts it in eval mode.

        precision: fp32 (plain), bf16 (autocast around the forward, weights stay fp32), fp16 (the model is
        converted with .half(), as on CUDA) or int8 (CPU: the first `calibration_batches` calls run an
        observing fp32 copy, later ones its int8 conversion, None meaning INT8_CALIBRATION_BATCHES; `model`
        itself stays fp32, for validation); precision None means fp16 if `half` else fp32."""
        precision = precision or ("fp16" if half else "fp32")
        if precision not in TEACHER_PRECISIONS[1:]:
            raise ValueError(f"Teacher precision {precision!r}: must be fp32, bf16, fp16 or int8")
        self.model = model.eval().requires_grad_(False)
        self.path = str(path)
        self.precision = precision
        self.half = precision == "fp16"
        if self.half:
            self.model.half()
        # int8: the network the forward runs, and how many calibration calls it still owes
        self._int8 = prepare_int8(self.model) if precision == "int8" else None
        n = INT8_CALIBRATION_BATCHES if calibration_batches is None else int(calibration_batches)
        self._to_observe = max(n, 1) if precision == "int8" else 0

    @property
    def network(self) -> nn.Module:
        """The module the forward runs: the model itself, or for int8 its observing copy and then its
        quantised conversion."""
        return self.model if self._int8 is None else self._int8

    @property
    def calibrated(self) -> bool:
        """False while an int8 teacher is still observing activation ranges (always True otherwise)."""
        return self._to_observe == 0

    @property
    def detect(self) -> nn.Module:
        """The teacher's Detect head."""
        return self.model.model[-1]

    @property
    def nc(self) -> int:
        """Number of classes the teacher predicts."""
        return int(self.detect.nc)

    @property
    def names(self) -> Any:
        """Class names as stored in the teacher checkpoint."""
        return getattr(self.model, "names", None)

    @property
    def anchors(self) -> torch.Tensor:
        """Anchors (nl, na, 2) in grid units, fp32."""
        return self.detect.anchors.float()

    @property
    def stride(self) -> torch.Tensor:
        """Per-level strides in pixels."""
        return self.detect.stride

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Raw maps (bs, na, ny, nx, 5+nc) in fp32 for images in [0, 1] already on the teacher's device."""
        return self.run(images)[0]

    def run(self, images: torch.Tensor, features: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """(raw maps, head inputs) from one forward, both fp32; the head inputs (the neck maps P3-P5, what
        feature distillation compares) only when `features`, else None."""
        if self.model.training:  # someone called .train() on it; BN stats (if unfused) must not move
            self.model.eval()
        x = images.half() if self.half else images.float()
        net = self.network
        head = net.model[-1]
        # Detect's training flag only picks its output: raw maps alone, without the decoded boxes the
        # distillation loss never reads (2.5 of the demo teacher's 194 ms at 16x320, bf16, 2 cores). Restored
        # at once, so evaluating the teacher still decodes.
        head_training, head.training = head.training, True
        try:
            with torch.inference_mode(), self._autocast(x.device.type):
                out = net(x, features=True) if features else net(x)
        finally:
            head.training = head_training
        raw, feats = out if features else (out, None)
        if self._to_observe:
            self._to_observe -= 1
            if not self._to_observe:
                self._int8 = convert_int8(self._int8)
                LOGGER.info("Teacher int8: activation ranges observed, convolutions quantised")
        # Inference tensors cannot be saved for backward; a copy made outside inference mode is an ordinary
        # constant tensor, so autograd through the student's side of the loss works with any op.
        maps = [r.to(dtype=torch.float32, copy=True) for r in raw]
        return maps, None if feats is None else [f.to(dtype=torch.float32, copy=True) for f in feats]

    def _autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        # bf16 autocasts the convolutions; fp32, fp16 and int8 switch off any autocast the caller may be
        # under, so the teacher always runs at its own precision
        if self.precision == "bf16":
            return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
        return torch.autocast(device_type=device_type, enabled=False)


def load_teacher(path: str | Path, device: str | torch.device = "cpu", trust: bool = False,
                 half: bool | None = None, precision: str = "auto") -> Teacher:
    """Load a teacher checkpoint with the safe loader: fused, eval, frozen, at `precision` (see
    resolve_teacher_precision; auto: fp16 on CUDA, bf16 on a CPU with native bf16, else fp32). `half`, when
    given, forces fp16 (True) or fp32 (False) without that resolution."""
    if half is not None:
        chosen, why = ("fp16" if half else "fp32"), "half=" + str(bool(half))
    else:
        chosen, why = resolve_teacher_precision(precision, device)  # before loading: a bad value fails fast
    model = attempt_load(path, device=device, fuse=True, trust=trust)
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{path}: teacher has non-finite weights ({len(bad)} tensors, first {bad[0]}); "
                        f"it cannot teach anything")
    teacher = Teacher(model, path=path, precision=chosen)
    n = sum(p.numel() for p in model.parameters())
    LOGGER.info(f"Teacher {path}: {n} parameters, nc={teacher.nc}, strides {_floats(teacher.stride)}")
    LOGGER.info(f"Teacher precision: {chosen} ({why})")
    return teacher


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file: the teacher's fingerprint recorded in the run."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise UserError(f"{path}: cannot read the teacher checkpoint ({e.strerror or e})") from None
    return h.hexdigest()


def check_teacher_unchanged(path: str | Path, recorded_sha256: str | None) -> None:
    """Refuse to resume a KD run whose teacher file is gone or differs from the one it started with."""
    if not Path(path).is_file():
        raise UserError(f"--resume: the teacher checkpoint recorded in this run ({path}) no longer exists; "
                        f"restore it there or start a new run with --t_weights")
    if recorded_sha256 and file_sha256(path) != recorded_sha256:
        raise UserError(f"--resume: the teacher at {path} is not the one this run started with (SHA-256 "
                        f"differs); put the original file back, or start a new run with --weights <run>/weights/"
                        f"last.pt --t_weights {path}")


def _floats(x: Any) -> list[float]:
    return [float(v) for v in (x.tolist() if isinstance(x, torch.Tensor) else x)]


def _names_list(names: Any) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names)]
    return [str(n) for n in names]


def preflight(teacher: Teacher | nn.Module, student: nn.Module, imgsz: int | Sequence[int]) -> dict[str, Any]:
    """Check the teacher can distil into the student at imgsz; raises UserError naming both values."""
    t_model = teacher.model if isinstance(teacher, Teacher) else de_parallel(teacher)
    s_model = de_parallel(student)
    td, sd = t_model.model[-1], s_model.model[-1]

    if td.nc != sd.nc:
        raise UserError(f"teacher has nc={td.nc} classes but student has nc={sd.nc}; distillation needs the same "
                        f"classes")
    if td.nl != sd.nl:
        raise UserError(f"teacher has {td.nl} detection levels but student has {sd.nl}")
    if td.na != sd.na:
        raise UserError(f"teacher has {td.na} anchors per level but student has {sd.na}")
    t_stride, s_stride = _floats(td.stride), _floats(sd.stride)
    if t_stride != s_stride:
        raise UserError(f"teacher strides {t_stride} differ from student strides {s_stride}; their output maps "
                        f"would not align")
    t_max, s_max = int(max(t_stride)), int(max(s_stride))
    sizes = [imgsz] if isinstance(imgsz, int) else list(imgsz)
    for s in sizes:
        if s % t_max or s % s_max:
            raise UserError(f"--imgsz {s} is not a multiple of the largest stride of the teacher ({t_max}) and of "
                            f"the student ({s_max})")

    t_names, s_names = _names_list(getattr(t_model, "names", None)), _names_list(getattr(s_model, "names", None))
    if t_names is not None and s_names is not None and t_names != s_names:
        LOGGER.warning(f"WARNING: teacher class names {t_names} differ from student names {s_names} (both nc="
                       f"{sd.nc}); classes are distilled by index")

    # whether the anchors differ is decided once, by the loss that has to act on it
    return {"teacher_anchors": td.anchors.detach().float().clone()}
