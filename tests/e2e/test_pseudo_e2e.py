"""Pseudo-labels end to end: the columns, the mosaic and the record of a run, an exact resume after kill -9,
2-process DDP, and the one-line refusals."""
import yaml

from conftest import ROOT, assert_same_weights, kill9_when, one_error, run_cli, unl_yaml
from utils.reporting.loggers import read_results_csv
from utils.training.checkpoint import torch_load

TRAIN = str(ROOT / "train.py")
# the shipped 8-class teacher: a random one would find no box worth a label
TEACHER = ROOT / "checkpoint" / "yolov5s-shapes.pt"
COMMON = ["--cfg", "yolov5n.yaml", "--imgsz", "64", "--batch-size", "4", "--workers", "0", "--noautoanchor"]
PSEUDO_COLUMNS = ["train/pseudo_loss", "train/pseudo_boxes_per_image"]


def _args(data, project, name, *extra, teacher=TEACHER):
    t = ["--t_weights", str(teacher)] if teacher else []
    return [TRAIN, "--data", str(data), *COMMON, "--project", str(project), "--name", name, *t, *extra]


def test_pseudo_label_run_records_logs_and_resumes_exactly(unl_data, tmp_path):
    data = unl_yaml(unl_data, "pseudo.yaml", str(unl_data / "extra" / "unl.txt"))
    args = ["--epochs", "3", "--seed", "1", "--pseudo_conf", "0.25", "--pseudo_ignore", "0.05", "--pseudo_weight",
            "0.5"]
    r = run_cli(_args(data, tmp_path, "full", *args), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("Unlabelled images: 6 (4 per step beside 4 labelled, unlabeled_ratio 1), distillation and "
            "pseudo-labels: the teacher's detections scoring at least 0.25 (weight 0.5; cells it scores in "
            "[0.05, 0.25) are not taught background)") in r.stderr
    assert "Pseudo-labels over the first 2 batches:" in r.stderr and "pboxes" in r.stderr
    run = tmp_path / "full"
    res = read_results_csv(run / "results.csv")
    assert list(res)[-2:] == PSEUDO_COLUMNS
    assert all(v > 0 for v in res["train/pseudo_boxes_per_image"]) and all(v > 0 for v in res["train/pseudo_loss"])
    assert (run / "train_batch0_pseudo.jpg").stat().st_size > 0 and (run / "train_batch0.jpg").exists()
    for f in ("hyp.yaml", "opt.yaml"):
        d = yaml.safe_load((run / f).read_text())
        assert (d["pseudo_conf"], d["pseudo_ignore"], d["pseudo_weight"]) == (0.25, 0.05, 0.5), f
    assert torch_load(run / "weights" / "last.pt")["opt"]["pseudo_conf"] == 0.25

    last = tmp_path / "cut" / "weights" / "last.pt"
    kill9_when(_args(data, tmp_path, "cut", *args), tmp_path, last.exists)
    r = run_cli([TRAIN, "--resume", str(last)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(run / "weights" / "last.pt", last)
    cut = read_results_csv(tmp_path / "cut" / "results.csv")
    assert all(res[c] == cut[c] for c in PSEUDO_COLUMNS)


def test_pseudo_labels_ddp_two_processes(unl_data, tmp_path):
    images = unl_data / "extra" / "images"
    data = unl_yaml(unl_data, "pseudo_ddp.yaml", [str(images / "u1"), str(images / "u2")])
    r = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 *_args(data, tmp_path, "ddp", "--epochs", "2", "--device", "cpu", "--noplots", "--pseudo_conf", "0.25",
                        "--distill_ratio", "0")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results_csv(tmp_path / "ddp" / "results.csv")
    assert res["epoch"] == [0, 1] and all(v > 0 for v in res["train/pseudo_loss"])


def test_pseudo_labels_are_refused_without_unlabelled_images_or_a_teacher(unl_data, tiny_data, tmp_path):
    r = run_cli(_args(tiny_data, tmp_path, "nou", "--epochs", "1", "--pseudo_conf", "0.5"), cwd=tmp_path)
    err = one_error(r)
    assert r.returncode == 2 and "tiny.yaml: pseudo_conf 0.5 needs unlabelled images" in err and "'unlabeled:'" in err
    data = unl_yaml(unl_data, "pseudo_not.yaml", str(unl_data / "extra" / "unl.txt"))
    r = run_cli(_args(data, tmp_path, "not", "--epochs", "1", "--pseudo_conf", "0.5", teacher=None), cwd=tmp_path)
    assert r.returncode == 2 and "pseudo-labels are a teacher's detections; give a teacher" in one_error(r)
    r = run_cli(_args(data, tmp_path, "band", "--epochs", "1", "--pseudo_conf", "0.3", "--pseudo_ignore", "0.3"),
                cwd=tmp_path)
    assert r.returncode == 2 and "pseudo_ignore 0.3 must be below pseudo_conf 0.3" in one_error(r)
    assert not any((tmp_path / n).exists() for n in ("nou", "not", "band"))  # no refused run wrote its folder
