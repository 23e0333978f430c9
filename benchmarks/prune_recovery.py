#!/usr/bin/env python
"""Prune the shipped YOLOv5s, then win back what pruning cost: with and without the unpruned model as teacher.

    python benchmarks/prune_recovery.py --stage prune                  # ratios 0.3/0.5/0.7 (l1); every importance at 0.5
    python benchmarks/prune_recovery.py --stage finetune               # 0.5, each importance, 10 epochs, no teacher
    python benchmarks/prune_recovery.py --stage recover --seeds 0 1 2 --epochs 30 \\
        [--importance l1] [--arm "name=--flag v ..."] [--no-reference]

Every pruning is a `prune.py` subprocess and every training a `train.py` subprocess, one at a time by
default (--jobs), each with OMP_NUM_THREADS=1 and at the lowest CPU priority (--nice). Runs whose results
exist under --project (default runs/prune_recovery) are reused, so an interrupted session can continue.
Figures: prune.py's prune.yaml (parameters, GFLOPs, latency, mAP right after pruning) and each training's
results.csv (the epoch best.pt holds, by train.py's fitness). Writes prune_<stage>.md (and for recover
the recovery-curve plot) into docs/experiments/<YYYY-MM-DD>-prune-<stage>/ (or --out), and prints it.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from experiments import experiment_dir, write_report

ROOT = Path(__file__).resolve().parents[1]

TEACHER = "checkpoint/yolov5s-shapes16.pt"
STUDENT = "checkpoint/yolov5n-shapes16.pt"
IMPORTANCES = ("l1", "l2", "bn", "lamp", "taylor")
M50, M5095 = "metrics/mAP_0.5", "metrics/mAP_0.5:0.95"
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
BUILTIN_ARMS = ("noteacher", "kd", "ref")


# ---------------------------------------------------------------------------------------------- arguments


def parse_arm(spec: str) -> tuple[str, list[str]]:
    """An extra recovery arm 'name=--flag v ...' -> (name, train.py flags). The name names the run folders."""
    name, sep, flags = spec.partition("=")
    name = name.strip()
    if not sep or not ARM_NAME.match(name) or name in BUILTIN_ARMS:
        raise SystemExit(f"--arm {spec!r}: expected name=--flag value ..., the name letters, digits, '.', '_' or "
                         f"'-' and not one of {', '.join(BUILTIN_ARMS)}")
    try:
        argv = shlex.split(flags)
    except ValueError as e:
        raise SystemExit(f"--arm {spec!r}: {e}") from None
    if not argv or not argv[0].startswith("--"):
        raise SystemExit(f"--arm {spec!r}: give the train.py flags after '=', e.g. kdbox=--dist_norm iou "
                         f"--distill_ratio 0.5")
    return name, argv


def prune_jobs(a) -> list[tuple[str, float]]:
    """(importance, ratio) of every pruning the prune stage makes: --ratios with l1, --importances at --ratio."""
    jobs = [("l1", r) for r in a.ratios] + [(imp, a.ratio) for imp in a.importances]
    seen, out = set(), []
    for job in jobs:
        if job not in seen:
            seen.add(job)
            out.append(job)
    return out


def prune_name(importance: str, ratio: float) -> str:
    return f"{importance}_r{ratio:g}"


def finetune_name(importance: str, ratio: float, epochs: int, seed: int) -> str:
    return f"ft_{prune_name(importance, ratio)}_e{epochs}_s{seed}"


def recover_name(arm: str, importance: str, ratio: float, epochs: int, seed: int) -> str:
    """Run folder of a recovery arm; the YOLOv5n reference does not depend on the pruning."""
    if arm == "ref":
        return f"ref_yolov5n_kd_e{epochs}_s{seed}"
    return f"rec_{prune_name(importance, ratio)}_{arm}_e{epochs}_s{seed}"


def arm_flags(arm: str, extra: dict[str, list[str]], teacher: str) -> list[str]:
    """train.py flags of an arm beyond the common ones; every arm but noteacher distils from the teacher."""
    if arm == "noteacher":
        return []
    if arm in ("kd", "ref"):
        return ["--t_weights", teacher]
    flags = list(extra[arm])
    return flags if "--t_weights" in flags else ["--t_weights", teacher] + flags


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["prune", "finetune", "recover"], required=True)
    ap.add_argument("--weights", default=TEACHER, help="the model pruned, and the recovery teacher")
    ap.add_argument("--student", default=STUDENT, help="recover: the same-size reference, distilled as in the Quickstart")
    ap.add_argument("--data", default="shapes16.yaml")
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--hyp", default="hyp.finetune.yaml")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="prune: ratios pruned with l1")
    ap.add_argument("--importances", nargs="+", default=list(IMPORTANCES), choices=IMPORTANCES,
                    help="prune, finetune: the importances compared at --ratio")
    ap.add_argument("--ratio", type=float, default=0.5, help="the ratio the importances and the recovery use")
    ap.add_argument("--importance", default="l1", choices=IMPORTANCES, help="recover: the pruning recovered")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 (finetune), 0 1 2 (recover)")
    ap.add_argument("--epochs", type=int, default=None, help="default: 10 (finetune), 30 (recover)")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=FLAGS",
                    help="recover: an extra distillation arm, e.g. 'kdbox=--dist_norm iou --distill_ratio 0.5' "
                         "(--t_weights is the unpruned model unless the flags name one); repeatable")
    ap.add_argument("--arms", nargs="+", default=None,
                    help="recover: only these arms (noteacher, kd, ref, and the --arm names); default all")
    ap.add_argument("--no-reference", action="store_true", help="recover: leave out the YOLOv5n reference arm")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--latency-runs", type=int, default=10)
    ap.add_argument("--train-flags", default="", help="extra train.py flags for every training")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: tables from the complete runs found (the others left out)")
    ap.add_argument("--jobs", type=int, default=1, help="subprocesses at once (each one thread)")
    ap.add_argument("--nice", type=int, default=19, help="niceness of every subprocess")
    ap.add_argument("--project", default=str(ROOT / "runs" / "prune_recovery"))
    ap.add_argument("--out", default=None, help="folder of the .md/.png (default docs/experiments/<date>-prune-<stage>)")
    a = ap.parse_args(argv)
    if a.seeds is None:
        a.seeds = [0] if a.stage == "finetune" else [0, 1, 2]
    if a.epochs is None:
        a.epochs = 10 if a.stage == "finetune" else 30
    a.extra = dict(parse_arm(s) for s in a.arm)
    if len(a.extra) != len(a.arm):
        raise SystemExit("--arm: two arms share a name")
    known = ["noteacher", "kd", *a.extra] + ([] if a.no_reference else ["ref"])
    if a.arms is None:
        a.arms = known
    else:
        unknown = [x for x in a.arms if x not in known]
        if unknown:
            raise SystemExit(f"--arms {' '.join(unknown)}: not among {', '.join(known)}")
    if not 0 < a.ratio < 1 or not all(0 < r < 1 for r in a.ratios):
        raise SystemExit("--ratio/--ratios: each must lie in (0, 1)")
    return a


# ---------------------------------------------------------------------------------------------- runs


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run(cmd: list[str], log: Path, a) -> float:
    """Run one subprocess (one thread, niced), its output to log; returns its wall seconds, refuses a failure."""
    print(" ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    nice = a.nice
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=_env(),
                           preexec_fn=(lambda: os.nice(nice)) if nice else None)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd[:2])} failed (exit {r.returncode}); see {log}")
    seconds = time.perf_counter() - t0
    log.with_suffix(".seconds").write_text(f"{seconds:.1f}\n")
    return seconds


def _seconds(path: Path) -> float | None:
    try:
        return float(path.read_text())
    except (OSError, ValueError):
        return None


def prune_run(imp: str, ratio: float, a) -> dict:
    """prune.py's recipe (prune.yaml) for one pruning, reused when it exists; adds 'seconds'."""
    import yaml

    name = prune_name(imp, ratio)
    folder = Path(a.project) / "prune" / name
    recipe = folder / "prune.yaml"
    log = Path(a.project) / "prune" / f"{name}.log"
    if not (recipe.exists() and (folder / "pruned.pt").exists()):
        if folder.exists():
            shutil.rmtree(folder)
        cmd = [sys.executable, str(ROOT / "prune.py"), "--weights", a.weights, "--ratio", f"{ratio:g}",
               "--importance", imp, "--imgsz", str(a.imgsz), "--data", a.data, "--workers", str(a.workers),
               "--latency-runs", str(a.latency_runs), "--project", str(Path(a.project) / "prune"), "--name", name,
               "--exist-ok"]
        _run(cmd, log, a)
    else:
        print(f"{name}: reusing {recipe}")
    out = yaml.safe_load(recipe.read_text())
    out["seconds"] = _seconds(log.with_suffix(".seconds"))
    out["path"] = str(folder / "pruned.pt")
    return out


