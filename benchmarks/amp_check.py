#!/usr/bin/env python
"""Does bf16 autocast on CPU cost accuracy? The convergence benchmark's continuation, with and without --amp.

    python benchmarks/amp_check.py --jobs 2                 # 2 arms (plain, default teacher) x fp32/amp x 3 seeds

Every run continues the shipped 8-class student for --epochs epochs (the setting of `kd_gain.py --mode
converge`, whose run folders it shares: `--project runs/kd_gain` reuses finished runs of either script).
The fp32 and --amp runs of one arm and seed are queued next to each other, so with --jobs 2 they share the
CPU with each other and their wall times compare. Prints, and writes to amp_check<tag>.md in a dated folder
under docs/experiments/, the best.pt mAP50-95 of every run, the bf16 - fp32 differences and the verdict of
the rule that decides the CPU default: |mean difference| <= --mean-tol and every seed's |difference| <=
--seed-tol, in each arm.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from experiments import experiment_dir, write_report
from kd_gain import DEMO_STUDENT, DEMO_TEACHER, ROOT, _conv_name, best_row, start_map, train_run
from optimizer.config import KDConfig

PRECISIONS = ("fp32", "amp")
MIN_SEEDS = 3  # the seeds the CPU-default decision asks for


def default_kd() -> dict:
    """train.py's default distillation settings, in kd_gain.py's run form."""
    d = KDConfig()
    return {"dist_loss": d.dist_loss, "T": d.temperature, "ratio": d.distill_ratio, "norm": d.dist_norm}


def verdict(diffs: list[float], mean_tol: float, seed_tol: float) -> tuple[bool, str]:
    """(passes, reason) of the rule on one arm's bf16 - fp32 differences, in mAP points."""
    m = statistics.mean(diffs)
    worst = max(diffs, key=abs)
    ok = abs(m) <= mean_tol and abs(worst) <= seed_tol
    return ok, (f"mean {m:+.2f} (limit ±{mean_tol:g}), worst seed {worst:+.2f} (limit ±{seed_tol:g}): "
                + ("within" if ok else "outside"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="shapes.yaml")
    ap.add_argument("--start", default=str(DEMO_STUDENT), help="the student every run continues")
    ap.add_argument("--teacher", default=str(DEMO_TEACHER))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ft-hyp", default="hyp.finetune.yaml")
    ap.add_argument("--mean-tol", type=float, default=0.3, help="largest |bf16 - fp32| of an arm's seed mean (points)")
    ap.add_argument("--seed-tol", type=float, default=0.7, help="largest |bf16 - fp32| of any seed (points)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each gets one thread when > 1)")
    ap.add_argument("--project", default=str(ROOT / "runs" / "kd_gain"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=None, help="folder of the .md (default: docs/experiments/<date>-amp-check<tag>/)")
    a = ap.parse_args()
    # what kd_gain.train_run reads from its namespace besides these
    a.device, a.teacher_precision, a.train_flags, a.student = "cpu", "auto", "", ""
    a.out = Path(a.out or experiment_dir(f"amp-check{a.tag}"))

    kd = default_kd()
    arms = [("baseline", None), ("default teacher", kd)]
    jobs = [(arm, arm_kd, seed, prec) for seed in a.seeds for arm, arm_kd in arms for prec in PRECISIONS]

    def one(job):
        arm, kd, seed, prec = job
        flags = "--amp" if prec == "amp" else "--no-amp"  # explicit both ways: the default is auto
        tag = "--amp" if prec == "amp" else ""  # the fp32 folders keep the names they had when fp32 was the default
        name = _conv_name(kd["norm"] if kd else "baseline", kd, seed, "auto", tag)
        return train_run(name, a, seed=seed, epochs=a.epochs, kd=kd, weights=a.start, extra=(flags,))

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        res = dict(zip([(j[0], j[2], j[3]) for j in jobs], pool.map(one, jobs)))
    _, s = start_map(a, a.start)
    _, t = start_map(a, a.teacher)
    lines = [f"Every run continues `{Path(a.start).name}` (mAP50-95 {s * 100:.2f}) for {a.epochs} epochs at imgsz "
             f"{a.imgsz}, batch {a.batch}, hyp {a.ft_hyp}, same seed per row; the teacher arm uses "
             f"`{Path(a.teacher).name}` (mAP50-95 {t * 100:.2f}) with train.py's defaults (--dist_norm {kd['norm']}, "
             f"--distill_ratio {kd['ratio']:g}, --dist_loss {kd['dist_loss']}, --temperature {kd['T']:g}, teacher "
             f"precision auto). fp32: `--no-amp`; amp: `--amp` (bf16 autocast for the student). Figures: best.pt's "
             f"epoch, mAP50-95 in points; wall time of the whole train.py command.", "",
             "| arm | seed | fp32 | amp | amp - fp32 | fp32 wall | amp wall | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    verdicts, why_lines = [], []
    for arm, _ in arms:
        diffs = []
        for seed in a.seeds:
            f32, amp = res[(arm, seed, "fp32")], res[(arm, seed, "amp")]
            v32, vamp = best_row(f32)[1] * 100, best_row(amp)[1] * 100
            diffs.append(vamp - v32)
            w32, wamp = f32.get("seconds"), amp.get("seconds")
            walls = f"{w32:.0f} s | {wamp:.0f} s | {w32 / wamp:.2f}×" if w32 and wamp else "n/a | n/a | n/a"
            lines.append(f"| {arm} | {seed} | {v32:.2f} | {vamp:.2f} | {vamp - v32:+.2f} | {walls} |")
        lines.append(f"| {arm} | mean | | | {statistics.mean(diffs):+.2f} | | | |")
        ok, why = verdict(diffs, a.mean_tol, a.seed_tol)
        verdicts.append(ok)
        why_lines.append(f"- {arm}: {why}.")
    lines += [""] + why_lines
    n = len(a.seeds)
    if not all(verdicts):
        outcome = "**not met**: keep --amp opt-in on CPU."
    elif n >= MIN_SEEDS:
        outcome = "**met in every arm**: bf16 autocast may become the CPU default where the CPU runs bf16 natively."
    else:  # a partial run: the decision waits for the rest
        outcome = f"met in every arm so far; the decision takes {MIN_SEEDS} seeds."
    lines += ["", f"Rule ({n} seed{'s' if n > 1 else ''}): " + outcome]
    a.out.mkdir(parents=True, exist_ok=True)
    write_report(a.out / f"amp_check{a.tag}.md", "bf16 autocast on CPU: accuracy", "amp_check.py", sys.argv[1:],
                 lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
