"""Teacher loading/freezing, KD training steps leave the teacher untouched, pre-flight checks, KD options."""
import logging
from copy import deepcopy

import pytest
import torch

from conftest import distillation_loss
from models.yolo import Model, load_model_yaml
from optimizer.teacher import Teacher, check_teacher_unchanged, file_sha256, load_teacher, preflight
from utils.core.errors import UserError

NAMES = {0: "circle", 1: "square", 2: "rect", 3: "triangle"}


@pytest.fixture(scope="module")
def teacher(fixtures_dir) -> Teacher:
    # fp32 explicitly: auto picks bf16 on a CPU with native bf16, and the maps are compared with fp32 references
    return load_teacher(fixtures_dir / "teacher.pt", "cpu", precision="fp32")


@pytest.fixture(scope="module")
def student_template(golden) -> Model:
    """A fresh yolov5n, 4 classes, set up as train.py would (hyp, nc, names); tests deepcopy it."""
    m = Model("yolov5n.yaml", nc=4)
    m.nc, m.hyp, m.names = 4, dict(golden["hyp_scaled"]), dict(NAMES)
    return m


@pytest.fixture()
def student(student_template) -> Model:
    return deepcopy(student_template)


def test_teacher_is_frozen_fused_eval(teacher):
    m = teacher.model
    assert not m.training and not teacher.half
    assert all(not p.requires_grad for p in m.parameters())
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # Conv+BN fused
    assert not isinstance(teacher, torch.nn.Module)  # can never be registered inside the student
    assert teacher.nc == 4 and teacher.names == NAMES
    assert m.hyp["box"] == 0.05  # its own hyp, as saved in its checkpoint


def test_teacher_raw_maps_match_reference(teacher, golden):
    images = golden["images_uint8"][:2].float() / 255
    raw = teacher(images)
    assert len(raw) == 3
    for r, ref in zip(raw, golden["teacher_raw"]):
        assert r.dtype == torch.float32 and not r.is_inference() and not r.requires_grad
        # fused fp32 here vs unfused reference: only float rounding differs
        assert torch.allclose(r, ref[:2], atol=1e-4, rtol=1e-4)


def test_teacher_skips_the_decode_and_restores_its_head(teacher, monkeypatch):
    head = teacher.detect
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        _, eval_raw = teacher.model(images.clone())  # eval mode: (decoded boxes, raw maps)
    made_grids = []
    monkeypatch.setattr(head, "_make_grid", lambda *a: made_grids.append(a))  # only the decode builds grids
    head.grid = [torch.empty(0)] * head.nl  # a stale grid would force a rebuild in any decode
    raw = teacher(images)
    assert made_grids == []  # no decoded boxes were computed
    assert len(raw) == len(eval_raw) and all(torch.equal(r, e) for r, e in zip(raw, eval_raw))
    assert not head.training and not teacher.model.training  # the head's flag is back: evaluating still decodes
    monkeypatch.undo()
    with torch.no_grad():
        assert isinstance(teacher.model(images), tuple)


def test_teacher_half_outputs_fp32(fixtures_dir):
    t = load_teacher(fixtures_dir / "teacher.pt", "cpu", half=True)
    assert t.half and next(t.model.parameters()).dtype == torch.float16
    try:
        raw = t(torch.rand(1, 3, 64, 64))
    except RuntimeError as e:  # some CPU builds lack fp16 convolution kernels
        pytest.skip(f"no fp16 conv on this CPU: {e}")
    assert all(r.dtype == torch.float32 and torch.isfinite(r).all() for r in raw)


def test_kd_steps_touch_only_the_student(teacher, student):
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in teacher.model.state_dict(keep_vars=False).items()}
    buffers_before = {k: v.clone() for k, v in teacher.model.named_buffers()}
    info = preflight(teacher, student, 64)
    loss_fn = distillation_loss(student, "kl", T=5.0, distill_ratio=0.5, teacher_anchors=info["teacher_anchors"])
    assert not loss_fn.decoded_box
    student.train()
    s_before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        images = torch.rand(2, 3, 64, 64)
        t_out = teacher(images)
        assert all(not t.requires_grad for t in t_out)
        total, _ = loss_fn(student(images), t_out)
        opt.zero_grad()
        total.backward()
        opt.step()
    assert all(p.grad is None for p in teacher.model.parameters())
    after = teacher.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, buffers_before[k]) for k, v in teacher.model.named_buffers())
    assert not teacher.model.training
    assert any(not torch.equal(a, b.detach()) for a, b in zip(s_before, student.parameters()))
    assert student.names == NAMES and teacher.names == NAMES and teacher.model.hyp["box"] == 0.05


