#!/usr/bin/env python
"""Does distillation help? Train the same student with and without the teacher, everything else equal.

    python benchmarks/kd_gain.py                       # main experiment: 2 arms x 3 seeds
    python benchmarks/kd_gain.py --mode sweep          # dist_loss x temperature x ratio, continuing --start
    python benchmarks/kd_gain.py --mode finetune       # continue a baseline student with / without KD
    python benchmarks/kd_gain.py --mode converge       # plateaued shipped student: baseline vs each --dist_norm
    python benchmarks/kd_gain.py --mode unlabeled      # 20 % labelled + the rest unlabelled: 4 arms
    python benchmarks/kd_gain.py --mode unlabeled --pseudo soft+0.5 0.5 --matched-steps soft+0.5   # + pseudo-labels

Each run is a plain `train.py` subprocess (yolov5n from scratch on the demo data unless --student is
given); the figures come from the runs' results.csv. Writes kd_<mode><tag>.md (+ the .png plots) into a new
dated folder, docs/experiments/<YYYY-MM-DD>-kd-<mode><tag>/ (or --out), and prints the table rows; add a row
for the folder to docs/experiments/index.md.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from experiments import experiment_dir, write_report
from optimizer.config import KD_SPECS, KDConfig
from utils.evaluation.metrics import fitness
from utils.reporting.loggers import read_results_csv

ROOT = Path(__file__).resolve().parents[1]

DEMO_TEACHER = ROOT / "checkpoint" / "yolov5s-shapes.pt"
DEMO_STUDENT = ROOT / "checkpoint" / "yolov5n-shapes.pt"
M50, M5095 = "metrics/mAP_0.5", "metrics/mAP_0.5:0.95"
# The folder-naming baseline, not defaults (the flags default to train.py's, from KD_SPECS / KDConfig): run
# folders name only what differs from these, so they stay fixed (a changed literal would orphan every stored run)
DEF_LOSS, DEF_T, DEF_RATIO, DEF_NORM, DEF_UNLABELED = "l2", 5.0, 0.5, "mean", 1.0
# Settings a converge arm may set after a comma, and the short names its label and folder give them
ARM_SETTINGS = {"dist_box": "box", "dist_obj": "obj", "dist_cls": "cls", "dist_loc": "loc", "distill_decay": "",
                "distill_floor": "floor"}


def _check_stored_run(run: Path, want: dict) -> None:
    """Refuse to reuse or overwrite a run folder whose opt.yaml records other data, imgsz, epochs, start or
    teacher: folder names carry the arm's settings but not these, so another dataset's run would otherwise be
    read as this one's, and a finished run of another length deleted as if it had been interrupted."""
    import yaml

    opt_file = run / "opt.yaml"
    if not opt_file.exists():
        return  # folders from before opt.yaml: nothing to compare against
    opt = yaml.safe_load(opt_file.read_text()) or {}
    for key, value in want.items():
        stored = opt.get(key)
        if key in ("weights", "t_weights"):  # paths may be written relative or absolute
            same = Path(str(stored or "")).name == Path(str(value or "")).name
        elif key == "imgsz":
            same = stored is None or (stored[0] if isinstance(stored, list) else stored) == value
        elif key == "epochs":
            same = stored is None or int(stored) == value
        else:
            same = Path(str(stored)).name == Path(str(value)).name
        if not same:
            raise SystemExit(f"{run}: this run was trained with {key} {stored!r}, not {value!r}; "
                             f"pass another --project (or move the folder) to run these settings")


def train_run(name: str, a, *, seed: int, epochs: int, kd: dict | None, weights: str = "", data: str = "",
              hyp: str | None = None, alone: bool = False, extra: tuple[str, ...] = ()) -> dict:
    """One training run (reused if its results.csv is complete); returns its results.csv columns, plus
    'seconds' (the run's wall time, recorded beside it) where known."""
    run = Path(a.project) / name
    csv = run / "results.csv"
    timing = Path(a.project) / f"{name}.seconds"
    if run.exists():
        _check_stored_run(run, {"data": data or a.data, "imgsz": a.imgsz, "epochs": epochs, "weights": weights,
                                "t_weights": a.teacher if kd else None})
    if csv.exists() and (run / "weights/best.pt").exists():
        res = read_results_csv(csv)
        if len(res.get("epoch", [])) == epochs:
            print(f"{name}: reusing {csv}")
            if timing.exists():
                res["seconds"] = float(timing.read_text())
            return res
    if run.exists():
        shutil.rmtree(run)  # an interrupted run: start it again rather than append to its results.csv
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", data or a.data, "--imgsz", str(a.imgsz), "--epochs", str(epochs),
           "--batch-size", str(a.batch), "--workers", str(a.workers), "--seed", str(seed), "--project", a.project,
           "--name", name, "--exist-ok", "--noplots", "--device", a.device]
    cmd += ["--weights", weights] if weights else ["--cfg", a.student, "--weights", ""]
    cmd += list(extra) + a.train_flags.split()
    hyp = a.ft_hyp if hyp is None and weights else hyp
    if hyp:  # continuing a trained model: the fine-tuning hyp (lower LR, gentle warmup)
        cmd += ["--hyp", hyp]
    if kd:
        cmd += ["--t_weights", a.teacher, "--dist_loss", kd["dist_loss"], "--temperature", str(kd["T"]),
                "--distill_ratio", str(kd["ratio"]), "--dist_norm", kd["norm"]]
        if "unlabeled_ratio" in kd:
            cmd += ["--unlabeled_ratio", str(kd["unlabeled_ratio"])]
        if kd.get("pseudo_conf"):
            cmd += ["--pseudo_conf", str(kd["pseudo_conf"]), "--pseudo_ignore", str(kd["pseudo_ignore"]),
                    "--pseudo_weight", str(kd["pseudo_weight"])]
        if kd.get("feat_kd", "none") != "none":
            cmd += ["--feat_kd", kd["feat_kd"], "--feat_ratio", str(kd["feat_ratio"])]
        for key, value in kd.get("extra", {}).items():
            cmd += [f"--{key}", str(value)]
        cmd += ["--teacher-precision", a.teacher_precision]
    print(" ".join(cmd), flush=True)
    log = Path(a.project) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # runs side by side must each get one thread: oversubscribed OpenMP threads slow both many times over
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if a.jobs > 1 and not alone else None
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        raise SystemExit(f"{name} failed (exit {r.returncode}); see {log}")
    seconds = time.perf_counter() - t0
    timing.write_text(f"{seconds:.1f}\n")
    return {**read_results_csv(csv), "seconds": seconds}


