#!/usr/bin/env python
"""KD step cost: plain training step vs distillation step vs the fused teacher's forward, in one process.

    python benchmarks/bench_kd_step.py [--batch 16] [--imgsz 320] [--iters 10] [--device cpu|0] [--feat mse pkd cross]
                                       [--no-loc]

Prints ms per step, KD/plain and the bound (plain + teacher forward)/plain, each feature form's KD step and the
step with the localisation term (--dist_loc 1) against the output-only KD step, and peak memory of each mode
(CUDA: max allocated; CPU: peak RSS of a separate process per mode; not for the localisation step). Steps are
the steady state: the first epoch's balance report is not timed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from common import Stepper, demo_data, load_hyp, peak_memory_mb, student, sync, teacher
from optimizer.config import KDConfig
from optimizer.criterion import Distiller, Student
from optimizer.config import FEAT_FORMS
from utils.core.distributed import select_device
from utils.core.runtime import init_seeds
from utils.data.datasets import DataSettings, LoadImagesAndLabels, create_dataloader
from utils.training.forward import to_input


def first_batch(imgsz: int, batch: int):
    """A real mosaic batch from the demo training set (fixed seed)."""
    data = demo_data()
    init_seeds(0)  # mosaic draws from random/numpy as well as torch
    dataset = LoadImagesAndLabels(data.train, DataSettings(imgsz=imgsz, batch_size=batch, augment=True, hyp=load_hyp()))
    loader = create_dataloader(dataset, workers=0, shuffle=True)
    imgs, targets, _, _ = next(iter(loader))
    return data, imgs, targets


def timed(fn, iters: int, device) -> float:
    """Median wall time of fn() in ms."""
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def with_localisation(step: Stepper, t, imgsz: int) -> Stepper:
    """The KD stepper with the localisation term on (dist_loc 1): its criterion rebuilt on the same student (the
    term trains nothing beside it, so the optimizer stays as it is)."""
    crit = step.criterion
    step.criterion = Distiller(KDConfig(t_weights=t.path, dist_loc=1.0), t,
                               Student(step.model, crit.compute_loss, crit.forward, imgsz))
    step.criterion.start_epoch(1)
    step.criterion.balance.reported = True  # the steady state, as Stepper's
    return step


def measure_peak(mode: str, a) -> float:
    """Peak memory (MB) of one mode, in a fresh process on CPU so the two modes do not share a high-water mark."""
    out = subprocess.run([sys.executable, __file__, "--only", mode, "--batch", str(a.batch), "--imgsz",
                          str(a.imgsz), "--device", a.device, "--iters", "3", "--feat", *a.feat],
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--feat", nargs="*", default=["mse", "pkd", "cross"], choices=FEAT_FORMS[1:],
                    help="feature forms timed beside the output-only KD step (at feat_ratio 1; the weight costs "
                         "nothing)")
    ap.add_argument("--no-loc", dest="loc", action="store_false", help="leave out the localisation term's step")
    ap.add_argument("--only", choices=["plain", "kd", *FEAT_FORMS[1:]], help=argparse.SUPPRESS)
    a = ap.parse_args()
    device = select_device(a.device)
    amp = device.type == "cuda"
    data, imgs, targets = first_batch(a.imgsz, a.batch)
    nc, hyp = data.nc, load_hyp()

    if a.only:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = teacher(nc, device) if a.only != "plain" else None
        step = Stepper(student(nc, a.imgsz, hyp, device), hyp, device, teacher=t, amp=amp, imgsz=a.imgsz,
                       feat_kd=a.only if a.only in FEAT_FORMS else "none")
        for _ in range(a.iters):
            step(imgs, targets)
        sync(device)
        print(json.dumps({"peak_mb": peak_memory_mb(device)}))
        return 0

    t = teacher(nc, device)
    plain = Stepper(student(nc, a.imgsz, hyp, device), hyp, device, amp=amp, imgsz=a.imgsz)
    kd = Stepper(student(nc, a.imgsz, hyp, device), hyp, device, teacher=t, amp=amp, imgsz=a.imgsz)
    feats = {form: Stepper(student(nc, a.imgsz, hyp, device), hyp, device, teacher=t, amp=amp, imgsz=a.imgsz,
                           feat_kd=form) for form in a.feat}
    if a.loc:
        feats["loc"] = with_localisation(Stepper(student(nc, a.imgsz, hyp, device), hyp, device, teacher=t, amp=amp,
                                                 imgsz=a.imgsz), t, a.imgsz)
    timg = to_input(imgs, device)  # the teacher sees what train.py feeds it
    for _ in range(2):  # warm-up: allocator, kernels, first-call paths
        plain(imgs, targets), kd(imgs, targets), t(timg)
        for s in feats.values():
            s(imgs, targets)
    # interleave the measurements so drifts in machine load hit them alike
    tp, tk, tt = [], [], []
    tf: dict[str, list[float]] = {form: [] for form in feats}
    for _ in range(a.iters):
        tp.append(timed(lambda: plain(imgs, targets), 1, device))
        tk.append(timed(lambda: kd(imgs, targets), 1, device))
        tt.append(timed(lambda: t(timg), 1, device))
        for form, s in feats.items():
            tf[form].append(timed(lambda: s(imgs, targets), 1, device))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    p, k, f = med(tp), med(tk), med(tt)
    print(f"device {device}, batch {a.batch}, imgsz {a.imgsz}, student yolov5n, teacher {t.path} "
          f"({t.precision}, fused), {a.iters} iterations, medians")
    print(f"plain step      {p:8.1f} ms")
    print(f"KD step         {k:8.1f} ms")
    print(f"teacher forward {f:8.1f} ms")
    print(f"KD/plain        {k / p:8.3f}")
    print(f"bound           {(p + f) / p:8.3f}   (plain + teacher forward at {t.precision}) / plain")
    print(f"KD vs bound     {100 * (k / (p + f) - 1):+7.1f} %")
    for form, xs in tf.items():
        print(f"KD+{form:<6s} step {med(xs):8.1f} ms   {med(xs) / k:.3f} x the output-only KD step")
    mp, mk = measure_peak("plain", a), measure_peak("kd", a)
    kind = "max allocated" if device.type == "cuda" else "peak RSS"
    print(f"peak memory ({kind}): plain {mp:.0f} MB, KD {mk:.0f} MB"
          + "".join(f", KD+{form} {measure_peak(form, a):.0f} MB" for form in a.feat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
