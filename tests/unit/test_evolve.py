"""train.py --evolve: bounds, mutation and parent choice as pure functions; the run loop with a stand-in
training (continuation, failures, outputs); two tiny real evolutions (with and without a teacher); refusals."""
import collections
import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import train
from conftest import ROOT, random_checkpoint, run_cli
from optimizer.config import KD_SPECS
from utils.core.errors import UserError
from utils.training import evolve as ev
from utils.training.hyp import HYP_SPECS, load_hyp

TRAIN = str(ROOT / "train.py")
LOW = ROOT / "data/hyps/hyp.scratch-low.yaml"
COMMON = ["--cfg", "yolov5n.yaml", "--imgsz", "64", "--batch-size", "4", "--workers", "0", "--noautoanchor",
          "--noplots", "--epochs", "1"]
KD = ("distill_ratio", "temperature", "dist_norm", "unlabeled_ratio", "feat_kd", "feat_ratio", "pseudo_conf",
      "pseudo_weight", "pseudo_ignore", "dist_box", "dist_obj", "dist_cls", "dist_loc", "distill_decay",
      "distill_floor")
SPECS = {**HYP_SPECS, **KD_SPECS}  # the one table evolve reads its bounds and choices from
BOUNDS = {k: s.evolve for k, s in SPECS.items() if s.evolve is not None and not s.choices}  # numeric keys
CHOICES = {k: s.choices for k, s in SPECS.items() if s.evolve is not None and s.choices}  # categorical keys


def _low(**extra) -> dict:
    return {**load_hyp(LOW, KD_SPECS), **extra}


def _in_bounds(hyp: dict, keys) -> None:
    for k in keys:
        if k in CHOICES:
            assert hyp[k] in CHOICES[k], (k, hyp[k])
            continue
        _, lo, hi = BOUNDS[k]
        assert lo <= hyp[k] <= hi, (k, hyp[k])
        assert round(hyp[k], 5) == hyp[k], (k, hyp[k])


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------- pure functions
def test_bounds_lie_inside_the_valid_hyp_ranges():
    specs = {**HYP_SPECS, **KD_SPECS}
    assert set(BOUNDS) | set(CHOICES) == set(specs)  # every key is evolved (or carried)
    assert not hasattr(ev, "BOUNDS") and not hasattr(ev, "CHOICES")  # the spec table is the only copy
    for k, (gain, lo, hi) in BOUNDS.items():
        s = specs[k]
        assert gain >= 0 and lo <= hi, k
        assert s.lo <= lo and hi <= s.hi and not (s.lo_open and lo == s.lo), k
    assert CHOICES == {"dist_norm": KD_SPECS["dist_norm"].choices, "feat_kd": KD_SPECS["feat_kd"].choices,
                       "distill_decay": KD_SPECS["distill_decay"].choices}
    assert KD_SPECS["distill_decay"].evolve[0] == 0  # carried: a schedule is judged over a whole run
    assert KD_SPECS["dist_norm"].evolve[0] > 0  # switched, not only carried
    assert KD_SPECS["feat_kd"].evolve[0] == 0  # carried: the forms differ in cost
    # YOLOv5 v7.0's table, then the distillation keys: the same values in the same order as before they moved
    assert [(k, *v) for k, v in BOUNDS.items()] == [
        ("lr0", 1, 1e-5, 1e-1), ("lrf", 1, 0.01, 1.0), ("momentum", 0.3, 0.6, 0.98), ("weight_decay", 1, 0.0, 0.001),
        ("warmup_epochs", 1, 0.0, 5.0), ("warmup_momentum", 1, 0.0, 0.95), ("warmup_bias_lr", 1, 0.0, 0.2),
        ("box", 1, 0.02, 0.2), ("cls", 1, 0.2, 4.0), ("cls_pw", 1, 0.5, 2.0), ("obj", 1, 0.2, 4.0),
        ("obj_pw", 1, 0.5, 2.0), ("iou_t", 0, 0.1, 0.7), ("anchor_t", 1, 2.0, 8.0), ("anchors", 2, 2.0, 10.0),
        ("fl_gamma", 0, 0.0, 2.0), ("hsv_h", 1, 0.0, 0.1), ("hsv_s", 1, 0.0, 0.9), ("hsv_v", 1, 0.0, 0.9),
        ("degrees", 1, 0.0, 45.0), ("translate", 1, 0.0, 0.9), ("scale", 1, 0.0, 0.9), ("shear", 1, 0.0, 10.0),
        ("perspective", 0, 0.0, 0.001), ("flipud", 1, 0.0, 1.0), ("fliplr", 0, 0.0, 1.0), ("mosaic", 1, 0.0, 1.0),
        ("mixup", 1, 0.0, 1.0), ("copy_paste", 1, 0.0, 1.0), ("distill_ratio", 1, 0.01, 5.0),
        ("temperature", 1, 1.0, 10.0), ("unlabeled_ratio", 0, 0.0, 64.0), ("feat_ratio", 1, 0.005, 1.0),
        ("pseudo_conf", 1, 0.0, 0.95), ("pseudo_weight", 1, 0.0, 4.0), ("pseudo_ignore", 1, 0.0, 0.9),
        ("dist_box", 1, 0.0, 20.0), ("dist_obj", 1, 0.0, 20.0), ("dist_cls", 1, 0.0, 20.0),
        ("dist_loc", 1, 0.0, 20.0), ("distill_floor", 1, 0.0, 1.0)]


