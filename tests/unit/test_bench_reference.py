"""benchmarks/bench_reference.py: the pieces that do not need a reference checkout."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

import bench_reference


def test_data_yaml_gets_an_absolute_path_and_no_download(tmp_path: Path) -> None:
    src = tmp_path / "d.yaml"
    src.write_text("path: datasets/shapes\ntrain: images/train\nval: images/val\nnames:\n  0: a\n"
                   "download: data/scripts/generate_shapes.py\n")
    out = yaml.safe_load(bench_reference.absolute_data_yaml(src, tmp_path / "abs.yaml").read_text())
    assert out["path"] == str((ROOT / "datasets/shapes").resolve())
    assert "download" not in out
    assert out["train"] == "images/train" and out["names"] == {0: "a"}


def test_both_trainers_get_the_same_job_arguments() -> None:
    args = bench_reference.job_args("d.yaml", 320, 16, 2, 2, "/p", "n")
    assert args[args.index("--weights") + 1] == ""  # from scratch on both sides
    assert args[args.index("--imgsz") + 1] == "320" and args[args.index("--epochs") + 1] == "2"
    assert "--noplots" in args


@pytest.mark.e2e
def test_a_folder_without_train_py_is_refused_in_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_reference.py"), "--reference", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "no train.py there" in r.stderr and "Traceback" not in r.stderr
