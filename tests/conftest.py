"""Shared fixtures: golden data and the two official-format checkpoints.

To run the suite as a CPU with AVX2 alone (no AVX-512, no native bf16) does, from any x86 machine:

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m pytest tests

ATen's kernels and oneDNN's convolutions then take their AVX2 paths, and utils.core.hardware reads the oneDNN
cap, so `--amp auto` is fp32 as on such a CPU. tests/README.md says why the tolerances hold on both.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

# One thread per xdist worker (the suite runs -n auto, a worker per core), as the CLI subprocesses run; two
# when run without xdist workers (-n 0).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def golden() -> dict:
    """Figures computed by the reference implementation (see tests/fixtures/README.md)."""
    return torch.load(FIXTURES / "golden.pt", weights_only=True)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


DEMO_NAMES = ["circle", "ellipse", "square", "rectangle", "diamond", "triangle", "plus", "cross"]


def random_checkpoint(path: Path, cfg: str, seed: int = 0) -> Path:
    """An official-format checkpoint of a randomly initialised model for the 8 demo classes."""
    from models.yolo import Model
    from utils.training.checkpoint import build_checkpoint, save_checkpoint

    torch.manual_seed(seed)
    m = Model(cfg, nc=len(DEMO_NAMES))
    m.names = dict(enumerate(DEMO_NAMES))
    return save_checkpoint(build_checkpoint(m), path)


def overflowing_checkpoint(path: Path, cfg: str) -> Path:
    """A checkpoint with finite fp16 weights whose activations overflow fp32 after a few layers, so every
    output map (and every loss computed from it) is non-finite."""
    from utils.training.checkpoint import save_checkpoint, torch_load

    ck = torch_load(random_checkpoint(path, cfg))
    with torch.no_grad():
        for m in ck["model"].modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(200)
    return save_checkpoint(ck, path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A dataset yaml over a handful of 64-px demo images (8 train, 4 val), made once per session."""
    from data.scripts.generate_shapes import generate

    root = tmp_path_factory.mktemp("tiny")
    generate(root / "shapes", n_train=8, n_val=4, seed=3, imgsz=64)
    yml = root / "tiny.yaml"
    yml.write_text(f"path: {root / 'shapes'}\ntrain: images/train\nval: images/val\nnames: {DEMO_NAMES}\n")
    return yml


def run_cli(args: list[str], cwd: Path, timeout: int = 600, env_extra: dict | None = None):
    """Run a project CLI in a fresh process (single-threaded torch, so runs are reproducible)."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def distillation_loss(student, dist_loss: str = "l2", *, T: float = 5.0, distill_ratio: float = 0.5,
                      norm: str = "mean", **kw):
    """OutputDistillationLoss with the values these tests were written for (the class has no defaults of its
    own) and the box/obj/cls gains of the student's hyp."""
    from optimizer.loss import OutputDistillationLoss

    return OutputDistillationLoss(student, dist_loss=dist_loss, T=T, distill_ratio=distill_ratio, norm=norm,
                                  gains=student.hyp, **kw)


def one_error(r) -> str:
    """The one 'ERROR:' line of a CLI run refused with exit code 2 and no traceback."""
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(err) == 1, r.stderr[-2000:]
    return err[0]


@pytest.fixture(scope="session")
def unl_data(tmp_path_factory) -> Path:
    """8 labelled train images, 4 val, and 6 unlabelled images in two folders whose label files must be
    ignored (they hold an out-of-range class that would be reported if read)."""
    from data.scripts.generate_shapes import generate

    root = tmp_path_factory.mktemp("unl")
    generate(root / "shapes", n_train=8, n_val=4, seed=3, imgsz=64)
    generate(root / "extra", n_train=6, n_val=1, seed=5, imgsz=64)
    ex = root / "extra"
    imgs = sorted((ex / "images" / "train").glob("*"))
    for i, f in enumerate(imgs):
        sub = "u1" if i < 4 else "u2"
        for kind, src in (("images", f), ("labels", ex / "labels" / "train" / f"{f.stem}.txt")):
            (ex / kind / sub).mkdir(exist_ok=True)
            src.rename(ex / kind / sub / src.name)
        (ex / "labels" / sub / f"{f.stem}.txt").write_text("99 0.5 0.5 0.2 0.2\n")
    lst = ex / "unl.txt"
    lst.write_text("".join(f"{p}\n" for p in sorted((ex / "images").glob("u*/*.*"))))
    return root


def unl_yaml(root: Path, name: str, unlabeled) -> Path:
    """A dataset yaml over unl_data's labelled images, with `unlabeled` (None: no such key)."""
    import yaml

    d = {"path": str(root / "shapes"), "train": "images/train", "val": "images/val", "names": DEMO_NAMES}
    if unlabeled is not None:
        d["unlabeled"] = unlabeled
    f = root / name
    f.write_text(yaml.safe_dump(d))
    return f


@pytest.fixture(scope="session")
def teacher8(tmp_path_factory) -> Path:
    """A yolov5s teacher for the 8 demo classes (random weights: the tests using it check the plumbing)."""
    return random_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher.pt", "yolov5s.yaml")


def assert_same_weights(uninterrupted: Path, resumed: Path) -> None:
    """The model in two checkpoints is equal tensor for tensor (an exact --resume after kill -9)."""
    from utils.training.checkpoint import torch_load

    a = torch_load(uninterrupted)["model"].state_dict()
    b = torch_load(resumed)["model"].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def kill9_when(args: list[str], cwd: Path, ready, timeout: float = 300) -> None:
    """Start a project CLI (one thread), wait until ready() is true, then kill -9 it; fails if it ended first."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the process finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def pytest_collection_modifyitems(config, items) -> None:
    """Each test carries the marker of its layer folder (unit, golden, e2e, cuda), so `-m "not e2e"` is the fast
    loop and `-m cuda` the GPU layer."""
    for item in items:
        layer = Path(str(item.fspath)).parent.name
        if layer in ("unit", "golden", "e2e", "cuda"):
            item.add_marker(getattr(pytest.mark, layer))


@pytest.fixture
def server(monkeypatch, tmp_path):
    """The local asset server as $YOLOV5KD_ASSETS_URL, with the working directory in tmp_path and YOLO_OFFLINE
    unset (the download tests' release host)."""
    from asset_server import AssetServer
    from utils.core import download as dl

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(dl.OFFLINE_ENV, raising=False)
    with AssetServer() as s:
        monkeypatch.setenv(dl.ASSETS_URL_ENV, s.url)
        yield s
