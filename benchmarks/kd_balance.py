#!/usr/bin/env python
"""Balance of the distillation terms against the detection loss on one real batch.

    python benchmarks/kd_balance.py [--weights runs/kd_gain/base_s0/weights/best.pt] [--dist_loss l2]
                                    [--temperature 5] [--distill_ratio 0.05] [--imgsz 320] [--batch 16]
                                    [--dist_norm weighted] (defaults: train.py's)

For a student (from scratch by default, or --weights) and the demo teacher it prints each loss part as it
enters the total (gains, distill_ratio and batch size applied) and the L2 norm of the gradient that part
sends into the student's raw output maps, so one can see which term drives the early updates. With several
--dist_norm values the distillation rows are printed once per normalisation, on the same batch and maps.
"""
from __future__ import annotations

import argparse
import sys

import torch
from bench_kd_step import first_batch

from common import load_hyp, student, teacher
from optimizer.config import DIST_NORMS, KDConfig
from optimizer.loss import OutputDistillationLoss
from utils.training.checkpoint import attempt_load
from utils.training.loss import ComputeLoss, scale_hyp


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="", help="student checkpoint (default: yolov5n from scratch)")
    # the defaults are train.py's, so that a bare run shows what training will do
    ap.add_argument("--dist_loss", default=KDConfig.dist_loss)
    ap.add_argument("--temperature", type=float, default=KDConfig.temperature)
    ap.add_argument("--distill_ratio", type=float, default=KDConfig.distill_ratio)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dist_norm", nargs="+", default=[KDConfig.dist_norm], choices=DIST_NORMS,
                    help="distillation normalisation(s) to compare")
    a = ap.parse_args()
    device = torch.device("cpu")
    data, imgs, targets = first_batch(a.imgsz, a.batch)
    nc, hyp = data.nc, load_hyp()
    if a.weights:
        model = attempt_load(a.weights, device=device, fuse=False).float().to(memory_format=torch.channels_last)
        model.nc, model.hyp = nc, scale_hyp(hyp, 3, nc, a.imgsz)
    else:
        torch.manual_seed(0)
        model = student(nc, a.imgsz, hyp, device)
    model.train()
    t = teacher(nc, device)
    x = imgs.to(device).float() / 255
    t_maps = t(x)
    # the maps as leaves: every term's gradient is taken with respect to the same tensors, one forward
    pred = [p.detach().requires_grad_(True) for p in model(x)]
    det = ComputeLoss(model)
    _, items = det(pred, targets)
    bs = imgs.shape[0]
    # ComputeLoss returns the parts summed over levels and × batch size only in the total; rebuild each part
    parts = {"box": items[0] * bs, "obj": items[1] * bs, "cls": items[2] * bs}
    print(f"student {a.weights or 'yolov5n from scratch'}, teacher {t.path}, {a.dist_loss} T={a.temperature:g} "
          f"distill_ratio={a.distill_ratio:g}, batch {bs}, imgsz {a.imgsz}")
    print(f"{'term':16s} {'value':>10s} {'|grad| at the output maps':>28s}")
    for name in ("box", "obj", "cls"):
        print(f"{name:16s} {float(parts[name]):10.4f} {grad_norm(name, pred, det, None, targets, t_maps):28.2e}")
    for norm in a.dist_norm:
        kd = OutputDistillationLoss(model, dist_loss=a.dist_loss, T=a.temperature, distill_ratio=a.distill_ratio,
                                    norm=norm, gains=det.hyp, teacher_anchors=t.anchors)
        _, kd_parts = kd(pred, t_maps)
        for name in ("dbox", "dobj", "dcls"):
            grad = grad_norm(name, pred, det, kd, targets, t_maps)
            print(f"{name + ' (' + norm + ')':16s} {float(kd_parts[name]):10.4f} {grad:28.2e}")
    return 0


def grad_norm(name: str, pred: list[torch.Tensor], det: ComputeLoss, kd: OutputDistillationLoss | None, targets,
              t_maps) -> float:
    """L2 norm of d(term)/d(student raw maps) for one term (the other terms' gains set to 0)."""
    if name in ("box", "obj", "cls"):
        saved = dict(det.hyp)
        det.hyp.update({k: (v if k == name else 0.0) for k, v in saved.items() if k in ("box", "obj", "cls")})
        try:
            term = det(pred, targets)[0]
        finally:
            det.hyp.update(saved)
    else:
        saved = dict(kd.gains)
        kd.gains = {k: (v if k == name else 0.0) for k, v in saved.items()}
        try:
            term = kd(pred, t_maps)[0]
        finally:
            kd.gains = saved
    g = torch.autograd.grad(term.sum(), pred)
    return float(torch.sqrt(sum((gi.float() ** 2).sum() for gi in g)))


if __name__ == "__main__":
    sys.exit(main())
