"""Issue 49, second bad-input probe, from the command line: a few of its cases end to end (the rest, with their
variants, are in tests/unit/test_probe2_inputs.py). Each ends in one line (exit 2, no traceback) or one warning,
and a refused run writes nothing."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from conftest import DEMO_NAMES, ROOT, one_error, random_checkpoint, run_cli
from optimizer.config import KDConfig
from utils.reporting.loggers import read_results_csv
from utils.training.checkpoint import build_checkpoint, save_checkpoint, torch_load
from utils.training.optim import build_optimizer, build_scheduler, lr_lambda

TRAIN, VAL = str(ROOT / "train.py"), str(ROOT / "val.py")
COMMON = ["--cfg", "yolov5n.yaml", "--imgsz", "64", "--batch-size", "4", "--workers", "0", "--noautoanchor",
          "--noplots"]


def _resumable(run: Path, data: Path, epoch: int, started: int, recorded: int) -> Path:
    """<run>/weights/last.pt stopped after `epoch` of a run started for `started` epochs (a killed run), whose
    opt.yaml now says `recorded` epochs."""
    import train
    from models.yolo import Model

    torch.manual_seed(0)
    model = Model("yolov5n.yaml", nc=len(DEMO_NAMES))
    opt = vars(train.parse_opt(["--data", str(data), *COMMON, "--noval", "--epochs", str(started)]))
    opt.update(KDConfig().as_dict(), hyp=yaml.safe_load((ROOT / "data/hyps/hyp.scratch-low.yaml").read_text()),
               save_dir=str(run))
    (run / "weights").mkdir(parents=True)
    optimizer = build_optimizer(model, "SGD", 0.01, 0.937, 0.0005)
    build_scheduler(optimizer, lr_lambda(started, 0.01))  # gives the groups their initial_lr, as training does
    save_checkpoint(build_checkpoint(model, ema=model, updates=2, optimizer=optimizer, epoch=epoch, best_fitness=0.0,
                                     opt=opt), run / "weights/last.pt")
    (run / "opt.yaml").write_text(yaml.safe_dump({**opt, "epochs": recorded}))
    return run / "weights/last.pt"


def test_unlabeled_val_images_are_refused_before_training(tiny_data, tmp_path):
    d = yaml.safe_load(tiny_data.read_text())
    data = tmp_path / "leak.yaml"
    data.write_text(yaml.safe_dump({**d, "unlabeled": "images/val"}))
    teacher = random_checkpoint(tmp_path / "t.pt", "yolov5n.yaml")
    err = one_error(run_cli([TRAIN, "--data", str(data), *COMMON, "--epochs", "1", "--t_weights", str(teacher),
                             "--project", str(tmp_path / "runs")], cwd=tmp_path))
    assert "leak.yaml: 4 image(s) listed under 'unlabeled:' are also in 'val:'" in err
    assert not (tmp_path / "runs").exists()


def test_resume_after_opt_yaml_was_cut_to_one_epoch_keeps_last_pt(tiny_data, tmp_path):
    last = _resumable(tmp_path / "run", tiny_data, epoch=0, started=3, recorded=1)
    before = last.read_bytes()
    err = one_error(run_cli([TRAIN, "--resume", str(last)], cwd=tmp_path))
    assert "opt.yaml: epochs 1, but the checkpoint has trained 1 epoch(s), so the resume would train nothing" in err
    assert last.read_bytes() == before and torch_load(last)["optimizer"] is not None


def test_resume_warns_about_typed_flags_and_trains_as_recorded(tiny_data, tmp_path):
    last = _resumable(tmp_path / "run", tiny_data, epoch=0, started=2, recorded=2)
    r = run_cli([TRAIN, "--resume", str(last), "--epochs", "5", "--feat_kd", "cross", "--workers", "0"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (line,) = [ln for ln in r.stderr.splitlines() if "so it ignores" in ln]
    assert "--epochs 5, --feat_kd cross (it takes only --device, --workers, --trust-checkpoint" in line
    assert read_results_csv(tmp_path / "run/results.csv")["epoch"] == [1]  # epoch 1 of the recorded 2, no more


def test_distillation_flags_without_teacher_and_unusable_project_are_one_line(tiny_data, tmp_path):
    err = one_error(run_cli([TRAIN, "--data", str(tiny_data), *COMMON, "--feat_kd", "cross", "--feat_ratio", "0.5",
                             "--project", str(tmp_path / "runs")], cwd=tmp_path))
    assert "--feat_kd cross, --feat_ratio 0.5: distillation setting(s) typed without a teacher" in err
    (tmp_path / "file").write_text("x")
    err = one_error(run_cli([TRAIN, "--data", str(tiny_data), *COMMON, "--project", str(tmp_path / "file")],
                            cwd=tmp_path))
    assert f"--project {tmp_path / 'file'}: {tmp_path / 'file'} is a file, not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_val_threshold_nan_and_name_outside_project_are_one_line(tiny_data, tmp_path):
    ck = random_checkpoint(tmp_path / "m.pt", "yolov5n.yaml")
    base = [VAL, "--data", str(tiny_data), "--weights", str(ck), "--imgsz", "64", "--workers", "0", "--project",
            str(tmp_path / "runs")]
    assert "--conf-thres nan: must be within [0, 1]" in one_error(run_cli([*base, "--conf-thres", "nan"], cwd=tmp_path))
    err = one_error(run_cli([*base, "--name", "../../x"], cwd=tmp_path))
    assert "--name ../../x: must name a folder inside --project" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
