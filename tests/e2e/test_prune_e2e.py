"""Prune, then recover with ordinary training: prune.py's file trains as it is (with and without the unpruned model
as teacher, output and feature terms), keeps its pruned widths in best.pt, and resumes exactly after kill -9."""
import pytest

from conftest import ROOT, assert_same_weights, kill9_when, random_checkpoint, run_cli
from utils.reporting.loggers import read_results_csv
from utils.training.checkpoint import torch_load

PRUNE = str(ROOT / "prune.py")
TRAIN = str(ROOT / "train.py")
COMMON = ["--imgsz", "64", "--batch-size", "4", "--workers", "0", "--noautoanchor", "--noplots"]


def _params(path) -> int:
    return sum(p.numel() for p in torch_load(path)["model"].parameters())


@pytest.fixture(scope="module")
def pruned_pair(tmp_path_factory):
    """(the unpruned yolov5n checkpoint, prune.py's half-width copy of it)."""
    root = tmp_path_factory.mktemp("prune")
    src = random_checkpoint(root / "n.pt", "yolov5n.yaml")
    r = run_cli([PRUNE, "--weights", str(src), "--ratio", "0.5", "--imgsz", "64", "--latency-runs", "1",
                 "--project", str(root), "--name", "p"], cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parameters" in r.stderr and "GFLOPs @64" in r.stderr and "CPU latency" in r.stderr
    return src, root / "p" / "pruned.pt"


@pytest.mark.parametrize("teacher", [False, True], ids=["alone", "distilled"])
def test_pruned_checkpoint_trains_and_keeps_its_widths(pruned_pair, tiny_data, tmp_path, teacher):
    src, pruned = pruned_pair
    extra = ["--t_weights", str(src), "--feat_kd", "cross"] if teacher else []
    r = run_cli([TRAIN, "--data", str(tiny_data), "--weights", str(pruned), *COMMON, "--epochs", "1",
                 "--project", str(tmp_path), "--name", "r", *extra], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training the checkpoint's own architecture" in r.stderr
    res = read_results_csv(tmp_path / "r" / "results.csv")
    assert res["epoch"] == [0]
    if teacher:  # the output terms and the feature term both ran across the pruned widths
        assert "->" in r.stderr and "Feature distillation: cross" in r.stderr
        assert all(res[k][0] > 0 for k in ("train/dbox_loss", "train/dcls_loss", "train/dfeat_loss"))
    else:
        assert "train/dbox_loss" not in res
    best = tmp_path / "r" / "weights" / "best.pt"
    assert _params(best) == _params(pruned) < 0.3 * _params(src)
    assert torch_load(best)["epoch"] == -1


def test_pruned_distillation_resumes_exactly_after_kill9(pruned_pair, tiny_data, tmp_path):
    src, pruned = pruned_pair
    args = [TRAIN, "--data", str(tiny_data), "--weights", str(pruned), *COMMON, "--epochs", "3", "--seed", "7",
            "--t_weights", str(src), "--project", str(tmp_path)]
    r = run_cli([*args, "--name", "full"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    last = tmp_path / "cut" / "weights" / "last.pt"
    kill9_when([*args, "--name", "cut"], tmp_path, last.exists)
    assert torch_load(last)["epoch"] in (0, 1)
    r = run_cli([TRAIN, "--resume", str(last)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(tmp_path / "full" / "weights" / "last.pt", last)
    assert read_results_csv(tmp_path / "cut" / "results.csv")["epoch"] == [0, 1, 2]
    assert _params(last) == _params(pruned)