def best_index(res: dict) -> int:
    """Row of the epoch best.pt holds: highest train.py fitness, the first such epoch on a tie."""
    cols = ("metrics/precision", "metrics/recall", M50, M5095)
    return int(fitness(list(zip(*(res[c] for c in cols)))).argmax())


def best_row(res: dict) -> tuple[float, float]:
    """(mAP50, mAP50-95) of the epoch best.pt holds."""
    i = best_index(res)
    return res[M50][i], res[M5095][i]


def mean_spread(xs: list[float]) -> str:
    """'mean ± sample std' in mAP points."""
    m = statistics.mean(xs) * 100
    s = statistics.stdev(xs) * 100 if len(xs) > 1 else 0.0
    return f"{m:.1f} ± {s:.1f}"


def teacher_map(a) -> tuple[float, float]:
    """The teacher's own val mAP (the ceiling)."""
    import val
    (_, _, m50, m, *_), _, _ = val.run(a.data, weights=a.teacher, imgsz=a.imgsz, batch_size=32, device=a.device,
                                       plots=False, project=ROOT / "runs/kd_gain_val", exist_ok=True, workers=a.workers)
    return m50, m


def _kd_flags(a, unlabeled: bool = False) -> tuple[dict, str]:
    """The KD settings given by the flags (main, finetune, unlabeled), and a folder suffix that names them
    unless they all equal DEF_* (unlabeled: unlabeled_ratio counts too and is named)."""
    kd = {"dist_loss": a.dist_loss, "T": a.temperature, "ratio": a.distill_ratio, "norm": a.dist_norm}
    settings = [a.dist_norm, a.distill_ratio, a.dist_loss, a.temperature]
    defaults = [DEF_NORM, DEF_RATIO, DEF_LOSS, DEF_T]
    tag = f"_{a.dist_norm}{a.distill_ratio:g}_{a.dist_loss}T{a.temperature:g}"
    if unlabeled:
        settings.append(a.unlabeled_ratio)
        defaults.append(DEF_UNLABELED)
        tag += f"_u{a.unlabeled_ratio:g}"
    return kd, "" if settings == defaults else tag


def main_experiment(a) -> list[str]:
    kd, tag = _kd_flags(a)
    rows, curves = [], {}
    for seed in a.seeds:
        base = train_run(f"base_s{seed}", a, seed=seed, epochs=a.epochs, kd=None)
        dist = train_run(f"kd{tag}_s{seed}", a, seed=seed, epochs=a.epochs, kd=kd)
        curves[seed] = (base[M5095], dist[M5095])
        rows.append((seed, best_row(base), best_row(dist)))
    t50, t5095 = teacher_map(a)
    lines = [f"Student {a.student} from scratch, {a.epochs} epochs, imgsz {a.imgsz}, batch {a.batch}; teacher "
             f"{Path(a.teacher).name} (mAP50 {t50 * 100:.1f}, mAP50-95 {t5095 * 100:.1f}); KD: --dist_norm {a.dist_norm} --dist_loss "
             f"{a.dist_loss} --temperature {a.temperature} --distill_ratio {a.distill_ratio}. Figures are best.pt's "
             f"epoch (max fitness), in mAP points.", "",
             "| seed | baseline mAP50 | KD mAP50 | baseline mAP50-95 | KD mAP50-95 | gain mAP50-95 |",
             "|---|---|---|---|---|---|"]
    for seed, (b50, b), (k50, k) in rows:
        lines.append(f"| {seed} | {b50 * 100:.1f} | {k50 * 100:.1f} | {b * 100:.1f} | {k * 100:.1f} | {(k - b) * 100:+.1f} |")
    b50s, bs = [r[1][0] for r in rows], [r[1][1] for r in rows]
    k50s, ks = [r[2][0] for r in rows], [r[2][1] for r in rows]
    gains = [k - b for b, k in zip(bs, ks)]
    lines.append(f"| mean ± std | {mean_spread(b50s)} | {mean_spread(k50s)} | {mean_spread(bs)} | {mean_spread(ks)} | "
                 f"{mean_spread(gains)} |")
    lines.append(f"| teacher | {t50 * 100:.1f} | | {t5095 * 100:.1f} | | |")
    plot_curves(curves, Path(a.out) / "kd_gain.png", a)
    return lines


