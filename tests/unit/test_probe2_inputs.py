"""Issue 49, second bad-input probe: the cases train.py and val.py can refuse or report without a subprocess.

Each reproduction from the issue sits beside a variant of our own. The refusals are one line (exit 2 from the
CLI mains, called in-process) and write nothing; the CLI side of a few is in tests/e2e/test_bad_input_probe2.py."""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import train
import val
from conftest import DEMO_NAMES
from optimizer.config import KD_SPECS, KDConfig
from optimizer.criterion import Distiller, Student
from optimizer.teacher import Teacher
from utils.core.distributed import DistInfo
from utils.core.errors import UserError
from utils.training import evolve as ev
from utils.training.checkpoint import build_checkpoint, save_checkpoint
from utils.training.forward import StudentForward
from utils.training.hyp import HYP_SPECS, load_hyp
from utils.training.keeper import ResumePoint

LOW = Path(train.ROOT) / "data/hyps/hyp.scratch-low.yaml"


@pytest.fixture
def messages():
    """The project logger's messages during the test (its own handler: the CLIs turn propagation off)."""
    got: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    logger = logging.getLogger("yolov5kd")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield got
    logger.removeHandler(handler)
    logger.setLevel(level)


def _error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ERROR:")]
    assert len(err) == 1, err
    return err[0]


def _data(tiny_data: Path, name: str, **keys) -> Path:
    """A dataset yaml over tiny_data's images with extra keys (unlabeled:, test:)."""
    d = yaml.safe_load(tiny_data.read_text())
    d.update(keys)
    f = tiny_data.parent / name
    f.write_text(yaml.safe_dump(d))
    return f


def _load(data: Path, kd: KDConfig):
    return train.load_data(argparse.Namespace(data=str(data), single_cls=False), DistInfo(), kd)


TEACHER = KDConfig(t_weights="t.pt")  # load_data only asks whether there is one


# ------------------------------------------------------------------------ 2. unlabelled images that are scored
def test_unlabeled_pointing_at_the_val_images_is_refused_with_the_count(tiny_data):
    data = _data(tiny_data, "unl_val.yaml", unlabeled="images/val")
    with pytest.raises(UserError, match=r"unl_val.yaml: 4 image\(s\) listed under 'unlabeled:' are also in 'val:'"):
        _load(data, TEACHER)


def test_unlabeled_overlap_variants_other_spellings_and_test_split(tiny_data):
    root = tiny_data.parent / "shapes"
    vals = sorted((root / "images/val").glob("*"))
    # two val images spelt another way (a .txt list, through '..'), among train images
    lst = root / "mixed.txt"
    lst.write_text("".join(f"{p}\n" for p in sorted((root / "images/train").glob("*")))
                   + f"./images/../images/val/{vals[0].name}\n{root}/images/val/../val/{vals[1].name}\n")
    with pytest.raises(UserError, match=r"2 image\(s\) listed under 'unlabeled:' are also in 'val:'"):
        _load(_data(tiny_data, "unl_mixed.yaml", unlabeled="mixed.txt"), TEACHER)
    # a test: split the run is scored on counts as val: does; a listed test: folder that is absent does not
    with pytest.raises(UserError, match=r"8 image\(s\) listed under 'unlabeled:' are also in 'test:'"):
        _load(_data(tiny_data, "unl_test.yaml", unlabeled="images/train", test="images/train"), TEACHER)
    extra = tiny_data.parent / "extra"
    if not extra.exists():
        shutil.copytree(root / "images/train", extra)
    _load(_data(tiny_data, "unl_ok.yaml", unlabeled=str(extra), test="images/missing"), TEACHER)  # no error


