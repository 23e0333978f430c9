"""Precision and speed flags: --teacher-precision, --amp (bf16 autocast on CPU) and --compile (eager fallback)."""
import argparse
import logging
import sys
from copy import deepcopy

import pytest
import torch
import yaml

import optimizer.teacher as teacher_mod
import utils.core.hardware as hardware_mod
import utils.training.forward as forward_mod
from conftest import ROOT, random_checkpoint, run_cli
from models.common import Conv
from models.yolo import Model
from optimizer.config import KD_SPECS, KDConfig, add_kd_args
from optimizer.criterion import DetectionCriterion, Distiller, Student
from optimizer.int8 import int8_unavailable
from optimizer.teacher import INT8_CALIBRATION_BATCHES, Teacher, load_teacher, resolve_teacher_precision
from utils.core.errors import UserError
from utils.core.hardware import cpu_supports_bf16
from utils.training.checkpoint import build_checkpoint, torch_load
from utils.training.engine import LoopConfig, LoopState, train_one_epoch
from utils.training.forward import CompiledForward, StudentForward, resolve_amp
from utils.training.hyp import load_hyp
from utils.training.loss import ComputeLoss, scale_hyp
from utils.training.optim import ModelEMA, Optim, build_optimizer, lr_lambda

TRAIN = str(ROOT / "train.py")
LOW = ROOT / "data/hyps/hyp.scratch-low.yaml"
CPU = torch.device("cpu")
needs_bf16 = pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")


def _bf16(monkeypatch, supported: bool) -> None:
    monkeypatch.setattr(teacher_mod, "cpu_supports_bf16", lambda: supported)


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


# ---------------------------------------------------------------------------------------------- teacher precision

def test_auto_precision_follows_the_device(monkeypatch):
    _bf16(monkeypatch, False)
    assert resolve_teacher_precision("auto", "cpu") == ("fp32", "auto: CPU has no native bf16")
    _bf16(monkeypatch, True)
    assert resolve_teacher_precision("auto", "cpu") == ("bf16", "auto: CPU supports bf16")
    assert resolve_teacher_precision("auto", torch.device("cuda", 0)) == ("fp16", "auto: CUDA device")


@pytest.mark.parametrize("supported", [False, True])
def test_explicit_precision_is_honoured_and_fp16_on_cpu_refused(monkeypatch, supported):
    _bf16(monkeypatch, supported)
    assert resolve_teacher_precision("fp32", "cpu") == ("fp32", "requested")
    chosen, why = resolve_teacher_precision("bf16", "cpu")
    assert chosen == "bf16" and ("emulated" in why) != supported  # honoured either way, slowness said once
    assert resolve_teacher_precision("fp16", "cuda") == ("fp16", "requested")
    with pytest.raises(UserError, match=r"^--teacher-precision fp16 needs a CUDA device \(this run uses cpu\); "
                                        r"use bf16 or fp32$"):
        resolve_teacher_precision("fp16", "cpu")
    with pytest.raises(UserError, match="must be one of auto, fp32, bf16, fp16, int8"):
        resolve_teacher_precision("fp8", "cpu")