def plot_curves(curves: dict, path: Path, a) -> None:
    """mAP50-95 per epoch, both arms, one thin line per seed and a thick mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for arm, colour, label in ((0, "tab:blue", "baseline"), (1, "tab:orange", "KD")):
        ys = [c[arm] for c in curves.values()]
        for y in ys:
            ax.plot(range(len(y)), [v * 100 for v in y], color=colour, alpha=0.3, lw=1)
        n = min(len(y) for y in ys)
        ax.plot(range(n), [statistics.mean(y[i] for y in ys) * 100 for i in range(n)], color=colour, lw=2.5,
                label=f"{label} (mean of {len(ys)} seeds)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mAP50-95 (points)")
    ax.set_title(f"{a.student} on the demo data, imgsz {a.imgsz}")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def baseline_start(a, seed: int) -> tuple[Path, tuple[float, float]]:
    """best.pt of the seed's from-scratch baseline (reused or trained) and its (mAP50, mAP50-95)."""
    res = train_run(f"base_s{seed}", a, seed=seed, epochs=a.epochs, kd=None)
    return Path(a.project) / f"base_s{seed}" / "weights" / "best.pt", best_row(res)


def sweep(a) -> list[str]:
    """dist_loss x temperature x distill_ratio, each continuing the plateaued student (--start) with --dist_norm."""
    seed = a.seeds[0]
    start = a.start
    base = best_row(train_run(f"sweep_base_s{seed}", a, seed=seed, epochs=a.ft_epochs, kd=None, weights=start))
    s50, s0 = start_map(a, start)
    lines = [f"Sweep: every setting continues `{Path(start).name}` (mAP50-95 {s0 * 100:.2f}) for {a.ft_epochs} "
             f"epochs at imgsz {a.imgsz}, seed {seed}, --dist_norm {a.dist_norm}. The same continuation without KD "
             f"reaches mAP50-95 {base[1] * 100:.2f} (mAP50 {base[0] * 100:.2f}).", "",
             "| dist_loss | T | distill_ratio | mAP50 | mAP50-95 | vs no KD |", "|---|---|---|---|---|---|"]
    grid = [("l2", 1.0, r) for r in a.ratios] + list(itertools.product(("kl", "bce"), a.temperatures, a.ratios))
    jobs = [(loss, T, r) for loss, T, r in grid]

    def one(job):
        loss, T, r = job
        return best_row(train_run(f"sweep_{a.dist_norm}_{loss}_T{T:g}_r{r:g}_s{seed}", a, seed=seed,
                                  epochs=a.ft_epochs, kd={"dist_loss": loss, "T": T, "ratio": r,
                                                          "norm": a.dist_norm}, weights=start))

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        rows = list(pool.map(one, jobs))
    results = []
    for (loss, T, r), (m50, m) in zip(jobs, rows):
        results.append((m, loss, T, r))
        lines.append(f"| {loss} | {T:g}{' (unused)' if loss == 'l2' else ''} | {r:g} | {m50 * 100:.2f} | "
                     f"{m * 100:.2f} | {(m - base[1]) * 100:+.2f} |")
    m, loss, T, r = max(results)
    lo = min(results)[0]
    lines += ["", f"Highest: --dist_loss {loss}" + (f" --temperature {T:g}" if loss != "l2" else "") +
              f" --distill_ratio {r:g} (mAP50-95 {m * 100:.2f}, {(m - base[1]) * 100:+.2f} vs no KD); all "
              f"{len(results)} settings lie within {(m - lo) * 100:.2f} points of each other (one seed each).",
              "Mean mAP50-95 per distill_ratio over all losses and temperatures: " +
              ", ".join(f"{r:g}: {statistics.mean(x[0] for x in results if x[3] == r) * 100:.2f}" for r in a.ratios) + "."]
    return lines


def finetune(a) -> list[str]:
    seed = a.seeds[0]
    start, b = baseline_start(a, seed)
    kd, tag = _kd_flags(a)
    plain = best_row(train_run(f"ft_plain_s{seed}", a, seed=seed, epochs=a.ft_epochs, kd=None, weights=str(start)))
    dist = best_row(train_run(f"ft_kd{tag}_s{seed}", a, seed=seed, epochs=a.ft_epochs, kd=kd, weights=str(start)))
    return [f"Fine-tuning: start from base_s{seed}/best.pt (mAP50-95 {b[1] * 100:.1f}), {a.ft_epochs} more epochs.", "",
            "| arm | mAP50 | mAP50-95 |", "|---|---|---|",
            f"| continue without KD | {plain[0] * 100:.1f} | {plain[1] * 100:.1f} |",
            f"| continue with KD | {dist[0] * 100:.1f} | {dist[1] * 100:.1f} |"]


def start_map(a, weights: str) -> tuple[float, float]:
    """Val (mAP50, mAP50-95) of a checkpoint: the teacher, or the student the arms start from."""
    import val
    (_, _, m50, m, *_), _, _ = val.run(a.data, weights=weights, imgsz=a.imgsz, batch_size=32, device=a.device,
                                       plots=False, project=ROOT / "runs/kd_gain_val", exist_ok=True, workers=a.workers)
    return m50, m


def plateau_gain(res: dict) -> float:
    """mAP50-95 gained in the last 20 % of epochs: best there minus best before (the plateau test)."""
    y = res[M5095]
    k = max(1, math.ceil(0.2 * len(y)))
    return max(y[-k:]) - max(y[:-k]) if len(y) > k else float("nan")


