"""A new YOLOv5 user's first command, typed the YOLOv5 way, against a local asset server: the official weights
and the dataset are fetched by name and a short training runs; offline, each CLI fails in one line."""
from asset_server import AssetServer, Route
from conftest import DEMO_NAMES, FIXTURES, ROOT, one_error, run_cli
from data_helpers import zip_folder
from utils.reporting.loggers import read_results_csv


def _served_dataset(tmp_path) -> bytes:
    from data.scripts.generate_shapes import generate

    src = tmp_path / "src"
    generate(src, n_train=8, n_val=4, seed=2, imgsz=64)
    for f in src.rglob("*.txt"):  # the four classes of the served checkpoint's head
        f.write_text("".join(ln + "\n" for ln in f.read_text().splitlines() if int(ln.split()[0]) < 4))
    return zip_folder(src, "served")


def test_first_command_downloads_weights_and_data_then_trains(tmp_path):
    with AssetServer() as s:
        s.routes["/v7.0/yolov5n.pt"] = Route((FIXTURES / "student.pt").read_bytes())
        s.routes["/datasets/served.zip"] = Route(_served_dataset(tmp_path))
        data = tmp_path / "served.yaml"
        data.write_text(f"path: {tmp_path / 'datasets' / 'served'}\ntrain: images/train\nval: images/val\n"
                        f"names: {DEMO_NAMES[:4]}\ndownload: {s.url}/datasets/served.zip\n")
        env = {"YOLOV5KD_ASSETS_URL": s.url, "YOLO_OFFLINE": ""}
        r = run_cli([str(ROOT / "train.py"), "--data", str(data), "--weights", "yolov5n.pt", "--imgsz", "64",
                     "--batch-size", "4", "--epochs", "1", "--workers", "0", "--noplots", "--noautoanchor",
                     "--project", str(tmp_path / "runs"), "--name", "first"], cwd=tmp_path, env_extra=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (tmp_path / "yolov5n.pt").is_file() and s.hits["/v7.0/yolov5n.pt"] == 1  # into the working dir
        assert "Transferred" in r.stderr and "dataset unpacked to" in r.stderr and "Downloading yolov5n.pt" in r.stderr
        assert read_results_csv(tmp_path / "runs" / "first" / "results.csv")["epoch"] == [0]
        # val.py by name too; the file is local now, so nothing more is fetched
        r = run_cli([str(ROOT / "val.py"), "--data", str(data), "--weights", "yolov5n.pt", "--imgsz", "64",
                     "--workers", "0", "--project", str(tmp_path / "val")], cwd=tmp_path, env_extra=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert s.hits["/v7.0/yolov5n.pt"] == 1


def test_offline_the_yolov5_way_fails_in_one_line(tmp_path):
    env = {"YOLO_OFFLINE": "1"}
    r = run_cli([str(ROOT / "train.py"), "--data", "shapes.yaml", "--weights", "yolov5n.pt", "--t_weights",
                 "yolov5s.pt", "--epochs", "1"], cwd=tmp_path, env_extra=env)
    err = one_error(r)
    assert "yolov5n.pt" in err and "releases/download/v7.0/yolov5n.pt" in err and "YOLO_OFFLINE" in err
    r = run_cli([str(ROOT / "val.py"), "--data", "shapes.yaml"], cwd=tmp_path, env_extra=env)  # default yolov5s.pt
    assert "yolov5s.pt" in one_error(r)
    r = run_cli([str(ROOT / "val.py"), "--data", "coco128.yaml", "--weights", str(FIXTURES / "student.pt")],
                cwd=tmp_path, env_extra=env)
    err = one_error(r)
    assert "coco128" in err and "https://ultralytics.com/assets/coco128.zip" in err
    # a shipped download script (coco.yaml's) reports its own one line; train.py adds no second one
    r = run_cli([str(ROOT / "train.py"), "--data", "coco.yaml", "--weights", str(FIXTURES / "student.pt"), "--epochs",
                 "1"], cwd=tmp_path, env_extra=env)
    err = one_error(r)
    assert "coco2017labels.zip" in err and "releases/download/v1.0/coco2017labels.zip" in err and "coco.yaml" in err
    assert list(tmp_path.iterdir()) == []  # nothing written