def test_cpu_bf16_detection_reads_the_cpu_flags(monkeypatch, tmp_path):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN: bf16 is never chosen")
    monkeypatch.setattr(sys, "platform", "linux")
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)  # the AVX2-only test mode sets it; this test reads the flags
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(hardware_mod, "CPUINFO", info)
    cases = {"flags\t\t: fpu sse avx2 avx512f avx512bw avx512vl\n": False,  # AVX512 alone: emulated bf16
             "flags\t\t: fpu avx512f avx512_bf16\n": True,
             "flags\t\t: fpu amx_tile amx_bf16\n": True,
             "Features\t: fp asimd sve bf16 i8mm\n": True,  # aarch64
             "Features\t: fp asimd sve\n": False,
             "model name\t: something bf16-ish\n": False}  # only the flag lines count
    for text, want in cases.items():
        info.write_text("processor\t: 0\n" + text)
        assert cpu_supports_bf16() is want, text
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16\n")
    for cap, want in (("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True), ("AVX512_CORE_AMX", True)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert cpu_supports_bf16() is want, cap  # oneDNN capped below bf16 emulates it: fp32 is faster
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")  # oneDNN's older name for the same cap
    assert cpu_supports_bf16() is False
    monkeypatch.delenv("DNNL_MAX_CPU_ISA")
    info.unlink()
    assert cpu_supports_bf16() is False  # unreadable: fp32
    monkeypatch.setattr(sys, "platform", "win32")
    assert cpu_supports_bf16() is False


@pytest.mark.parametrize("supported", [False, True])
def test_load_teacher_says_what_it_chose(monkeypatch, caplog, fixtures_dir, supported):
    _bf16(monkeypatch, supported)
    with caplog.at_level(logging.INFO, logger="yolov5kd"):
        t = load_teacher(fixtures_dir / "teacher.pt", "cpu")
    want = "Teacher precision: bf16 (auto: CPU supports bf16)" if supported else \
        "Teacher precision: fp32 (auto: CPU has no native bf16)"
    assert [m for m in _messages(caplog) if m.startswith("Teacher precision")] == [want]
    assert t.precision == ("bf16" if supported else "fp32") and not t.half
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # bf16 autocasts; weights stay fp32
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        load_teacher(fixtures_dir / "teacher.pt", "cpu", precision="fp16")


def test_teacher_runs_at_its_own_precision_under_any_autocast():
    torch.manual_seed(0)
    m = Model("yolov5n.yaml", nc=8).eval().fuse()
    x = torch.rand(1, 3, 64, 64)
    t32, t16 = Teacher(m, precision="fp32"), Teacher(deepcopy(m), precision="bf16")
    plain = t32(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # e.g. the student's --amp region
        again = t32(x)
    assert all(torch.equal(a, b) for a, b in zip(plain, again))
    seen = []
    hook = t16.model.model[0].register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
    maps = t16(x)
    hook.remove()
    assert seen == [torch.bfloat16]
    assert all(r.dtype == torch.float32 and not r.is_inference() for r in maps)
    # train.py's teacher validation deep-copies the model and runs it in fp32: nothing of bf16 sticks to it
    assert all(p.dtype == torch.float32 for p in deepcopy(t16.model).float().parameters())
    with pytest.raises(ValueError):
        Teacher(m, precision="auto")


def _decode(raw: torch.Tensor, det, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes xywh in pixels, objectness and class probabilities from a raw map, YOLOv5's decoding."""
    s = raw.sigmoid()
    ny, nx = raw.shape[2:4]
    yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
    grid = torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2).float()
    stride, anchors = float(det.stride[i]), det.anchors[i].view(1, -1, 1, 1, 2)
    xy = (s[..., :2] * 2 - 0.5 + grid) * stride
    wh = (s[..., 2:4] * 2) ** 2 * anchors * stride
    return torch.cat((xy, wh), -1), s[..., 4], s[..., 5:]


# Measured (random yolov5n, nc=8, imgsz 64, batch 2, seeds 0-2, AMX CPU): raw logits differ by <= 0.016, boxes by
# <= 0.025 px, objectness by <= 1.3e-4, class probabilities by <= 6e-4. Tolerances are about 4x those.
BF16_TOL = {"raw": 0.06, "box_px": 0.1, "obj": 5e-4, "cls": 2.5e-3}


@needs_bf16
@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_teacher_maps_stay_close_to_fp32(seed):
    torch.manual_seed(seed)
    m = Model("yolov5n.yaml", nc=8).eval().fuse()
    det = m.model[-1]
    x = torch.rand(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    ref = Teacher(m, precision="fp32")(x)
    low = Teacher(deepcopy(m), precision="bf16")(x)
    for i, (a, b) in enumerate(zip(ref, low)):
        assert b.dtype == torch.float32 and a.shape == b.shape
        assert (a - b).abs().max() <= BF16_TOL["raw"]
        (box_a, obj_a, cls_a), (box_b, obj_b, cls_b) = _decode(a, det, i), _decode(b, det, i)
        assert (box_a - box_b).abs().max() <= BF16_TOL["box_px"]
        assert (obj_a - obj_b).abs().max() <= BF16_TOL["obj"]
        assert (cls_a - cls_b).abs().max() <= BF16_TOL["cls"]


def test_int8_is_cpu_only_and_refused_where_torch_cannot_quantise(monkeypatch):
    if int8_unavailable():
        pytest.skip(f"int8 teacher unavailable: {int8_unavailable()}")
    chosen, why = resolve_teacher_precision("int8", "cpu")
    assert chosen == "int8" and f"first {INT8_CALIBRATION_BATCHES} training batches" in why
    assert resolve_teacher_precision("auto", "cpu")[0] != "int8"  # opt-in only
    with pytest.raises(UserError, match=r"^--teacher-precision int8 is for CPU training \(this run uses cuda\); "
                                        r"use auto$"):
        resolve_teacher_precision("int8", "cuda")
    monkeypatch.setattr(teacher_mod, "int8_unavailable", lambda: "this torch build has no onednn quantised engine")
    with pytest.raises(UserError, match=r"^--teacher-precision int8: this torch build has no onednn quantised "
                                        r"engine; use auto \(bf16 or fp32\)$"):
        resolve_teacher_precision("int8", "cpu")


# Measured (the fixture yolov5s teacher, ranges observed on 4 golden images, compared on the other 4): raw maps
# differ by <= 0.70 (|maps| up to 8.5), by 0.9-1.1 % of their mean magnitude, objectness by <= 0.10.
INT8_TOL = {"raw": 2.0, "rel_mean": 0.03, "obj": 0.25}


def test_int8_teacher_observes_then_quantises(fixtures_dir, golden, caplog):
    if int8_unavailable():
        pytest.skip(f"int8 teacher unavailable: {int8_unavailable()}")
    images = golden["images_uint8"].float() / 255
    ref = load_teacher(fixtures_dir / "teacher.pt", "cpu", precision="fp32")
    t8 = Teacher(deepcopy(ref.model), precision="int8", calibration_batches=2)
    engine = torch.backends.quantized.engine
    with caplog.at_level(logging.INFO, logger="yolov5kd"):
        for x in (images[:2], images[2:4]):
            assert not t8.calibrated
            # while it observes, the teacher is exactly the fp32 network
            assert all(torch.equal(a, b) for a, b in zip(t8(x), ref(x)))
    assert t8.calibrated and "Teacher int8: activation ranges observed, convolutions quantised" in _messages(caplog)
    assert torch.backends.quantized.engine == engine  # the process-wide engine is left as it was

    net = t8.network
    n_conv = sum(isinstance(m, Conv) for m in ref.model.modules())
    assert sum(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in net.modules()) == n_conv > 50
    assert all(type(m) is torch.nn.Conv2d for m in net.model[-1].m)  # Detect's output convolutions stay fp32
    # the wrapped model itself stays fp32: train.py validates the teacher from it
    assert not any(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in t8.model.modules())
    assert all(p.dtype == torch.float32 for p in t8.model.parameters())

    held_out = images[4:]
    for a, b in zip(t8(held_out), ref(held_out)):
        assert a.dtype == torch.float32 and a.shape == b.shape and not a.is_inference()
        d = (a - b).abs()
        assert 0 < d.max() <= INT8_TOL["raw"]  # quantised for real, and still close
        assert d.mean() / b.abs().mean() <= INT8_TOL["rel_mean"]
        assert (a[..., 4].sigmoid() - b[..., 4].sigmoid()).abs().max() <= INT8_TOL["obj"]


# ----------------------------------------------------------------------------------------------------- --amp, loop

def test_resolve_amp(monkeypatch, caplog):
    cuda = torch.device("cuda", 0)
    for native in (False, True):  # CUDA ignores the CPU's bf16
        monkeypatch.setattr(forward_mod, "cpu_supports_bf16", lambda: native)
        for flag in ("auto", "on", True, None):
            assert resolve_amp(flag, cuda) == torch.float16, flag
        assert resolve_amp("off", cuda) is None and resolve_amp(False, cuda) is None
    monkeypatch.setattr(forward_mod, "cpu_supports_bf16", lambda: True)
    with caplog.at_level(logging.INFO, logger="yolov5kd"):
        assert resolve_amp("auto", CPU) == torch.bfloat16  # the new default, where bf16 is native
    assert "AMP: bf16 autocast (auto: CPU runs bf16 natively)" in _messages(caplog)
    assert resolve_amp("on", CPU) == resolve_amp(True, CPU) == torch.bfloat16
    assert resolve_amp("off", CPU) is None and resolve_amp(False, CPU) is None
    assert resolve_amp(None, CPU) is None  # a run recorded before auto resumes in the fp32 it began in
    monkeypatch.setattr(forward_mod, "cpu_supports_bf16", lambda: False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="yolov5kd"):
        assert resolve_amp("auto", CPU) is None  # emulated bf16 is slower than fp32: never a default
        assert resolve_amp("on", CPU) == torch.bfloat16  # asked for: honoured, with the reason it may be slow
    assert _messages(caplog) == [
        "AMP: off (fp32) (auto: CPU has no native bf16)",
        "AMP: bf16 autocast (requested; this CPU emulates bf16, which may be slower than fp32)"]
    with pytest.raises(UserError, match=r"^--amp fast: must be one of auto, on, off$"):
        resolve_amp("fast", CPU)


def _student(seed: int = 0) -> Model:
    torch.manual_seed(seed)
    m = Model("yolov5n.yaml", nc=8).to(memory_format=torch.channels_last)
    m.nc, m.hyp = 8, scale_hyp(load_hyp(LOW, KD_SPECS), 3, 8, 64)
    return m


def test_detection_loss_is_fp32_under_cpu_bf16_autocast():
    m = _student()
    x = torch.rand(2, 3, 64, 64)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 3, 0.3, 0.6, 0.2, 0.2]])
    loss_fn = ComputeLoss(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = m(x)
        assert all(p.dtype == torch.bfloat16 for p in pred)
        loss, items = loss_fn(pred, targets)
        fp32_in_autocast, _ = loss_fn([p.float() for p in pred], targets)
    assert loss.dtype == torch.float32 and items.dtype == torch.float32
    ref, ref_items = loss_fn([p.detach().float() for p in pred], targets)  # outside autocast, fp32 throughout
    assert torch.equal(loss.detach(), ref) and torch.equal(items, ref_items)
    assert torch.equal(fp32_in_autocast.detach(), ref)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def _batches(n: int = 3, bs: int = 2, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        imgs = torch.randint(0, 256, (bs, 3, 64, 64), dtype=torch.uint8, generator=g)
        targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 3, 0.3, 0.6, 0.2, 0.2], [1, 0, 0.7, 0.3, 0.4, 0.3]])
        out.append((imgs, targets, [f"im{i}.jpg" for i in range(bs)], None))
    return out


