"""One KD configuration (flag > hyp yaml > default, validated once, kept on resume) and the balance report."""
import argparse
import logging

import pytest
import torch
import yaml

from conftest import ROOT, random_checkpoint, run_cli
from optimizer.config import KD_SPECS, KDConfig, add_kd_args
from optimizer.balance import BALANCE_HIGH, BALANCE_LOW, balance_ratios, balance_warnings
from optimizer.criterion import DetectionCriterion, Distiller, Student
from optimizer.teacher import Teacher
from optimizer.terms.base import StepMaps
from optimizer.terms.output import OutputTerm
from utils.core.errors import UserError
from utils.training.checkpoint import torch_load
from utils.training.forward import StudentForward
from utils.training.hyp import load_hyp, validate_hyp

TRAIN = str(ROOT / "train.py")
LOW = ROOT / "data/hyps/hyp.scratch-low.yaml"


def _flags(*argv):
    p = add_kd_args(argparse.ArgumentParser())
    return vars(p.parse_args(list(argv))), {a[2:] for a in argv if a.startswith("--")}


def test_flag_beats_hyp_beats_default():
    flags, given = _flags("--temperature", "3")
    kd = KDConfig.resolve(flags, {"temperature": 10.0, "distill_ratio": 0.8, "dist_norm": "weighted"}, given)
    assert (kd.temperature, kd.distill_ratio, kd.dist_norm, kd.dist_loss) == (3.0, 0.8, "weighted", "l2")
    kd = KDConfig.resolve(*_flags()[:1], {}, set())
    assert (kd.temperature, kd.distill_ratio, kd.dist_norm) == (KD_SPECS["temperature"].default,
                                                                KD_SPECS["distill_ratio"].default,
                                                                KD_SPECS["dist_norm"].default)
    flags, given = _flags("--dist_norm", "soft", "--distill_ratio", "2")
    kd = KDConfig.resolve(flags, {"dist_norm": "mean", "distill_ratio": 0.1}, given)
    assert kd.dist_norm == "soft" and kd.distill_ratio == 2.0
    assert not kd.enabled and KDConfig(t_weights="t.pt").enabled


def test_values_are_validated_once_where_they_come_from():
    flags, given = _flags("--temperature", "-1")
    with pytest.raises(UserError, match="command line: temperature -1.0 must be finite, > 0"):
        KDConfig.resolve(flags, {}, given)
    hyp = yaml.safe_load(LOW.read_text())
    with pytest.raises(UserError, match="my.yaml: dist_norm 'sum' must be one of mean, weighted, soft"):
        validate_hyp({**hyp, "dist_norm": "sum"}, "my.yaml", KD_SPECS)
    with pytest.raises(UserError, match="my.yaml: distill_ratio inf must be finite"):
        validate_hyp({**hyp, "distill_ratio": float("inf")}, "my.yaml", KD_SPECS)
    # the shipped hyps carry every KD key, so none is reported as unknown or defaulted
    for f in sorted((ROOT / "data/hyps").glob("hyp.*.yaml")):
        out = load_hyp(f, KD_SPECS)
        assert all(k in yaml.safe_load(f.read_text()) for k in KD_SPECS), f.name
        # and they agree with train.py's defaults, so a run with or without --hyp distils the same way
        assert (out["dist_norm"], out["distill_ratio"]) == (KD_SPECS["dist_norm"].default,
                                                            KD_SPECS["distill_ratio"].default), f.name


def test_from_record_keeps_the_recorded_values():
    kd = KDConfig(t_weights="t.pt", dist_loss="kl", temperature=2.0, distill_ratio=0.7, dist_norm="soft",
                  t_sha256="ab")
    assert KDConfig.from_record({**kd.as_dict(), "epochs": 3}) == kd
    assert not KDConfig.from_record({"t_weights": None, "temperature": 9.0}).enabled
    # runs recorded before dist_norm existed used the seed's 'mean' form; resuming one keeps it
    old = KDConfig.from_record({"t_weights": "t.pt", "dist_loss": "l2", "temperature": 5.0, "distill_ratio": 0.5})
    assert (old.dist_norm, old.distill_ratio) == ("mean", 0.5)


