"""Hyperparameter evolution for `train.py --evolve [N]`: YOLOv5 v7.0's scheme, extended to the KD keys.

Generation 0 trains the starting hyp (clipped to the evolve bounds of the hyp specs, HypSpec.evolve). Every
later generation picks a parent from the best rows of evolve.csv (fitness-weighted), multiplies its values by
random gains, clips them to the bounds and trains with the result for --epochs epochs (validation and saving
in the final epoch only). The run folder keeps three files: evolve.csv (one row per finished generation),
hyp_evolve.yaml (the best row as a hyp file for --hyp) and evolve.png. A generation trains in <run>/gen/, which
is removed afterwards.

Started again on the same folder (same --name with --exist-ok), an evolution continues after the last row
of its evolve.csv. A row is written (whole file, temp + rename) only once its generation has finished, and
generation g draws its random numbers from (seed, g), so nothing is lost, repeated or drawn twice.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from utils.core.config import atomic_write, find_file, read_yaml
from utils.core.distributed import DistInfo, select_device
from utils.core.errors import UserError
from utils.core.log import hold_run_folder, increment_path
from utils.evaluation.metrics import fitness
from utils.training.hyp import HYP_DIR, HYP_SPECS, HypSpec, load_hyp

LOGGER = logging.getLogger("yolov5kd")
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROJECT = ROOT / "runs" / "evolve"

MUTATION_P = 0.8  # chance that a numeric key takes part in a generation's mutation
SIGMA = 0.2  # spread of the multiplicative gain
GAIN_CLIP = (0.3, 3.0)  # a value changes by at most x0.3 .. x3 per generation
SWITCH_P = 0.2  # chance that a categorical key (dist_norm) switches to another choice in a generation
TOP_N = 5  # parents are drawn from this many best rows
MAX_FAILED_IN_A_ROW = 3  # a mutated hyp that fails to train scores 0; this many failures in a row stop the run
MAX_DRAWS = 100  # draws per generation before mutate gives up and returns the parent

METRIC_KEYS = ("metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
               "val/box_loss", "val/obj_loss", "val/cls_loss")
TAIL_KEYS = ("generation", "fitness")
OUTPUTS = ("evolve.csv", "hyp_evolve.yaml", "evolve.png")


Specs = Mapping[str, HypSpec]  # every hyp key's spec: HYP_SPECS merged with the caller's (the KD keys)
CheckFn = Callable[[Mapping[str, Any]], None]  # raises UserError for a hyp that breaks a rule between keys


# --------------------------------------------------------------------------------------------- pure functions
def evolved_keys(hyp: Mapping[str, Any], specs: Specs, teacher_keys: Collection[str], teacher: bool,
                 autoanchor: bool) -> list[str]:
    """The hyp keys evolve.csv carries, in the hyp's order: the keys whose spec has evolve bounds (gain 0
    included), `teacher_keys` (the KD keys) only with a teacher, `anchors` only with AutoAnchor on and no
    teacher (output distillation needs the teacher's number of anchors per level)."""
    keys = []
    for k in hyp:
        if k not in specs or specs[k].evolve is None:
            continue
        if (k in teacher_keys and not teacher) or (k == "anchors" and (teacher or not autoanchor)):
            continue
        keys.append(k)
    return keys


def constrain(hyp: Mapping[str, Any], keys: Sequence[str], specs: Specs) -> dict:
    """A copy with every numeric evolved key clipped to its bounds and rounded to 5 decimals (whole numbers
    for int keys such as anchors, as the hyp file requires)."""
    out = dict(hyp)
    for k in keys:
        s = specs[k]
        if s.choices:
            continue
        _, lo, hi = s.evolve
        v = round(min(max(float(out[k]), lo), hi), 5)
        out[k] = int(round(v)) if s.kind is int else v
    return out


def select_parent(rows: Sequence[Mapping[str, Any]], rng: np.random.Generator) -> Mapping[str, Any]:
    """One of the TOP_N best rows by fitness, drawn with probability ∝ fitness − min + 1e-6."""
    if not rows:
        raise ValueError("select_parent needs at least one row")
    f = np.array([float(r["fitness"]) for r in rows])
    order = np.argsort(-f, kind="stable")[:min(TOP_N, len(rows))]  # ties keep the earlier generation first
    w = f[order] - f[order].min() + 1e-6
    return rows[int(order[rng.choice(len(order), p=w / w.sum())])]


def mutate(parent: Mapping[str, Any], keys: Sequence[str], specs: Specs, rng: np.random.Generator,
           check: CheckFn | None = None) -> dict:
    """The parent's values with the numeric keys multiplied by v = clip(g·[U<0.8]·N(0,1)·u·0.2 + 1, 0.3, 3)
    (one u per draw, redrawn until some v differs from 1), categorical keys switched with probability
    SWITCH_P to one of their other choices (uniformly; gain 0 keeps them), then constrained to the bounds. A
    draw that the clipping and rounding turn back into the parent, or that `check` refuses (the rules between
    keys, such as pseudo_ignore below pseudo_conf), is drawn again, at most MAX_DRAWS times in all; when no
    draw passes, the parent comes back (a valid draw that equals it, or the parent itself)."""
    numeric = [k for k in keys if not specs[k].choices]
    g = np.array([float(specs[k].evolve[0]) for k in numeric])
    fallback = dict(parent)
    for _ in range(MAX_DRAWS):
        out = dict(parent)
        if numeric and (g > 0).any():
            v = np.ones(len(numeric))
            while (v == 1).all():
                v = g * (rng.random(len(g)) < MUTATION_P) * rng.standard_normal(len(g)) * rng.random() * SIGMA + 1
                v = v.clip(*GAIN_CLIP)
            for k, x in zip(numeric, v):
                out[k] = float(parent[k]) * float(x)
        for k in keys:
            # the gain test comes first so that a carried categorical key draws nothing
            if specs[k].choices and specs[k].evolve[0] > 0 and rng.random() < SWITCH_P:
                others = [c for c in specs[k].choices if c != parent[k]]
                out[k] = others[int(rng.integers(len(others)))]
        child = constrain(out, keys, specs)
        if check is not None:
            try:
                check(child)
            except UserError:
                continue
        if any(child[k] != parent[k] for k in keys):
            return child
        fallback = child
    return fallback


def generation_rng(seed: int, generation: int) -> np.random.Generator:
    """The generator of one generation: the same (seed, generation) draws the same, another draws anew."""
    return np.random.default_rng([int(seed) % 2**32, int(generation)])


def next_hyp(base: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], keys: Sequence[str], specs: Specs,
             seed: int, generation: int, check: CheckFn | None = None) -> dict:
    """Generation `generation`'s hyp: the (constrained) starting hyp when there are no rows yet, else a
    mutated copy of a parent drawn from the rows whose draws `check` accepts (see mutate). Keys outside `keys`
    keep the starting hyp's values."""
    if not rows:
        return constrain(base, keys, specs)
    rng = generation_rng(seed, generation)
    parent = select_parent(rows, rng)
    return mutate({**base, **{k: parent[k] for k in keys}}, keys, specs, rng, check)