def test_evolve_imports_nothing_from_the_layer_above():
    src = Path(ev.__file__).read_text()
    assert "optimizer" not in {ln.split()[1].split(".")[0] for ln in src.splitlines()
                               if ln.startswith(("from ", "import "))}


PINNED_GEN5 = {
    "lr0": 0.00893, "lrf": 0.01088, "momentum": 0.90821, "weight_decay": 0.00048, "warmup_epochs": 3.79907,
    "warmup_momentum": 0.67269, "warmup_bias_lr": 0.07594, "box": 0.03407, "cls": 0.49644, "cls_pw": 1.00107,
    "obj": 0.9959, "obj_pw": 0.54727, "iou_t": 0.2, "anchor_t": 4.0, "fl_gamma": 0.0, "hsv_h": 0.01502,
    "hsv_s": 0.9, "hsv_v": 0.40031, "degrees": 0.0, "translate": 0.07788, "scale": 0.66283, "shear": 0.0,
    "perspective": 0.0, "flipud": 0.0, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.0, "copy_paste": 0.0,
    "distill_ratio": 0.05183, "temperature": 3.3407, "dist_norm": "iou", "unlabeled_ratio": 1.0}


def test_generations_are_the_same_draws_as_before():
    # pinned from the implementation before the bounds moved into the specs: a seed's evolution must not change
    hyp = _low()
    # over the keys there were then (the feature and pseudo-label keys came later): the same keys must give the
    # same draws
    keys = [k for k in ev.evolved_keys(hyp, SPECS, KD_SPECS, teacher=True, autoanchor=False)
            if k not in ("feat_kd", "feat_ratio", "pseudo_conf", "pseudo_weight", "pseudo_ignore", "dist_box",
                         "dist_obj", "dist_cls", "dist_loc", "distill_decay", "distill_floor")]
    rows = []
    for g in range(6):
        h = ev.next_hyp(hyp, rows, keys, SPECS, seed=7, generation=g)
        rows.append(ev.make_row([0.5, 0.5, (g * 37 % 11) / 20, (g * 13 % 7) / 20, 0.1, 0.1, 0.1], h, keys, g))
    assert [r["dist_norm"] for r in rows] == ["iou", "iou", "weighted", "weighted", "iou", "iou"]
    assert {k: rows[-1][k] for k in keys} == PINNED_GEN5 and list(keys) == list(PINNED_GEN5)


