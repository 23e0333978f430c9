"""benchmarks/bench_kd_ratio.py: reading bench_train.py's result line (the timed runs themselves are benchmarks)."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

import bench_kd_ratio


def test_epoch_seconds_reads_the_result_line() -> None:
    kd = ("train KD (teacher bf16) yolov5n imgsz 320 batch 16 workers 2 on cpu: 24.8 images/s "
          "(1000 images in 40.2 s), peak RSS 1758 MB")
    out = f"Teacher precision: bf16 (auto: CPU supports bf16)\n{kd}\n"
    assert bench_kd_ratio.epoch_seconds(out) == (1000, 40.2, kd)
    plain = "train yolov5n imgsz 320 batch 16 workers 2 on cpu: 36.6 images/s (1000 images in 27.3 s), peak RSS 1 MB"
    assert bench_kd_ratio.epoch_seconds(plain) == (1000, 27.3, plain)


def test_epoch_seconds_without_a_result_line_says_so() -> None:
    with pytest.raises(ValueError, match="printed no 'train"):
        bench_kd_ratio.epoch_seconds("Traceback (most recent call last):\n  ...\n")