def _flags_tag(flags: str) -> str:
    """'--amp --compile' -> '_amp_compile': runs with extra train.py flags get folders of their own."""
    return "".join("_" + f.lstrip("-").replace("=", "") for f in flags.split())


def _conv_name(arm: str, kd: dict | None, seed: int, precision: str = "auto", a_flags: str = "") -> str:
    """Run folder of a converge arm; KD arms carry their distill_ratio (and a teacher precision other than
    auto), so runs at other settings sit beside them."""
    if kd is None:
        return f"conv_{arm}{_flags_tag(a_flags)}_s{seed}"
    loss = "" if (kd["dist_loss"], kd["T"]) == (DEF_LOSS, DEF_T) else f"_{kd['dist_loss']}T{kd['T']:g}"
    feat = f"_{kd['feat_kd']}{kd['feat_ratio']:g}" if kd.get("feat_kd", "none") != "none" else ""
    extra = "".join(f"_{ARM_SETTINGS[k]}{v}" for k, v in kd.get("extra", {}).items())
    return (f"conv_{arm}_r{kd['ratio']:g}{loss}{feat}{extra}{'' if precision == 'auto' else '_t' + precision}"
            f"{_flags_tag(a_flags)}_s{seed}")


def parse_arm(spec: str, a) -> tuple[str, dict]:
    """A converge arm 'norm[:ratio[:loss[:T]]][+feat:feat_ratio][,setting=value...]' ('soft:0.5:bce:1',
    'iou:0.05+mse:0.5'; ratio 0 turns the output terms off: 'iou:0+pkd:0.3'; 'iou:0.05,dist_box=14,dist_obj=50'
    sets any of ARM_SETTINGS); what it leaves out comes from the flags."""
    spec, *settings = spec.split(",")
    extra = {}
    for item in settings:
        key, eq, value = item.partition("=")
        if key not in ARM_SETTINGS or not eq or not value:
            raise SystemExit(f"--norms {item!r}: expected setting=value with a setting among {', '.join(ARM_SETTINGS)}")
        extra[key] = value
    out_spec, _, feat_spec = spec.partition("+")
    parts = out_spec.split(":")
    if len(parts) > 4 or not parts[0]:
        raise SystemExit(f"--norms {spec!r}: expected norm[:ratio[:loss[:T]]][+feat:feat_ratio], e.g. soft:0.5:bce:1 "
                         f"or iou:0.05+mse:0.5")
    norm, ratio, loss, t = (parts + [""] * 3)[:4]
    kd = {"dist_loss": loss or a.dist_loss, "T": float(t) if t else a.temperature,
          "ratio": float(ratio) if ratio else a.distill_ratio, "norm": norm}
    label = f"{norm} r{kd['ratio']:g}" + ("" if (loss, t) == ("", "") else f" {kd['dist_loss']} T{kd['T']:g}")
    if feat_spec:
        feat, _, fratio = feat_spec.partition(":")
        if not feat or not fratio:
            raise SystemExit(f"--norms {spec!r}: the feature part must be form:feat_ratio, e.g. +mse:0.5")
        kd.update(feat_kd=feat, feat_ratio=float(fratio))
        label = (f"{label} + " if kd["ratio"] else "") + f"{feat} f{kd['feat_ratio']:g}"
    if extra:
        kd["extra"] = extra
        label += " " + " ".join(f"{ARM_SETTINGS[k]}{v}" for k, v in extra.items())
    return label, kd