def test_mutation_stays_within_bounds_over_many_draws():
    hyp = _low(anchors=3)
    assert ev.evolved_keys(hyp, SPECS, KD_SPECS, teacher=False, autoanchor=True)[-1] == "anchors"
    # the teacher's count is kept
    assert "anchors" not in ev.evolved_keys(hyp, SPECS, KD_SPECS, teacher=True, autoanchor=True)
    keys = [*ev.evolved_keys(hyp, SPECS, KD_SPECS, teacher=True, autoanchor=False), "anchors"]
    assert set(KD) <= set(keys)
    rng = np.random.default_rng(0)
    lo_parent = {**hyp, **{k: BOUNDS[k][1] for k in keys if k not in CHOICES}, "anchors": 2}
    hi_parent = {**hyp, **{k: BOUNDS[k][2] for k in keys if k not in CHOICES}, "anchors": 10}
    changed = collections.Counter()
    for i in range(600):
        parent = (hyp, lo_parent, hi_parent)[i % 3]
        child = ev.mutate(parent, keys, SPECS, rng)
        _in_bounds(child, keys)
        assert isinstance(child["anchors"], int)
        assert any(child[k] != parent[k] for k in keys)
        for k in keys:
            changed[k] += child[k] != parent[k]
        for k, (gain, _, _) in BOUNDS.items():
            if gain == 0:
                assert child[k] == parent[k], k
    assert all(changed[k] > 0 for k in keys if SPECS[k].evolve[0] > 0), changed
    assert load_hyp(child, KD_SPECS) == child  # a mutated hyp is a valid hyp
    # the categorical key switches at about SWITCH_P, to every other choice
    switched = collections.Counter()
    n = 3000
    for _ in range(n):
        c = ev.mutate(hyp, keys, SPECS, rng)["dist_norm"]
        if c != hyp["dist_norm"]:
            switched[c] += 1
    assert abs(sum(switched.values()) / n - ev.SWITCH_P) < 0.03
    assert set(switched) == set(CHOICES["dist_norm"]) - {hyp["dist_norm"]}


def test_kd_keys_are_evolved_only_with_a_teacher():
    hyp = _low()
    without = ev.evolved_keys(hyp, SPECS, KD_SPECS, teacher=False, autoanchor=False)
    assert not set(KD) & set(without) and "anchors" not in without
    assert without == [k for k in hyp if k in BOUNDS and k not in KD]  # the hyp file's order
    rng = np.random.default_rng(1)
    for _ in range(50):
        child = ev.mutate(hyp, without, SPECS, rng)
        assert all(child[k] == hyp[k] for k in KD)
    with_t = ev.evolved_keys(hyp, SPECS, KD_SPECS, teacher=True, autoanchor=False)
    moved = [ev.mutate(hyp, with_t, SPECS, rng) for _ in range(50)]
    assert any(c["distill_ratio"] != hyp["distill_ratio"] for c in moved)
    assert any(c["temperature"] != hyp["temperature"] for c in moved)
    assert any(c["feat_ratio"] != hyp["feat_ratio"] for c in moved)
    assert all(c["feat_kd"] == hyp["feat_kd"] for c in moved)  # carried, never switched
    assert hyp["pseudo_conf"] == 0 and all(c["pseudo_conf"] == 0 for c in moved)  # off stays off ...
    on = [ev.mutate({**hyp, "pseudo_conf": 0.5}, with_t, SPECS, rng) for _ in range(50)]
    assert any(c["pseudo_conf"] != 0.5 for c in on) and all(0 < c["pseudo_conf"] <= 0.95 for c in on)  # ... on, on


def test_parent_selection_is_fitness_weighted_over_the_top_five():
    fit = [0.10, 0.50, 0.30, 0.05, 0.40, 0.45, 0.20]
    rows = [{"fitness": f, "generation": i} for i, f in enumerate(fit)]
    rng = np.random.default_rng(2)
    counts = collections.Counter(ev.select_parent(rows, rng)["generation"] for _ in range(20000))
    assert set(counts) <= {1, 2, 4, 5, 6}  # the top 5
    w = {1: 0.30, 2: 0.10, 4: 0.20, 5: 0.25, 6: 1e-6}  # fitness - min of the top 5
    for g, wg in w.items():
        assert abs(counts[g] / 20000 - wg / sum(w.values())) < 0.015, (g, counts)
    assert ev.select_parent(rows[:1], rng)["generation"] == 0
    flat = [{"fitness": 0.0, "generation": i} for i in range(3)]  # all equal: uniform
    c = collections.Counter(ev.select_parent(flat, rng)["generation"] for _ in range(3000))
    assert set(c) == {0, 1, 2}


