"""Official weights and dataset archives by name (utils/core/download.py), against a local server on 127.0.0.1:
download with progress, an interrupted download and its retry, an HTML page refused, the offline line, names
that are never fetched, and zip datasets that are unpacked whole or not at all."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from asset_server import CKPT, WEIGHTS_PATH, Route
from conftest import DEMO_NAMES
from data_helpers import zip_folder
from utils.core import download as dl
from utils.core.errors import UserError
from utils.training.checkpoint import model_from_ckpt, torch_load




def _left(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_official_names_cover_the_v7_detection_checkpoints():
    assert set(dl.OFFICIAL_WEIGHTS) == {f"yolov5{s}{p}.pt" for s in "nsmlx" for p in ("", "6")}


def test_base_url_default_and_override(monkeypatch):
    monkeypatch.delenv(dl.ASSETS_URL_ENV, raising=False)
    url = dl.official_weights_url("yolov5s.pt")
    assert url == "https://github.com/ultralytics/yolov5/releases/download/v7.0/yolov5s.pt"
    monkeypatch.setenv(dl.ASSETS_URL_ENV, "http://mirror.local/assets/")
    assert dl.official_weights_url("yolov5x6.pt") == "http://mirror.local/assets/v7.0/yolov5x6.pt"


def test_an_official_name_is_downloaded_with_progress_and_loads_safely(server, tmp_path, capsys):
    server.routes[WEIGHTS_PATH] = Route(CKPT)
    dl.ensure_weights("yolov5n.pt")
    assert (tmp_path / "yolov5n.pt").read_bytes() == CKPT and _left(tmp_path) == ["yolov5n.pt"]
    assert "Downloading yolov5n.pt" in capsys.readouterr().err  # tqdm's bar
    model = model_from_ckpt(torch_load(tmp_path / "yolov5n.pt"), tmp_path / "yolov5n.pt")  # weights_only + allow-list
    assert type(model).__name__ == "DetectionModel"
    dl.ensure_weights("yolov5n.pt")  # present now: not fetched again
    assert server.hits[WEIGHTS_PATH] == 1


def test_other_names_are_never_downloaded(server, tmp_path):
    server.routes["/v7.0/mine.pt"] = Route(CKPT)
    for name in ("mine.pt", "yolov5n-cls.pt", "sub/yolov5n.pt", "./yolov5n.pt", "", None):
        dl.ensure_weights(name)
    assert not server.hits and _left(tmp_path) == []


def test_an_interrupted_download_is_retried(server, tmp_path, caplog):
    server.routes[WEIGHTS_PATH] = Route(CKPT, cut_after=500_000, cut_times=1)
    with caplog.at_level("WARNING", logger="yolov5kd"):
        dl.ensure_weights("yolov5n.pt")
    assert "download failed (the connection closed" in caplog.text and "retrying" in caplog.text
    assert server.hits[WEIGHTS_PATH] == 2 and (tmp_path / "yolov5n.pt").read_bytes() == CKPT
    assert _left(tmp_path) == ["yolov5n.pt"]  # no partial file left behind


def test_a_download_that_keeps_failing_leaves_nothing(server, tmp_path):
    server.routes[WEIGHTS_PATH] = Route(CKPT, cut_after=500_000)
    with pytest.raises(UserError) as e:
        dl.ensure_weights("yolov5n.pt")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("yolov5n.pt: could not download the official YOLOv5 checkpoint from")
    assert f"{server.url}/v7.0/yolov5n.pt" in msg and "connection closed" in msg
    assert _left(tmp_path) == []


def test_an_html_page_is_refused(server, tmp_path):
    server.routes[WEIGHTS_PATH] = Route(html=True)
    with pytest.raises(UserError, match="the server sent an HTML page, not the file"):
        dl.ensure_weights("yolov5n.pt")
    assert _left(tmp_path) == []


@pytest.mark.parametrize("body,why", [(b"x" * 1000, "only 1000 bytes arrived"),
                                      (b"\x00" * 200_000, "not a PyTorch checkpoint")], ids=["small", "not-a-zip"])
def test_small_or_foreign_files_are_refused(server, tmp_path, body, why):
    server.routes[WEIGHTS_PATH] = Route(body)
    with pytest.raises(UserError, match=why):
        dl.ensure_weights("yolov5n.pt")
    assert _left(tmp_path) == []


def test_offline_is_one_line_naming_the_file_and_where_to_get_it(server, tmp_path, monkeypatch):
    monkeypatch.setenv(dl.OFFLINE_ENV, "1")
    with pytest.raises(UserError) as e:
        dl.ensure_weights("yolov5s.pt")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("yolov5s.pt: the official YOLOv5 checkpoint is not here and YOLO_OFFLINE")
    assert f"{server.url}/v7.0/yolov5s.pt" in msg and not server.hits
    monkeypatch.delenv(dl.OFFLINE_ENV)
    monkeypatch.setenv(dl.ASSETS_URL_ENV, "http://127.0.0.1:9")  # nothing listens there: no network
    with pytest.raises(UserError, match=r"yolov5s.pt: could not download .* \(no connection: "):
        dl.ensure_weights("yolov5s.pt")
    assert _left(tmp_path) == []


# ------------------------------------------------------------------------------------------------------ datasets
def _dataset_zip(tmp_path: Path, top: str = "tinyset") -> bytes:
    """A zip of a few demo images in YOLOv5's layout, under one folder `top` (as coco128.zip is)."""
    from data.scripts.generate_shapes import generate

    src = tmp_path / "src"
    generate(src, n_train=4, n_val=2, seed=1, imgsz=64)
    return zip_folder(src, top)


