"""Tiny end-to-end runs (imgsz 64, a handful of images): run folder, val reproduction, resume, divergence."""

import torch
import yaml

from conftest import ROOT, assert_same_weights, kill9_when, run_cli
from utils.reporting.loggers import read_results_csv
from utils.training.checkpoint import torch_load

TRAIN = str(ROOT / "train.py")
VAL = str(ROOT / "val.py")
COMMON = ["--cfg", "yolov5n.yaml", "--imgsz", "64", "--batch-size", "4", "--workers", "0", "--noautoanchor"]


def _train(tiny_data, project, name, *extra, timeout=600):
    r = run_cli([TRAIN, "--data", str(tiny_data), *COMMON, "--project", str(project), "--name", name, *extra],
                cwd=project, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return project / name


def test_two_epochs_run_folder_and_val_reproduces(tiny_data, tmp_path):
    run = _train(tiny_data, tmp_path, "exp", "--epochs", "2")
    for f in ("weights/last.pt", "weights/best.pt", "hyp.yaml", "opt.yaml", "results.csv", "results.png",
              "labels.jpg", "train_batch0.jpg", "confusion_matrix.png", "PR_curve.png", "F1_curve.png",
              "P_curve.png", "R_curve.png", "val_batch0_labels.jpg", "val_batch0_pred.jpg"):
        assert (run / f).is_file(), f
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard event file"
    res = read_results_csv(run / "results.csv")
    assert res["epoch"] == [0, 1]
    assert "train/dbox_loss" not in res
    hyp = yaml.safe_load((run / "hyp.yaml").read_text())
    assert hyp["lr0"] == 0.01 and hyp["distill_ratio"] == 0.05
    ck = torch_load(run / "weights/best.pt")
    assert ck["epoch"] == -1 and ck["optimizer"] is None and "resume_state" not in ck
    best_epoch = max(range(2), key=lambda i: 0.1 * res["metrics/mAP_0.5"][i] + 0.9 * res["metrics/mAP_0.5:0.95"][i])

    import val
    # The same kernels as the training process: one thread (run_cli sets OMP_NUM_THREADS=1), as the thread
    # count changes oneDNN's reduction order, and a barely trained model's mAP flips on ~1e-4 score changes.
    # train.py validates a contiguous fp16-rounded copy, so the two paths then compute the same floats and
    # differ only by results.csv's rounding (%.5g): 1e-5 relative is what the saved-checkpoint path promises.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (p, r, map50, map_, *_), _, _ = val.run(str(tiny_data), weights=str(run / "weights/best.pt"), imgsz=64,
                                                batch_size=8, project=tmp_path / "val", plots=False, workers=0)
    finally:
        torch.set_num_threads(threads)
    for got, key in ((p, "metrics/precision"), (r, "metrics/recall"), (map50, "metrics/mAP_0.5"),
                     (map_, "metrics/mAP_0.5:0.95")):
        assert abs(got - res[key][best_epoch]) <= 1e-5 * max(1.0, abs(got)), key


def test_kill9_then_resume_matches_uninterrupted(tiny_data, tmp_path):
    args = ["--epochs", "3", "--seed", "7", "--noplots"]
    full = _train(tiny_data, tmp_path, "full", *args)

    last = tmp_path / "cut" / "weights" / "last.pt"
    kill9_when([TRAIN, "--data", str(tiny_data), *COMMON, "--project", str(tmp_path), "--name", "cut", *args], tmp_path,
               last.exists)
    ck = torch_load(last)  # loadable after kill -9
    assert ck["epoch"] in (0, 1) and ck["optimizer"] is not None

    r = run_cli([TRAIN, "--resume", str(last)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(full / "weights/last.pt", last)
    assert read_results_csv(tmp_path / "cut" / "results.csv")["epoch"] == [0, 1, 2]


def test_non_finite_detection_loss_stops_cleanly(tiny_data, tmp_path):
    # starting weights whose activations overflow fp32: every detection loss is non-finite (an absurd lr0, the
    # old way to get there, is now refused by the hyp check)
    from conftest import overflowing_checkpoint

    overflowing_checkpoint(tmp_path / "s.pt", "yolov5n.yaml")
    r = run_cli([TRAIN, "--data", str(tiny_data), "--weights", str(tmp_path / "s.pt"), *COMMON[2:], "--project",
                 str(tmp_path), "--name", "nan", "--epochs", "3", "--noplots"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(err) == 1 and "epoch 0" in err[0] and "detection loss" in err[0] and "lr0" in err[0], err
    assert "distillation" not in err[0]
    for f in (tmp_path / "nan" / "weights").glob("*.pt"):
        sd = torch_load(f)["model"].float().state_dict()
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()), f


def test_pruned_student_trains_as_loaded(tiny_data, tmp_path):
    """A checkpoint whose layer widths no longer match its yaml is trained with its own architecture."""
    from models.common import Conv
    from models.yolo import Model
    from utils.training.checkpoint import build_checkpoint, save_checkpoint

    torch.manual_seed(0)
    m = Model("yolov5n.yaml", nc=8)
    b = m.model[2].m[0]  # a C3's bottleneck: halve its hidden width, as a channel pruner would
    c = b.cv1.conv.in_channels
    b.cv1, b.cv2 = Conv(c, c // 2, 1, 1), Conv(c // 2, c, 3, 1)
    b.cv1.i = b.cv2.i = 2
    pruned = save_checkpoint(build_checkpoint(m), tmp_path / "pruned.pt")
    r = run_cli([TRAIN, "--data", str(tiny_data), "--weights", str(pruned), *COMMON[2:], "--epochs", "1",
                 "--project", str(tmp_path), "--name", "p", "--noplots"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training the checkpoint's own architecture" in r.stderr
    out = torch_load(tmp_path / "p" / "weights" / "last.pt")["model"]
    assert out.model[2].m[0].cv1.conv.out_channels == c // 2