def test_generation_randomness_depends_on_seed_and_index():
    hyp = _low()
    keys = ev.evolved_keys(hyp, SPECS, KD_SPECS, teacher=True, autoanchor=False)
    rows = [ev.make_row([0.5, 0.5, 0.3, 0.2, 0.1, 0.1, 0.1], ev.constrain(hyp, keys, SPECS), keys, 0)]
    a = ev.next_hyp(hyp, rows, keys, SPECS, seed=0, generation=1)
    assert a == ev.next_hyp(hyp, rows, keys, SPECS, seed=0, generation=1)  # a restarted generation draws the same
    assert a != ev.next_hyp(hyp, rows, keys, SPECS, seed=0, generation=2)
    assert a != ev.next_hyp(hyp, rows, keys, SPECS, seed=1, generation=1)
    # generation 0: the start
    assert ev.next_hyp(hyp, [], keys, SPECS, seed=0, generation=0) == ev.constrain(hyp, keys, SPECS)


# --------------------------------------------------------------------------------------- the loop, stand-in training
def _fake_train(calls, fail_at=()):
    def fn(hyp, opt, device, info, kd):
        calls.append((hyp, opt, kd))
        if len(calls) - 1 in fail_at:
            raise UserError("epoch 0: weights became non-finite")
        assert not info.distributed and opt.noval and opt.nosave and opt.noplots
        (Path(opt.save_dir) / "weights").mkdir(parents=True)
        (Path(opt.save_dir) / "weights/last.pt").write_text("x")
        m = 0.5 - abs(hyp["lr0"] - 0.013) * 10 - abs(kd.distill_ratio - 0.7) * 0.1
        return (0.6, 0.5, m + 0.1, m, 0.05, 0.04, 0.03)
    return fn


EVOLVE_DEPS = (train.resolve_run, KD_SPECS)  # what train.py hands run_evolution besides its training


def _opt(tmp_path, *args):
    return train.parse_opt(["--data", "none.yaml", "--device", "cpu", "--project", str(tmp_path), "--name", "e",
                            *args])


@pytest.fixture
def no_plot(monkeypatch):
    """The stand-in runs skip evolve.png (about 1.5 s a plot); the real runs below draw it."""
    monkeypatch.setattr(ev, "write_plot", lambda *a, **k: None)