def converge(a) -> list[str]:
    """Every arm continues the same plateaued student (same data, hyp, seed, epochs): baseline vs each norm."""
    arms = [("baseline", None)]
    arms += [parse_arm(n, a) for n in a.norms]  # "soft" (the flags' settings), "soft:0.05", "soft:0.5:bce:1"
    jobs = [(arm, kd, seed) for seed in a.seeds for arm, kd in arms]
    # A KD run takes ~1.5x a baseline's time (the teacher's forward): starting them first keeps --jobs workers
    # busy to the end instead of leaving one KD run alone at the tail.
    jobs.sort(key=lambda j: j[1] is None)
    folder = {(arm, seed): _conv_name(kd["norm"] if kd else arm, kd, seed, a.teacher_precision, a.train_flags)
              for arm, kd, seed in jobs}
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        res = dict(zip([(arm, seed) for arm, _, seed in jobs],
                       pool.map(lambda j: train_run(folder[(j[0], j[2])], a, seed=j[2], epochs=a.ft_epochs, kd=j[1],
                                                    weights=a.start), jobs)))
    s50, s = start_map(a, a.start)
    t50, t = start_map(a, a.teacher)
    names = [arm for arm, _ in arms]
    lines = [f"Convergence regime: every arm continues `{Path(a.start).name}` (mAP50-95 {s * 100:.1f}) for "
             f"{a.ft_epochs} epochs at imgsz {a.imgsz}, batch {a.batch}, same data, hyp and seed; KD arms use "
             f"teacher `{Path(a.teacher).name}` (mAP50-95 {t * 100:.1f}), --dist_loss {a.dist_loss}, "
             f"--temperature {a.temperature:g}, --teacher-precision {a.teacher_precision}, the --distill_ratio "
             f"(and a loss and temperature other than these) in the column name. Figures: best.pt's epoch, "
             f"mAP50-95 in points (last row: mAP50 of the same epochs); gap closed = (arm - baseline) / (teacher - baseline).", "",
             "| seed | " + " | ".join(names) + " | baseline gain in last 20 % of epochs |",
             "|---|" + "---|" * (len(names) + 1)]
    best_of = {key: best_row(r) for key, r in res.items()}  # (mAP50, mAP50-95) of each run's best.pt epoch
    for seed in a.seeds:
        vals = [best_of[(n, seed)][1] for n in names]
        cells = [f"{vals[0] * 100:.2f}"] + [f"{v * 100:.2f} ({(v - vals[0]) * 100:+.2f})" for v in vals[1:]]
        lines.append(f"| {seed} | " + " | ".join(cells) + f" | {plateau_gain(res[('baseline', seed)]) * 100:+.2f} |")
    means = {n: statistics.mean(best_of[(n, sd)][1] for sd in a.seeds) for n in names}
    gains = {n: [best_of[(n, sd)][1] - best_of[("baseline", sd)][1] for sd in a.seeds] for n in names}
    lines.append("| mean | " + " | ".join([f"{means['baseline'] * 100:.2f}"] + [
        f"{means[n] * 100:.2f} ({statistics.mean(gains[n]) * 100:+.2f}, gap closed "
        f"{(means[n] - means['baseline']) / (t - means['baseline']) * 100:.0f} %)" if t > means["baseline"] else
        f"{means[n] * 100:.2f}" for n in names[1:]]) + " | |")
    # mAP50 of the same best.pt epochs: distillation can move it while mAP50-95 stays (boxes found, not tighter)
    m50 = {n: statistics.mean(best_of[(n, sd)][0] for sd in a.seeds) for n in names}
    g50 = {n: [best_of[(n, sd)][0] - best_of[("baseline", sd)][0] for sd in a.seeds] for n in names}
    lines.append("| mAP50, mean | " + " | ".join([f"{m50['baseline'] * 100:.2f}"] + [
        f"{m50[n] * 100:.2f} ({statistics.mean(g50[n]) * 100:+.2f}; per seed "
        + ", ".join(f"{g * 100:+.2f}" for g in g50[n]) + ")" for n in names[1:]]) + " | |")
    lines += ["", f"Start {s * 100:.2f}, teacher {t * 100:.2f}."
              + (f" Extra train.py flags in every run: `{a.train_flags}`." if a.train_flags else "")]
    if len(names) > 1:
        best = max(names[1:], key=lambda n: means[n])
        lines[-1] += (f" Best KD arm: `{best}` ({statistics.mean(gains[best]) * 100:+.2f} on the mean, per seed "
                      + ", ".join(f"{g * 100:+.2f}" for g in gains[best]) + ").")
        lines += iou_lines(a, {n: [Path(a.project) / folder[(n, sd)] / "weights/best.pt" for sd in a.seeds]
                               for n in ("baseline", best)})
    curves = {n: [res[(n, sd)][M5095] for sd in a.seeds] for n in names}
    shipped = Path(a.start).resolve() == Path(DEMO_STUDENT).resolve()
    plot_arms(curves, s, t, Path(a.out) / f"kd_converge{a.tag}.png", a,
              start_label="start (shipped student)" if shipped else f"start ({a.start})")
    return lines


def iou_lines(a, checkpoints: dict[str, list[Path]]) -> list[str]:
    """AP50, AP75 and mAP50-95 of each arm's best.pt per seed (val.py's pass): where a gain lands."""
    import val

    lines = ["", "Per IoU threshold (best.pt of each seed, val.py's pass; AP75 rewards the tighter boxes):", "",
             "| arm | seed | AP50 | AP75 | mAP50-95 |", "|---|---|---|---|---|"]
    means = {}
    for arm, files in checkpoints.items():
        rows = [val.ap_by_iou(a.data, str(f), imgsz=a.imgsz, device=a.device, workers=a.workers,
                              project=ROOT / "runs/kd_gain_val", name="ap_iou") for f in files]
        rows = [(r[0], r[5], statistics.mean(r)) for r in rows]
        for seed, (ap50, ap75, m) in zip(a.seeds, rows):
            lines.append(f"| {arm} | {seed} | {ap50 * 100:.2f} | {ap75 * 100:.2f} | {m * 100:.2f} |")
        means[arm] = [statistics.mean(col) for col in zip(*rows)]
        lines.append(f"| {arm} | mean | " + " | ".join(f"{x * 100:.2f}" for x in means[arm]) + " |")
    if len(means) == 2:
        (_, base), (arm, best) = means.items()
        lines.append(f"| gain of `{arm}` | | " + " | ".join(f"{(x - y) * 100:+.2f}" for x, y in zip(best, base)) + " |")
    return lines


