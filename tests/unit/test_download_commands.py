"""A dataset yaml's `download:` value never runs as a command (utils/core/download.py dataset_download_plan, used
by check_dataset): only an http(s) URL of a .zip, or a script shipped in data/scripts/ named by its path or name,
may act; anything else is refused in one line naming the yaml and the value, before anything runs, online or
offline. The shipped yamls keep working."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from utils.core import download as dl
from utils.core.config import read_yaml
from utils.core.errors import UserError
from utils.data import datasets as D

BASE = "path: datasets/dl\ntrain: images/train\nval: images/val\nnames: [a]\n"
MAKE_VAL = "from pathlib import Path\nPath('datasets/dl/images/val').mkdir(parents=True)\n"


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A stand-in repository root: data/scripts/ with one harmless script, and hostile scripts around it, each of
    which would create tmp_path/MARKER if it ran."""
    monkeypatch.setattr(D, "ROOT", tmp_path / "repo")
    scripts = tmp_path / "repo" / "data" / "scripts"
    scripts.mkdir(parents=True)
    (scripts / "mk.py").write_text(MAKE_VAL)
    touch = f"open({str(tmp_path / 'MARKER')!r}, 'w').close()\n"
    for p in (tmp_path / "repo" / "x.py", tmp_path / "x.py", tmp_path / "repo" / "some" / "file.py",
              scripts / "sub" / "deep.py", tmp_path / "repo" / "data" / "notes.txt"):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(touch)
    (scripts / "link.py").symlink_to(tmp_path / "x.py")  # a link inside the folder to a file outside it
    return tmp_path / "repo"


def _refused(repo: Path, value: str) -> str:
    y = repo / "data" / "dl.yaml"
    y.write_text(BASE + "download: " + value + "\n")
    with pytest.raises(UserError) as e:
        D.check_dataset(y)
    msg = str(e.value)
    written = str(read_yaml(y, "dataset yaml")["download"]).strip()  # the value as the yaml holds it
    assert "\n" not in msg and msg.startswith(f"{y}: refusing download {written!r} (")
    assert "only a .zip URL or a shipped script" in msg and not (repo / "datasets").exists()
    return msg


# the probe's five forms, then variants of our own
HOSTILE = ["bash -c 'touch {m}'", "python -c \"open('{m}', 'w')\"", "{t}/x.py", "data/scripts/../../x.py",
           "python some/file.py",
           "data/scripts/link.py", "data/scripts/sub/deep.py", "python3 -m x", "data/scripts/mk.py; touch {m}",
           "/bin/sh -c 'touch {m}'", "python data/scripts/../../x.py --out datasets/dl", "data/notes.txt",
           "'{m}'", "sh", "python", "data/scripts/mk.py 'unclosed", "file://{t}/x.zip", "ftp://example.com/x.zip",
           "https://example.com/get.sh", "https://example.com/x.zip && touch {m}", "|\n  open('{m}', 'w')"]


@pytest.mark.parametrize("offline", [False, True], ids=["online", "offline"])
@pytest.mark.parametrize("form", HOSTILE)
def test_a_hostile_download_value_is_refused_before_anything_runs(repo, tmp_path, monkeypatch, form, offline):
    monkeypatch.setenv(dl.OFFLINE_ENV, "1" if offline else "")
    value = form.format(m=tmp_path / "MARKER", t=tmp_path)
    _refused(repo, value)
    assert not (tmp_path / "MARKER").exists()


def test_the_refusal_names_the_value_and_the_reason(repo, tmp_path):
    msg = _refused(repo, "data/scripts/../../x.py")
    assert "'data/scripts/../../x.py'" in msg and "data/scripts/../../x.py is not a script in data/scripts/" in msg
    assert "not of a .zip" in _refused(repo, "https://example.com/get.sh")
    assert "code, and no code in a yaml is run" in _refused(repo, "|\n  import os\n  os.system('x')")


@pytest.mark.parametrize("form", ["data/scripts/mk.py", "python data/scripts/mk.py", "python3 data/scripts/mk.py",
                                  "mk.py", "{r}/data/scripts/mk.py", "data/scripts/../scripts/mk.py"])
def test_a_shipped_script_runs_by_path_or_name(repo, form):
    y = repo / "data" / "dl.yaml"
    y.write_text(BASE + "download: " + form.format(r=repo) + "\n")
    assert Path(D.check_dataset(y).val).is_dir()


def test_a_shipped_script_gets_its_arguments_as_words_with_no_shell(repo, tmp_path):
    (repo / "data" / "scripts" / "args.py").write_text(
        "import sys\nfrom pathlib import Path\nPath('datasets/dl/images/val').mkdir(parents=True)\n"
        "Path('datasets/dl/args.txt').write_text('|'.join(sys.argv[1:]))\n")
    y = repo / "data" / "dl.yaml"
    y.write_text(BASE + f"download: python data/scripts/args.py --out 'a b' $(touch {tmp_path / 'MARKER'}) ;x\n")
    D.check_dataset(y)
    assert (repo / "datasets" / "dl" / "args.txt").read_text() == f"--out|a b|$(touch|{tmp_path / 'MARKER'})|;x"
    assert not (tmp_path / "MARKER").exists()


def test_a_failing_shipped_script_is_one_line(repo):
    (repo / "data" / "scripts" / "fail.py").write_text("import sys\nsys.exit(3)\n")
    y = repo / "data" / "dl.yaml"
    y.write_text(BASE + "download: data/scripts/fail.py --x\n")
    with pytest.raises(UserError, match=r"download script failed with exit code 3: data/scripts/fail.py --x$"):
        D.check_dataset(y)


def test_every_shipped_yaml_download_is_allowed():
    for y in sorted((ROOT / "data").glob("*.yaml")):
        value = read_yaml(y, "dataset yaml").get("download")
        if value is None:
            continue
        plan = dl.dataset_download_plan(str(value), ROOT, y, ROOT / "datasets")
        if isinstance(plan, str):
            assert plan.startswith("https://") and plan.endswith(".zip"), y
        else:
            assert Path(plan[0]).parent == ROOT / "data" / "scripts" and Path(plan[0]).is_file(), y


def test_a_shipped_demo_yaml_form_generates_offline(tmp_path, monkeypatch):
    # data/shapes16.yaml's form, with a tiny output: the real data/scripts/generate_shapes.py runs, offline
    monkeypatch.setenv(dl.OFFLINE_ENV, "1")
    y = tmp_path / "tiny.yaml"
    y.write_text(f"path: {tmp_path / 'tiny'}\ntrain: images/train\nval: images/val\nnames: {list('abcdefgh')}\n"
                 f"download: python data/scripts/generate_shapes.py --n-train 1 --n-val 1 --imgsz 32 "
                 f"--out {tmp_path / 'tiny'}\n")
    d = D.check_dataset(y)
    assert len(list(Path(d.val).glob("*"))) == 1


def test_the_data_scripts_import_the_installed_packages(tmp_path):
    for f in ("get_coco.py", "get_voc.py", "generate_shapes.py"):
        assert "sys.path" not in (ROOT / "data" / "scripts" / f).read_text()
    r = subprocess.run([sys.executable, str(ROOT / "data" / "scripts" / "get_voc.py"), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "usage" in r.stdout, r.stderr
