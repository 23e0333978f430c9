"""Feature distillation end to end: the dfeat column, adapters in last.pt but never in best.pt (which loads into a
plain model), an exact resume after kill -9, 2-process DDP, and --evolve with a feature form."""
import torch

from conftest import ROOT, assert_same_weights, kill9_when, run_cli
from models.yolo import Model
from utils.reporting.loggers import read_results_csv
from utils.training.checkpoint import torch_load

TRAIN = str(ROOT / "train.py")
COMMON = ["--cfg", "yolov5n.yaml", "--imgsz", "64", "--batch-size", "4", "--workers", "0", "--noautoanchor",
          "--noplots"]


def _args(data, project, name, teacher, *extra):
    return [TRAIN, "--data", str(data), *COMMON, "--project", str(project), "--name", name, "--t_weights",
            str(teacher), *extra]


def test_feature_kd_run_saves_a_plain_student(tiny_data, teacher8, tmp_path):
    r = run_cli(_args(tiny_data, tmp_path, "f", teacher8, "--epochs", "2", "--feat_kd", "cross", "--feat_ratio",
                      "0.3", "--save-period", "1"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Feature distillation: cross on the head inputs (64->128, 128->256, 256->512 channels)" in r.stderr
    assert "Feature distillation balance over the first" in r.stderr and "dfeat_loss" in r.stderr
    run = tmp_path / "f"
    res = read_results_csv(run / "results.csv")
    assert list(res)[-4:] == ["train/dbox_loss", "train/dobj_loss", "train/dcls_loss", "train/dfeat_loss"]
    assert all(v > 0 for v in res["train/dfeat_loss"])
    # a periodic save is a training snapshot: it keeps the adapters, as last.pt does until the run ends
    snap = torch_load(run / "weights/epoch0.pt")
    adapters = snap["resume_state"]["criterion"]["adapters"]
    assert adapters and all(v.is_contiguous() for v in adapters.values())
    assert snap["opt"]["feat_kd"] == "cross" and snap["opt"]["hyp"]["feat_ratio"] == 0.3
    plain_params = sum(p.numel() for p in Model("yolov5n.yaml", nc=8).parameters())
    for name in ("best.pt", "last.pt"):
        ck = torch_load(run / "weights" / name)
        assert "resume_state" not in ck, name  # stripped: nothing but the student
        m = ck["model"].float()
        assert sum(p.numel() for p in m.parameters()) == plain_params, name
        assert all(t.is_contiguous() for t in m.state_dict().values())
        plain = Model("yolov5n.yaml", nc=8)
        plain.load_state_dict(m.state_dict(), strict=True)  # a plain model takes every tensor, and nothing else
        plain.eval().fuse()(torch.rand(1, 3, 64, 64))


def test_feature_kd_resume_is_exact(tiny_data, teacher8, tmp_path):
    args = ["--epochs", "3", "--seed", "2", "--feat_kd", "mse"]
    r = run_cli(_args(tiny_data, tmp_path, "full", teacher8, *args), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    last = tmp_path / "cut" / "weights" / "last.pt"
    kill9_when(_args(tiny_data, tmp_path, "cut", teacher8, *args), tmp_path, last.exists)
    assert "adapters" in torch_load(last)["resume_state"]["criterion"]
    r = run_cli([TRAIN, "--resume", str(last)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "holds no feature adapters" not in r.stderr
    assert_same_weights(tmp_path / "full" / "weights" / "last.pt", last)
    full = read_results_csv(tmp_path / "full" / "results.csv")
    cut = read_results_csv(tmp_path / "cut" / "results.csv")
    assert full["train/dfeat_loss"] == cut["train/dfeat_loss"]


def test_feature_kd_ddp_two_processes(tiny_data, teacher8, tmp_path):
    r = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 *_args(tiny_data, tmp_path, "ddp", teacher8, "--epochs", "2", "--device", "cpu", "--feat_kd", "pkd")],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results_csv(tmp_path / "ddp" / "results.csv")
    assert res["epoch"] == [0, 1] and all(v > 0 for v in res["train/dfeat_loss"])
    ck = torch_load(tmp_path / "ddp" / "weights" / "last.pt")
    assert type(ck["model"]).__name__ == "DetectionModel"
    assert sum(p.numel() for p in ck["model"].parameters()) == sum(
        p.numel() for p in Model("yolov5n.yaml", nc=8).parameters())