def make_split(a) -> tuple[Path, Path, int, int]:
    """Split the demo training images: --labelled-fraction keep their labels, the rest become 'unlabeled:'.
    Returns the two dataset yamls (labelled part only; labelled part + unlabeled) and the two counts."""
    import yaml

    from utils.data.datasets import check_dataset, list_images

    d = check_dataset(a.data)
    images = list_images(d.train)
    rng = random.Random(a.split_seed)
    order = images[:]
    rng.shuffle(order)
    k = round(a.labelled_fraction * len(order))
    labelled, unlabelled = sorted(order[:k]), sorted(order[k:])
    # absolute: the yamls name these lists, and a dataset yaml resolves relative entries against its own path
    out = Path(a.project).resolve() / "unl_split"
    out.mkdir(parents=True, exist_ok=True)
    for name, files in (("labelled.txt", labelled), ("unlabeled.txt", unlabelled)):
        (out / name).write_text("".join(f"{f}\n" for f in files))
    base = {"path": str(d.path), "train": str(out / "labelled.txt"), "val": d.val, "names": d.names}
    yl, yu = out / "labelled.yaml", out / "labelled+unlabeled.yaml"
    yl.write_text(yaml.safe_dump(base))
    yu.write_text(yaml.safe_dump({**base, "unlabeled": str(out / "unlabeled.txt")}))
    return yl, yu, len(labelled), len(unlabelled)


def parse_pseudo(spec: str) -> tuple[bool, float, float, float]:
    """A pseudo-label arm '[soft+]conf[:ignore[:weight]]' -> (beside the soft terms, conf, ignore, weight); what it
    leaves out is train.py's default."""
    soft = spec.startswith("soft+")
    parts = spec[5 if soft else 0:].split(":")
    values = [KD_SPECS["pseudo_conf"].default, KD_SPECS["pseudo_ignore"].default, KD_SPECS["pseudo_weight"].default]
    try:
        for i, x in enumerate(parts[:3]):
            values[i] = float(x)
    except ValueError:
        values[0] = -1.0
    conf, ignore, weight = values
    if len(parts) > 3 or not 0 < conf <= 1:
        raise SystemExit(f"--pseudo {spec!r}: expected [soft+]conf[:ignore[:weight]] with 0 < conf <= 1, e.g. "
                         f"soft+0.5 or 0.5:0.1:1")
    return soft, conf, ignore, weight


def pseudo_arm(spec: str, soft_kd: dict, tag: str) -> tuple[str, dict, str]:
    """(label, the run's KD settings, folder stem) of a pseudo-label arm; alone means distill_ratio 0."""
    soft, conf, ignore, weight = parse_pseudo(spec)
    kd = {**soft_kd, "pseudo_conf": conf, "pseudo_ignore": ignore, "pseudo_weight": weight}
    if not soft:
        kd["ratio"] = 0.0
    label = f"pseudo {conf:g} (ignore {ignore:g}, weight {weight:g})" + (" + soft KD" if soft else " alone")
    stem = f"unl_pl{conf:g}_i{ignore:g}_w{weight:g}" + (tag if soft else f"_alone_u{soft_kd['unlabeled_ratio']:g}")
    return label, kd, stem


def batches_per_epoch(images: int, batch: int) -> int:
    """Batches in one pass over `images` (the loader keeps the last, partial batch)."""
    return math.ceil(images / batch)


