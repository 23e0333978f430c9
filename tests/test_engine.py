"""Training-loop pieces on hand-built cases: optimizer groups, LR schedule and its resume, EMA, stopping."""
import math

import torch

from models.yolo import Model
from utils.engine import EarlyStopping, ModelEMA, build_optimizer, build_scheduler, lr_lambda


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
