"""Distillation on unlabelled images: the 'unlabeled:' yaml key, the loop's split of the two losses, and runs."""

import pytest
import torch
import yaml

from data_helpers import FixedStream
from conftest import ROOT, assert_same_weights, kill9_when, run_cli, unl_yaml as _yaml
from utils.reporting.loggers import KD_KEYS, read_results_csv
from utils.training.checkpoint import torch_load

TRAIN = str(ROOT / "train.py")
KD_KEYS_SHORT = ("dbox", "dobj", "dcls")  # the distillation parts of a criterion's `parts`
COMMON = ["--cfg", "yolov5n.yaml", "--imgsz", "64", "--batch-size", "4", "--workers", "0", "--noautoanchor",
          "--noplots"]


@pytest.mark.parametrize("form", ["folder", "folders", "txt"])
def test_yaml_forms(unl_data, form, caplog):
    from utils.data.datasets import DataSettings, check_dataset
    from utils.data.unlabeled import build_unlabeled_stream

    extra = unl_data / "extra"
    u1, u2 = str(extra / "images" / "u1"), str(extra / "images" / "u2")
    value, n = {"folder": (u1, 4), "folders": ([u1, u2], 6), "txt": (str(extra / "unl.txt"), 6)}[form]
    d = check_dataset(_yaml(unl_data, f"{form}.yaml", value))
    assert isinstance(d.unlabeled, list) == (form == "folders")
    with caplog.at_level("INFO", logger="yolov5kd"):
        s = build_unlabeled_stream(d.unlabeled, 0.5, DataSettings(imgsz=64, batch_size=4, hyp={"mosaic": 1.0}),
                                   workers=0, rank=-1, world_size=1, seed=0)
    assert len(s) == n and s.batch_size == 2
    assert all(len(lb) == 0 for lb in s.dataset.labels)  # the label files beside the images were not read
    assert f"{n} label file(s) sit beside these images and are ignored" in caplog.text
    assert "99" not in caplog.text  # ... so their bad class id was never reported
    s.start_epoch(0)
    batch = s.next_batch()
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == torch.uint8


def test_stream_reseeds_per_epoch_and_cycles(unl_data):
    from utils.data.datasets import DataSettings
    from utils.data.unlabeled import build_unlabeled_stream

    s = build_unlabeled_stream(str(unl_data / "extra" / "images" / "u1"), 1.0,
                               DataSettings(imgsz=64, batch_size=3, hyp={"mosaic": 0.0}), workers=0, rank=-1,
                               world_size=1, seed=0)
    torch.manual_seed(0)
    s.start_epoch(2)
    a = [s.next_batch() for _ in range(3)]  # 4 images, batches of 3: the pass restarts within the epoch
    torch.manual_seed(0)
    s.start_epoch(2)
    b = [s.next_batch() for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_zero_ratio_disables_the_stream(unl_data):
    from utils.data.datasets import DataSettings
    from utils.data.unlabeled import build_unlabeled_stream, unlabeled_batch_size

    assert unlabeled_batch_size(0.0, 16) == 0 and unlabeled_batch_size(0.01, 16) == 1
    assert unlabeled_batch_size(2.0, 8) == 16
    assert build_unlabeled_stream(str(unl_data / "extra" / "images" / "u1"), 0.0,
                                  DataSettings(imgsz=64, batch_size=4, hyp={}), workers=0, rank=-1, world_size=1,
                                  seed=0) is None


def test_refused_without_a_teacher(unl_data, tmp_path):
    data = _yaml(unl_data, "noteacher.yaml", str(unl_data / "extra" / "images" / "u1"))
    r = run_cli([TRAIN, "--data", str(data), *COMMON, "--project", str(tmp_path), "--name", "x", "--epochs", "1"],
                cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(err) == 1 and "unlabeled" in err[0] and "--t_weights" in err[0], r.stderr[-2000:]
    assert not (tmp_path / "x").exists(), "a refused run wrote its folder"




def _one_step_setup(teacher8):
    from models.yolo import Model
    from optimizer.config import KDConfig
    from optimizer.criterion import Distiller, Student
    from utils.training.engine import LoopState
    from utils.training.forward import StudentForward
    from utils.training.hyp import load_hyp
    from utils.training.loss import ComputeLoss, scale_hyp
    from utils.training.optim import build_optimizer

    torch.manual_seed(1)
    model = Model("yolov5n.yaml", nc=8)
    hyp = load_hyp("hyp.scratch-low.yaml")
    model.hyp = scale_hyp(hyp, 3, 8, 64, 0.0)
    model.nc = 8
    crit = Distiller.build(KDConfig(t_weights=str(teacher8), teacher_precision="fp32"),
                           Student(model, ComputeLoss(model), StudentForward(torch.device("cpu")), 64))
    opt = build_optimizer(model, "SGD", 0.0, 0.9, 0.0)  # lr 0 everywhere: the step changes no weight
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8, generator=g)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3], [1, 4, 0.3, 0.6, 0.2, 0.4]])
    u = torch.randint(0, 255, (3, 3, 64, 64), dtype=torch.uint8, generator=g)
    hyp = {**hyp, "warmup_bias_lr": 0.0, "warmup_momentum": 0.9}
    return model, crit, opt, [(imgs, targets, ("a", "b"), None)], hyp, u, LoopState