def unlabeled(a) -> list[str]:
    """Arms from one start: the baseline on the labelled part, KD on it, KD on it + the unlabelled rest (their
    label files unread), and the baseline on every label (the ceiling). With --pseudo, the pseudo-label arms
    replace 'KD, labelled part'; --matched-steps adds one arm trained for as many batches as the ceiling."""
    yl, yu, nl, nu = make_split(a)
    start = Path(a.project) / "unl_start" / "weights" / "best.pt"
    # the start is only its final weights: validating it once, at the end, saves a third of its time
    train_run("unl_start", a, seed=0, epochs=a.pre_epochs, kd=None, data=str(yl), alone=True,
              extra=("--noval",))
    kd, tag = _kd_flags(a, unlabeled=True)
    u_kd = {**kd, "unlabeled_ratio": a.unlabeled_ratio}
    # KD folders carry their settings (the defaults keep the plain names) so that runs of several settings
    # in one --project share the two baseline arms instead of reusing each other's KD runs
    # (extra train.py flags name every folder, as in converge; a teacher precision other than auto the KD ones)
    flags = _flags_tag(a.train_flags)
    tag += ("" if a.teacher_precision == "auto" else "_t" + a.teacher_precision) + flags
    n_all = nl + nu
    e = a.ft_epochs
    # (label, kd settings, data, folder stem, epochs)
    arms = [("baseline, labelled part", None, yl, f"unl_base20{flags}", e)]
    pseudo = a.pseudo or a.matched_steps
    if not pseudo:
        arms.append(("KD, labelled part", kd, yl, f"unl_kd20{tag}", e))
    arms.append(("KD, labelled + unlabelled", u_kd, yu, f"unl_kd20u{tag}", e))
    for spec in a.pseudo:
        label, pkd, stem = pseudo_arm(spec, u_kd, tag)
        arms.append((label, pkd, yu, stem, e))
    arms.append(("baseline, all labels", None, Path(a.data), f"unl_base100{flags}", e))
    if a.matched_steps:
        # an epoch is one pass over an arm's labelled images: the ceiling's 30 epochs are ~5x the batches
        me = round(e * batches_per_epoch(n_all, a.batch) / batches_per_epoch(nl, a.batch))
        label, pkd, stem = pseudo_arm(a.matched_steps, u_kd, tag)
        arms.append((f"{label}, {me} epochs (matched steps)", pkd, yu, f"{stem}_e{me}", me))
    lo, hi = 0, next(i for i, x in enumerate(arms) if x[3].startswith("unl_base100"))
    jobs = [(i, seed) for seed in a.seeds for i in range(len(arms))]
    # the longest runs first, so that --jobs workers stay busy to the end
    cost = {i: x[4] * (n_all if x[2] == Path(a.data) else nl * (1 + (a.unlabeled_ratio if x[1] and x[2] == yu
                                                                       else 0))) for i, x in enumerate(arms)}
    jobs.sort(key=lambda j: -cost[j[0]])

    def one(job):
        i, seed = job
        return train_run(f"{arms[i][3]}_s{seed}", a, seed=seed, epochs=arms[i][4], kd=arms[i][1],
                         weights=str(start), data=str(arms[i][2]))

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        res = dict(zip(jobs, pool.map(one, jobs)))
    _, s = start_map(a, str(start))
    _, t = start_map(a, a.teacher)
    names = [x[0] for x in arms]
    lines = [f"Unlabelled images: {nl} training images keep their labels ({a.labelled_fraction:.0%}, split seed "
             f"{a.split_seed}), the other {nu} are listed under `unlabeled:` (their label files are not read). Start "
             f"for every arm: YOLOv5n trained {a.pre_epochs} epochs from scratch on the labelled part (mAP50-95 "
             f"{s * 100:.2f}); each arm then runs {e} epochs unless its name says otherwise (an epoch is one pass "
             f"over its labelled images) at imgsz {a.imgsz}, batch {a.batch}, hyp {a.ft_hyp}, same seed. KD: teacher "
             f"`{Path(a.teacher).name}` (mAP50-95 {t * 100:.2f}), --dist_norm {a.dist_norm} --distill_ratio "
             f"{a.distill_ratio:g} --dist_loss {a.dist_loss} --temperature {a.temperature:g}; --unlabeled_ratio "
             f"{a.unlabeled_ratio:g}; pseudo-label arms alone run with --distill_ratio 0. Figures: best.pt's epoch, "
             f"mAP50-95 in points (mAP50 in brackets); gap recovered = (arm - arm 1) / (arm {hi + 1} - arm 1).", "",
             "| seed | " + " | ".join(f"{i + 1}. {n}" for i, n in enumerate(names)) + " |",
             "|---|" + "---|" * len(names)]
    rows = {sd: [best_row(res[(i, sd)]) for i in range(len(arms))] for sd in a.seeds}  # (mAP50, mAP50-95)
    for sd in a.seeds:
        lines.append(f"| {sd} | " + " | ".join(f"{m * 100:.2f} ({m50 * 100:.1f})" for m50, m in rows[sd]) + " |")
    m = [statistics.mean(rows[sd][i][1] for sd in a.seeds) for i in range(len(arms))]
    m50 = [statistics.mean(rows[sd][i][0] for sd in a.seeds) for i in range(len(arms))]
    lines.append("| mean | " + " | ".join(f"{x * 100:.2f} ({y * 100:.1f})" for x, y in zip(m, m50)) + " |")

    def recovered(v: list[float], i: int) -> float:
        return (v[i] - v[lo]) / (v[hi] - v[lo]) if v[hi] > v[lo] else float("nan")

    lines.append("| gap recovered, mean | " + " | ".join(
        "" if i in (lo, hi) else f"{recovered(m, i):.0%} (per seed "
        + ", ".join(f"{recovered([r[1] for r in rows[sd]], i):.0%}" for sd in a.seeds) + ")"
        for i in range(len(arms))) + " |")
    kd_u = names.index("KD, labelled + unlabelled")
    lines.append("")
    for i, name in enumerate(names):
        if i in (lo, hi, kd_u) or names[i] == "KD, labelled part":
            continue
        beats = all(rows[sd][i][1] > rows[sd][kd_u][1] for sd in a.seeds)
        lines.append(f"- Arm {i + 1} ({name}): {recovered(m, i):.0%} of the gap on the mean of {len(a.seeds)} "
                     f"seed(s); {'beats' if beats else 'does not beat'} arm {kd_u + 1} (soft KD on the same images) "
                     f"on every seed.")
    if not pseudo:
        beats = all(rows[sd][kd_u][1] > rows[sd][1][1] for sd in a.seeds)
        lines.append(f"- Arm {kd_u + 1} recovers {recovered(m, kd_u):.0%} of the gap between arm 1 and arm {hi + 1} "
                     f"on the mean of {len(a.seeds)} seeds (target 50 %), and {'beats' if beats else 'does not beat'} "
                     f"arm 2 on every seed.")
    # what each arm cost: optimizer steps follow the batches (gradients accumulate to 64 images, ~4 batches of 16)
    lines += ["", "| arm | epochs | labelled images seen | unlabelled images seen | batches | wall time, mean |",
              "|---|---|---|---|---|---|"]
    for i, (name, akd, data, _, epochs) in enumerate(arms):
        n = n_all if data == Path(a.data) else nl
        nb = batches_per_epoch(n, a.batch) * epochs
        u = nb * round(a.unlabeled_ratio * a.batch) if akd and data == yu else 0
        secs = [res[(i, sd)].get("seconds") for sd in a.seeds]
        wall = f"{statistics.mean(secs) / 60:.1f} min" if all(secs) else "–"
        lines.append(f"| {i + 1}. {name} | {epochs} | {n * epochs} | {u} | {nb} | {wall} |")
    lines += ["", f"Batches of {a.batch}; an optimizer step comes every {max(round(64 / a.batch), 1)} batches after "
              f"the warm-up (gradients accumulate to 64 images). Wall time: training + validation, "
              f"{'one thread per run, ' + str(a.jobs) + ' runs at once' if a.jobs > 1 else 'one run at a time'}."]
    curves = {names[i]: [res[(i, sd)][M5095] for sd in a.seeds] for i in range(len(arms))}
    plot_arms(curves, s, t, Path(a.out) / f"kd_unlabeled{a.tag}.png", a, start_label="start (labelled part only)")
    return lines


