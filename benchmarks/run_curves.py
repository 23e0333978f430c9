#!/usr/bin/env python
"""Summarise training runs from their results.csv: best mAP, where the curve was, and the plateau test.

    python benchmarks/run_curves.py runs/train/teacher runs/train/student [--marks 10 25 50]

For each run folder (or results.csv) it prints the epochs, the best mAP50 / mAP50-95 (the epoch best.pt
keeps), mAP50-95 at a few epochs, and the plateau test the convergence benchmark uses: mAP50-95 gained
in the last 20 % of the epochs (best there minus best before; a run has plateaued below 0.5 points).
With two or more runs, each run's best mAP50-95 is also given as a multiple of the last one's, so
`teacher student` prints how far the teacher is ahead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kd_gain import M50, M5095, best_index, plateau_gain

from utils.reporting.loggers import read_results_csv

ROOT = Path(__file__).resolve().parents[1]

PLATEAU_POINTS = 0.5  # the convergence benchmark's test: < 0.5 mAP50-95 points in the last 20 % of epochs


def summarise(path: Path, marks: list[int]) -> dict:
    """Best (mAP50, mAP50-95), its epoch, mAP50-95 at `marks` and the plateau gain of one run."""
    csv = path / "results.csv" if path.is_dir() else path
    res = read_results_csv(csv)
    if not res or not res.get("epoch"):
        raise SystemExit(f"{csv}: no results rows (is it a train.py run folder?)")
    i = best_index(res)
    at = {e: res[M5095][res["epoch"].index(e)] for e in marks if e in res["epoch"]}
    return {"name": str(path), "epochs": len(res["epoch"]), "map50": res[M50][i], "map": res[M5095][i],
            "best_epoch": int(res["epoch"][i]), "at": at, "plateau": plateau_gain(res)}


def report(rows: list[dict]) -> list[str]:
    """Markdown table of the summaries; the ratio column compares each run with the last one."""
    head = "| run | epochs | best mAP50 | best mAP50-95 (epoch) | mAP50-95 at epoch | last 20 % gained | plateaued |"
    if len(rows) > 1:
        head += " × last run |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    ref = rows[-1]["map"]
    for r in rows:
        at = ", ".join(f"{e}: {v * 100:.1f}" for e, v in r["at"].items()) or "–"
        verdict = "yes" if r["plateau"] * 100 < PLATEAU_POINTS else "no"
        line = (f"| {r['name']} | {r['epochs']} | {r['map50'] * 100:.1f} | {r['map'] * 100:.1f} ({r['best_epoch']}) "
                f"| {at} | {r['plateau'] * 100:+.2f} | {verdict} |")
        if len(rows) > 1:
            line += f" {r['map'] / ref:.2f}× |" if ref > 0 else " – |"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="train.py run folders or results.csv files")
    ap.add_argument("--marks", nargs="*", type=int, default=[], help="epochs at which to show mAP50-95")
    a = ap.parse_args(argv)
    print("\n".join(report([summarise(p, a.marks) for p in a.runs])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
