"""What we save must load in official YOLOv5 tools: standard contiguous tensors, whatever the training layout.

Official YOLOv5 fuses Conv+BN with `conv.weight.clone().view(out_channels, -1)`, which fails on channels_last
storage; these tests perform exactly that operation on every kind of checkpoint the project writes."""
import pickle
import shutil

import pytest
import torch

from conftest import ROOT, random_checkpoint, run_cli
from models.yolo import INPLACE_TYPES, Model, to_training_layout
from utils.core.errors import UserError
from utils.training.checkpoint import attempt_load, build_checkpoint, save_checkpoint, strip_optimizer, torch_load

TRAIN = str(ROOT / "train.py")


def assert_official_layout(ckpt: dict, where: str) -> None:
    """Every floating tensor of model/ema contiguous, and the official fuse's view works on every Conv2d."""
    for key in ("model", "ema"):
        m = ckpt.get(key)
        if m is None:
            continue
        tensors = list(m.state_dict().items())
        assert tensors, where
        for name, t in tensors:
            if t.is_floating_point():
                assert t.is_contiguous(), f"{where}: {key}.{name} is not contiguous"
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Conv2d):
                w = mod.weight
                w.clone().view(w.shape[0], -1)  # raises on channels_last storage
            if isinstance(mod, INPLACE_TYPES):  # training runs them out of place; saved ones are as YOLOv5's
                assert mod.inplace, f"{where}: {key}.{name} saved with inplace=False"


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    r = run_cli([TRAIN, "--data", str(tiny_data), "--cfg", "yolov5n.yaml", "--imgsz", "64", "--batch-size", "4",
                 "--workers", "0", "--noautoanchor", "--noplots", "--epochs", "2", "--save-period", "1",
                 "--project", str(root), "--name", "r"], cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "r" / "weights"


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["last.pt", "best.pt", "epoch0.pt", "epoch1.pt"])
def test_training_checkpoints_have_the_official_layout(trained_run, name):
    ck = torch_load(trained_run / name)
    assert_official_layout(ck, name)
    for k, t in (ck.get("resume_state") or {}).get("model", {}).items():
        assert t.is_contiguous(), k


def test_unstripped_checkpoint_of_a_channels_last_model(tmp_path):
    m = to_training_layout(Model("yolov5n.yaml", nc=8))
    assert not m.model[0].conv.weight.is_contiguous()  # the premise: training layout is channels_last
    assert not m.model[0].act.inplace
    ck = build_checkpoint(m, ema=m, updates=1, epoch=0)
    f = save_checkpoint(ck, tmp_path / "last.pt")
    assert_official_layout(torch_load(f), "last.pt")
    assert not m.model[0].conv.weight.is_contiguous(), "saving must not change the model being trained"
    assert not m.model[0].act.inplace, "saving must not change the model being trained"
    strip_optimizer(f)
    assert_official_layout(torch_load(f), "stripped last.pt")


@pytest.mark.parametrize("path", sorted((ROOT / "checkpoint").glob("*.pt")), ids=lambda p: p.name)
def test_shipped_checkpoints_have_the_official_layout(path):
    assert_official_layout(torch_load(path), path.name)


def test_channels_last_checkpoint_from_earlier_versions_still_loads(tmp_path):
    torch.manual_seed(0)
    m = Model("yolov5n.yaml", nc=8).eval()
    x = torch.rand(1, 3, 64, 64)
    ref = m(x)[0]
    old = {"epoch": -1, "model": m.half().to(memory_format=torch.channels_last), "ema": None}
    torch.save(old, tmp_path / "old.pt")  # what earlier versions wrote: strides pickled as they were
    assert not torch_load(tmp_path / "old.pt")["model"].model[0].conv.weight.is_contiguous()
    got = attempt_load(tmp_path / "old.pt", fuse=True)(x)[0]
    assert torch.allclose(got, ref, atol=0.05, rtol=0.01)  # fp16 weights
    strip_optimizer(tmp_path / "old.pt")  # converting an old file gives the official layout
    assert_official_layout(torch_load(tmp_path / "old.pt"), "converted old.pt")


class _Payload:
    def __reduce__(self):
        import os
        return (os.system, ("true",))


@pytest.mark.parametrize("fmt", ["raw-pickle", "legacy-torch"])
def test_hostile_non_zip_files_name_the_refused_global(tmp_path, fmt):
    f = tmp_path / "evil.pt"
    if fmt == "raw-pickle":
        f.write_bytes(pickle.dumps({"model": _Payload()}))
    else:
        torch.save({"model": _Payload()}, f, _use_new_zipfile_serialization=False)
    with pytest.raises(UserError) as e:
        torch_load(f)
    msg = str(e.value)
    assert "system" in msg and "--trust-checkpoint" in msg and "weights_only" not in msg
    assert "\n" not in msg


def test_legacy_format_plain_tensors_still_load(tmp_path):
    torch.save({"a": torch.arange(3.0)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(torch_load(tmp_path / "old.pt")["a"], torch.arange(3.0))


def test_random_checkpoint_helper_writes_official_layout(tmp_path):
    assert_official_layout(torch_load(random_checkpoint(tmp_path / "r.pt", "yolov5n.yaml")), "r.pt")
    shutil.rmtree(tmp_path)


def test_validation_copy_computes_what_val_py_computes_from_the_saved_file(tmp_path):
    """results.csv's mAP comes from validation_copy(EMA in the training layout), val.py's from the saved fp16
    file: the two must run the same kernels on the same weights, so their outputs are equal bit for bit."""
    from train import validation_copy

    torch.manual_seed(0)
    # yolov5s: its wider convs take kernels whose NHWC and NCHW variants round differently even on AVX-512
    m = to_training_layout(Model("yolov5s.yaml", nc=8)).train()
    with torch.no_grad():  # a few train-mode steps give BN running stats, so the fused weights are not trivial
        for _ in range(3):
            m(torch.rand(2, 3, 128, 128).to(memory_format=torch.channels_last))
    path = save_checkpoint(build_checkpoint(m), tmp_path / "best.pt")
    im = torch.rand(2, 3, 128, 96)
    with torch.no_grad():
        during_training = validation_copy(m)(im)[0]
        from_the_file = attempt_load(path)(im)[0]
    assert torch.equal(during_training, from_the_file)
