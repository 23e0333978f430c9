"""The ten cases of the hostile-input probe (issue 39), each with a variant of our own.

Every case ends in the right result, or in one clear line (exit 2, no traceback) or one warning, with
nothing already written lost."""
from __future__ import annotations

import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import utils.data.datasets as D
from conftest import ROOT, one_error, run_cli
from tests.data_helpers import solid, write_jpg, write_label
from utils.core.config import atomic_write, read_yaml
from utils.core.distributed import select_device
from utils.core.errors import UserError
from utils.core.log import hold_run_folder
from utils.training.checkpoint import model_from_ckpt, torch_load

TRAIN = str(ROOT / "train.py")
COMMON = ["--cfg", "yolov5n.yaml", "--imgsz", "64", "--batch-size", "4", "--workers", "0", "--noautoanchor",
          "--noplots"]
BOM = b"\xef\xbb\xbf"


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _val_instances(stderr: str) -> list[int]:
    """The Instances column of every 'all' row validation printed."""
    return [int(m.group(1)) for m in re.finditer(r"^\s+all\s+\d+\s+(\d+)\s", stderr, re.M)]


def _dataset(root: Path, names: list[str], rows: dict[str, str], size: int = 64) -> Path:
    """A dataset yaml whose train and val splits are the same images (name -> label text)."""
    for name, text in rows.items():
        write_jpg(root / "images" / f"{name}.jpg", solid(size, size, 90 + 10 * len(name)))
        write_label(root / "labels" / f"{name}.txt", text)
    y = root / "data.yaml"
    y.write_text(f"path: {root}\ntrain: images\nval: images\nnames: {names}\n")
    return y


