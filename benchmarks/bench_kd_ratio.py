#!/usr/bin/env python
"""KD/plain training throughput in interleaved pairs: bench_train.py without and with --kd, alternated.

    python benchmarks/bench_kd_ratio.py [--pairs 3] [--device cpu] [--teacher-precision auto|fp32|bf16|int8]
                                        [-- extra bench_train.py arguments]

Each run is a separate process (one at a time). A pair's ratio is plain epoch time / KD epoch time for the
same images, i.e. KD throughput as a fraction of plain; alternating the two spreads host drift over both, so
the median over pairs is steadier than one run of each (a single epoch moves by a few seconds between runs).
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bench_train.py's result line: "... 24.8 images/s (1000 images in 40.2 s), peak ..."
RESULT = re.compile(r"^train .*?([\d.]+) images/s \((\d+) images in ([\d.]+) s\)")


def epoch_seconds(output: str) -> tuple[int, float, str]:
    """(images, seconds, the line) of the timed epoch from bench_train.py's output; ValueError if it has none."""
    for line in output.splitlines():
        m = RESULT.match(line.strip())
        if m:
            return int(m.group(2)), float(m.group(3)), line.strip()
    raise ValueError("bench_train.py printed no 'train ... images/s (N images in T s)' line")


def run_bench(extra: list[str]) -> tuple[int, float, str]:
    """One bench_train.py process: (images, seconds, its result line)."""
    r = subprocess.run([sys.executable, str(HERE / "bench_train.py"), *extra], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"bench_train.py {' '.join(extra)} failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
    return epoch_seconds(r.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--teacher-precision", default="auto", help="the KD runs' --teacher-precision")
    ap.add_argument("extra", nargs="*", help="passed to both bench_train.py runs (after --)")
    a = ap.parse_args()
    if a.pairs < 1:
        raise SystemExit("--pairs must be >= 1")
    common = ([] if a.device == "cpu" else ["--device", a.device]) + a.extra
    ratios = []
    for i in range(1, a.pairs + 1):
        n_p, t_p, line_p = run_bench(common)
        n_k, t_k, line_k = run_bench(["--kd", "--teacher-precision", a.teacher_precision, *common])
        if n_p != n_k:
            raise SystemExit(f"pair {i}: plain timed {n_p} images, KD {n_k}; not comparable")
        ratios.append(t_p / t_k)
        print(f"pair {i}: {line_p}")
        print(f"pair {i}: {line_k}")
        print(f"pair {i}: KD/plain {t_p:.1f} / {t_k:.1f} s = {ratios[-1]:.3f}", flush=True)
    print(f"KD/plain throughput (teacher {a.teacher_precision}) over {a.pairs} interleaved pairs: median "
          f"{statistics.median(ratios):.3f} (per pair {', '.join(f'{r:.3f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
