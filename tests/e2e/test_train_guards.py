"""train.py on bad input: flags, hyp values, resume pitfalls, non-finite losses, unlabelled val sets.

Every case must end in one clear line (exit 2, no traceback) or a warning with the right result, and a
refused run must write nothing."""
import shutil

import pytest
import torch
import yaml

from conftest import ROOT, one_error, overflowing_checkpoint, random_checkpoint, run_cli
from utils.reporting.loggers import read_results_csv
from utils.training.checkpoint import build_checkpoint, save_checkpoint, torch_load
from utils.training.optim import build_optimizer, build_scheduler, lr_lambda

TRAIN = str(ROOT / "train.py")
COMMON = ["--cfg", "yolov5n.yaml", "--imgsz", "64", "--batch-size", "4", "--workers", "0", "--noautoanchor",
          "--noplots"]
LOW = ROOT / "data/hyps/hyp.scratch-low.yaml"


def _files(root) -> dict:
    return {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def _hyp_file(tmp_path, **changes):
    hyp = yaml.safe_load(LOW.read_text())
    for k, v in changes.items():
        if v is None:
            hyp.pop(k)
        else:
            hyp[k] = v
    f = tmp_path / "hyp.custom.yaml"
    f.write_text(yaml.safe_dump(hyp))
    return f


@pytest.mark.parametrize("args,needle", [
    (["--epochs", "0"], "--epochs 0"),
    (["--epochs", "-1"], "--epochs -1"),
    (["--workers", "-1"], "--workers -1"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--distill_ratio", "inf"], "distill_ratio inf"),
    (["--temperature", "inf"], "temperature inf"),
    (["--temperature", "0"], "temperature 0"),
    (["--label-smoothing", "1.5"], "--label-smoothing 1.5"),
])
def test_bad_flags_are_refused_before_anything_is_written(tiny_data, tmp_path, args, needle):
    r = run_cli([TRAIN, "--data", str(tiny_data), *COMMON, "--project", str(tmp_path / "runs"), *args], cwd=tmp_path)
    assert needle in one_error(r)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("changes,needle", [
    ({"lr0": "abc"}, "lr0 'abc' must be a number"),
    ({"mosaic": 2.0}, "mosaic 2.0 must be"),
    ({"hsv_h": "0.1x"}, "hsv_h '0.1x' must be a number"),
    ({"weight_decay": float("nan")}, "weight_decay nan must be finite"),
    ({"lr0": None}, "missing lr0"),
    ({"distill_ratio": -1}, "distill_ratio -1 must be"),
])
def test_bad_hyp_values_are_one_line(tiny_data, tmp_path, changes, needle):
    hyp = _hyp_file(tmp_path, **changes)
    r = run_cli([TRAIN, "--data", str(tiny_data), *COMMON, "--project", str(tmp_path / "runs"), "--hyp", str(hyp)],
                cwd=tmp_path)
    err = one_error(r)
    assert needle in err and "hyp.custom.yaml" in err
    assert not (tmp_path / "runs").exists()


def test_unknown_and_defaulted_hyp_keys_warn_once(caplog):
    from utils.training.hyp import validate_hyp

    hyp = yaml.safe_load(LOW.read_text())
    hyp["lr00"] = 0.02
    del hyp["mosaic"], hyp["fliplr"]
    with caplog.at_level("WARNING", logger="yolov5kd"):
        out = validate_hyp(hyp, "my.yaml")
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2
    assert any("lr00" in m and "unknown" in m for m in msgs)
    assert any("mosaic" in m and "fliplr" in m and "default" in m for m in msgs)
    assert out["mosaic"] == 1.0 and out["fliplr"] == 0.5 and out["lr0"] == 0.01


def test_lowlr_hyp_is_finetune_at_a_quarter_of_the_learning_rate():
    # hyp files are standalone (YOLOv5's format has no inheritance), so the copy is pinned to its source here
    hyps = ROOT / "data/hyps"
    ft = yaml.safe_load((hyps / "hyp.finetune.yaml").read_text())
    low = yaml.safe_load((hyps / "hyp.finetune-lowlr.yaml").read_text())
    assert low.keys() == ft.keys()
    scaled = {"lr0", "warmup_bias_lr"}
    assert {k: low[k] for k in scaled} == {k: ft[k] / 4 for k in scaled}
    assert {k: v for k, v in low.items() if k not in scaled} == {k: v for k, v in ft.items() if k not in scaled}

# ------------------------------------------------------------------------------------------------------ resume
@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """A finished 1-epoch run (stripped weights) to build resumable states from."""
    root = tmp_path_factory.mktemp("finished")
    r = run_cli([TRAIN, "--data", str(tiny_data), *COMMON, "--project", str(root), "--name", "done", "--epochs", "1"],
                cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "done"


def _resumable(finished, dest, epoch: int, epochs: int, **opt_changes):
    """Copy of a run whose last.pt stopped after `epoch` of `epochs`, as a killed run leaves it."""
    shutil.copytree(finished, dest)
    model = torch_load(dest / "weights/last.pt")["model"].float()
    optimizer = build_optimizer(model, "SGD", 0.01, 0.937, 0.0005)
    build_scheduler(optimizer, lr_lambda(epochs, 0.01))  # gives the groups their initial_lr, as training does
    opt = yaml.safe_load((dest / "opt.yaml").read_text())
    opt.update(epochs=epochs, save_dir=str(finished), **opt_changes)
    (dest / "opt.yaml").write_text(yaml.safe_dump(opt))
    ck = build_checkpoint(model, ema=model, updates=2, optimizer=optimizer, epoch=epoch, best_fitness=0.0, opt=opt)
    save_checkpoint(ck, dest / "weights/last.pt")
    return dest / "weights/last.pt"


def test_resume_of_a_stripped_checkpoint_writes_nothing(finished_run, tmp_path):
    before = _files(finished_run)
    r = run_cli([TRAIN, "--resume", str(finished_run / "weights/last.pt")], cwd=tmp_path)
    assert "finished or stripped" in one_error(r)
    assert _files(finished_run) == before
    assert list(tmp_path.iterdir()) == []


def test_resume_outside_a_run_folder_is_refused(tmp_path):
    shutil.copy(ROOT / "checkpoint/yolov5s-shapes.pt", tmp_path / "teacher.pt")
    r = run_cli([TRAIN, "--resume", str(tmp_path / "teacher.pt")], cwd=tmp_path)
    assert "not inside a run's weights/ folder" in one_error(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.pt"]


def test_resume_of_a_copy_writes_into_the_copy(finished_run, tmp_path):
    last = _resumable(finished_run, tmp_path / "orig", epoch=0, epochs=2)
    orig = _files(tmp_path / "orig")
    shutil.copytree(tmp_path / "orig", tmp_path / "copy")
    r = run_cli([TRAIN, "--resume", str(tmp_path / "copy/weights/last.pt")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _files(tmp_path / "orig") == orig, "resuming the copy touched the original run"
    assert read_results_csv(tmp_path / "copy/results.csv")["epoch"] == [0, 1]
    assert torch_load(tmp_path / "copy/weights/last.pt")["epoch"] == -1
    assert last.is_file()


def test_resume_cleans_temp_files_and_duplicate_rows(finished_run, tmp_path):
    last = _resumable(finished_run, tmp_path / "run", epoch=0, epochs=2)
    w = last.parent
    for name in (".last.pt.a1b2.tmp", ".best.pt.c3d4.tmp"):
        (w / name).write_bytes(b"partial")
    csv = tmp_path / "run/results.csv"
    lines = csv.read_text().splitlines(keepends=True)
    csv.write_text("".join(lines + [lines[-1].replace("0,", "1,", 1)]))  # a row of epoch 1, whose save was cut
    r = run_cli([TRAIN, "--resume", str(last)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not list(w.glob(".*.tmp"))
    assert read_results_csv(csv)["epoch"] == [0, 1]


def test_resume_killed_during_final_strip_reports_no_epochs(finished_run, tmp_path):
    last = _resumable(finished_run, tmp_path / "run", epoch=1, epochs=2)
    r = run_cli([TRAIN, "--resume", str(last)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "0 epochs completed" in r.stderr
    assert torch_load(last)["epoch"] == -1


def test_kd_resume_refuses_a_different_teacher(finished_run, tmp_path):
    teacher = random_checkpoint(tmp_path / "teacher.pt", "yolov5s.yaml", seed=1)
    from optimizer.teacher import file_sha256

    last = _resumable(finished_run, tmp_path / "run", epoch=0, epochs=2, t_weights=str(teacher),
                      t_sha256=file_sha256(teacher))
    random_checkpoint(teacher, "yolov5n.yaml", seed=2)  # someone put another model at the recorded path
    before = _files(tmp_path / "run")
    err = one_error(run_cli([TRAIN, "--resume", str(last)], cwd=tmp_path))
    assert "not the one this run started with" in err and str(teacher) in err
    assert _files(tmp_path / "run") == before


# ------------------------------------------------------------------------------------------------ non-finite
def test_teacher_with_nan_weights_is_refused(tiny_data, tmp_path):
    ck = torch_load(random_checkpoint(tmp_path / "t.pt", "yolov5s.yaml"))
    with torch.no_grad():
        ck["model"].model[0].conv.weight[0, 0, 0, 0] = float("nan")
    save_checkpoint(ck, tmp_path / "t.pt")
    err = one_error(run_cli([TRAIN, "--data", str(tiny_data), *COMMON, "--project", str(tmp_path / "runs"),
                              "--t_weights", str(tmp_path / "t.pt"), "--epochs", "1"], cwd=tmp_path))
    assert "non-finite weights" in err and "t.pt" in err


def test_epoch_with_every_step_skipped_stops_and_names_the_distillation_loss(tiny_data, tmp_path):
    overflowing_checkpoint(tmp_path / "t.pt", "yolov5s.yaml")  # every teacher map is non-finite
    # 8 images at batch 4: two batches, fewer than the three-in-a-row limit
    err = one_error(run_cli([TRAIN, "--data", str(tiny_data), *COMMON, "--project", str(tmp_path / "runs"),
                              "--name", "x", "--t_weights", str(tmp_path / "t.pt"), "--epochs", "1", "--noval"],
                             cwd=tmp_path))
    assert "every batch of epoch 0" in err and "distillation loss" in err and "lr0" not in err
    assert not (tmp_path / "runs/x/weights/last.pt").exists()


def test_val_set_without_labels_warns_and_still_writes_best(tiny_data, tmp_path):
    spec = yaml.safe_load(tiny_data.read_text())
    root = tmp_path / "data"
    shutil.copytree(spec["path"], root)
    for f in (root / "labels/val").glob("*.txt"):
        f.write_text("")
    (root / "labels/val.cache").unlink(missing_ok=True)
    yml = tmp_path / "nolabels.yaml"
    yml.write_text(yaml.safe_dump({**spec, "path": str(root)}))
    r = run_cli([TRAIN, "--data", str(yml), *COMMON, "--project", str(tmp_path), "--name", "e", "--epochs", "1"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sum("has no labels" in ln for ln in r.stderr.splitlines()) == 1
    assert (tmp_path / "e/weights/best.pt").is_file()

