"""Checkpoint I/O: safe loading, refusal of pickle payloads, one-line errors, official-format saving."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from models.yolo import Model
from utils.core.errors import UserError
from utils.training.checkpoint import attempt_load, build_checkpoint, save_checkpoint, strip_optimizer, torch_load

ROOT = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_payload_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    bad = tmp_path / "evil.pt"
    torch.save({"model": None, "x": Payload(marker)}, bad)
    assert not marker.exists()
    with pytest.raises(UserError) as e:
        torch_load(bad)
    msg = str(e.value)
    assert "evil.pt" in msg and "system" in msg and "allow-list" in msg and "\n" not in msg
    assert not marker.exists()
    # also through the model loader, and without the pre-scan (legacy path): still refused
    with pytest.raises(UserError):
        attempt_load(bad)
    assert not marker.exists()


def test_trust_flag_allows_full_unpickling(tmp_path):
    f = tmp_path / "plain.pt"
    torch.save({"model": None, "obj": Path("x")}, f)  # an allowed class, so both paths load
    assert torch_load(f, trust=True)["obj"] == Path("x")


@pytest.mark.parametrize("case", ["missing", "truncated", "text", "no_model", "empty", "state_dict"])
def test_one_line_errors(case, tmp_path, fixtures_dir):
    f = tmp_path / f"{case}.pt"
    if case == "truncated":
        data = (fixtures_dir / "student.pt").read_bytes()
        f.write_bytes(data[: len(data) // 2])
    elif case == "text":
        f.write_text("hello, I am not a checkpoint\n")
    elif case == "no_model":
        torch.save({"epoch": 3, "optimizer": None}, f)
    elif case == "empty":
        f.write_bytes(b"")
    elif case == "state_dict":
        torch.save(Model("yolov5n.yaml", nc=2).state_dict(), f)
    with pytest.raises(UserError) as e:
        attempt_load(f)
    msg = str(e.value)
    assert f.name in msg and "\n" not in msg
    expected = {"missing": "not found", "truncated": "truncated", "text": "not a torch checkpoint",
                "no_model": "no 'model'", "empty": "empty", "state_dict": "bare state_dict"}[case]
    assert expected in msg


@pytest.mark.e2e
def test_cli_prints_one_line_without_traceback(tmp_path):
    f = tmp_path / "garbage.pt"
    f.write_text("garbage")
    r = subprocess.run([sys.executable, str(ROOT / "val.py"), "--weights", str(f), "--data", "shapes.yaml"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr + r.stdout
    assert "garbage.pt" in r.stderr


SAVE_CHECK = r"""
import sys, torch
from utils.training.checkpoint import attempt_load
m = attempt_load(sys.argv[2], fuse=False)
torch.manual_seed(0)
x = torch.rand(2, 3, 64, 64)
with torch.no_grad():
    y = m(x)[0]
torch.save(y, sys.argv[3])
"""


@pytest.mark.e2e
def test_saved_checkpoint_roundtrip_in_fresh_process(tmp_path, fixtures_dir):
    model = attempt_load(fixtures_dir / "student.pt", fuse=False)
    ckpt = build_checkpoint(model, ema=model, updates=5, epoch=2, best_fitness=0.25,
                            opt={"weights": Path("a.pt"), "imgsz": 64})
    out = save_checkpoint(ckpt, tmp_path / "weights" / "last.pt")
    assert sorted(ckpt) == sorted(["epoch", "best_fitness", "model", "ema", "updates", "optimizer", "opt", "git", "date"])
    assert not [p for p in out.parent.iterdir() if p.name != "last.pt"], "temp files left behind"
    # its pickle references only our model modules, torch, numpy and builtins
    refs = torch.serialization.get_unsafe_globals_in_checkpoint(out)
    assert all(r.split(".")[0] in ("models", "torch", "numpy", "builtins", "collections") for r in refs), refs
    res = tmp_path / "y.pt"
    subprocess.run([sys.executable, "-c", SAVE_CHECK, str(ROOT), str(out), str(res)], check=True, timeout=120)
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        y = model.half().float()(x)[0]
    assert torch.allclose(torch.load(res, weights_only=True), y, atol=1e-4)


def test_save_is_atomic(tmp_path, monkeypatch, fixtures_dir):
    target = tmp_path / "last.pt"
    model = attempt_load(fixtures_dir / "student.pt", fuse=False)
    save_checkpoint(build_checkpoint(model, epoch=1), target)
    before = target.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(build_checkpoint(model, epoch=2), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_strip_optimizer(tmp_path, fixtures_dir):
    model = attempt_load(fixtures_dir / "student.pt", fuse=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    f = save_checkpoint(build_checkpoint(model, ema=model, updates=3, optimizer=opt, epoch=4, best_fitness=0.5),
                        tmp_path / "best.pt")
    strip_optimizer(f)
    ck = torch_load(f)
    assert ck["epoch"] == -1 and ck["optimizer"] is None and ck["ema"] is None and ck["updates"] is None
    assert next(ck["model"].parameters()).dtype == torch.float16
    assert zipfile.is_zipfile(f)


def test_official_checkpoint_contents(fixtures_dir):
    ck = torch_load(fixtures_dir / "teacher.pt")
    assert type(ck["model"]).__name__ == "DetectionModel"
    assert ck["model"].class_weights.shape == (4,)  # official models carry it; the safe loader takes it as it is
    m = attempt_load(fixtures_dir / "teacher.pt")
    assert m.names == {0: "circle", 1: "square", 2: "rect", 3: "triangle"}
    assert next(m.parameters()).dtype == torch.float32
