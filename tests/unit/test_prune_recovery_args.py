"""benchmarks/prune_recovery.py: arms, run folders and tables (no pruning, no training)."""
from __future__ import annotations

import pytest

import prune_recovery as pr


def test_extra_arm_is_a_name_and_train_flags() -> None:
    assert pr.parse_arm("kdbox=--dist_norm iou --distill_ratio 0.5") == \
        ("kdbox", ["--dist_norm", "iou", "--distill_ratio", "0.5"])
    assert pr.parse_arm(" feat = --feat_kd mse --feat_ratio '0.5'")[1] == ["--feat_kd", "mse", "--feat_ratio", "0.5"]


@pytest.mark.parametrize("bad", ["kdbox", "=--dist_norm iou", "kd=--dist_norm iou", "ref=--x 1", "a b=--x 1",
                                 "box=", "box=dist_norm iou", "box=--x 'open"])
def test_malformed_or_builtin_arm_is_refused(bad: str) -> None:
    with pytest.raises(SystemExit, match="--arm"):
        pr.parse_arm(bad)


def test_stage_defaults_and_arm_selection() -> None:
    ft = pr.parse_opt(["--stage", "finetune"])
    assert (ft.seeds, ft.epochs, ft.ratio) == ([0], 10, 0.5)
    rec = pr.parse_opt(["--stage", "recover", "--arm", "box=--dist_norm iou"])
    assert (rec.seeds, rec.epochs, rec.importance) == ([0, 1, 2], 30, "l1")
    assert rec.arms == ["noteacher", "kd", "box", "ref"]
    assert pr.parse_opt(["--stage", "recover", "--no-reference"]).arms == ["noteacher", "kd"]
    assert pr.parse_opt(["--stage", "recover", "--arms", "kd", "--seeds", "0"]).arms == ["kd"]
    with pytest.raises(SystemExit, match="--arms box"):
        pr.parse_opt(["--stage", "recover", "--arms", "box"])
    with pytest.raises(SystemExit, match="share a name"):
        pr.parse_opt(["--stage", "recover", "--arm", "a=--x 1", "--arm", "a=--y 2"])
    with pytest.raises(SystemExit, match="ratio"):
        pr.parse_opt(["--stage", "prune", "--ratios", "0.5", "1"])


def test_prune_stage_makes_each_pruning_once() -> None:
    a = pr.parse_opt(["--stage", "prune"])
    assert pr.prune_jobs(a) == [("l1", 0.3), ("l1", 0.5), ("l1", 0.7), ("l2", 0.5), ("bn", 0.5), ("lamp", 0.5),
                                ("taylor", 0.5)]


def test_run_folders_name_their_settings() -> None:
    assert pr.prune_name("taylor", 0.5) == "taylor_r0.5"
    assert pr.finetune_name("bn", 0.5, 10, 0) == "ft_bn_r0.5_e10_s0"
    assert pr.recover_name("kd", "l1", 0.5, 30, 2) == "rec_l1_r0.5_kd_e30_s2"
    assert pr.recover_name("ref", "lamp", 0.7, 30, 1) == "ref_yolov5n_kd_e30_s1"  # shared by every pruning


def test_every_arm_but_noteacher_distils_from_the_unpruned_model() -> None:
    extra = {"box": ["--dist_norm", "iou"], "other": ["--t_weights", "m.pt"]}
    assert pr.arm_flags("noteacher", extra, "t.pt") == []
    assert pr.arm_flags("kd", extra, "t.pt") == pr.arm_flags("ref", extra, "t.pt") == ["--t_weights", "t.pt"]
    assert pr.arm_flags("box", extra, "t.pt") == ["--t_weights", "t.pt", "--dist_norm", "iou"]
    assert pr.arm_flags("other", extra, "t.pt") == ["--t_weights", "m.pt"]