def _yaml(tmp_path: Path, url: str) -> Path:
    f = tmp_path / "tinyset.yaml"
    f.write_text(f"path: {tmp_path / 'datasets' / 'tinyset'}\ntrain: images/train\nval: images/val\n"
                 f"names: {DEMO_NAMES}\ndownload: {url}\n")
    return f


def test_a_zip_dataset_is_fetched_and_unpacked_to_its_path(server, tmp_path):
    from utils.data.datasets import check_dataset

    server.routes["/data/tinyset.zip"] = Route(_dataset_zip(tmp_path))
    d = check_dataset(_yaml(tmp_path, f"{server.url}/data/tinyset.zip"))
    root = tmp_path / "datasets" / "tinyset"
    assert Path(d.val) == root / "images" / "val" and len(list((root / "images" / "val").glob("*"))) == 2
    assert _left(tmp_path / "datasets") == ["tinyset"]  # the zip and the unpacking folder are gone
    check_dataset(_yaml(tmp_path, f"{server.url}/data/tinyset.zip"))
    assert server.hits["/data/tinyset.zip"] == 1  # found the second time


def test_a_broken_archive_is_never_taken_for_the_dataset(server, tmp_path):
    from utils.data.datasets import check_dataset

    good = bytearray(_dataset_zip(tmp_path))
    good[200:260] = b"\xff" * 60  # a corrupted member: its CRC no longer matches
    server.routes["/data/tinyset.zip"] = Route(bytes(good))
    with pytest.raises(UserError, match="broken zip archive"):
        check_dataset(_yaml(tmp_path, f"{server.url}/data/tinyset.zip"))
    assert _left(tmp_path / "datasets") == []
    server.routes["/data/tinyset.zip"] = Route(_dataset_zip(tmp_path)[:5000], cut_after=None)  # cut short: not a zip
    with pytest.raises(UserError, match="not a zip archive"):
        check_dataset(_yaml(tmp_path, f"{server.url}/data/tinyset.zip"))
    assert _left(tmp_path / "datasets") == []


def test_a_dataset_offline_is_one_line_naming_the_url(server, tmp_path, monkeypatch):
    from utils.data.datasets import check_dataset

    monkeypatch.setenv(dl.OFFLINE_ENV, "1")
    with pytest.raises(UserError) as e:
        check_dataset(_yaml(tmp_path, f"{server.url}/data/tinyset.zip"))
    assert "\n" not in str(e.value) and f"{server.url}/data/tinyset.zip" in str(e.value) and not server.hits


def test_a_member_outside_the_folder_is_refused(server, tmp_path):
    from utils.data.datasets import check_dataset

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../evil.txt", "x")
    server.routes["/data/tinyset.zip"] = Route(buf.getvalue())
    with pytest.raises(UserError, match="outside the dataset folder"):
        check_dataset(_yaml(tmp_path, f"{server.url}/data/tinyset.zip"))
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "datasets" / "evil.txt").exists()


def test_the_shipped_official_yamls():
    from utils.core.config import read_yaml
    from conftest import ROOT

    coco128, coco, voc = (read_yaml(ROOT / "data" / f, f) for f in ("coco128.yaml", "coco.yaml", "VOC.yaml"))
    assert coco128["download"] == "https://ultralytics.com/assets/coco128.zip"
    assert coco128["path"] == "../datasets/coco128" and coco128["train"] == coco128["val"] == "images/train2017"
    for d in (coco128, coco):
        assert len(d["names"]) == 80 and d["names"][0] == "person" and d["names"][79] == "toothbrush"
    assert (coco["train"], coco["val"]) == ("train2017.txt", "val2017.txt")
    assert len(voc["names"]) == 20 and voc["names"][0] == "aeroplane" and voc["names"][19] == "tvmonitor"
    assert voc["val"] == ["images/test2007"] and len(voc["train"]) == 4
    for d in (coco, voc):  # a shipped script, never code inside the yaml
        script = d["download"].split()[1]
        assert d["download"].startswith("python data/scripts/") and (ROOT / script).is_file()


def test_voc_xml_converts_to_yolo_lines():
    from data.scripts.get_voc import voc_to_yolo  # the installed package: no sys.path edit

    xml = """<annotation><size><width>500</width><height>400</height><depth>3</depth></size>
      <object><name>dog</name><difficult>0</difficult><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>111</xmax>
      <ymax>221</ymax></bndbox></object>
      <object><name>cat</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>
      <ymax>5</ymax></bndbox></object>
      <object><name>unicorn</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>
      <ymax>5</ymax></bndbox></object></annotation>"""
    # centre (61 - 1) / 500, (121 - 1) / 400; size 100 / 500, 200 / 400; the difficult cat and the unicorn are left out
    assert voc_to_yolo(xml) == ["11 0.120000 0.300000 0.200000 0.500000"]