def test_teacher_stays_eval_if_switched(teacher):
    teacher.model.train()
    raw = teacher(torch.rand(1, 3, 64, 64))
    assert not teacher.model.training and len(raw) == 3


def test_preflight_ok(teacher, student):
    info = preflight(teacher, student, [320, 640])
    assert info["teacher_anchors"].shape == (3, 3, 2)
    assert not distillation_loss(student, "l2", teacher_anchors=info["teacher_anchors"]).decoded_box


def test_preflight_nc(teacher):
    other = Model("yolov5n.yaml", nc=3)
    with pytest.raises(UserError, match=r"teacher has nc=4 classes but student has nc=3"):
        preflight(teacher, other, 320)


def test_preflight_levels(teacher):
    d = load_model_yaml("yolov5n.yaml")
    d["nc"], d["anchors"] = 4, d["anchors"][1:]
    d["head"][-1] = [[20, 23], 1, "Detect", ["nc", "anchors"]]
    with pytest.raises(UserError, match=r"teacher has 3 detection levels but student has 2"):
        preflight(teacher, Model(d), 320)


def test_preflight_anchors_per_level(teacher):
    d = load_model_yaml("yolov5n.yaml")
    d["nc"], d["anchors"] = 4, [a[:4] for a in d["anchors"]]
    with pytest.raises(UserError, match=r"teacher has 3 anchors per level but student has 2"):
        preflight(teacher, Model(d), 320)


def test_preflight_strides(teacher, student):
    # a real P3-P5 vs P3-P6 pair would need another architecture; only the Detect strides matter here
    d = student.model[-1]
    d.stride = student.stride = torch.tensor([8.0, 16.0, 64.0])
    with pytest.raises(UserError, match=r"teacher strides \[8.0, 16.0, 32.0\] differ from student strides "
                                        r"\[8.0, 16.0, 64.0\]"):
        preflight(teacher, student, 320)


@pytest.mark.parametrize("imgsz", [100, [320, 330]])
def test_preflight_imgsz(teacher, student, imgsz):
    with pytest.raises(UserError, match=r"--imgsz (100|330) is not a multiple of the largest stride of the teacher "
                                        r"\(32\) and of the student \(32\)"):
        preflight(teacher, student, imgsz)


def test_preflight_names_warning(teacher, student, caplog):
    student.names = {0: "a", 1: "b", 2: "c", 3: "d"}
    with caplog.at_level(logging.INFO, logger="yolov5kd"):
        preflight(teacher, student, 320)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "teacher class names" in warnings[0].getMessage()
    assert "'circle'" in warnings[0].getMessage() and "'a'" in warnings[0].getMessage()


def test_preflight_anchors_differ_notice(teacher, student, caplog):
    student.model[-1].anchors *= 1.3  # as AutoAnchor would have done
    with caplog.at_level(logging.INFO, logger="yolov5kd"):
        info = preflight(teacher, student, 320)
        assert distillation_loss(student, "l2", teacher_anchors=info["teacher_anchors"]).decoded_box
    notices = [r.getMessage() for r in caplog.records if "decoded space" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0]


def test_teacher_fingerprint(tmp_path, fixtures_dir):
    t = tmp_path / "teacher.pt"
    t.write_bytes((fixtures_dir / "teacher.pt").read_bytes())
    sha = file_sha256(t)
    check_teacher_unchanged(t, sha)  # same file: fine
    with pytest.raises(UserError, match=r"--resume: the teacher checkpoint recorded in this run .*no longer exists"):
        check_teacher_unchanged(tmp_path / "gone.pt", sha)
    t.write_bytes((fixtures_dir / "student.pt").read_bytes())
    with pytest.raises(UserError, match="not the one this run started with"):
        check_teacher_unchanged(t, sha)


def test_unsafe_teacher_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"model": torch.nn.Linear(1, 1)}, bad)  # nn.Linear is not on the allow-list
    with pytest.raises(UserError, match="refused"):
        load_teacher(bad)