def test_best_row_is_the_fitness_epoch() -> None:
    res = {pr.M5095: [0.40, 0.50, 0.48, 0.50, 0.50], pr.M50: [0.70, 0.60, 0.80, 0.70, 0.70]}
    # index 3 (0.45 + 0.07) beats index 1 (0.45 + 0.06) and index 2 (0.432 + 0.08); index 4 ties it, the first wins
    assert pr.best_row(res) == (0.50, 0.70)
    res[pr.M50][4] = 0.71
    assert pr.best_row(res) == (0.50, 0.71)


def test_recover_table_means_over_the_seeds_each_arm_has() -> None:
    results = {"noteacher": {0: {"map": 0.50, "map50": 0.70, "seconds": 600.0},
                             1: {"map": 0.52, "map50": 0.72, "seconds": 660.0}},
               "kd": {0: {"map": 0.53, "map50": 0.74, "seconds": None}}}
    lines = pr.recover_table(results, [0, 1])
    assert lines[0].startswith("| arm | mAP50-95, mean ± std |") and "seed 1 mAP50-95 (mAP50)" in lines[0]
    assert lines[1].count("---") == 7
    assert lines[2] == "| noteacher | 51.00 ± 1.41 | 71.0 | 2 | 50.00 (70.0) | 52.00 (72.0) | 10.5 min |"
    assert lines[3] == "| kd | 53.00 | 74.0 | 1 | 53.00 (74.0) | pending | – |"
    assert pr.gains(results, [0, 1]) == ["- kd − noteacher: +3.00 mAP50-95 points on the mean of 1 seed(s) "
                                         "(per seed 0: +3.00)"]


def test_prune_and_finetune_tables() -> None:
    recipe = {"params_before": 7062781, "params_after": 1785565, "gflops_before": 0.993, "gflops_after": 0.262,
              "latency_ms_before": 38.7, "latency_ms_after": 13.41, "map50_95_before": 0.71601,
              "map50_95_after": 0.00091, "map50_before": 0.88334, "map50_after": 0.00403, "seconds": 27.2}
    lines = pr.prune_table([("l1", 0.5, recipe)])
    assert lines[2] == "| (unpruned) | 0 | 7,062,781 | 0.993 | 38.7 ms | 71.60 | 88.33 | |"
    assert lines[3] == "| l1 | 0.5 | 1,785,565 (25.3%) | 0.262 (26.4%) | 38.7 → 13.4 ms (35%) | 0.09 | 0.40 | 27 s |"
    two = pr.prune_table([("l1", 0.5, recipe), ("l2", 0.5, {**recipe, "latency_ms_before": 70.4})])
    assert "| 54.6 ms (median of 2, 38.7–70.4) |" in two[2]
    rows = pr.finetune_table([("l1", recipe, (0.521, 0.725), 900.0)])
    assert rows[2] == "| l1 | 0.09 | 52.10 | 72.50 | 15.0 min |"
    assert pr.prune_table([]) == pr.prune_table([])[:2]  # headers only


def test_report_only_reuses_complete_runs_and_trains_nothing(tmp_path) -> None:
    a = pr.parse_opt(["--stage", "recover", "--epochs", "2", "--project", str(tmp_path), "--report-only"])
    run = tmp_path / "rec_l1_r0.5_kd_e2_s0"
    (run / "weights").mkdir(parents=True)
    (run / "weights" / "best.pt").write_bytes(b"")
    header = ",".join(f"{k:>20}" for k in ("epoch", pr.M50, pr.M5095))
    (run / "results.csv").write_text(f"{header}\n0,0.5,0.3\n")
    assert pr.train_run(run.name, "w.pt", [], 0, a) is None  # one epoch of two: incomplete, left alone
    assert (run / "results.csv").exists()
    with open(run / "results.csv", "a") as f:
        f.write("1,0.6,0.4\n")
    (tmp_path / f"{run.name}.seconds").write_text("90.0\n")
    res = pr.train_run(run.name, "w.pt", [], 0, a)
    assert pr.best_row(res) == (0.4, 0.6) and res["seconds"] == 90.0
