"""An int8 copy of a fused teacher for CPU distillation: eager-mode post-training quantisation on oneDNN.

Only the convolutions of the backbone and neck (the `Conv` blocks) become int8: per-channel symmetric
weights, per-tensor uint8 activations whose ranges are observed on real batches first. SiLU, cat,
upsampling, pooling and Detect's 1x1 output convolutions stay fp32, so the raw maps keep fp32 resolution.
torch's eager quantisation has no int8 SiLU, which is why each int8 convolution quantises its input and
dequantises its output.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator

import torch
import torch.nn as nn

from models.common import Conv

# full-range uint8 activations; the x86/fbgemm default reduces them to 7 bits, which cost the shapes16 demo
# teacher 12 mAP50-95 points at imgsz 160 where onednn cost 2 on the same calibration batches
ENGINE = "onednn"


def int8_unavailable() -> str | None:
    """Why this torch cannot run the int8 teacher, or None when it can."""
    try:
        import torch.ao.quantization as tq
    except ImportError as e:  # pragma: no cover - torch builds without the quantisation package
        return f"this torch has no torch.ao.quantization ({e})"
    if ENGINE not in torch.backends.quantized.supported_engines:
        return (f"this torch build has no {ENGINE} quantised engine (it has "
                f"{', '.join(torch.backends.quantized.supported_engines) or 'none'})")
    if not all(hasattr(tq, n) for n in ("QuantWrapper", "prepare", "convert", "get_default_qconfig")):
        return "this torch has dropped eager-mode quantisation (torch.ao.quantization.prepare/convert)"
    return None


@contextlib.contextmanager
def _quiet_engine() -> Iterator[None]:
    # the engine is process-wide: chosen for the quantisation calls only and restored afterwards; torch's
    # deprecation notices for quantised tensors are about this API's future, not about the run
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = ENGINE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        torch.backends.quantized.engine = previous


def prepare_int8(model: nn.Module) -> nn.Module:
    """A copy of the fused fp32 model with activation observers around every Conv's convolution; its
    forward is still exact fp32 while it records the ranges convert_int8 needs."""
    import torch.ao.quantization as tq

    observed = copy.deepcopy(model)
    with _quiet_engine():
        qconfig = tq.get_default_qconfig(ENGINE)
        for m in observed.modules():
            if isinstance(m, Conv):
                m.conv = tq.QuantWrapper(m.conv)
                m.conv.qconfig = qconfig
        tq.prepare(observed, inplace=True)
    return observed


def convert_int8(observed: nn.Module) -> nn.Module:
    """The int8 model from an observed copy that has seen calibration batches (converted in place)."""
    import torch.ao.quantization as tq

    with _quiet_engine():
        tq.convert(observed, inplace=True)
    return observed