def _epoch(model, crit, opt, loader, hyp, state_cls, unlabeled=None):
    from utils.training.engine import LoopConfig, train_one_epoch
    from utils.training.optim import Optim

    scaler = torch.amp.GradScaler("cuda", enabled=False)
    for g in opt.param_groups:
        g.setdefault("initial_lr", 0.0)
    crit.unlabeled = unlabeled  # the distiller owns the stream
    cfg = LoopConfig(epochs=1, device=torch.device("cpu"), warmup=hyp, lf=lambda x: 1.0, batch_size=2, nw=100,
                     imgsz=64, gs=32, show_progress=False)
    return train_one_epoch(model, loader, crit, Optim(opt, scaler, None), 0, state_cls(), cfg)


def test_detection_loss_untouched_by_unlabelled_images(teacher8):
    model, crit, opt, loader, hyp, u, state_cls = _one_step_setup(teacher8)
    plain = _epoch(model, crit, opt, loader, hyp, state_cls).mloss
    with_u = _epoch(model, crit, opt, loader, hyp, state_cls, unlabeled=FixedStream(u)).mloss
    for k in ("box", "obj", "cls"):
        assert with_u[k] == plain[k], k  # bit-identical: the student runs the labelled batch alone
    assert any(with_u[k] != plain[k] for k in KD_KEYS_SHORT)  # ... while distillation sees the extra images


def test_distillation_reaches_the_unlabelled_images(teacher8):
    from optimizer.terms.base import StepMaps

    model, crit, _, loader, _, u, _ = _one_step_setup(teacher8)
    imgs, targets = loader[0][0].float() / 255, loader[0][1]
    model.train()

    def grads(u_imgs):
        model.zero_grad()
        t_maps = crit.teacher(imgs if u_imgs is None else torch.cat((imgs, u_imgs.detach()), 0))
        pred = model(imgs)
        loss, _ = crit.losses(StepMaps(pred, targets, t_maps, None if u_imgs is None else model(u_imgs)))
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    u_imgs = (u.float() / 255).requires_grad_(True)
    with_u = grads(u_imgs)
    assert u_imgs.grad is not None and u_imgs.grad.abs().sum() > 0  # the loss depends on every unlabelled image
    assert not torch.equal(with_u, grads(None))  # ... and so do the student's weight gradients


def test_broken_unlabelled_images_are_skipped(unl_data, tmp_path, caplog):
    from utils.data.datasets import DataSettings
    from utils.data.unlabeled import build_unlabeled_stream

    d = tmp_path / "u"
    d.mkdir()
    for f in sorted((unl_data / "extra" / "images" / "u1").glob("*")):
        (d / f.name).write_bytes(f.read_bytes())
    (d / "broken.jpg").write_bytes(b"not an image at all")
    (d / "empty.png").write_bytes(b"")
    with caplog.at_level("INFO", logger="yolov5kd"):
        s = build_unlabeled_stream(str(d), 1.0, DataSettings(imgsz=64, batch_size=2, hyp={"mosaic": 1.0}),
                                   workers=0, rank=-1, world_size=1, seed=0)
    assert len(s) == 4
    assert "broken.jpg" in caplog.text and "empty.png" in caplog.text
    assert "6 unlabelled images found, 2 corrupt (skipped)" in caplog.text


def _kd_args(data, project, name, teacher, *extra):
    return [TRAIN, "--data", str(data), *COMMON, "--project", str(project), "--name", name, "--t_weights",
            str(teacher), *extra]


def test_train_with_unlabelled_images_and_resume_is_exact(unl_data, teacher8, tmp_path):
    data = _yaml(unl_data, "kd_unl.yaml", str(unl_data / "extra" / "unl.txt"))
    args = ["--epochs", "3", "--seed", "3", "--unlabeled_ratio", "0.5"]
    r = run_cli(_kd_args(data, tmp_path, "full", teacher8, *args), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Unlabelled images: 6 (2 per step beside 4 labelled, unlabeled_ratio 0.5)" in r.stderr
    res = read_results_csv(tmp_path / "full" / "results.csv")
    assert list(res)[-3:] == KD_KEYS and res["epoch"] == [0, 1, 2]  # one set of KD columns
    for f in ("hyp.yaml", "opt.yaml"):
        d = yaml.safe_load((tmp_path / "full" / f).read_text())
        assert d["unlabeled_ratio"] == 0.5, f
    assert torch_load(tmp_path / "full" / "weights" / "last.pt")["opt"]["unlabeled_ratio"] == 0.5

    last = tmp_path / "cut" / "weights" / "last.pt"
    kill9_when(_kd_args(data, tmp_path, "cut", teacher8, *args), tmp_path, last.exists)
    r = run_cli([TRAIN, "--resume", str(last)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(tmp_path / "full" / "weights" / "last.pt", last)


def test_ddp_two_processes_with_unlabelled_images(unl_data, teacher8, tmp_path):
    images = unl_data / "extra" / "images"
    data = _yaml(unl_data, "kd_ddp.yaml", [str(images / "u1"), str(images / "u2")])
    r = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 *_kd_args(data, tmp_path, "ddp", teacher8, "--epochs", "2", "--device", "cpu")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Unlabelled images: 6 (2 per step beside 2 labelled" in r.stderr
    res = read_results_csv(tmp_path / "ddp" / "results.csv")
    assert res["epoch"] == [0, 1] and all(v > 0 for v in res["train/dbox_loss"])