# ------------------------------------------------------------------------------- 16. an empty 'unlabeled:'
@pytest.mark.parametrize("value", [[], ""])
def test_empty_unlabeled_says_it_lists_no_images(tiny_data, value):
    kd = KDConfig(t_weights="t.pt", pseudo_conf=0.5)
    with pytest.raises(UserError, match="pseudo_conf 0.5 needs unlabelled images") as e:
        _load(_data(tiny_data, "unl_empty.yaml", unlabeled=value), kd)
    assert "lists no images" in str(e.value) and "has no 'unlabeled:' key" not in str(e.value)


def test_empty_unlabeled_variant_null_and_absent(tiny_data):
    kd = KDConfig(t_weights="t.pt", pseudo_conf=0.3)
    with pytest.raises(UserError, match="its 'unlabeled:' lists no images"):
        _load(_data(tiny_data, "unl_null.yaml", unlabeled=None), kd)
    with pytest.raises(UserError, match="has no 'unlabeled:' key"):
        _load(tiny_data, kd)


# ---------------------------------------------------------------------------- 3. --evolve keeps the pseudo pair
def _fake_train(configs):
    def fn(hyp, opt, device, info, kd):
        configs.append(kd)
        (Path(opt.save_dir) / "weights").mkdir(parents=True)
        m = 0.3 + 0.1 * np.sin(len(configs))  # any fitness: parents differ from one generation to the next
        return (0.5, 0.5, m + 0.1, m, 0.05, 0.04, 0.03)
    return fn


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("t") / "teacher.pt"
    f.write_bytes(b"the stand-in trainings never load it; the run records its sha256")
    return f


@pytest.mark.parametrize("conf,ignore,seed,n", [
    (0.11, 0.1, 1, 4),  # the run: its generation 3 drew ignore 0.10577 >= conf 0.10069
    (0.3, 0.29, 0, 12),  # ours
])
def test_evolve_keeps_pseudo_ignore_below_pseudo_conf(tmp_path, teacher_file, monkeypatch, conf, ignore, seed, n):
    monkeypatch.setattr(ev, "write_plot", lambda *a, **k: None)
    opt = train.parse_opt(["--data", "none.yaml", "--device", "cpu", "--project", str(tmp_path), "--evolve", str(n),
                           "--t_weights", str(teacher_file), "--pseudo_conf", str(conf), "--pseudo_ignore",
                           str(ignore), "--seed", str(seed)])
    configs: list[KDConfig] = []
    assert ev.run_evolution(opt, DistInfo(), _fake_train(configs), train.resolve_run, KD_SPECS) == 0
    assert len(configs) == n
    pairs = [(c.pseudo_conf, c.pseudo_ignore) for c in configs]
    assert all(i < c for c, i in pairs), pairs
    assert len(set(pairs)) == n  # the pair still evolves


def test_mutation_redraws_what_the_config_refuses():
    hyp = {**load_hyp(LOW, KD_SPECS), "pseudo_conf": 0.2, "pseudo_ignore": 0.19}
    specs = {**HYP_SPECS, **KD_SPECS}
    keys = ev.evolved_keys(hyp, specs, KD_SPECS, teacher=True, autoanchor=False)
    kd = KDConfig(t_weights="t.pt")

    def check(h):
        KDConfig(**{**kd.as_dict(), **{k: h[k] for k in KD_SPECS}}).check()

    rng = np.random.default_rng(0)
    children = [ev.mutate(hyp, keys, specs, rng, check) for _ in range(300)]
    assert all(c["pseudo_ignore"] < c["pseudo_conf"] for c in children)
    assert all(any(c[k] != hyp[k] for k in keys) for c in children)
    # a rule no draw can meet gives the parent back rather than a child that breaks it
    never = ev.mutate(hyp, keys, specs, rng, lambda h: (_ for _ in ()).throw(UserError("no")))
    assert never == hyp


