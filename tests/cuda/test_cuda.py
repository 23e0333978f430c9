"""The CUDA path: a distillation step under fp16 autocast with GradScaler (output terms, feature terms and
pseudo-labels), the fp16 teacher, `--device 0` end to end, and 2-GPU nccl DDP. Skipped without CUDA."""
from __future__ import annotations

import copy

import pytest
import torch

from data_helpers import FixedStream
from conftest import ROOT, run_cli, unl_yaml
from models.yolo import Model
from optimizer.config import KD_SPECS, KDConfig
from optimizer.criterion import Distiller, Student
from optimizer.teacher import Teacher
from utils.reporting.loggers import read_results_csv
from utils.training.forward import StudentForward
from utils.training.hyp import load_hyp
from utils.training.loss import ComputeLoss, scale_hyp
from utils.training.optim import build_optimizer, optimizer_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TRAIN = str(ROOT / "train.py")
TEACHER = ROOT / "checkpoint" / "yolov5s-shapes.pt"
DEV = torch.device("cuda:0")
NC = 8




def _teacher(precision: str) -> Teacher:
    torch.manual_seed(3)
    model = Model("yolov5s.yaml", nc=NC).fuse().to(DEV)
    with torch.no_grad():  # scores near 0.73 in every cell: pseudo boxes above 0.5 exist
        for conv in model.model[-1].m:
            conv.bias.view(3, -1)[:, 4] = 1.0
            conv.bias.view(3, -1)[:, 6] = 1.0
    return Teacher(model, precision=precision)


@pytest.mark.parametrize("extra", [{}, {"feat_kd": "mse"}, {"pseudo_conf": 0.5}], ids=["output", "features", "pseudo"])
def test_fp16_autocast_distillation_step_with_grad_scaler(extra):
    torch.manual_seed(0)
    model = Model("yolov5n.yaml", nc=NC).to(DEV).train()
    hyp = load_hyp(ROOT / "data/hyps/hyp.scratch-low.yaml", KD_SPECS)
    loss_fn = ComputeLoss(model, hyp=scale_hyp(hyp, 3, NC, 128))
    g = torch.Generator().manual_seed(0)
    unlabeled = FixedStream(torch.randint(0, 255, (4, 3, 128, 128), dtype=torch.uint8, generator=g), 4)
    kd = KDConfig(t_weights="t.pt", **extra)
    crit = Distiller(kd, _teacher("fp16"), Student(model, loss_fn, StudentForward(DEV, torch.float16), 128),
                     unlabeled if "pseudo_conf" in extra else None, seed=0)
    crit.start_epoch(1)  # past the feature adapters' warm-up: every term reaches the student
    opt = build_optimizer(model, "SGD", 0.01, 0.9, 5e-4, extra=crit.trainable())
    scaler = torch.amp.GradScaler("cuda")
    before = copy.deepcopy(model.state_dict())
    imgs = torch.rand(4, 3, 128, 128, generator=g).to(DEV)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3], [1, 3, 0.3, 0.6, 0.2, 0.4], [2, 5, 0.5, 0.5, 0.9, 0.8],
                            [3, 7, 0.7, 0.3, 0.2, 0.2]])
    for _ in range(3):
        loss, parts = crit(model, imgs, targets)
        assert torch.isfinite(loss).all() and all(torch.isfinite(v).all() for v in parts.values()), parts
        scaler.scale(loss).backward()
        optimizer_step(model, opt, scaler, None, tuple(crit.trainable().parameters()) if crit.trainable() else ())
    assert 0 < scaler.get_scale() < float("inf")
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert moved, "the scaler skipped every step"
    if "pseudo_conf" in extra:
        assert float(parts["pboxes"]) > 0


def test_fp16_teacher_matches_fp32():
    imgs = torch.rand(2, 3, 128, 128, device=DEV)
    fp32, fp16 = _teacher("fp32"), _teacher("fp16")
    assert next(fp16.model.parameters()).dtype == torch.float16
    a, fa = fp32.run(imgs, features=True)
    b, fb = fp16.run(imgs, features=True)
    for x, y in zip(a + fa, b + fb):
        assert y.dtype == torch.float32 and torch.isfinite(y).all()
        torch.testing.assert_close(y, x, rtol=0.02, atol=0.02)


def test_device_0_end_to_end(unl_data, tmp_path):
    data = unl_yaml(unl_data, "cuda.yaml", str(unl_data / "extra" / "unl.txt"))
    r = run_cli([TRAIN, "--data", str(data), "--cfg", "yolov5n.yaml", "--weights", "", "--imgsz", "64",
                 "--batch-size", "4", "--epochs", "1", "--workers", "0", "--noplots", "--device", "0",
                 "--t_weights", str(TEACHER), "--feat_kd", "mse", "--pseudo_conf", "0.25", "--project", str(tmp_path),
                 "--name", "gpu"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fp16 autocast with GradScaler" in r.stderr and "Teacher" in r.stderr
    res = read_results_csv(tmp_path / "gpu" / "results.csv")
    assert res["epoch"] == [0] and res["metrics/mAP_0.5:0.95"][0] >= 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_nccl_two_gpus(tiny_data, tmp_path):
    r = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TRAIN, "--data",
                 str(tiny_data), "--cfg", "yolov5n.yaml", "--weights", "", "--imgsz", "64", "--batch-size", "8",
                 "--epochs", "2", "--workers", "0", "--noplots", "--device", "0,1", "--t_weights", str(TEACHER),
                 "--project", str(tmp_path), "--name", "ddp"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_results_csv(tmp_path / "ddp" / "results.csv")["epoch"] == [0, 1]