# ------------------------------------------------------------------------------------ 1. --single-cls in train.py
def test_single_cls_training_merges_every_class_into_one(tiny_data, tmp_path):
    labels = sorted((tiny_data.parent / "shapes" / "labels" / "val").glob("*.txt"))
    rows = [ln for f in labels for ln in f.read_text().splitlines() if ln.strip()]
    assert len({ln.split()[0] for ln in rows}) > 1  # the data really has several classes
    r = run_cli([TRAIN, "--data", str(tiny_data), *COMMON, "--epochs", "1", "--single-cls",
                 "--project", str(tmp_path / "runs")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bad label row" not in r.stderr and ">= nc" not in r.stderr
    counts = _val_instances(r.stderr)
    assert counts and all(c == len(rows) for c in counts), (counts, len(rows))


def test_single_cls_variant_three_classes_other_size(tmp_path):
    rows = {"a": "2 0.5 0.5 0.3 0.3\n", "b": "1 0.3 0.3 0.2 0.2\n2 0.7 0.7 0.2 0.2\n", "c": "0 0.5 0.5 0.4 0.4\n"}
    y = _dataset(tmp_path / "d", ["cat", "dog", "fox"], rows, size=96)
    r = run_cli([TRAIN, "--data", str(y), *COMMON, "--imgsz", "96", "--epochs", "1", "--single-cls",
                 "--project", str(tmp_path / "runs")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bad label row" not in r.stderr
    assert _val_instances(r.stderr) and set(_val_instances(r.stderr)) == {4}
    ck = torch_load(tmp_path / "runs" / "exp" / "weights" / "best.pt")
    assert int(ck["model"].nc) == 1 and len(ck["model"].names) == 1


# ----------------------------------------------------------------------------------- 2. two runs, one folder
def _train_args(data: Path, project: Path, epochs: int) -> list[str]:
    return [TRAIN, "--data", str(data), *COMMON, "--epochs", str(epochs), "--project", str(project),
            "--name", "shared", "--exist-ok"]


def test_second_run_into_a_held_folder_is_refused(tiny_data, tmp_path):
    run = tmp_path / "runs" / "shared"
    # long enough to be still running when the second starts; stopped with Ctrl-C once the check is done
    first = subprocess.Popen([sys.executable, *_train_args(tiny_data, tmp_path / "runs", 500)], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 300
        while not (run / "results.csv").is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second could start"
        opt_yaml = (run / "opt.yaml").read_bytes()
        second = run_cli(_train_args(tiny_data, tmp_path / "runs", 1), cwd=tmp_path)
        assert first.poll() is None, "the check must happen while the first run still holds the folder"
        err = one_error(second)
        assert str(run) in err and "another process" in err
        assert (run / "opt.yaml").read_bytes() == opt_yaml
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=600)
    lines = (run / "results.csv").read_text().splitlines()
    epochs = [int(float(ln.split(",")[0])) for ln in lines[1:]]
    assert len({ln.count(",") for ln in lines}) == 1 and epochs == list(range(len(epochs)))  # one run's rows


def test_held_folder_variant_evolution_and_kill(tiny_data, tmp_path):
    # an evolution's folder is held the same way
    run = tmp_path / "evo" / "e"
    with hold_run_folder(run):
        r = run_cli([TRAIN, "--data", str(tiny_data), *COMMON, "--epochs", "1", "--evolve", "1", "--project",
                     str(tmp_path / "evo"), "--name", "e", "--exist-ok"], cwd=tmp_path)
        assert "another process" in one_error(r)
        assert list(run.iterdir()) == []
    # a holder killed with -9 leaves no stale lock behind
    code = f"import time; from utils.core.log import hold_run_folder\n" \
           f"with hold_run_folder({str(tmp_path / 'k')!r}):\n    print('held', flush=True); time.sleep(60)\n"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(UserError):
        with hold_run_folder(tmp_path / "k"):
            pass
    p.kill()
    p.wait()
    with hold_run_folder(tmp_path / "k") as held:
        assert held == tmp_path / "k"


def test_refused_folder_created_for_nothing_is_removed(tmp_path):
    with pytest.raises(RuntimeError):
        with hold_run_folder(tmp_path / "a" / "b" / "c"):
            raise RuntimeError("set-up failed")
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------- 3. --cache disk .npy
def _npy_dataset(tmp_path: Path, w: int, h: int) -> D.LoadImagesAndLabels:
    write_jpg(tmp_path / "images" / "a.jpg", solid(h, w, 120))
    write_label(tmp_path / "labels" / "a.txt", "0 0.5 0.5 0.2 0.2\n")
    return D.LoadImagesAndLabels(tmp_path / "images", D.DataSettings(imgsz=64, cache="disk", nc=4))


@pytest.mark.parametrize("bad", [np.zeros((5, 5), np.uint8), np.zeros((48, 40), np.float64)])
def test_disk_cache_of_another_shape_or_dtype_falls_back_to_the_image(tmp_path, caplog, bad):
    caplog.set_level(logging.WARNING, logger="yolov5kd")
    ds = _npy_dataset(tmp_path, w=40, h=48)
    npy = Path(ds.npy_files[0])
    assert npy.is_file() and np.load(npy).shape == (48, 40, 3)
    np.save(npy, bad)
    for _ in range(2):
        im, hw0, _ = ds.load_image(0)
        assert hw0 == (48, 40) and im.dtype == np.uint8 and im.shape[2] == 3
    warn = [m for m in _warnings(caplog) if npy.name in m]
    assert len(warn) == 1 and "reading the image instead" in warn[0]


@pytest.mark.parametrize("bad", [np.zeros((30, 50, 3), np.float32), np.zeros((30, 50, 4), np.uint8),
                                 np.zeros((50, 30, 3), np.uint8)])
def test_disk_cache_variant_right_size_wrong_layout(tmp_path, caplog, bad):
    caplog.set_level(logging.WARNING, logger="yolov5kd")
    ds = _npy_dataset(tmp_path, w=50, h=30)
    np.save(ds.npy_files[0], bad)
    im, hw0, _ = ds.load_image(0)
    assert hw0 == (30, 50) and im.dtype == np.uint8 and im.shape[2] == 3 and im.mean() > 100
    assert any("disk cache" in m for m in _warnings(caplog))


# -------------------------------------------------------------------------------------------- 4. alias bombs
def _bomb(levels: int = 9, anchor: str = "i") -> str:
    """A yaml 'billion laughs': each level lists the previous one ten times."""
    text = 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for k in range(1, levels):
        text += f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 10)}]\n"
    return text.replace(f"&l{levels - 1}", f"&{anchor}")


def test_alias_bomb_as_class_name_is_refused_in_one_line(tmp_path):
    (tmp_path / "images").mkdir()
    y = tmp_path / "bomb.yaml"
    y.write_text(_bomb() + f"path: {tmp_path}\ntrain: images\nval: images\nnames: {{0: *i}}\n")
    with pytest.raises(UserError, match="alias"):
        D.check_dataset(y)
    r = run_cli([TRAIN, "--data", str(y), *COMMON, "--epochs", "1", "--project", str(tmp_path / "runs")],
                cwd=tmp_path, timeout=120)
    assert str(y) in one_error(r) and len(r.stderr) < 5000
    assert not (tmp_path / "runs").exists()


def test_alias_bomb_variant_as_train_path_and_small_nested_values(tmp_path):
    (tmp_path / "images").mkdir()
    y = tmp_path / "bomb2.yaml"
    y.write_text(_bomb(7, "p") + f"path: {tmp_path}\ntrain: *p\nval: images\nnames: [a]\n")
    with pytest.raises(UserError, match="alias"):
        read_yaml(y, "dataset yaml")
    # under the node limit, but still not what a class name or a path can be: refused before str() expands it
    cases = {"names: [[a, b], c]\n": "class name 0", "names: [a, {x: 1}]\n": "class name 1",
             f"names: [{'k' * 300}]\n": "300 characters", "names: [a]\ntest: {x: 1}\n": "'test'",
             "names: [a]\npath: [x, y]\n": "'path'"}
    for body, needle in cases.items():
        y.write_text(f"path: {tmp_path}\ntrain: images\nval: images\n{body}")
        with pytest.raises(UserError, match=re.escape(needle)) as e:
            D.check_dataset(y)
        assert len(str(e.value)) < 300
    y.write_text("a: &a [1, *a]\n")  # self-referencing: infinite once expanded
    with pytest.raises(UserError, match="alias"):
        read_yaml(y, "hyp yaml")


# ------------------------------------------------------------------------------------ 5. nothing left to train
@pytest.mark.parametrize("freeze", [["100"], [str(i) for i in range(25)]])
def test_freeze_of_every_layer_is_refused_at_start_up(tiny_data, tmp_path, freeze):
    r = run_cli([TRAIN, "--data", str(tiny_data), *COMMON, "--epochs", "1", "--freeze", *freeze,
                 "--project", str(tmp_path / "runs")], cwd=tmp_path)
    err = one_error(r)
    assert "--freeze" in err and "nothing is left to train" in err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------- 6. huge --imgsz
@pytest.mark.parametrize("args", [["--imgsz", "100000"], ["--imgsz", "40000", "--batch-size", "2"]])
def test_imgsz_beyond_memory_is_one_line(tiny_data, tmp_path, args):
    r = run_cli([TRAIN, "--data", str(tiny_data), *COMMON, "--epochs", "1", *args,
                 "--project", str(tmp_path / "runs")], cwd=tmp_path, timeout=120)
    err = one_error(r)
    assert f"--imgsz {args[1]}" in err and "GiB" in err
    assert not (tmp_path / "runs").exists()


def test_batch_memory_need_grows_with_size_batch_and_workers():
    base = D.batch_memory_need(640, 16, 8)
    assert base < 2**30  # the default setting is never refused
    assert D.batch_memory_need(1280, 16, 8) > base and D.batch_memory_need(640, 32, 8) > base
    assert D.batch_memory_need(640, 16, 9) > base
    assert D.available_memory() is None or D.available_memory() > 0


# ------------------------------------------------------------------------------------------ 7, 8. BOMs
@pytest.mark.parametrize("text", [b"0 0.5 0.5 0.2 0.2\n3 0.25 0.25 0.1 0.1\n",
                                  b"1 0.1 0.2 0.5 0.2 0.3 0.6\r\n2 0.8 0.8 0.1 0.1\r\n"])
def test_label_file_with_a_bom_keeps_its_first_row(tmp_path, caplog, text):
    caplog.set_level(logging.WARNING, logger="yolov5kd")
    write_jpg(tmp_path / "images" / "a.jpg", solid(32, 32))
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_bytes(BOM + text)
    ds = D.LoadImagesAndLabels(tmp_path / "images", D.DataSettings(imgsz=32, nc=4))
    assert len(ds.labels[0]) == 2 and not _warnings(caplog)


@pytest.mark.parametrize("relative", [False, True])
def test_image_list_with_a_bom_keeps_its_first_image(tmp_path, relative):
    for name in ("b", "c"):
        write_jpg(tmp_path / "images" / f"{name}.jpg", solid(32, 32))
    lines = [f"./images/{n}.jpg" if relative else str(tmp_path / "images" / f"{n}.jpg") for n in ("b", "c")]
    lst = tmp_path / "train.txt"
    lst.write_bytes(BOM + "\n".join(lines).encode())
    assert [Path(f).name for f in D.list_images(lst)] == ["b.jpg", "c.jpg"]


# ---------------------------------------------------------------------------- 9. a label path that is a folder
def test_label_path_that_is_a_folder_means_background_as_documented(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="yolov5kd")
    write_jpg(tmp_path / "images" / "a.jpg", solid(32, 32))
    write_jpg(tmp_path / "images" / "b.jpg", solid(32, 32))
    (tmp_path / "labels" / "a.txt").mkdir(parents=True)
    write_label(tmp_path / "labels" / "b.txt", "1 0.5 0.5 0.2 0.2\n")
    ds = D.LoadImagesAndLabels(tmp_path / "images", D.DataSettings(imgsz=32, nc=4))
    assert [Path(f).name for f in ds.im_files] == ["a.jpg", "b.jpg"]
    assert ds.labels[0].shape == (0, 5) and len(ds.labels[1]) == 1
    warn = [m for m in _warnings(caplog) if "a.txt" in m]
    assert len(warn) == 1 and "background" in warn[0]
    # data/README.md says the same as the code
    row = next(ln for ln in (ROOT / "data" / "README.md").read_text().splitlines()
               if ln.startswith("| label path is a directory"))
    here = row.split("|")[3]
    assert "background" in here and "skipped" not in here and "corrupt" not in here


# ------------------------------------------------------------------------------------- 10. messages and modes
def test_state_dict_refusal_is_short(tmp_path):
    ck = torch_load(ROOT / "tests" / "fixtures" / "student.pt")
    sd = ck["model"].float().state_dict()
    torch.save(sd, tmp_path / "sd.pt")
    with pytest.raises(UserError) as e:
        model_from_ckpt(torch_load(tmp_path / "sd.pt"), tmp_path / "sd.pt")
    msg = str(e.value)
    assert len(msg) < 300 and "state_dict" in msg and f"{len(sd)} tensors" in msg
    # variant: a dict of many other keys names a few of them and how many there are
    with pytest.raises(UserError) as e:
        model_from_ckpt({f"k{i}": i for i in range(60)}, "other.pt")
    assert len(str(e.value)) < 300 and "(60 keys)" in str(e.value)


@pytest.mark.parametrize("cut", [0.5, 0.01])
def test_truncated_checkpoint_message_is_whole(tmp_path, cut):
    data = (ROOT / "tests" / "fixtures" / "student.pt").read_bytes()
    f = tmp_path / "cut.pt"
    f.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(UserError) as e:
        torch_load(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}: truncated or not a torch checkpoint (") and msg.endswith(")")
    inner = msg[msg.index("(") + 1:-1]
    assert len(msg) < 300 and not inner.endswith((" is", " file", " the", " a"))


def test_truncated_message_variant_long_error_text():
    from utils.training.checkpoint import _first_line
    long_one = RuntimeError("word " * 80)
    out = _first_line(long_one)
    assert out.endswith(" ...") and len(out) <= 170 and "word wor ..." not in out
    assert _first_line(RuntimeError("First part. Second part that goes on.")) == "First part"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("flag", ["cuda:0", "CUDA:1", "0,1"])
def test_device_message_names_the_flag_as_given(flag):
    with pytest.raises(UserError) as e:
        select_device(flag)
    assert str(e.value).startswith(f"--device {flag}: CUDA is not available")


def test_device_that_is_no_device_is_refused():
    with pytest.raises(UserError, match="--device gpu: not a device"):
        select_device("gpu")


def test_evolve_outputs_get_the_runs_file_mode(tmp_path):
    from utils.training.evolve import METRIC_KEYS, write_best_hyp, write_rows
    m = os.umask(0)
    os.umask(m)
    want = 0o666 & ~m
    write_rows(tmp_path / "evolve.csv", ["generation", "fitness"], [{"generation": 0, "fitness": 0.5}])
    base = read_yaml(ROOT / "data" / "hyps" / "hyp.scratch-low.yaml", "hyp")
    write_best_hyp(tmp_path / "hyp_evolve.yaml", base, 
                   [{**base, **dict.fromkeys(METRIC_KEYS, 0.1), "generation": 0, "fitness": 0.5}], ["lr0"], 1)
    for f in ("evolve.csv", "hyp_evolve.yaml"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == want, f
    # variant: any atomic write, text or a writer's bytes
    atomic_write(tmp_path / "x.bin", lambda fh: fh.write(b"abc"))
    assert stat.S_IMODE((tmp_path / "x.bin").stat().st_mode) == want and (tmp_path / "x.bin").read_bytes() == b"abc"
    assert not list(tmp_path.glob(".*.tmp"))
