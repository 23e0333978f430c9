"""Training-loop pieces on hand-built cases: optimizer groups, LR schedule and its resume, EMA, stopping."""
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.yolo import Model
from utils.core.errors import UserError
from utils.training.engine import LoopConfig, LoopState, train_one_epoch
from utils.training.optim import EarlyStopping, ModelEMA, Optim, build_optimizer, build_scheduler, lr_lambda


def test_optimizer_groups_match_reference_counts():
    opt = build_optimizer(Model("yolov5s.yaml"), "SGD", 0.01, 0.937, 0.0005)
    g = opt.param_groups
    assert [len(x["params"]) for x in g] == [60, 60, 57]  # biases, decayed weights, BN weights
    assert [x["weight_decay"] for x in g] == [0.0, 0.0005, 0.0]
    assert g[0]["nesterov"] and g[0]["momentum"] == 0.937


def test_lr_lambda_values():
    lf = lr_lambda(100, 0.01)
    assert lf(0) == 1.0 and math.isclose(lf(99), 0.0199, rel_tol=1e-9)
    cos = lr_lambda(100, 0.01, cos_lr=True)
    assert cos(0) == 1.0 and math.isclose(cos(100), 0.01, rel_tol=1e-9)


def _run_epochs(opt, sched, n):
    for _ in range(n):
        opt.step()
        sched.step()


def test_scheduler_resume_keeps_the_learning_rates():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    lf = lr_lambda(10, 0.1)
    opt = build_optimizer(net, "SGD", 0.01, 0.9, 0.0)
    sched = build_scheduler(opt, lf)
    _run_epochs(opt, sched, 4)
    saved = opt.state_dict()
    expected = [g["lr"] for g in opt.param_groups]
    # as in the reference, last_epoch starts at -1, so after epoch e's step the next epoch uses lf(e)
    assert math.isclose(expected[0], 0.01 * lf(3))

    opt2 = build_optimizer(net, "SGD", 0.01, 0.9, 0.0)
    sched2 = build_scheduler(opt2, lf, start_epoch=4, optimizer_state=saved)
    assert [g["lr"] for g in opt2.param_groups] == expected
    _run_epochs(opt, sched, 1)
    _run_epochs(opt2, sched2, 1)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_ema_decay_and_buffers():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.BatchNorm2d(1))
    ema = ModelEMA(net)
    assert math.isclose(ema.decay_fn(1), 0.9999 * (1 - math.exp(-1 / 2000)))
    assert math.isclose(ema.decay_fn(2000), 0.632057, rel_tol=1e-5)
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[1].running_mean.fill_(2.0)
    before = ema.ema[0].weight.clone()
    ema.update(net)
    d = ema.decay_fn(1)
    assert torch.allclose(ema.ema[0].weight, d * before + (1 - d) * 1.0)
    assert torch.allclose(ema.ema[1].running_mean, torch.tensor([(1 - d) * 2.0]))
    assert ema.ema[1].num_batches_tracked.item() == 0  # integer buffers are not averaged
    assert not any(p.requires_grad for p in ema.ema.parameters())


def test_early_stopping():
    s = EarlyStopping(patience=2)
    assert not s(0, 0.5) and not s(1, 0.4)
    assert s.possible_stop
    assert s(2, 0.45)
    assert s.best_epoch == 0


class _NanCriterion:
    """A criterion whose second part, and with it the loss, is never finite."""

    parts = ("box", "dx")
    figures: dict = {}
    progress_note = ""

    def start_epoch(self, epoch):
        pass

    def end_epoch(self):
        pass

    def nonfinite_advice(self, parts):
        return f"advice for {'+'.join(parts)}"

    def __call__(self, model, imgs, targets):
        out = model(imgs).sum()
        return out * float("nan"), {"box": out.detach(), "dx": torch.tensor(float("nan"))}


def test_the_loop_stops_on_a_nonfinite_loss_with_the_criterions_advice():
    """The loop names the non-finite parts and nothing it does not know: the advice is the criterion's."""
    net = torch.nn.Conv2d(3, 1, 1)
    opt = build_optimizer(net, "SGD", 0.01, 0.9, 0.0)
    build_scheduler(opt, lr_lambda(1, 0.01))  # the warmup reads each group's initial_lr
    cfg = LoopConfig(epochs=1, device=torch.device("cpu"), lf=lr_lambda(1, 0.01), batch_size=2, nw=0, imgsz=8, gs=8,
                     warmup={"warmup_bias_lr": 0.1, "warmup_momentum": 0.8, "momentum": 0.9}, show_progress=False)
    batch = (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, 6), ("a", "b"), None)
    with pytest.raises(UserError) as e:
        train_one_epoch(net, [batch] * 4, _NanCriterion(), Optim(opt, torch.amp.GradScaler("cuda", enabled=False)),
                        0, LoopState(), cfg)
    msg = str(e.value)
    assert "non-finite loss (dx) at epoch 0, batch 2 (3 batches in a row); advice for dx." in msg
    assert "distillation" not in msg and "detection" not in msg


_FAULTS_SCRIPT = """
import resource, sys, torch
from utils.core.runtime import keep_freed_memory

SIZES = (10 * 2**20, 2**20, 10 * 2**20, 4 * 2**20, 12 * 2**20)  # floats: 40, 4, 40, 16, 48 MB

def faults_of_one_step():
    # activations of several sizes, written, held together and freed, as a training step does
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.empty(n).fill_(1.0) for n in SIZES]
    del held
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = [faults_of_one_step() for _ in range(4)][1:]
took = keep_freed_memory()
kept = [faults_of_one_step() for _ in range(6)][3:]
print(took, min(default), sum(kept))
"""


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_refaulting_activations():
    """With glibc's defaults the large blocks a step frees go back to the OS and are faulted in again on
    the next step; after keep_freed_memory() later steps reuse them. Run in a fresh process, since the
    setting is process-wide and cannot be undone."""
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT.format(root=root)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    took, default_min, kept_3_steps = out.stdout.split()
    if took != "True":
        pytest.skip("not glibc: mallopt unavailable")
    pages = 148 * 2**20 // resource.getpagesize()  # one step's blocks
    assert int(default_min) > pages // 2  # the premise: by default every step faults its blocks in again
    assert int(kept_3_steps) < pages // 10  # three later steps together: almost nothing new