def train_run(name: str, weights: str, flags: list[str], seed: int, a) -> dict | None:
    """One train.py run, reused when its results.csv holds every epoch and best.pt exists; returns the
    results.csv columns plus 'seconds' (wall time of the subprocess) where known. With --report-only a run
    that is not complete is not trained: None."""
    from utils.reporting.loggers import read_results_csv

    run = Path(a.project) / name
    csv = run / "results.csv"
    log = Path(a.project) / f"{name}.log"
    if csv.exists() and (run / "weights" / "best.pt").exists():
        res = read_results_csv(csv)
        if len(res.get("epoch", [])) == a.epochs:
            print(f"{name}: reusing {csv}")
            return {**res, "seconds": _seconds(log.with_suffix(".seconds"))}
    if a.report_only:
        print(f"{name}: not complete, left out (--report-only)")
        return None
    if run.exists():
        shutil.rmtree(run)  # interrupted: start again rather than append to its results.csv
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", a.data, "--imgsz", str(a.imgsz), "--epochs",
           str(a.epochs), "--batch-size", str(a.batch), "--workers", str(a.workers), "--seed", str(seed),
           "--device", a.device, "--weights", weights, "--hyp", a.hyp, "--project", a.project, "--name", name,
           "--exist-ok", "--noplots", *flags, *a.train_flags.split()]
    seconds = _run(cmd, log, a)
    return {**read_results_csv(csv), "seconds": seconds}