# ------------------------------------------------------------- 4. a resume that would train nothing
def _resumable(root: Path, data: Path, epoch: int, started: int, recorded) -> Path:
    """<root>/weights/last.pt stopped after `epoch` of a run started for `started` epochs, whose opt.yaml now
    records `recorded`."""
    from models.yolo import Model
    from utils.training.optim import build_optimizer

    torch.manual_seed(0)
    model = Model("yolov5n.yaml", nc=len(DEMO_NAMES))
    opt = vars(train.parse_opt(["--data", str(data), "--cfg", "yolov5n.yaml", "--imgsz", "64", "--batch-size", "4",
                                "--workers", "0", "--noautoanchor", "--noplots", "--noval", "--epochs",
                                str(started), "--device", "cpu"]))
    opt.update(KDConfig().as_dict(), hyp=load_hyp(LOW, KD_SPECS), save_dir=str(root))
    (root / "weights").mkdir(parents=True)
    ck = build_checkpoint(model, ema=model, updates=2, optimizer=build_optimizer(model, "SGD", 0.01, 0.937, 0.0005),
                          epoch=epoch, best_fitness=0.0, opt=opt)
    save_checkpoint(ck, root / "weights/last.pt")
    (root / "opt.yaml").write_text(yaml.safe_dump({**opt, "epochs": recorded}))
    return root / "weights/last.pt"


@pytest.mark.parametrize("epoch,started,recorded,needle", [
    (0, 3, 1, "epochs 1, but the checkpoint has trained 1 epoch(s), so the resume would train nothing"),
    (0, 3, -5, "epochs -5 is not a whole number >= 1, so the record is corrupt"),
    (1, 4, 2, "epochs 2, but the checkpoint has trained 2 epoch(s), so the resume would train nothing"),
    (1, 4, 2.5, "epochs 2.5 is not a whole number >= 1"),
    (1, 4, "3", "epochs '3' is not a whole number >= 1"),
    (1, 4, 0, "epochs 0 is not a whole number >= 1"),
])
def test_resume_that_would_train_nothing_is_refused(tiny_data, tmp_path, capsys, epoch, started, recorded, needle):
    last = _resumable(tmp_path / "run", tiny_data, epoch, started, recorded)
    before = {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()}
    assert train.main(["--resume", str(last)]) == 2
    err = _error(capsys)
    assert needle in err and "opt.yaml" in err
    assert {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()} == before


def test_resume_point_keeps_a_final_strip_and_more_epochs():
    ck = {"epoch": 1, "best_fitness": 0.2, "opt": {"epochs": 2}}
    # killed during the final strip of a 2-epoch run: nothing to train, the resume finishes the strip
    assert ResumePoint.plan(ck, 2, "opt.yaml") == ResumePoint(2, 2, 0.2)
    assert ResumePoint.plan(ck, 5, "opt.yaml") == ResumePoint(2, 5, 0.2)  # opt.yaml raised to train on
    with pytest.raises(UserError, match="would train nothing"):
        ResumePoint.plan({**ck, "opt": {"epochs": 9}}, 2, "opt.yaml")
    with pytest.raises(UserError, match="corrupt"):
        ResumePoint.plan(ck, True, "opt.yaml")


# ------------------------------------------------------------- 10. distillation flags typed without a teacher
@pytest.mark.parametrize("args,named", [
    (["--feat_kd", "cross", "--feat_ratio", "0.5"], "--feat_kd cross, --feat_ratio 0.5"),
    (["--distill_ratio", "0.3"], "--distill_ratio 0.3"),
    (["--dist_loss", "kl"], "--dist_loss kl"),
    # ours: an abbreviation and a dashed flag are typed flags too
    (["--feat_k", "mse", "--teacher-precision", "fp32"], "--feat_kd mse, --teacher-precision fp32"),
    (["--temperature", "3", "--unlabeled_ratio", "2"], "--temperature 3, --unlabeled_ratio 2"),
])
def test_distillation_flags_without_a_teacher_are_refused(tmp_path, capsys, args, named):
    assert train.main(["--data", "none.yaml", "--project", str(tmp_path / "runs"), *args]) == 2
    err = _error(capsys)
    assert named in err and "without a teacher" in err and "--t_weights" in err
    assert not (tmp_path / "runs").exists()


