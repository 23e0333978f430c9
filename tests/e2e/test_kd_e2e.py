"""Distillation end to end: an epoch with the KD columns, option precedence, resume, 2-process DDP."""
import shutil

import pytest
import yaml

from conftest import ROOT, kill9_when, run_cli
from utils.reporting.loggers import KD_KEYS, read_results_csv
from utils.training.checkpoint import torch_load

TRAIN = str(ROOT / "train.py")
COMMON = ["--cfg", "yolov5n.yaml", "--imgsz", "64", "--batch-size", "4", "--workers", "0", "--noautoanchor",
          "--noplots"]


def test_distill_one_epoch(tiny_data, teacher8, tmp_path):
    hyp = yaml.safe_load((ROOT / "data/hyps/hyp.scratch-low.yaml").read_text())
    hyp.update(distill_ratio=0.25, temperature=3.0)
    hyp_file = tmp_path / "hyp.kd.yaml"
    hyp_file.write_text(yaml.safe_dump(hyp))
    r = run_cli([TRAIN, "--data", str(tiny_data), *COMMON, "--project", str(tmp_path), "--name", "kd",
                 "--epochs", "1", "--t_weights", str(teacher8), "--dist_loss", "kl", "--hyp", str(hyp_file),
                 "--temperature", "2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "kd"
    res = read_results_csv(run / "results.csv")
    assert list(res)[-3:] == KD_KEYS and len(res["epoch"]) == 1
    assert all(res[k][0] > 0 for k in KD_KEYS)
    assert "Teacher mAP50" in r.stderr and "dbox" in r.stderr
    # the flag wins over the hyp file; the hyp value is used where no flag was given
    for f in ("hyp.yaml", "opt.yaml"):
        d = yaml.safe_load((run / f).read_text())
        d = d.get("hyp", d) if f == "opt.yaml" else d
        assert d["temperature"] == 2.0 and d["distill_ratio"] == 0.25, f
    opt = torch_load(run / "weights/last.pt")["opt"]
    assert opt["temperature"] == 2.0 and opt["distill_ratio"] == 0.25 and opt["dist_loss"] == "kl"
    assert opt["t_weights"] == str(teacher8)
    # the teacher is not in the student's checkpoint
    ck = torch_load(run / "weights/last.pt")
    assert sum(p.numel() for p in ck["model"].parameters()) < 2_000_000


def test_preflight_error_is_one_line(tiny_data, fixtures_dir, tmp_path):
    r = run_cli([TRAIN, "--data", str(tiny_data), *COMMON, "--project", str(tmp_path), "--epochs", "1",
                 "--t_weights", str(fixtures_dir / "teacher.pt")], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "nc=4" in r.stderr and "nc=8" in r.stderr


def test_kd_resume_and_missing_teacher(tiny_data, teacher8, tmp_path):
    t = tmp_path / "t.pt"
    shutil.copy(teacher8, t)
    last = tmp_path / "kd" / "weights" / "last.pt"
    kill9_when([TRAIN, "--data", str(tiny_data), *COMMON, "--project", str(tmp_path), "--name", "kd", "--epochs", "3",
                "--t_weights", str(t)], tmp_path, last.exists)

    t.rename(tmp_path / "elsewhere.pt")
    r = run_cli([TRAIN, "--resume", str(last)], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "t.pt" in r.stderr and "no longer exists" in r.stderr
    (tmp_path / "elsewhere.pt").rename(t)

    r = run_cli([TRAIN, "--resume", str(last)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results_csv(tmp_path / "kd" / "results.csv")
    assert res["epoch"] == [0, 1, 2] and all(v > 0 for v in res["train/dbox_loss"])


@pytest.mark.parametrize("kd", [False, True], ids=["plain", "kd"])
def test_ddp_two_cpu_processes(tiny_data, teacher8, tmp_path, kd):
    extra = ["--t_weights", str(teacher8)] if kd else []
    r = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TRAIN,
                 "--data", str(tiny_data), *COMMON, "--project", str(tmp_path), "--name", "ddp", "--epochs", "2",
                 "--device", "cpu", *extra], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DDP: rank 1/2" in r.stderr or "gloo" in r.stderr
    res = read_results_csv(tmp_path / "ddp" / "results.csv")
    assert res["epoch"] == [0, 1]
    assert ("train/dbox_loss" in res) == kd
    assert not (tmp_path / "ddp2").exists(), "a second rank wrote its own run folder"
    ck = torch_load(tmp_path / "ddp" / "weights" / "last.pt")
    assert type(ck["model"]).__name__ == "DetectionModel"  # de-parallelised before saving