def plot_arms(curves: dict, start: float, teacher: float, path: Path, a,
              start_label: str = "start (shipped student)") -> None:
    """mAP50-95 per epoch for every arm (thin: seeds, thick: mean), with the start and teacher levels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for (name, ys), colour in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
                                                   "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")):
        for y in ys:
            ax.plot(range(1, len(y) + 1), [v * 100 for v in y], color=colour, alpha=0.3, lw=1)
        n = min(len(y) for y in ys)
        ax.plot(range(1, n + 1), [statistics.mean(y[i] for y in ys) * 100 for i in range(n)], color=colour, lw=2.5,
                label=f"{name} (mean of {len(ys)} seeds)")
    ax.axhline(start * 100, color="grey", ls=":", label=start_label)
    ax.axhline(teacher * 100, color="black", ls="--", label="teacher")
    ax.set_xlabel("epoch of the continuation")
    ax.set_ylabel("val mAP50-95 (points)")
    ax.set_title(f"{Path(a.start).name if a.mode == 'converge' else 'the labelled-part student'} continued, "
                 f"imgsz {a.imgsz}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["main", "sweep", "finetune", "converge", "unlabeled"], default="main")
    ap.add_argument("--data", default="shapes.yaml")
    ap.add_argument("--student", default="yolov5n.yaml")
    ap.add_argument("--teacher", default=str(DEMO_TEACHER))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--sweep-epochs", type=int, default=2)
    ap.add_argument("--ft-epochs", type=int, default=6, help="finetune / converge: epochs of each continuation")
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ft-hyp", default="hyp.finetune.yaml", help="hyp for runs that continue a checkpoint ('' = default)")
    ap.add_argument("--dist_loss", default=KDConfig.dist_loss)
    ap.add_argument("--train-flags", default="", help="extra train.py flags for every run, e.g. '--amp' (converge "
                    "run folders are named after them)")
    ap.add_argument("--teacher-precision", default="auto", help="KD runs' --teacher-precision (auto: bf16 on a CPU "
                                                                "with native bf16)")
    # the KD flags default to what train.py uses (DEF_* above only name folders)
    ap.add_argument("--dist_norm", default=KD_SPECS["dist_norm"].default,
                    help="main, finetune, sweep, unlabeled: the normalisation every KD run uses")
    ap.add_argument("--temperature", type=float, default=KD_SPECS["temperature"].default)
    ap.add_argument("--distill_ratio", type=float, default=KD_SPECS["distill_ratio"].default)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 5.0])
    ap.add_argument("--ratios", type=float, nargs="+", default=None,
                    help="sweep: distill_ratio values (default: half, one and two times --distill_ratio)")
    ap.add_argument("--start", default=str(DEMO_STUDENT), help="converge: the plateaued student every arm continues")
    ap.add_argument("--norms", nargs="*", default=["mean:0.5", "weighted:0.05", "soft:0.05"],
                    help="converge: KD arms, each a --dist_norm, optionally with its own ratio, loss and T "
                         "(soft:0.05, soft:0.5:bce:1)")
    ap.add_argument("--labelled-fraction", type=float, default=0.2, help="unlabeled: share that keeps its labels")
    ap.add_argument("--split-seed", type=int, default=0, help="unlabeled: seed of the labelled/unlabelled split")
    ap.add_argument("--pre-epochs", type=int, default=60, help="unlabeled: epochs of the start on the labelled part")
    ap.add_argument("--unlabeled_ratio", type=float, default=DEF_UNLABELED, help="unlabeled: unlabelled per labelled image")
    ap.add_argument("--pseudo", nargs="*", default=[],
                    help="unlabeled: pseudo-label arms, each [soft+]conf[:ignore[:weight]] ('soft+0.5': beside the "
                         "soft terms of the flags; '0.5:0.1': alone, --distill_ratio 0)")
    ap.add_argument("--matched-steps", default="", help="unlabeled: one more pseudo-label arm (same form) trained for "
                    "as many batches as the all-labels arm")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each gets one thread when > 1)")
    ap.add_argument("--tag", default="", help="suffix of the docs files written (kd_<mode><tag>.md/.png)")
    ap.add_argument("--project", default=str(ROOT / "runs" / "kd_gain"))
    ap.add_argument("--out", default=None, help="folder for the .md/.png files (default: a new dated folder "
                    "docs/experiments/<YYYY-MM-DD>-kd-<mode><tag>/)")
    a = ap.parse_args()
    if a.out is None:
        a.out = str(experiment_dir(f"kd-{a.mode}{a.tag}"))
    Path(a.out).mkdir(parents=True, exist_ok=True)  # the plots are written before the table
    if a.ratios is None:
        a.ratios = [a.distill_ratio * f for f in (0.5, 1.0, 2.0)]
    lines = {"main": main_experiment, "sweep": sweep, "finetune": finetune, "converge": converge,
             "unlabeled": unlabeled}[a.mode](a)
    write_report(Path(a.out) / f"kd_{a.mode}{a.tag}.md", f"KD {a.mode}", "kd_gain.py", sys.argv[1:], lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
