#!/usr/bin/env python
"""Validation throughput: images/s of val.run over the demo val set (rect batches, conf 0.001, NMS, AP).

    python benchmarks/bench_val.py [--weights checkpoint/yolov5s-shapes.pt] [--imgsz 320] [--batch 32]
"""
from __future__ import annotations

import argparse
import sys
import time

import val
from common import DEMO_TEACHER, ROOT, demo_data
from utils.data.datasets import list_images


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(DEMO_TEACHER))
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    data = demo_data()
    kw = dict(weights=a.weights, imgsz=a.imgsz, batch_size=a.batch, device=a.device, workers=a.workers,
              plots=False, project=ROOT / "runs" / "bench", exist_ok=True, name="val")
    val.run(data, **kw)  # warm-up: label cache, page cache, first-call paths
    t0 = time.perf_counter()
    (p, r, m50, m, *_), _, speed = val.run(data, **kw)
    dt = time.perf_counter() - t0
    n = len(list_images(data.val))
    print(f"val {a.weights} imgsz {a.imgsz} batch {a.batch}: {n / dt:.1f} images/s end to end "
          f"(pre {speed[0]:.1f} / inference {speed[1]:.1f} / NMS {speed[2]:.1f} ms per image), "
          f"mAP50 {m50:.4f} mAP50-95 {m:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