def best_row(res: dict) -> tuple[float, float]:
    """(mAP50-95, mAP50) of the epoch best.pt holds: train.py's fitness (0.1 mAP50 + 0.9 mAP50-95), first on a tie."""
    fit = [0.1 * m50 + 0.9 * m for m50, m in zip(res[M50], res[M5095])]
    i = fit.index(max(fit))
    return res[M5095][i], res[M50][i]


def pool_map(fn, jobs: list, a) -> list:
    if a.jobs <= 1:
        return [fn(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        return list(pool.map(fn, jobs))


# ---------------------------------------------------------------------------------------------- tables


def pts(x: float | None, nd: int = 1) -> str:
    """A mAP fraction in points, '–' when unknown."""
    return "–" if x is None else f"{x * 100:.{nd}f}"


def minutes(s: float | None) -> str:
    return "–" if s is None else f"{s / 60:.1f} min"


def mean_std(xs: list[float]) -> str:
    """'mean ± sample std' in points (no spread for one value)."""
    m = statistics.mean(xs) * 100
    return f"{m:.2f}" if len(xs) < 2 else f"{m:.2f} ± {statistics.stdev(xs) * 100:.2f}"


def prune_table(rows: list[tuple[str, float, dict]]) -> list[str]:
    """Markdown rows of the prune stage from (importance, ratio, prune.yaml) triples. Latency is each run's own
    pair (the original and the pruned model took turns in that run), so a load on the machine weighs on both;
    the unpruned row gives the median and range of the runs' 'before' figures."""
    lines = ["| importance | ratio | parameters | GFLOPs | CPU latency bs1, before → after | mAP50-95 after | "
             "mAP50 after | prune.py wall |", "|---|---|---|---|---|---|---|---|"]
    if rows:
        r0 = rows[0][2]
        before = [r["latency_ms_before"] for _, _, r in rows if r.get("latency_ms_before") is not None]
        lat = "–" if not before else (f"{statistics.median(before):.1f} ms" + (
            f" (median of {len(before)}, {min(before):.1f}–{max(before):.1f})" if len(before) > 1 else ""))
        lines.append(f"| (unpruned) | 0 | {r0['params_before']:,} | {r0['gflops_before']:.3f} | {lat} | "
                     f"{pts(r0.get('map50_95_before'), 2)} | {pts(r0.get('map50_before'), 2)} | |")
    for imp, ratio, r in rows:
        share = r["params_after"] / r["params_before"]
        gshare = r["gflops_after"] / r["gflops_before"] if r["gflops_before"] else float("nan")
        lb, la = r.get("latency_ms_before"), r.get("latency_ms_after")
        lat = "–" if lb is None or la is None else f"{lb:.1f} → {la:.1f} ms ({la / lb:.0%})"
        lines.append(f"| {imp} | {ratio:g} | {r['params_after']:,} ({share:.1%}) | {r['gflops_after']:.3f} "
                     f"({gshare:.1%}) | {lat} | {pts(r.get('map50_95_after'), 2)} | "
                     f"{pts(r.get('map50_after'), 2)} | {_sec(r.get('seconds'))} |")
    return lines


def _ms(x) -> str:
    return "–" if x is None else f"{x:.1f} ms"


def _sec(x) -> str:
    return "–" if x is None else f"{x:.0f} s"


def finetune_table(rows: list[tuple[str, dict, tuple[float, float], float | None]]) -> list[str]:
    """Markdown rows of the finetune stage from (importance, prune.yaml, (mAP50-95, mAP50) of best.pt, seconds)."""
    lines = ["| importance | mAP50-95 right after pruning | mAP50-95 after fine-tuning | mAP50 after fine-tuning | "
             "wall time |", "|---|---|---|---|---|"]
    for imp, recipe, (m, m50), secs in rows:
        lines.append(f"| {imp} | {pts(recipe.get('map50_95_after'), 2)} | {pts(m, 2)} | {pts(m50, 2)} | "
                     f"{minutes(secs)} |")
    return lines


def recover_table(results: dict[str, dict[int, dict]], seeds: list[int]) -> list[str]:
    """Markdown rows of the recover stage. results[arm][seed] = {'map': .., 'map50': .., 'seconds': ..}; an arm
    missing some seeds is shown with the seeds it has (its mean says over how many)."""
    lines = ["| arm | mAP50-95, mean ± std | mAP50, mean | seeds | " + " | ".join(f"seed {s} mAP50-95 (mAP50)"
                                                                                  for s in seeds)
             + " | wall time, mean |", "|---|---|---|---|" + "---|" * len(seeds) + "---|"]
    for arm, per_seed in results.items():
        done = [s for s in seeds if s in per_seed]
        if not done:
            continue
        maps = [per_seed[s]["map"] for s in done]
        m50 = statistics.mean(per_seed[s]["map50"] for s in done)
        cells = [f"{pts(per_seed[s]['map'], 2)} ({pts(per_seed[s]['map50'])})" if s in per_seed else "pending"
                 for s in seeds]
        secs = [per_seed[s].get("seconds") for s in done]
        wall = minutes(statistics.mean(secs)) if all(x is not None for x in secs) else "–"
        lines.append(f"| {arm} | {mean_std(maps)} | {m50 * 100:.1f} | {len(done)} | " + " | ".join(cells)
                     + f" | {wall} |")
    return lines


def gains(results: dict[str, dict[int, dict]], seeds: list[int], base: str = "noteacher") -> list[str]:
    """Per distilling arm: its mAP50-95 minus the base arm's, mean and per seed (seeds both have)."""
    out = []
    for arm, per_seed in results.items():
        if arm in (base, "ref") or base not in results:
            continue
        both = [s for s in seeds if s in per_seed and s in results[base]]
        if not both:
            continue
        d = [per_seed[s]["map"] - results[base][s]["map"] for s in both]
        out.append(f"- {arm} − {base}: {statistics.mean(d) * 100:+.2f} mAP50-95 points on the mean of {len(both)} "
                   f"seed(s) (per seed " + ", ".join(f"{s}: {x * 100:+.2f}" for s, x in zip(both, d)) + ")")
    return out


def plot_recovery(curves: dict[str, list[list[float]]], levels: dict[str, float], path: Path, title: str) -> None:
    """mAP50-95 per epoch per arm (thin: seeds, thick: mean) with horizontal reference levels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for (arm, ys), colour in zip(curves.items(), colours):
        for y in ys:
            ax.plot(range(1, len(y) + 1), [v * 100 for v in y], color=colour, alpha=0.3, lw=1)
        n = min(len(y) for y in ys)
        ax.plot(range(1, n + 1), [statistics.mean(y[i] for y in ys) * 100 for i in range(n)], color=colour, lw=2.5,
                label=f"{arm} (mean of {len(ys)} seed{'s' if len(ys) != 1 else ''})")
    for (label, v), ls in zip(levels.items(), ("--", ":", "-.")):
        ax.axhline(v * 100, color="black" if ls == "--" else "grey", ls=ls, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mAP50-95 (points)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- stages


def stage_prune(a) -> list[str]:
    jobs = prune_jobs(a)
    recipes = pool_map(lambda j: prune_run(j[0], j[1], a), jobs, a)
    rows = [(imp, ratio, r) for (imp, ratio), r in zip(jobs, recipes)]
    return [f"Pruned `{a.weights}` per layer at imgsz {a.imgsz}: {', '.join(f'{r:g}' for r in a.ratios)} with l1, "
            f"and each importance at {a.ratio:g} (taylor: 4 labelled train batches of 16 from `{a.data}`). "
            f"Figures from each run's prune.yaml: GFLOPs at {a.imgsz} px; CPU latency the median of "
            f"{a.latency_runs} batch-1 forwards, fused fp32, one thread, the original and the pruned model taking "
            f"turns; mAP on the val split as val.py loads the saved file (points).", "", *prune_table(rows)]


def stage_finetune(a) -> list[str]:
    seed = a.seeds[0]

    def one(imp):
        recipe = prune_run(imp, a.ratio, a)
        res = train_run(finetune_name(imp, a.ratio, a.epochs, seed), recipe["path"], [], seed, a)
        return None if res is None else (imp, recipe, best_row(res), res.get("seconds"))

    rows = [r for r in pool_map(one, list(a.importances), a) if r is not None]
    return [f"Each pruning at ratio {a.ratio:g} of `{a.weights}` trained {a.epochs} epochs without a teacher: "
            f"`--hyp {a.hyp}`, imgsz {a.imgsz}, batch {a.batch}, seed {seed}. Figures: the epoch best.pt holds "
            f"(results.csv, train.py's fitness), mAP in points; wall time of the whole train.py run.", "",
            *finetune_table(rows)]


def stage_recover(a) -> list[str]:
    recipe = prune_run(a.importance, a.ratio, a)
    jobs = [(arm, seed) for seed in a.seeds for arm in a.arms]

    def one(job):
        arm, seed = job
        weights = a.student if arm == "ref" else recipe["path"]
        name = recover_name(arm, a.importance, a.ratio, a.epochs, seed)
        return train_run(name, weights, arm_flags(arm, a.extra, a.weights), seed, a)

    runs = dict(zip(jobs, pool_map(one, jobs, a)))
    results: dict[str, dict[int, dict]] = {}
    curves: dict[str, list[list[float]]] = {}
    for (arm, seed), res in runs.items():
        if res is None:
            continue
        m, m50 = best_row(res)
        results.setdefault(arm, {})[seed] = {"map": m, "map50": m50, "seconds": res.get("seconds")}
        curves.setdefault(arm, []).append(res[M5095])
    sizes = model_sizes(a, recipe)
    teacher = recipe.get("map50_95_before")
    plot_recovery(curves, {"unpruned teacher": teacher} if teacher else {}, Path(a.out) / "prune_recover.png",
                  f"{prune_name(a.importance, a.ratio)} pruned YOLOv5s recovered, imgsz {a.imgsz}")
    lines = [f"Recovery of `{a.weights}` pruned at {a.ratio:g} ({a.importance}, per layer): {a.epochs} epochs of "
             f"`--hyp {a.hyp}` at imgsz {a.imgsz}, batch {a.batch}, seeds {' '.join(map(str, a.seeds))}. Arms: "
             "noteacher (no --t_weights); kd (`--t_weights " + a.weights + "`, the default distillation settings)"
             + "".join(f"; {n} (`{' '.join(arm_flags(n, a.extra, a.weights))}`)" for n in a.extra)
             + (f"; ref: the shipped YOLOv5n `{a.student}` distilled the same way (the Quickstart's arm)"
                if "ref" in a.arms else "") + ". Figures: the epoch best.pt holds (results.csv, train.py's "
             "fitness), mAP in points; wall time of the whole train.py run (training and per-epoch val).", "",
             *recover_table(results, a.seeds), "", *gains(results, a.seeds), "",
             "| model | parameters | GFLOPs | CPU latency bs1 |", "|---|---|---|---|"]
    for label, (params, gflops, ms) in sizes.items():
        lines.append(f"| {label} | {params:,} | {gflops:.3f} | {_ms(ms)} |")
    if teacher:
        lines += ["", f"Unpruned teacher: mAP50-95 {teacher * 100:.2f}; 0.90 × that is {teacher * 90:.2f}."]
    return lines


def model_sizes(a, recipe: dict) -> dict[str, tuple[int, float, float | None]]:
    """(parameters, GFLOPs at imgsz, CPU latency bs1 ms) of the unpruned, pruned and reference models; latency
    measured here, one thread, the models taking turns."""
    import torch

    from utils.training.prune import load_detection_model, measure_latency, summarise

    torch.set_num_threads(1)
    models = {"unpruned YOLOv5s": a.weights, f"pruned ({prune_name(a.importance, a.ratio)})": recipe["path"]}
    models["YOLOv5n (reference)"] = a.student  # sized even when its arm is not run
    loaded = {k: load_detection_model(v) for k, v in models.items()}
    lat = measure_latency(list(loaded.values()), a.imgsz, a.latency_runs)
    out = {}
    for (label, m), ms in zip(loaded.items(), lat):
        s = summarise(m, a.imgsz)
        out[label] = (s["params"], s["gflops"], ms)
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_opt(argv)
    if a.out is None:
        a.out = str(experiment_dir(f"prune-{a.stage}"))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    lines = {"prune": stage_prune, "finetune": stage_finetune, "recover": stage_recover}[a.stage](a)
    write_report(Path(a.out) / f"prune_{a.stage}.md", f"Prune and recover: {a.stage}", "prune_recovery.py",
                 argv or sys.argv[1:], lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
