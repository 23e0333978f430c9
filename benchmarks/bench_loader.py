#!/usr/bin/env python
"""Training-loader throughput (images/s) on the shapes demo data: mosaic on, hyp.scratch-low, batch 16.

    python benchmarks/bench_loader.py [--imgsz 320 640] [--workers 2] [--batch 16]

Generates the demo dataset first if it is missing. Each size gets a short warm-up (worker start-up,
page cache), then one full timed epoch.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import yaml

from utils.data.datasets import DataSettings, DatasetSpec, LoadImagesAndLabels, check_dataset, create_dataloader

ROOT = Path(__file__).resolve().parents[1]


def _ensure_dataset() -> DatasetSpec:
    spec = importlib.util.spec_from_file_location("generate_shapes", ROOT / "data" / "scripts" / "generate_shapes.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(ROOT / "datasets" / "shapes", 1000, 200, seed=0)  # no-op when already complete
    return check_dataset(ROOT / "data" / "shapes.yaml", autodownload=False)


def _cpu_seconds(pids: list[int]) -> float:
    """User+system CPU time of this process and the given worker processes (Linux /proc)."""
    t = sum(os.times()[:2])
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            t += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return t


def bench(train: str, imgsz: int, batch: int, workers: int, hyp: dict, warmup: int = 5) -> tuple[float, float]:
    """(images/s, CPU ms per image) over one full epoch of the augmenting training loader."""
    settings = DataSettings(imgsz=imgsz, batch_size=batch, augment=True, hyp=hyp)
    loader = create_dataloader(LoadImagesAndLabels(train, settings), workers=workers, shuffle=True)
    for i, _ in enumerate(loader):
        if i + 1 >= warmup:
            break
    it = iter(loader)
    # worker pids (private attribute, used only for CPU accounting; absent with workers=0)
    pids = [w.pid for w in getattr(it, "_workers", [])]
    n = 0
    c0, t0 = _cpu_seconds(pids), time.perf_counter()
    for ims, *_ in it:
        n += ims.shape[0]
    wall, cpu = time.perf_counter() - t0, _cpu_seconds(pids) - c0
    return n / wall, 1000 * cpu / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--imgsz", type=int, nargs="+", default=[320, 640])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    data = _ensure_dataset()
    hyp = yaml.safe_load((ROOT / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before start "
          "(other processes on the machine lower the wall-clock figure, not the CPU cost)")
    for s in a.imgsz:
        ips, ms = bench(data.train, s, a.batch, a.workers, hyp)
        print(f"imgsz {s}: {ips:.0f} images/s wall, {ms:.2f} CPU ms/image (all processes) "
              f"(batch {a.batch}, {a.workers} workers, mosaic on)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
