"""How the student runs in a training step: the loader's batch as its input, the autocast precision (--amp), an
optional compiled forward, and the second pass that DDP allows."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from utils.core.distributed import de_parallel
from utils.core.errors import UserError
from utils.core.hardware import cpu_supports_bf16

LOGGER = logging.getLogger("yolov5kd")

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