@pytest.mark.e2e
def test_loop_writes_rows_outputs_and_continues(tmp_path, teacher, no_plot):
    calls = []
    opt = _opt(tmp_path, "--evolve", "2", "--t_weights", str(teacher), "--distill_ratio", "0.9", "--noautoanchor")
    assert ev.run_evolution(opt, train.DistInfo(), _fake_train(calls), *EVOLVE_DEPS) == 0
    run = tmp_path / "e"
    rows = _read_csv(run / "evolve.csv")
    assert [r["generation"] for r in rows] == ["0", "1"]
    assert calls[0][2].distill_ratio == 0.9 == float(rows[0]["distill_ratio"])  # the typed flag is the start
    assert calls[1][2].distill_ratio == float(rows[1]["distill_ratio"])  # later: the evolved value, not the flag
    assert calls[1][2].temperature == float(rows[1]["temperature"]) and calls[1][2].t_sha256
    # a generation killed mid-training leaves gen/ behind: it is removed and the generation trained again
    (run / "gen/weights").mkdir(parents=True)
    opt = _opt(tmp_path, "--evolve", "4", "--t_weights", str(teacher), "--distill_ratio", "0.9", "--noautoanchor",
               "--exist-ok")
    assert ev.run_evolution(opt, train.DistInfo(), _fake_train(calls, fail_at=(3,)),
                            *EVOLVE_DEPS) == 0
    rows2 = _read_csv(run / "evolve.csv")
    assert rows2[:2] == rows and [r["generation"] for r in rows2] == ["0", "1", "2", "3"]
    assert len({tuple(v for k, v in r.items() if k not in ev.METRIC_KEYS + ev.TAIL_KEYS) for r in rows2}) == 4
    assert float(rows2[3]["fitness"]) == 0.0  # the failed generation scores 0 and the run goes on
    assert sorted(p.name for p in run.iterdir()) == sorted(set(ev.OUTPUTS) - {"evolve.png"})
    best = max(rows2, key=lambda r: float(r["fitness"]))
    hyp = load_hyp(run / "hyp_evolve.yaml", KD_SPECS)
    keys = [k for k in rows2[0] if k not in ev.METRIC_KEYS + ev.TAIL_KEYS]
    assert {k: str(hyp[k]) if k in CHOICES else hyp[k] for k in keys} == \
        {k: best[k] if k in CHOICES else float(best[k]) for k in keys}
    assert f"Generation {best['generation']}," in (run / "hyp_evolve.yaml").read_text()
    # asking for fewer generations than done trains nothing
    n = len(calls)
    opt = _opt(tmp_path, "--evolve", "3", "--t_weights", str(teacher), "--noautoanchor", "--exist-ok")
    assert ev.run_evolution(opt, train.DistInfo(), _fake_train(calls), *EVOLVE_DEPS) == 0 and len(calls) == n
    # other columns (no teacher now) are refused in one line
    with pytest.raises(UserError, match="columns differ"):
        ev.run_evolution(_opt(tmp_path, "--evolve", "5", "--noautoanchor", "--exist-ok"), train.DistInfo(),
                         _fake_train(calls), *EVOLVE_DEPS)


@pytest.mark.e2e
def test_failing_start_and_repeated_failures_stop(tmp_path, no_plot):
    with pytest.raises(UserError, match="non-finite"):
        ev.run_evolution(_opt(tmp_path, "--evolve", "3"), train.DistInfo(), _fake_train([], fail_at=(0,)),
                         *EVOLVE_DEPS)
    assert not (tmp_path / "e/evolve.csv").exists()
    with pytest.raises(UserError, match="non-finite"):
        ev.run_evolution(_opt(tmp_path, "--evolve", "9", "--exist-ok"), train.DistInfo(),
                         _fake_train([], fail_at=(1, 2, 3)), *EVOLVE_DEPS)
    rows = _read_csv(tmp_path / "e/evolve.csv")
    assert len(rows) == 3 and "anchors" in rows[0]  # AutoAnchor on: anchors is evolved, from 3