def _train(model, criterion):
    hyp = load_hyp(LOW, KD_SPECS)
    opt = build_optimizer(model, "SGD", hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    state = LoopState()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    cfg = LoopConfig(epochs=1, device=CPU, warmup=hyp, lf=lr_lambda(1, hyp["lrf"]), batch_size=2, nw=100, imgsz=64,
                     gs=32, show_progress=False)
    res = train_one_epoch(model, _batches(), criterion, Optim(opt, torch.amp.GradScaler("cuda", enabled=False),
                                                              ModelEMA(model)), 0, state, cfg)
    moved = any(not torch.equal(before[k], v) for k, v in model.named_parameters())  # the optimizer stepped
    return res, state, moved


def test_cpu_amp_training_steps_pass_the_nonfinite_guard(caplog):
    student = _student()
    torch.manual_seed(1)
    dtypes = []

    def forward(x):
        out = student(x)
        dtypes.append(out[0].dtype)
        return out

    kd = Distiller(KDConfig(t_weights="t.pt"), Teacher(Model("yolov5n.yaml", nc=8).eval().fuse(), precision="bf16"),
                   Student(student, ComputeLoss(student), StudentForward(CPU, torch.bfloat16, forward), 64))
    with caplog.at_level(logging.WARNING, logger="yolov5kd"):
        res, state, moved = _train(student, kd)
    assert dtypes == [torch.bfloat16] * 3  # the student really ran under bf16 autocast
    assert res.skipped == 0 and state.nonfinite == 0 and not any("non-finite" in m for m in _messages(caplog))
    assert list(res.mloss) == list(kd.parts) and all(torch.isfinite(torch.tensor(list(res.mloss.values()))))
    assert moved and all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in student.parameters())