@pytest.mark.e2e
def test_resume_keeps_the_kd_values(tiny_data, tmp_path):
    teacher = random_checkpoint(tmp_path / "t.pt", "yolov5s.yaml")
    hyp = yaml.safe_load(LOW.read_text())
    hyp.update(distill_ratio=0.3, dist_norm="weighted")
    (tmp_path / "hyp.kd.yaml").write_text(yaml.safe_dump(hyp))
    common = ["--cfg", "yolov5n.yaml", "--imgsz", "64", "--batch-size", "4", "--workers", "0", "--noautoanchor",
              "--noplots", "--noval"]
    r = run_cli([TRAIN, "--data", str(tiny_data), *common, "--project", str(tmp_path), "--name", "kd", "--epochs",
                 "1", "--t_weights", str(teacher), "--hyp", str(tmp_path / "hyp.kd.yaml"), "--temperature", "2",
                 "--dist_loss", "kl"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "kd"
    want = {"temperature": 2.0, "distill_ratio": 0.3, "dist_norm": "weighted"}
    assert {k: yaml.safe_load((run / "hyp.yaml").read_text())[k] for k in want} == want
    opt = yaml.safe_load((run / "opt.yaml").read_text())
    assert {k: opt[k] for k in want} == want and opt["dist_loss"] == "kl" and len(opt["t_sha256"]) == 64
    ck_opt = torch_load(run / "weights/last.pt")["opt"]
    assert {k: ck_opt[k] for k in want} == want
    assert KDConfig.from_record(opt) == KDConfig.from_record(ck_opt)
    assert "Distillation balance over the first" in r.stderr


def test_balance_ratios_and_warnings():
    parts = {"box": 2.0, "obj": 0.5, "cls": 1.0, "dbox": 0.01, "dobj": 6.0, "dcls": 0.5}
    r = balance_ratios(parts)
    assert r == pytest.approx({"dbox/box": 0.005, "dobj/obj": 12.0, "dcls/cls": 0.5})
    lines = balance_warnings(r, KDConfig(t_weights="t.pt", dist_norm="mean"))
    assert len(lines) == 2
    assert "dbox/box" in lines[0] and f"below {BALANCE_LOW:g}" in lines[0] and "--dist_norm soft" in lines[0]
    assert "dobj/obj" in lines[1] and f"above {BALANCE_HIGH:g}" in lines[1] and "lower distill_ratio" in lines[1]
    assert balance_warnings({"dbox/box": 1.0, "dobj/obj": 0.5, "dcls/cls": float("nan")}, KDConfig()) == []
    # soft / iou: a low objectness KL is named as such instead of sending the user to raise the ratio alone
    low_obj = {"dbox/box": 0.04, "dobj/obj": 0.009, "dcls/cls": 1.4}
    for norm in ("soft", "iou"):
        (line,) = balance_warnings(low_obj, KDConfig(t_weights="t.pt", dist_norm=norm))
        assert "dobj/obj" in line and "a KL over every cell" in line and "only if the other parts are low" in line
    (line,) = balance_warnings(low_obj, KDConfig(t_weights="t.pt", dist_norm="weighted"))
    assert line.endswith("the teacher hardly counts there; raise distill_ratio")


def test_distiller_reports_balance_once(caplog):
    from models.yolo import Model
    from utils.training.loss import ComputeLoss, scale_hyp

    torch.manual_seed(0)
    student = Model("yolov5n.yaml", nc=8)
    student.hyp = scale_hyp(load_hyp(LOW, KD_SPECS), 3, 8, 64)
    imgs = torch.rand(2, 3, 64, 64)
    forward = StudentForward(torch.device("cpu"))
    d = Distiller(KDConfig(t_weights="t.pt", distill_ratio=1e4), Teacher(Model("yolov5n.yaml", nc=8)),
                  Student(student, ComputeLoss(student), forward, 64))
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.2]])
    with caplog.at_level(logging.INFO, logger="yolov5kd"):
        for _ in range(3):
            loss, parts = d(student, imgs, targets)
            assert list(parts) == ["box", "obj", "cls", "dbox", "dobj", "dcls"]
            loss.backward()
        d.end_epoch()
        d.end_epoch()
    reports = [r.getMessage() for r in caplog.records if "Distillation balance" in r.getMessage()]
    assert len(reports) == 1 and "dobj" in reports[0] and "\n" not in reports[0]
    assert any("above" in r.getMessage() and "lower distill_ratio" in r.getMessage() for r in caplog.records)
    plain = DetectionCriterion(ComputeLoss(student), forward)
    assert list(plain(student, imgs, targets)[1]) == ["box", "obj", "cls"]


