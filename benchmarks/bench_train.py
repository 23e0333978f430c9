#!/usr/bin/env python
"""Training throughput: images/s over one full epoch on the demo data (yolov5n, imgsz 320, batch 16,
2 workers, mosaic on), as train.py's loop runs it (warmup, EMA, clipping; fp32 on CPU unless --amp, AMP on CUDA).

    python benchmarks/bench_train.py [--imgsz 320] [--batch 16] [--workers 2] [--device cpu] [--kd]
                                     [--teacher-precision auto|fp32|bf16|fp16|int8] [--amp] [--compile]

With --compile the first (untimed) epoch includes the compilation, and its time is printed as well.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from common import criterion_for, demo_data, load_hyp, peak_memory_mb, student, sync
from utils.core.distributed import select_device
from utils.data.datasets import DataSettings, LoadImagesAndLabels, create_dataloader
from utils.data.unlabeled import build_unlabeled_stream
from utils.training.engine import LoopConfig, LoopState, train_one_epoch
from utils.training.forward import AMP_CHOICES, CompiledForward, StudentForward, resolve_amp
from utils.training.optim import ModelEMA, Optim, build_optimizer, lr_lambda


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kd", action="store_true", help="distil from the demo teacher while training")
    ap.add_argument("--teacher-precision", default="auto", help="as train.py's --teacher-precision")
    ap.add_argument("--amp", nargs="?", const="on", default=None, choices=AMP_CHOICES,
                    help="as train.py's --amp (alone: on); not given: fp32 on CPU, fp16 on CUDA, the tables' baseline")
    ap.add_argument("--compile", action="store_true", help="torch.compile the student's forward (train.py --compile)")
    ap.add_argument("--unlabeled-ratio", type=float, default=0.0,
                    help="with --kd: also draw this many unlabelled images per labelled one (the demo training "
                         "images, their labels unread), as a dataset yaml's 'unlabeled:' does")
    a = ap.parse_args()
    device = select_device(a.device)
    data, hyp = demo_data(), load_hyp()
    nc = data.nc
    model = student(nc, a.imgsz, hyp, device)
    train = DataSettings(imgsz=a.imgsz, batch_size=a.batch, augment=True, hyp=hyp)
    loader = create_dataloader(LoadImagesAndLabels(data.train, train), workers=a.workers, shuffle=True)
    opt = build_optimizer(model, "SGD", hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
    amp_dtype = resolve_amp(a.amp, device)
    unlabeled = None
    if a.kd and a.unlabeled_ratio > 0:
        unlabeled = build_unlabeled_stream(data.train, a.unlabeled_ratio, train, workers=a.workers, rank=-1,
                                           world_size=1, seed=0)
    forward = StudentForward(device, amp_dtype, CompiledForward(model) if a.compile else None)
    criterion = criterion_for(model, imgsz=a.imgsz, forward=forward, kd=a.kd, teacher_precision=a.teacher_precision,
                              unlabeled=unlabeled)
    cfg = LoopConfig(epochs=2, device=device, warmup=hyp, lf=lr_lambda(2, hyp["lrf"]), batch_size=a.batch, nw=100,
                     imgsz=a.imgsz, gs=32, show_progress=False)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    state = LoopState()
    # epoch 0 warms up workers, allocator and page cache (and compiles); epoch 1 is timed
    t0 = time.perf_counter()
    train_one_epoch(model, loader, criterion, Optim(opt, scaler, ModelEMA(model)), 0, state, cfg)
    sync(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_one_epoch(model, loader, criterion, Optim(opt, scaler, ModelEMA(model)), 1, state, cfg)
    sync(device)
    dt = time.perf_counter() - t0
    n = len(loader.dataset)
    what = (f"{'KD (teacher ' + criterion.teacher.precision + ') ' if a.kd else ''}"
            f"{f'+ {unlabeled.batch_size} unlabelled per step ' if unlabeled is not None else ''}"
            f"{'amp ' if amp_dtype is not None else ''}{'compiled ' if a.compile else ''}")
    print(f"train {what}yolov5n imgsz {a.imgsz} batch {a.batch} workers {a.workers} on {device}: "
          f"{n / dt:.1f} images/s ({n} images in {dt:.1f} s), peak {'CUDA memory' if device.type == 'cuda' else 'RSS'} "
          f"{peak_memory_mb(device):.0f} MB")
    if a.compile:
        print(f"first epoch (compiles) {first:.1f} s vs {dt:.1f} s per later epoch: compile overhead "
              f"{first - dt:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