# ------------------------------------------------------------------------------------------------------- --compile

def _boom(*a, **k):
    raise RuntimeError("Compiler: cc not found\nmore detail that is not printed")


def test_compile_unavailable_warns_once_and_trains_eagerly(monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", _boom)
    student = _student()
    with caplog.at_level(logging.WARNING, logger="yolov5kd"):
        fwd = CompiledForward(student)
        res, state, moved = _train(student, DetectionCriterion(ComputeLoss(student), StudentForward(CPU, None, fwd)))
    warns = [m for m in _messages(caplog) if "--compile" in m]
    assert warns == ["WARNING: --compile: torch.compile is unavailable or failed here (RuntimeError: Compiler: cc "
                     "not found); training eagerly"]
    assert fwd.compiled is None and res.skipped == 0 and moved


def test_compile_failing_at_the_first_call_falls_back(monkeypatch, caplog):
    calls = []

    def lazy_compile(model, **kw):  # torch.compile is lazy: a missing compiler shows at the first forward
        def run(x):
            calls.append(1)
            _boom()
        return run

    monkeypatch.setattr(torch, "compile", lazy_compile)
    student = _student()
    with caplog.at_level(logging.WARNING, logger="yolov5kd"):
        fwd = CompiledForward(student)
        res, _, moved = _train(student, DetectionCriterion(ComputeLoss(student), StudentForward(CPU, None, fwd)))
    assert len(calls) == 1 and len([m for m in _messages(caplog) if "--compile" in m]) == 1
    assert res.skipped == 0 and moved


def test_compiled_forward_is_used_and_never_reaches_the_checkpoint(monkeypatch):
    wrapped = []

    class FakeCompiled(torch.nn.Module):  # stands in for torch._dynamo's OptimizedModule
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model
            wrapped.append(0)

        def forward(self, x):
            wrapped.append(1)
            return self._orig_mod(x)

    monkeypatch.setattr(torch, "compile", lambda model, **kw: FakeCompiled(model))
    student = _student()
    fwd = CompiledForward(student)
    res, _, moved = _train(student, DetectionCriterion(ComputeLoss(student), StudentForward(CPU, None, fwd)))
    assert wrapped == [0, 1, 1, 1] and moved
    ckpt = build_checkpoint(student, ema=deepcopy(student))
    assert type(ckpt["model"]) is Model and not any("_orig_mod" in k for k in ckpt["model"].state_dict())


# ---------------------------------------------------------------------------------------------- flags and records

def test_flags_and_resume_record():
    p = add_kd_args(argparse.ArgumentParser())
    assert p.parse_args([]).teacher_precision == "auto"
    flags = vars(p.parse_args(["--teacher-precision", "bf16"]))
    kd = KDConfig.resolve(flags, {}, {"teacher_precision"})
    assert kd.teacher_precision == "bf16"
    assert p.parse_args(["--teacher-precision", "int8"]).teacher_precision == "int8"
    # the parser takes any word; the one check is where the value is resolved, in one line
    fp8 = vars(p.parse_args(["--teacher-precision", "fp8"]))
    with pytest.raises(UserError, match=r"^command line: teacher_precision 'fp8' must be one of auto, fp32, bf16, "
                                        r"fp16, int8$"):
        KDConfig.resolve(fp8, {}, {"teacher_precision"})
    kd = KDConfig(t_weights="t.pt", teacher_precision="fp32", t_sha256="ab")
    assert KDConfig.from_record({**kd.as_dict(), "epochs": 3}) == kd
    old = {k: v for k, v in kd.as_dict().items() if k != "teacher_precision"}  # a run recorded before the flag
    assert KDConfig.from_record(old).teacher_precision == "auto"

    import train
    opt = train.parse_opt(["--teacher-precision", "fp32", "--amp", "--compile"])
    assert (opt.teacher_precision, opt.amp, opt.compile) == ("fp32", "on", True)
    assert "teacher_precision" in opt.cli_given
    opt = train.parse_opt([])
    assert (opt.teacher_precision, opt.amp, opt.compile) == ("auto", "auto", False)
    assert train.parse_opt(["--no-amp"]).amp == "off" and train.parse_opt(["--amp", "off"]).amp == "off"
    assert train.parse_opt(["--amp", "auto", "--epochs", "1"]).amp == "auto"


@pytest.mark.e2e
def test_cli_amp_compile_and_bf16_teacher_end_to_end(tiny_data, tmp_path):
    """One epoch of KD with --amp --compile --teacher-precision bf16, torch.compile made to fail (so nothing is
    compiled for real): the run finishes, validates the teacher, says what it chose, and records the settings
    for --resume."""
    teacher = random_checkpoint(tmp_path / "t.pt", "yolov5n.yaml")
    args = ["--data", str(tiny_data), "--cfg", "yolov5n.yaml", "--imgsz", "64", "--batch-size", "4", "--workers",
            "0", "--noautoanchor", "--noplots", "--project", str(tmp_path), "--name", "run", "--epochs",
            "1", "--t_weights", str(teacher), "--teacher-precision", "bf16", "--amp", "--compile"]
    code = ("import sys, torch\n"
            "def boom(*a, **k):\n    raise RuntimeError('no C++ compiler')\n"
            "torch.compile = boom\n"
            "import train\n"
            "sys.exit(train.main(sys.argv[1:]))\n")
    r = run_cli(["-c", code, *args], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Teacher precision: bf16 (requested" in r.stderr and "AMP: bf16 autocast" in r.stderr
    assert r.stderr.count("WARNING: --compile: torch.compile is unavailable or failed here (RuntimeError: no C++ "
                          "compiler); training eagerly") == 1
    assert "non-finite" not in r.stderr
    assert "Teacher mAP50" in r.stderr  # the teacher's reference validation runs on an fp32 copy
    run = tmp_path / "run"
    opt = yaml.safe_load((run / "opt.yaml").read_text())
    assert (opt["teacher_precision"], opt["amp"], opt["compile"]) == ("bf16", "on", True)
    ck = torch_load(run / "weights/last.pt")
    assert type(ck["model"]) is Model
    assert KDConfig.from_record(ck["opt"]).teacher_precision == "bf16" == KDConfig.from_record(opt).teacher_precision


@pytest.mark.e2e
def test_cli_int8_teacher_end_to_end(tiny_data, tmp_path):
    """Two epochs of KD from an int8 teacher observing for 2 batches (train.py's Teacher made to calibrate that
    soon, so the quantised network teaches the later steps): the run finishes, says what it chose and when it
    quantised, validates the teacher from its fp32 weights, and records int8 for --resume."""
    if int8_unavailable():
        pytest.skip(f"int8 teacher unavailable: {int8_unavailable()}")
    teacher = random_checkpoint(tmp_path / "t.pt", "yolov5n.yaml")
    args = ["--data", str(tiny_data), "--cfg", "yolov5n.yaml", "--imgsz", "64", "--batch-size", "2", "--workers",
            "0", "--noautoanchor", "--noplots", "--project", str(tmp_path), "--name", "run", "--epochs",
            "2", "--t_weights", str(teacher), "--teacher-precision", "int8"]
    code = ("import sys\n"
            "import optimizer.teacher as t\n"
            "t.INT8_CALIBRATION_BATCHES = 2\n"
            "import train\n"
            "sys.exit(train.main(sys.argv[1:]))\n")
    r = run_cli(["-c", code, *args], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Teacher precision: int8 (requested: int8 convolutions" in r.stderr
    assert r.stderr.count("Teacher int8: activation ranges observed, convolutions quantised") == 1
    assert "Teacher mAP50" in r.stderr and "non-finite" not in r.stderr
    opt = yaml.safe_load((tmp_path / "run" / "opt.yaml").read_text())
    assert opt["teacher_precision"] == "int8" == KDConfig.from_record(opt).teacher_precision
