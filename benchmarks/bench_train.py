#!/usr/bin/env python
"""Training throughput: images/s over one full epoch on the demo data (yolov5n, imgsz 320, batch 16,
2 workers, mosaic on), as train.py's loop runs it (warmup, EMA, clipping; fp32 on CPU, AMP on CUDA).

    python benchmarks/bench_train.py [--imgsz 320] [--batch 16] [--workers 2] [--device cpu] [--kd]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from common import criterion_for, demo_data, load_hyp, peak_memory_mb, student, sync

from utils.datasets import create_dataloader  # noqa: E402
from utils.distributed import select_device  # noqa: E402
from utils.engine import LoopState, ModelEMA, build_optimizer, lr_lambda, train_one_epoch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kd", action="store_true", help="distil from the demo teacher while training")
    a = ap.parse_args()
    device = select_device(a.device)
    data, hyp = demo_data(), load_hyp()
    nc = int(data["nc"])
    model = student(nc, a.imgsz, hyp, device)
    loader, _ = create_dataloader(data["train"], a.imgsz, a.batch, 32, hyp=hyp, augment=True, workers=a.workers,
                                  shuffle=True)
    opt = build_optimizer(model, "SGD", hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
    criterion = criterion_for(model, imgsz=a.imgsz, device=device, kd=a.kd)
    common = dict(epochs=2, device=device, hyp=hyp, lf=lr_lambda(2, hyp["lrf"]), batch_size=a.batch, nw=100,
                  imgsz=a.imgsz, gs=32, amp=device.type == "cuda", show_progress=False)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    state = LoopState()
    # epoch 0 warms up workers, allocator and page cache; epoch 1 is timed
    train_one_epoch(model, loader, opt, scaler, criterion, ModelEMA(model), 0, state=state, **common)
    sync(device)
    t0 = time.perf_counter()
    train_one_epoch(model, loader, opt, scaler, criterion, ModelEMA(model), 1, state=state, **common)
    sync(device)
    dt = time.perf_counter() - t0
    n = len(loader.dataset)
    print(f"train {'KD ' if a.kd else ''}yolov5n imgsz {a.imgsz} batch {a.batch} workers {a.workers} on {device}: "
          f"{n / dt:.1f} images/s ({n} images in {dt:.1f} s), peak {'CUDA memory' if device.type == 'cuda' else 'RSS'} "
          f"{peak_memory_mb(device):.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
