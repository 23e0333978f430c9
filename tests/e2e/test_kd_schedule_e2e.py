"""Issue 51 end to end: per-term weights, the localisation term and the teacher's weight schedule in one tiny
distilled run, recorded, and continued exactly after a kill -9 (the x/distill column as uninterrupted)."""
import yaml

from conftest import ROOT, kill9_when, run_cli
from utils.reporting.loggers import read_results_csv
from utils.training.checkpoint import torch_load

TRAIN = str(ROOT / "train.py")
COMMON = ["--cfg", "yolov5n.yaml", "--imgsz", "64", "--batch-size", "4", "--workers", "0", "--noautoanchor",
          "--noplots", "--noval", "--epochs", "3", "--seed", "3"]
KD = ["--dist_box", "2", "--dist_loc", "1", "--distill_decay", "linear", "--distill_floor", "0.2"]


def test_weights_localisation_and_schedule_resume_exactly(tiny_data, teacher8, tmp_path):
    args = ["--data", str(tiny_data), *COMMON, "--t_weights", str(teacher8), *KD, "--project", str(tmp_path)]
    r = run_cli([TRAIN, *args, "--name", "full"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dloc" in r.stderr and "Localisation balance" in r.stderr and "Distillation schedule: linear" in r.stderr
    full = read_results_csv(tmp_path / "full" / "results.csv")
    keys = list(full)
    assert keys[keys.index("x/lr2") + 1] == "x/distill" and keys[-1] == "train/dloc_loss"
    assert full["x/distill"] == [1.0, 0.6, 0.2]
    assert all(v > 0 for v in full["train/dloc_loss"])
    hyp = yaml.safe_load((tmp_path / "full" / "hyp.yaml").read_text())
    assert (hyp["dist_box"], hyp["dist_loc"], hyp["distill_decay"], hyp["distill_floor"]) == (2.0, 1.0, "linear", 0.2)

    last = tmp_path / "cut" / "weights" / "last.pt"
    kill9_when([TRAIN, *args, "--name", "cut"], tmp_path, last.exists)
    assert torch_load(last)["epoch"] in (0, 1)
    r = run_cli([TRAIN, "--resume", str(last)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    cut = read_results_csv(tmp_path / "cut" / "results.csv")
    assert cut["epoch"] == [0, 1, 2]
    for k in ("x/distill", "train/dbox_loss", "train/dloc_loss"):
        assert cut[k] == full[k], k
