"""train.py and val.py with a dataset yaml whose `download:` is a command, its val folder missing, offline as
the probe ran them: one ERROR line naming the yaml and the value, exit 2, and the command never ran."""
from conftest import FIXTURES, ROOT, one_error, run_cli


def test_a_download_command_never_runs_from_either_cli(tmp_path):
    marker = tmp_path / "MARKER"
    env = {"YOLO_OFFLINE": "1"}
    for cli, value in (("val.py", f"bash -c 'touch {marker}'"), ("train.py", f"python -c \"open('{marker}', 'w')\"")):
        data = tmp_path / f"hostile_{cli[:-3]}.yaml"
        data.write_text(f"path: {tmp_path / 'ds'}\ntrain: images/train\nval: images/val\nnames: [a]\n"
                        f"download: {value}\n")
        r = run_cli([str(ROOT / cli), "--data", str(data), "--weights", str(FIXTURES / "student.pt"), "--imgsz", "64",
                     "--project", str(tmp_path / "runs")], cwd=tmp_path, env_extra=env, timeout=300)
        err = one_error(r)
        assert f"{data}: refusing download " in err and "only a .zip URL or a shipped script" in err
        assert not marker.exists()
