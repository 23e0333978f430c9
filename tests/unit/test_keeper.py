"""The checkpoint keeper (resume point, last/best/periodic saves, temp-file hygiene) and train()'s inputs."""
import copy

import pytest
import torch

from models.yolo import Model
from utils.core.errors import UserError
from utils.training.checkpoint import torch_load
from utils.training.keeper import CheckpointKeeper, ResumePoint
from utils.training.optim import ModelEMA, build_optimizer


def test_resume_point_counts_epochs():
    assert ResumePoint.from_checkpoint({"epoch": 2, "best_fitness": 0.3}, "last.pt", 5) == ResumePoint(3, 5, 0.3)
    # fewer total epochs than already trained: YOLOv5's "fine-tune for N more epochs"
    assert ResumePoint.from_checkpoint({"epoch": 2, "best_fitness": None}, "last.pt", 2) == ResumePoint(3, 4, 0.0)


@pytest.fixture()
def parts():
    torch.manual_seed(0)
    m = Model("yolov5n.yaml", nc=8)
    return m, ModelEMA(m), build_optimizer(m, "SGD", 0.01, 0.9, 0.0)


def test_saves_last_best_and_periodic(tmp_path, parts):
    m, ema, opt = parts
    k = CheckpointKeeper(tmp_path, save_period=2)
    k.save(0, m, ema, opt, {"epochs": 3}, best_fitness=0.5, fitness=0.5, final_epoch=False)
    assert k.last.is_file() and k.best.is_file() and (k.dir / "epoch0.pt").is_file()
    best_before = k.best.read_bytes()
    k.save(1, m, ema, opt, {"epochs": 3}, best_fitness=0.5, fitness=0.4, final_epoch=False)
    assert k.best.read_bytes() == best_before and torch_load(k.last)["epoch"] == 1  # not better: best.pt kept
    assert not (k.dir / "epoch1.pt").exists()
    ck = torch_load(k.last)
    assert ck["optimizer"] is not None and set(ck["resume_state"]) == {"model", "ema"}
    k.finish()
    for f in (k.last, k.best):
        ck = torch_load(f)
        assert ck["optimizer"] is None and ck["epoch"] == -1 and "resume_state" not in ck
    assert not list(k.dir.glob(".*.tmp"))


def test_nosave_writes_only_the_final_epoch(tmp_path, parts):
    m, ema, opt = parts
    k = CheckpointKeeper(tmp_path, nosave=True)
    k.save(0, m, ema, opt, {}, best_fitness=0.1, fitness=0.1, final_epoch=False)
    assert not k.last.exists()
    k.save(1, m, ema, opt, {}, best_fitness=0.1, fitness=0.1, final_epoch=True)
    assert k.last.exists()


def test_non_finite_weights_are_never_saved(tmp_path, parts):
    m, ema, opt = parts
    k = CheckpointKeeper(tmp_path)
    k.save(0, m, ema, opt, {}, best_fitness=0.1, fitness=0.1, final_epoch=False)
    good = k.last.read_bytes()
    with torch.no_grad():
        next(m.parameters()).fill_(float("inf"))
    with pytest.raises(UserError, match="non-finite"):
        k.save(1, m, ema, opt, {}, best_fitness=0.1, fitness=0.1, final_epoch=False)
    assert k.last.read_bytes() == good


def test_clean_interrupted_removes_temp_files_and_later_rows(tmp_path):
    k = CheckpointKeeper(tmp_path)
    k.dir.mkdir(parents=True)
    (k.dir / ".last.pt.abc.tmp").write_bytes(b"partial")
    (tmp_path / "results.csv").write_text("epoch,x\n0,1\n1,2\n2,3\n")
    k.clean_interrupted(0)
    assert not list(k.dir.glob(".*.tmp"))
    assert (tmp_path / "results.csv").read_text().splitlines() == ["epoch,x", "0,1"]


def test_train_changes_neither_hyp_nor_opt(tiny_data, tmp_path):
    import train
    from optimizer.config import KDConfig
    from utils.core.distributed import DistInfo
    from utils.training.hyp import load_hyp

    opt = train.parse_opt(["--data", str(tiny_data), "--cfg", "yolov5n.yaml", "--imgsz", "64", "--batch-size", "4",
                           "--workers", "0", "--noautoanchor", "--noplots", "--noval", "--epochs", "1",
                           "--project", str(tmp_path), "--name", "r", "--device", "cpu"])
    opt.save_dir = str(tmp_path / "r")
    hyp = load_hyp(opt.hyp)
    opt.hyp = dict(hyp)
    hyp0, opt0 = copy.deepcopy(hyp), copy.deepcopy(vars(opt))
    train.train(hyp, opt, torch.device("cpu"), DistInfo(), KDConfig())
    assert hyp == hyp0  # weight decay is scaled on the run's own copy
    assert vars(opt) == opt0
    assert (tmp_path / "r" / "weights" / "last.pt").is_file()