def test_pseudo_conf_without_a_teacher_is_the_same_refusal():
    opt = train.parse_opt(["--pseudo_conf", "0.5"])
    with pytest.raises(UserError, match=r"^pseudo_conf 0.5: pseudo-labels are a teacher's detections; give a teacher"):
        train.resolve_run(opt, load_hyp(LOW, KD_SPECS))
    # values that switch a part off need no teacher
    for args in (["--pseudo_conf", "0"], ["--feat_kd", "none"], []):
        assert not train.resolve_run(train.parse_opt(args), load_hyp(LOW, KD_SPECS)).enabled


def test_hyp_distillation_keys_without_a_teacher_are_defaults_and_not_recorded_as_settings():
    hyp = {**load_hyp(LOW, KD_SPECS), "feat_kd": "cross", "feat_ratio": 0.5, "pseudo_conf": 0.4}
    opt = train.parse_opt(["--data", "none.yaml"])
    opt.save_dir = "runs/train/exp"
    kd = train.resolve_run(opt, hyp)  # accepted: the hyp's keys are what a run with a teacher would take
    assert not kd.enabled
    hyp_rec, opt_rec = train.run_record({k: v for k, v in hyp.items() if k not in KD_SPECS}, opt, kd)
    off = KDConfig().as_dict()
    assert {k: opt_rec[k] for k in off} == off  # opt.yaml says what was in effect: no distillation
    assert opt_rec["feat_kd"] == "none" and opt_rec["pseudo_conf"] == 0.0 and opt_rec["t_weights"] is None
    assert hyp_rec["feat_kd"] == "cross"  # the hyp file as given, for a later run with a teacher


# ------------------------------------------------------------- 11. typed flags a resume ignores
def test_resume_names_the_typed_flags_it_ignores(tiny_data, tmp_path, messages):
    last = _resumable(tmp_path / "run", tiny_data, 0, 3, 3)
    opt = train.parse_opt(["--resume", str(last), "--feat_kd", "cross", "--epochs", "9", "--amp", "--device", "cpu"])
    new = train.prepare_resume(opt)
    assert new.epochs == 3 and new.feat_kd == "none" and new.device == "cpu"
    (line,) = [m for m in messages if "ignores" in m]
    assert "--amp on" in line and "--epochs 9" in line and "--feat_kd cross" in line and "--device" not in \
        line.split("(")[0]


def test_resume_ignored_flags_variant_other_spellings_and_values_equal_to_the_record(tiny_data, tmp_path, messages):
    last = _resumable(tmp_path / "run", tiny_data, 0, 3, 3)
    opt = train.parse_opt(["--resume", str(last), "--feat_ratio", "0.5", "--no-amp", "--img", "128", "--epochs", "3",
                           "--rect"])
    train.prepare_resume(opt)
    (line,) = [m for m in messages if "ignores" in m]
    assert "--feat_ratio 0.5" in line and "--amp off" in line and "--imgsz 128" in line and "--rect" in line
    assert "--epochs" not in line  # typed as recorded: nothing is lost
    messages.clear()
    train.prepare_resume(train.parse_opt(["--resume", str(last), "--workers", "0"]))
    assert not [m for m in messages if "ignores" in m]


# ------------------------------------------------------------- 12 / 14. run folders
def _refusals(tmp_path) -> list[tuple]:
    afile = tmp_path / "afile"
    afile.write_text("x")
    return [(["--project", str(afile)], "is a file, not a folder"),
            (["--project", "/proc/yolov5kd-probe"], "no folder can be made in /proc"),
            (["--project", str(afile / "sub")], "is a file, not a folder"),  # ours: a folder under a file
            (["--project", str(tmp_path / "p"), "--name", "../../x"], "--name ../../x: must name a folder inside"),
            (["--project", str(tmp_path / "p"), "--name", str(tmp_path / "abs")], "must name a folder inside"),
            (["--project", str(tmp_path / "p"), "--name", "a/../.."], "must name a folder inside")]


