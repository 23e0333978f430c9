#!/usr/bin/env python
"""Every speed/memory figure of the README's performance table, measured back to back in one run.

    python benchmarks/perf_table.py [--device cpu|0] [--reference DIR [--reference-pythonpath P]]

Runs each benchmark script as a subprocess (one at a time, so they do not share the machine), writes
perf_table.md (figure + the command that reproduces it) into a new dated folder,
docs/experiments/<YYYY-MM-DD>-perf-table-run<N>/ (or --out), and prints the table; add a row for the
folder to docs/experiments/index.md (docs/results/performance.md holds the current figures). With
--reference (a reference YOLOv5 checkout; see benchmarks/bench_reference.py) it also times the reference
trainer against this one, interleaved, adds the side-by-side ratios and leaves that script's
perf_reference.md next to perf_table.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

from experiments import experiment_dir, remind_index

ROOT = Path(__file__).resolve().parents[1]
VARIANT_ROWS = ("fp32 ", "bf16 ", "bf16-weights ", "int8 ")  # bench_teacher_forward.py's table lines


def run(args: list[str]) -> list[str]:
    """Output lines of one benchmark (raises with its output when it fails)."""
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(args)} failed (exit {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r.stdout.splitlines()


def pick(lines: list[str], *prefixes: str) -> list[str]:
    """The result lines (those starting with one of the prefixes)."""
    return [ln.strip() for ln in lines if ln.strip().startswith(prefixes)]


def next_run() -> int:
    """One past the highest N of the docs/experiments/*-perf-table-run<N> folders."""
    ns = [int(d.name.rsplit("-run", 1)[1]) for d in (ROOT / "docs" / "experiments").glob("*-perf-table-run*")
          if d.name.rsplit("-run", 1)[1].isdigit()]
    return max(ns, default=0) + 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="file to write (default: perf_table.md in a new dated folder "
                    "docs/experiments/<YYYY-MM-DD>-perf-table-run<N>/, N one past the last run)")
    ap.add_argument("--reference", default="", help="folder of a reference YOLOv5 train.py: add the side-by-side rows")
    ap.add_argument("--reference-pythonpath", default="", help="extra PYTHONPATH the reference needs")
    ap.add_argument("--reference-pairs", type=int, default=3)
    a = ap.parse_args()
    out = Path(a.out) if a.out else experiment_dir(f"perf-table-run{next_run()}") / "perf_table.md"
    dev = [] if a.device == "cpu" else ["--device", a.device]
    import torch
    machine = (f"{os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, device {a.device}, "
               f"load average {os.getloadavg()[0]:.2f} at start")
    print(machine, flush=True)
    benches = [
        ("training loader (mosaic, batch 16, 2 workers)", ["benchmarks/bench_loader.py"], ("imgsz",)),
        ("training, yolov5n from scratch (fp32)", ["benchmarks/bench_train.py", *dev], ("train",)),
        ("training with KD, yolov5n ← demo yolov5s, teacher --teacher-precision auto (the default)",
         ["benchmarks/bench_train.py", "--kd", *dev], ("train",)),
        ("training with KD + unlabelled images (unlabeled_ratio 1), teacher auto",
         ["benchmarks/bench_train.py", "--kd", "--unlabeled-ratio", "1", *dev], ("train",)),
        ("training with KD, teacher fp32", ["benchmarks/bench_train.py", "--kd", "--teacher-precision", "fp32", *dev],
         ("train",)),
        ("training, --amp (bf16 autocast on CPU)", ["benchmarks/bench_train.py", "--amp", *dev], ("train",)),
        ("training with KD, --amp, teacher auto", ["benchmarks/bench_train.py", "--kd", "--amp", *dev], ("train",)),
        ("training, --compile", ["benchmarks/bench_train.py", "--compile", *dev], ("train", "first epoch")),
        ("KD/plain training throughput, interleaved pairs (teacher auto)",
         ["benchmarks/bench_kd_ratio.py", "--pairs", "3", *dev], ("KD/plain throughput",)),
        ("one optimizer step, plain vs KD (teacher auto)", ["benchmarks/bench_kd_step.py", "--iters", "20", *dev],
         ("device", "plain step", "KD step", "teacher forward", "KD/plain", "bound", "KD vs bound", "peak memory")),
        ("validation (val.run on the 200 demo val images)", ["benchmarks/bench_val.py", *dev], ("val",)),
    ]
    if a.device == "cpu":  # --teacher-precision int8 is a CPU option
        benches.append(("training with KD, teacher int8 (opt-in)",
                        ["benchmarks/bench_train.py", "--kd", "--teacher-precision", "int8"], ("train",)))
        benches.append(("KD/plain training throughput, interleaved pairs (teacher int8)",
                        ["benchmarks/bench_kd_ratio.py", "--pairs", "3", "--teacher-precision", "int8"],
                        ("KD/plain throughput",)))
        benches.append(("the teacher's forward at each precision: ms, largest map difference from fp32, mAP50-95, "
                        "the KD/plain step ratio it allows", ["benchmarks/bench_teacher_forward.py"],
                        ("cpu,", "plain step", "variant", *VARIANT_ROWS)))
    if a.reference:
        ref = ["benchmarks/bench_reference.py", "--reference", a.reference, "--pairs", str(a.reference_pairs),
               "--out", os.path.relpath(out.parent / "perf_reference.md", ROOT)]  # run from ROOT; no abs path in the table
        ref += ["--pythonpath", a.reference_pythonpath] if a.reference_pythonpath else []
        benches.append(("training time vs the reference YOLOv5 (yolov5n from scratch, 2 epochs, whole processes, "
                        "interleaved)", ref, ("project",)))
    rows = []
    for what, args, prefixes in benches:
        print(f"running {' '.join(args)}", flush=True)
        figures = pick(run(args), *prefixes)
        cells = "<br>".join(f.replace("|", "\\|") for f in figures)  # a figure's own "|" must not split the row
        rows.append(f"| {what} | {cells} | `python {' '.join(args)}` |")
    lines = [f"Machine: {machine}.", "", "| what | figures | command |", "|---|---|---|", *rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = ("" if a.device == "cpu" else " --device " + a.device) + (" --reference REF" if a.reference else "")
    out.write_text(f"# Performance, one run\n\nReproduce: `python benchmarks/perf_table.py{flags}`\n\n"
                   + "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten {out}")
    remind_index(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
