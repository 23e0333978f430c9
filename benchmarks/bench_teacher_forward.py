#!/usr/bin/env python
"""The teacher's forward at each precision we could run it in: time, accuracy, and the KD/plain it allows.

    python benchmarks/bench_teacher_forward.py [--batch 16] [--imgsz 320] [--iters 8] [--calib 8] [--no-map]
        [--data data/shapes.yaml --weights checkpoint/yolov5s-shapes.pt --val-imgsz 256]

CPU only. The teacher (fused) on one real mosaic batch of the training set, the variants timed in turn
(interleaved, medians), next to the plain training step of a yolov5n student on the same batch:

  fp32          the teacher as loaded (--teacher-precision fp32)
  bf16          autocast around the fp32 weights: --teacher-precision auto on a CPU with native bf16
  bf16-weights  a copy of the model held in bf16, no autocast
  int8          --teacher-precision int8 (optimizer/int8.py: eager-mode post-training quantisation on oneDNN,
                per-channel int8 weights, uint8 activations whose ranges are observed on --calib augmented
                training batches; Detect's 1x1 convolutions stay fp32)

For each: forward ms, the largest raw-map difference from fp32, the teacher's mAP50-95 on the demo val set
(as val.py at --val-imgsz), and plain / (plain + forward), the KD/plain step ratio that teacher allows when
the KD step sits at its bound (issue 13's target is 0.7 for whole epochs, which run 0.02-0.03 above it).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from common import DEMO_TEACHER, ROOT, Stepper, load_hyp, student
from optimizer.teacher import Teacher, load_teacher
from utils.core.runtime import init_seeds
from utils.data.datasets import DataSettings, DatasetSpec, LoadImagesAndLabels, check_dataset, create_dataloader
from utils.training.forward import to_input

VARIANTS = ("fp32", "bf16", "bf16-weights", "int8")


class TeacherVariant(nn.Module):
    """One way of running the teacher: a model copy, an input dtype and an optional bf16 autocast."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32, autocast: bool = False):
        super().__init__()
        self.model, self.dtype, self.autocast = model, dtype, autocast
        self.names = getattr(model, "names", None)
        # val.evaluate() reads the device from the first parameter; a quantised model has none of its own
        self.register_parameter("device_anchor", nn.Parameter(torch.zeros(1), requires_grad=False))

    def _run(self, x: torch.Tensor):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(x.to(self.dtype))

    def raw(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Raw maps in fp32, as optimizer.teacher.Teacher gives them to the loss (Detect skips decoding)."""
        head = self.model.model[-1]
        head.training = True
        try:
            return [r.float() for r in self._run(x)]
        finally:
            head.training = False

    def forward(self, x: torch.Tensor):
        """Decoded predictions and raw maps, the pair val.evaluate() expects, in fp32."""
        pred, raw = self._run(x)
        return pred.float(), [r.float() for r in raw]

    # val.evaluate() casts the model it is given; a variant keeps its own precision
    def float(self) -> TeacherVariant:  # noqa: D102
        return self

    def half(self) -> TeacherVariant:  # noqa: D102
        return self


def int8_variant(model: nn.Module, batches: Sequence[torch.Tensor]) -> TeacherVariant:
    """The int8 teacher of --teacher-precision int8, calibrated by the Teacher's own first calls on `batches`."""
    if not batches:
        raise ValueError("the int8 variant needs at least one calibration batch (--calib)")
    teacher = Teacher(copy.deepcopy(model), precision="int8", calibration_batches=len(batches))
    for x in batches:
        teacher(x)
    return TeacherVariant(teacher.network)


def bf16_weights_variant(model: nn.Module) -> TeacherVariant:
    """A copy whose convolutions hold bf16 weights (no autocast); Detect's anchors stay fp32, so its box
    decoding promotes to fp32 as under autocast (a bf16 grid would round pixel coordinates)."""
    m = copy.deepcopy(model)
    for conv in m.modules():
        if isinstance(conv, nn.Conv2d):
            conv.to(torch.bfloat16)
    return TeacherVariant(m, dtype=torch.bfloat16)


def build_variants(model: nn.Module, calib: Sequence[torch.Tensor], names: Iterable[str] = VARIANTS
                   ) -> dict[str, TeacherVariant]:
    """The named variants of a fused fp32 teacher (int8 calibrated on `calib`)."""
    out: dict[str, TeacherVariant] = {}
    for name in names:
        if name == "fp32":
            out[name] = TeacherVariant(copy.deepcopy(model))
        elif name == "bf16":
            out[name] = TeacherVariant(copy.deepcopy(model), autocast=True)
        elif name == "bf16-weights":
            out[name] = bf16_weights_variant(model)
        elif name == "int8":
            out[name] = int8_variant(model, calib)
        else:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return out


def median_ms(fns: dict[str, Callable[[], object]], iters: int) -> dict[str, float]:
    """Median wall time of each function in ms, the functions called in turn so drifts hit them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def val_map(variant: TeacherVariant, data: DatasetSpec, imgsz: int) -> float:
    """mAP50-95 of a variant on the val set, as val.py computes it."""
    import val as validate

    val = DataSettings(imgsz=imgsz, batch_size=32, rect=True, pad=0.5)
    loader = create_dataloader(LoadImagesAndLabels(data.val, val), workers=1)
    return float(validate.evaluate(variant, loader, data, plots=False, half=False).results[3])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--calib", type=int, default=8, help="training batches that calibrate the int8 activations")
    ap.add_argument("--val-imgsz", type=int, default=256, help="imgsz of the mAP column (the checkpoint README's)")
    ap.add_argument("--no-map", action="store_true", help="skip the mAP column")
    ap.add_argument("--data", default=str(ROOT / "data" / "shapes.yaml"), help="dataset yaml (demo data by default)")
    ap.add_argument("--weights", default=str(DEMO_TEACHER), help="teacher checkpoint (the 8-class demo teacher)")
    a = ap.parse_args()
    device = torch.device("cpu")
    data, hyp = check_dataset(a.data), load_hyp()
    nc = data.nc
    t = load_teacher(a.weights, device, precision="fp32")
    fused = t.model.to(memory_format=torch.channels_last)  # as train.py sets the teacher up

    def train_batches(seed: int) -> Iterable[tuple]:
        init_seeds(seed)  # mosaic draws from random/numpy as well as torch
        train = DataSettings(imgsz=a.imgsz, batch_size=a.batch, augment=True, hyp=hyp)
        return create_dataloader(LoadImagesAndLabels(data.train, train), workers=0, shuffle=True, seed=seed)

    imgs, targets, *_ = next(iter(train_batches(0)))  # the timed batch
    calib = [to_input(b[0], device) for b, _ in zip(train_batches(1), range(a.calib))]
    variants = build_variants(fused, calib)

    x = to_input(imgs, device)
    ref = variants["fp32"].raw(x)
    diff = {k: max((r - f).abs().max().item() for r, f in zip(v.raw(x), ref)) for k, v in variants.items()}
    plain = Stepper(student(nc, a.imgsz, hyp, device), hyp, device, imgsz=a.imgsz)
    fns: dict[str, Callable[[], object]] = {"plain step": lambda: plain(imgs, targets)}
    fns.update({k: (lambda v=v: v.raw(x)) for k, v in variants.items()})
    median_ms(fns, 2)  # warm-up: allocator, kernels, weight reorders
    ms = median_ms(fns, a.iters)
    p = ms.pop("plain step")
    maps = {} if a.no_map else {k: val_map(v, data, a.val_imgsz) for k, v in variants.items()}

    print(f"cpu, {torch.get_num_threads()} threads, batch {a.batch}, imgsz {a.imgsz}, teacher {t.path} (fused), "
          f"{a.iters} iterations, medians; int8 calibrated on {a.calib} batches")
    print(f"plain step (yolov5n student): {p:.1f} ms")
    head = f"{'variant':<13} {'forward ms':>10} {'vs bf16':>8} {'max |dmap|':>10} {'mAP50-95':>9} {'KD/plain bound':>14}"
    print(head)
    for k, f in ms.items():
        m = f"{maps[k]:9.4f}" if k in maps else f"{'-':>9}"
        print(f"{k:<13} {f:10.1f} {f / ms['bf16']:8.2f} {diff[k]:10.3f} {m} {p / (p + f):14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