@pytest.mark.parametrize("args,env,needle", [
    (["--evolve", "0"], {}, "--evolve 0: must be >= 1"),
    (["--evolve", "-2"], {}, "--evolve -2: must be >= 1"),
    (["--evolve", "--resume"], {}, "--resume and --evolve cannot be combined"),
    (["--evolve"], {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "not supported with DDP"),
    (["--evolve", "3", "--hyp", "MISSING"], {}, "mutates hsv_h, mosaic, which this hyp file lacks"),
])
def test_refusals_are_one_line(tmp_path, monkeypatch, capsys, args, env, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    hyp = yaml.safe_load(LOW.read_text())
    del hyp["hsv_h"], hyp["mosaic"]
    (tmp_path / "h.yaml").write_text(yaml.safe_dump(hyp))
    args = [str(tmp_path / "h.yaml") if a == "MISSING" else a for a in args]
    assert train.main(["--data", "none.yaml", "--project", str(tmp_path / "runs"), *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ERROR:")]
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "runs").exists()


def test_evolve_flag_defaults():
    assert train.parse_opt([]).evolve is None
    assert train.parse_opt(["--evolve"]).evolve == 300
    assert train.parse_opt(["--evolve", "7"]).evolve == 7


# -------------------------------------------------------------------------------------------- real tiny evolutions
@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("t") / "teacher.pt", "yolov5s.yaml")


def _check_run(run, n, teacher: bool):
    rows = _read_csv(run / "evolve.csv")
    assert [int(r["generation"]) for r in rows] == list(range(n))
    keys = [k for k in rows[0] if k not in ev.METRIC_KEYS + ev.TAIL_KEYS]
    assert list(rows[0])[:7] == list(ev.METRIC_KEYS)
    assert bool(set(KD) & set(keys)) == teacher
    values = [{k: r[k] if k in CHOICES else float(r[k]) for k in keys} for r in rows]
    assert len({tuple(v.values()) for v in values}) == n  # no generation repeated
    for v in values:
        _in_bounds(v, keys)
    for r in rows:
        assert all(math.isfinite(float(r[k])) for k in ev.METRIC_KEYS)
    best = max(range(n), key=lambda i: (float(rows[i]["fitness"]), -i))
    hyp = load_hyp(run / "hyp_evolve.yaml", KD_SPECS)
    assert {k: hyp[k] for k in keys} == values[best]
    assert sorted(p.name for p in run.iterdir()) == sorted(ev.OUTPUTS)  # gen/ removed, nothing else written
    return rows, values, hyp


@pytest.mark.e2e
def test_evolve_without_teacher_continues_after_kill9(tiny_data, tmp_path):
    args = [TRAIN, "--data", str(tiny_data), *COMMON, "--project", str(tmp_path), "--name", "exp"]
    csv = tmp_path / "exp/evolve.csv"
    proc = subprocess.Popen([sys.executable, *args, "--evolve", "3"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (csv.exists() and len(_read_csv(csv)) >= 1):
        time.sleep(0.05)
    assert proc.poll() is None, "the evolution ended before it could be killed"
    proc.send_signal(signal.SIGKILL)  # during generation 1: its training folder is left behind
    proc.wait()
    first = _read_csv(csv)
    assert 1 <= len(first) < 3
    # a kill can land inside any of the three temp-then-rename writes; plant the temp file each one leaves
    for stale in (".evolve.csv.ab12cd.tmp", ".hyp_evolve.yaml.ef34gh.tmp", ".evolve.png.tmp.png"):
        (tmp_path / "exp" / stale).write_text("half a file")
    r = run_cli([*args, "--evolve", "3", "--exist-ok"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(first)} of 3 generations already done" in r.stderr
    assert "temp file(s) of writes cut short" in r.stderr
    rows, values, hyp = _check_run(tmp_path / "exp", 3, teacher=False)
    assert rows[:len(first)] == first
    low = load_hyp(LOW, KD_SPECS)
    assert all(hyp[k] == low[k] for k in KD)  # without a teacher the KD keys keep their starting values


@pytest.mark.e2e
def test_evolve_with_teacher(tiny_data, teacher, tmp_path):
    r = run_cli([TRAIN, "--data", str(tiny_data), *COMMON, "--project", str(tmp_path), "--name", "kd",
                 "--t_weights", str(teacher), "--evolve", "3", "--feat_kd", "mse", "--feat_ratio", "0.5"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows, values, _ = _check_run(tmp_path / "kd", 3, teacher=True)
    start = values[0]
    assert start["distill_ratio"] == 0.05 and start["temperature"] == 5.0 and start["dist_norm"] == "iou"
    # each generation distils the features too, with its own evolved feat_ratio
    assert all(v["feat_kd"] == "mse" for v in values) and start["feat_ratio"] == 0.5
    assert r.stderr.count("Feature distillation: mse") == 3
    for v in values[1:]:
        assert f"feat_ratio={v['feat_ratio']:g}" in r.stderr or f"feat_ratio={v['feat_ratio']}" in r.stderr
    assert any(v[k] != start[k] for v in values[1:] for k in KD)  # seed 0: deterministic
    assert (tmp_path / "kd/evolve.png").stat().st_size > 0