def test_train_run_folder_refusals(tmp_path, capsys):
    for args, needle in _refusals(tmp_path):
        assert train.main(["--data", "none.yaml", *args]) == 2, args
        assert needle in _error(capsys), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert not Path("/proc/yolov5kd-probe").exists()


def test_val_run_folder_refusals(tmp_path, capsys):
    for args, needle in _refusals(tmp_path):
        assert val.main(["--data", "none.yaml", "--weights", str(tmp_path / "missing.pt"), *args]) == 2, args
        assert needle in _error(capsys), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    val.check_run_folder(tmp_path / "p", "a/b")  # a nested name inside the project is fine, and nothing is made
    assert not (tmp_path / "p").exists()


# ------------------------------------------------------------- 13. val.py's numeric flags
@pytest.mark.parametrize("args,needle", [
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--conf-thres", "2"], "--conf-thres 2.0: must be within [0, 1]"),
    (["--conf-thres", "nan"], "--conf-thres nan: must be within [0, 1]"),
    (["--iou-thres", "-1"], "--iou-thres -1.0: must be within [0, 1]"),
    (["--iou-thres", "1.5"], "--iou-thres 1.5: must be within [0, 1]"),
    (["--imgsz", "0"], "--imgsz 0: must be >= 32"),
    # ours
    (["--max-det", "0"], "--max-det 0: must be >= 1"),
    (["--conf-thres", "inf", "--task", "speed"], "--conf-thres inf"),
    (["--workers", "-2"], "--workers -2: must be >= 0"),
])
def test_val_numeric_flags_are_refused_before_anything_loads(tmp_path, capsys, args, needle):
    # the checkpoint does not exist: a check that came after loading would report that instead
    assert val.main(["--data", "none.yaml", "--weights", str(tmp_path / "missing.pt"), "--project",
                     str(tmp_path / "runs"), *args]) == 2
    assert needle in _error(capsys)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------- also seen: a teacher that finds nothing
def _distiller(obj_bias: float, distill_ratio: float = 0.05):
    from models.yolo import Model
    from utils.training.loss import ComputeLoss, scale_hyp

    torch.manual_seed(0)
    student = Model("yolov5n.yaml", nc=8)
    student.hyp = scale_hyp(load_hyp(LOW, KD_SPECS), 3, 8, 64)
    teacher = Model("yolov5n.yaml", nc=8)
    with torch.no_grad():
        for conv in teacher.model[-1].m:
            conv.bias.view(3, -1)[:, 4] = obj_bias
    d = Distiller(KDConfig(t_weights="t.pt", distill_ratio=distill_ratio, dist_norm="weighted"), Teacher(teacher),
                  Student(student, ComputeLoss(student), StudentForward(torch.device("cpu")), 64))
    return student, d


@pytest.mark.parametrize("obj_bias", [-20.0, -8.0])
def test_blind_teacher_is_named_instead_of_raise_distill_ratio(messages, obj_bias):
    student, d = _distiller(obj_bias)
    imgs, targets = torch.rand(2, 3, 64, 64), torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.2]])
    for _ in range(2):
        d(student, imgs, targets)
    d.end_epoch()
    warns = [m for m in messages if m.startswith("WARNING")]
    assert any("the teacher finds no objects" in m for m in warns), messages
    assert not any("raise distill_ratio" in m for m in warns), warns


def test_confident_teacher_gets_no_blind_warning(messages):
    student, d = _distiller(4.0, distill_ratio=1e-6)  # a ratio so low that the parts are below 1%
    imgs, targets = torch.rand(2, 3, 64, 64), torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.2]])
    d(student, imgs, targets)
    d.end_epoch()
    warns = [m for m in messages if m.startswith("WARNING")]
    assert not any("finds no objects" in m for m in warns)
    assert any("raise distill_ratio" in m for m in warns), warns