def test_each_criterion_advises_on_its_own_nonfinite_parts():
    from models.yolo import Model
    from utils.training.loss import ComputeLoss, scale_hyp

    student = Model("yolov5n.yaml", nc=8)
    student.hyp = scale_hyp(load_hyp(LOW, KD_SPECS), 3, 8, 64)
    forward = StudentForward(torch.device("cpu"))
    plain = DetectionCriterion(ComputeLoss(student), forward)
    d = Distiller(KDConfig(t_weights="t.pt"), Teacher(Model("yolov5n.yaml", nc=8)),
                  Student(student, ComputeLoss(student), forward, 64))
    for crit in (plain, d):
        assert crit.nonfinite_advice(["box"]).startswith("the detection loss is at fault: lower lr0")
        assert crit.nonfinite_advice([]).startswith("lower lr0")  # only the total: no part to blame
    assert "distill" not in plain.nonfinite_advice(["box", "cls"])
    for parts in (["dcls"], ["dbox", "dobj"]):
        advice = d.nonfinite_advice(parts)
        assert advice.startswith("the distillation loss is at fault") and "lr0" not in advice
    assert "lr0" in d.nonfinite_advice(["obj", "dobj"])  # the detection loss too: its advice comes first


@pytest.mark.parametrize("n_unlabeled", [0, 3])
def test_distiller_parts_share_the_detection_scale(n_unlabeled):
    """The logged parts are per-image like YOLOv5's loss items: their sum x the labelled batch size is the loss
    that is back-propagated, so dbox/box etc. compare what each part weighs in the gradient."""
    from models.yolo import Model
    from utils.training.loss import ComputeLoss, scale_hyp

    torch.manual_seed(0)
    student = Model("yolov5n.yaml", nc=8)
    student.hyp = scale_hyp(load_hyp(LOW, KD_SPECS), 3, 8, 64)
    bs = 4
    imgs = torch.rand(bs + n_unlabeled, 3, 64, 64)
    d = Distiller(KDConfig(t_weights="t.pt", distill_ratio=0.5), Teacher(Model("yolov5n.yaml", nc=8)),
                  Student(student, ComputeLoss(student), StudentForward(torch.device("cpu")), 64))
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.2], [2, 3, 0.3, 0.6, 0.1, 0.3]])
    t_maps = d.teacher(imgs)
    pred = student(imgs)
    lab, unl = [p[:bs] for p in pred], ([p[bs:] for p in pred] if n_unlabeled else None)
    loss, parts = d.losses(StepMaps(lab, targets, [m.clone() for m in t_maps], unl))
    assert float(loss.detach()) == pytest.approx(sum(float(v) for v in parts.values()) * bs, rel=1e-5)
    (output,) = [t for t in d.terms if isinstance(t, OutputTerm)]
    _, raw = output.loss(pred, t_maps)  # the seed-scaled parts (x the batch size of all images the KD saw)
    for k in ("dbox", "dobj", "dcls"):
        assert float(parts[k]) == pytest.approx(float(raw[k]) / bs, rel=1e-5)