def make_row(results: Sequence[float] | None, hyp: Mapping[str, Any], keys: Sequence[str], generation: int) -> dict:
    """One evolve.csv row: the 7 results (zeros for a failed generation), the evolved values, index, fitness."""
    res = [0.0] * len(METRIC_KEYS) if results is None else [float(x) for x in list(results)[:len(METRIC_KEYS)]]
    res = [round(x, 6) if math.isfinite(x) else 0.0 for x in res]
    row: dict[str, Any] = dict(zip(METRIC_KEYS, res))
    row.update({k: hyp[k] for k in keys})
    row["generation"] = int(generation)
    row["fitness"] = round(float(fitness(np.array([res]))[0]), 6)
    return row


# ------------------------------------------------------------------------------------------------------- files
def write_rows(path: Path, header: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """The whole evolve.csv (header + rows), replaced atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow([r[k] if isinstance(r[k], str) else repr(r[k]) for k in header])
    atomic_write(path, buf.getvalue())


def _parse(key: str, text: str, specs: Specs) -> Any:
    s = specs.get(key)
    if s is not None and s.choices:
        if text not in s.choices:
            raise ValueError(f"{key} {text!r} is not one of {', '.join(s.choices)}")
        return text
    if key == "generation" or (s is not None and s.kind is int):
        return int(float(text))
    return float(text)


def read_rows(path: Path, header: Sequence[str], specs: Specs) -> list[dict]:
    """The rows of an existing evolve.csv, checked against this evolution's columns and numbered 0, 1, …"""
    with open(path, newline="") as f:
        lines = [r for r in csv.reader(f) if r]
    if not lines:
        return []
    if lines[0] != list(header):
        raise UserError(f"{path}: its columns differ from this evolution's (another hyp file, --t_weights or "
                        f"--noautoanchor than when it was started?); continue with the same options or use a "
                        f"new --name")
    rows = []
    for i, line in enumerate(lines[1:]):
        try:
            if len(line) != len(header):
                raise ValueError(f"{len(line)} values for {len(header)} columns")
            row = {k: _parse(k, v, specs) for k, v in zip(header, line)}
        except ValueError as e:
            raise UserError(f"{path}: row {i + 1} cannot be read ({e})") from None
        if row["generation"] != i:
            raise UserError(f"{path}: row {i + 1} is generation {row['generation']}, expected {i}")
        rows.append(row)
    return rows


def best_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The row with the highest fitness (the earliest on ties)."""
    return max(rows, key=lambda r: (float(r["fitness"]), -int(r["generation"])))


def write_best_hyp(path: Path, base: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], keys: Sequence[str],
                   generations: int) -> dict:
    """hyp_evolve.yaml: the starting hyp with the best row's values, headed by a comment naming that row."""
    b = best_row(rows)
    hyp = {**base, **{k: b[k] for k in keys}}
    metrics = ", ".join(f"{k.split('/')[-1]} {b[k]:.5g}" for k in METRIC_KEYS)
    head = (f"# Hyperparameter evolution (train.py --evolve), best of {len(rows)}/{generations} generations\n"
            f"# Generation {b['generation']}, fitness {b['fitness']:.5g} (0.1 mAP_0.5 + 0.9 mAP_0.5:0.95)\n"
            f"# {metrics}\n"
            f"# Train with: python train.py --hyp {path.name}\n\n")
    atomic_write(path, head + yaml.safe_dump(hyp, sort_keys=False))
    return hyp


def write_plot(path: Path, rows: Sequence[Mapping[str, Any]], keys: Sequence[str], specs: Specs) -> None:
    """evolve.png: fitness against each evolved value (via a temp file, so an old plot is never half-replaced)."""
    from utils.reporting.plots import plot_evolve

    # savefig picks the format from the suffix, so the temp name keeps it; the ".evolve.png." prefix is what
    # remove_stale_temps looks for, as for atomic_write's temp files
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    plot_evolve({k: [r[k] for r in rows] for k in keys if specs[k].evolve[0] != 0},
                [float(r["fitness"]) for r in rows], tmp, best=int(best_row(rows)["generation"]))
    if tmp.exists():
        os.replace(tmp, path)


def remove_stale_temps(run: Path) -> int:
    """Delete the temp files a killed evolution left mid-write (its outputs are replaced via temp + rename)."""
    stale = [f for name in OUTPUTS for f in run.glob(f".{name}.*") if f.is_file()]  # every writer's temp prefix
    for f in stale:
        f.unlink()
    return len(stale)


def check_evolvable(hyp_arg: Any, specs: Specs, teacher_keys: Collection[str]) -> None:
    """A hyp file must hold every key the specs mutate (the teacher keys and `anchors` have defaults)."""
    if isinstance(hyp_arg, dict):
        raw = hyp_arg
        where = "hyp"
    else:
        p = find_file(hyp_arg, [HYP_DIR], "hyp yaml")
        raw, where = read_yaml(p, "hyp yaml"), str(p)
    missing = [k for k, s in specs.items()
               if s.evolve is not None and s.evolve[0] and k not in raw and k not in teacher_keys and k != "anchors"]
    if missing:
        raise UserError(f"{where}: --evolve mutates {', '.join(missing)}, which this hyp file lacks "
                        f"(add them, e.g. from data/hyps/hyp.scratch-low.yaml)")


# ---------------------------------------------------------------------------------------------------- the run
# The caller (train.py) hands in its training and its run-config resolution, so this layer needs nothing
# from the distillation package above it; the config is a frozen dataclass with enabled, hyp_values(),
# as_dict() and check(where) (its rules between keys, as one-line UserErrors), whose KD fields are named as
# the teacher keys.
TrainFn = Callable[[dict, argparse.Namespace, Any, DistInfo, Any], Sequence[float]]
ResolveFn = Callable[[argparse.Namespace, dict], Any]


def run_evolution(opt: argparse.Namespace, info: DistInfo, train_fn: TrainFn, resolve_fn: ResolveFn,
                  kd_specs: Mapping[str, HypSpec]) -> int:
    """--evolve N: check the options, then train the remaining generations in-process with train_fn.

    resolve_fn(opt, hyp) is the config a new run resolves (flag > hyp > default, teacher sha256); kd_specs are
    the distillation keys' specs (as for load_hyp), evolved only with a teacher."""
    n = opt.evolve
    if info.world_size > 1:
        raise UserError(f"--evolve is not supported with DDP (WORLD_SIZE {info.world_size}); run it as one process")
    if opt.resume:
        raise UserError("--resume and --evolve cannot be combined; an evolution continues from its evolve.csv "
                        "when started again with the same --name and --exist-ok")
    if n < 1:
        raise UserError(f"--evolve {n}: must be >= 1 (the number of generations)")
    autoanchor = not opt.noautoanchor
    specs = {**HYP_SPECS, **kd_specs}
    teacher_keys = tuple(kd_specs)
    check_evolvable(opt.hyp, specs, teacher_keys)
    base = load_hyp(opt.hyp, kd_specs)
    # flag > hyp > default, as for training: a typed --distill_ratio/--temperature/--dist_norm is the value of
    # generation 0, from which the later generations mutate
    kd = resolve_fn(opt, base)
    base.update(kd.hyp_values())
    if autoanchor and not kd.enabled and "anchors" not in base:
        base["anchors"] = 3  # evolved from 3 per level; AutoAnchor then computes them for the data
    keys = evolved_keys(base, specs, teacher_keys, kd.enabled, autoanchor)
    header = [*METRIC_KEYS, *keys, *TAIL_KEYS]

    project = opt.project if "project" in opt.cli_given else DEFAULT_PROJECT
    run = increment_path(Path(project) / opt.name, exist_ok=opt.exist_ok)
    device = select_device(opt.device, opt.batch_size)
    with hold_run_folder(run):  # a second evolution into the same folder would interleave evolve.csv rows
        return _evolve_generations(opt, run, n, base, kd, keys, header, device, train_fn, specs, teacher_keys)


def _evolve_generations(opt: argparse.Namespace, run: Path, n: int, base: dict, kd: Any, keys: list[str],
                        header: list[str], device: Any, train_fn: TrainFn, specs: Specs,
                        teacher_keys: Sequence[str]) -> int:
    """Train the generations evolve.csv lacks into `run` (held by the caller), writing each row as it finishes."""
    csv_path, yaml_path, png_path, gen_dir = (run / "evolve.csv", run / "hyp_evolve.yaml", run / "evolve.png",
                                              run / "gen")
    rows = read_rows(csv_path, header, specs) if csv_path.is_file() else []
    stale = remove_stale_temps(run)
    if rows:
        LOGGER.info(f"Evolve: continuing {csv_path}, {len(rows)} of {n} generations already done"
                    + (f"; removed {stale} temp file(s) of writes cut short" if stale else ""))

    def outputs() -> None:
        write_best_hyp(yaml_path, base, rows, keys, n)
        write_plot(png_path, rows, keys, specs)

    def config(hyp: Mapping[str, Any]) -> Any:
        return dataclasses.replace(kd, **{k: hyp[k] for k in teacher_keys})  # the evolved values, never the flags

    def check(hyp: Mapping[str, Any]) -> None:
        config(hyp).check()  # the rules the command line enforces hold for every generation

    failed, trained = 0, 0
    try:
        for g in range(len(rows), n):
            shutil.rmtree(gen_dir, ignore_errors=True)  # what a generation cut short left behind
            hyp = next_hyp(base, rows, keys, specs, opt.seed, g, check)
            gkd = config(hyp)
            gopt = argparse.Namespace(**vars(opt))
            gopt.save_dir, gopt.resume = str(gen_dir), False
            gopt.noval = gopt.nosave = gopt.noplots = True  # validate and save the final epoch only
            LOGGER.info(f"\nEvolve: generation {g + 1}/{n} " + " ".join(f"{k}={hyp[k]}" for k in keys))
            t0 = time.time()
            try:
                # a parent read from an older evolve.csv may break a rule that no draw could mend
                gkd.check(f"evolve generation {g}")
                # the distillation values travel in gkd alone, as in a plain run
                results = train_fn({k: v for k, v in hyp.items() if k not in teacher_keys}, gopt, device, DistInfo(),
                                   gkd)
                failed = 0
            except UserError as e:
                shutil.rmtree(gen_dir, ignore_errors=True)
                failed += 1
                if not rows or failed >= MAX_FAILED_IN_A_ROW:
                    raise  # the starting hyp must train, and repeated failures are not the hyp's fault
                LOGGER.warning(f"WARNING: evolve generation {g}: training failed ({e}); scored as fitness 0")
                results = None
            rows.append(make_row(results, hyp, keys, g))
            write_rows(csv_path, header, rows)
            shutil.rmtree(gen_dir, ignore_errors=True)
            outputs()
            trained += 1
            b = best_row(rows)
            LOGGER.info(f"Evolve: generation {g + 1}/{n} fitness {rows[-1]['fitness']:.5g} in "
                        f"{time.time() - t0:.0f}s; best so far {b['fitness']:.5g} (generation {b['generation']})")
    except KeyboardInterrupt:
        LOGGER.warning(f"Interrupted; {csv_path} keeps the {len(rows)} finished generation(s): run the same command "
                       f"with --name {run.name} --exist-ok to continue")
        return 130
    if rows and not trained:
        outputs()  # nothing left to train: refresh the files (a kill may have come between csv and yaml)
    b = best_row(rows) if rows else None
    LOGGER.info(f"\nHyperparameter evolution complete: {len(rows)} generations in {csv_path}"
                + (f"\nBest: generation {b['generation']}, fitness {b['fitness']:.5g}, saved as {yaml_path}\n"
                   f"Use it with: python train.py --hyp {yaml_path}" if b else ""))
    return 0
