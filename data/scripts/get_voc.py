#!/usr/bin/env python
"""Fetch PASCAL VOC 2007 + 2012 from YOLOv5's v1.0 release assets and convert it to YOLOv5's layout:
images/<set><year>/*.jpg beside labels/<set><year>/*.txt (class x y w h, normalised). Run by train.py / val.py
when data/VOC.yaml's val images are missing."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from utils.core.download import assets_base, download_zip_dataset
from utils.core.errors import UserError, report

ROOT = Path(__file__).resolve().parents[2]

ZIPS = ("VOCtrainval_06-Nov-2007.zip", "VOCtest_06-Nov-2007.zip", "VOCtrainval_11-May-2012.zip")
SETS = (("2012", "train"), ("2012", "val"), ("2007", "train"), ("2007", "val"), ("2007", "test"))
NAMES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
         "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def voc_to_yolo(xml_text: str) -> list[str]:
    """One VOC annotation as YOLO label lines 'class x y w h' (normalised); objects marked difficult, or of a
    class outside the 20, are left out, as YOLOv5 does."""
    root = ET.fromstring(xml_text)
    size = root.find("size")
    w, h = float(size.find("width").text), float(size.find("height").text)
    lines = []
    for obj in root.iter("object"):
        name = obj.find("name").text.strip()
        difficult = obj.find("difficult")
        if name not in NAMES or (difficult is not None and int(difficult.text) == 1):
            continue
        b = obj.find("bndbox")
        x1, x2, y1, y2 = (float(b.find(k).text) for k in ("xmin", "xmax", "ymin", "ymax"))
        # VOC pixel coordinates start at 1: the centre moves back by one pixel
        box = ((x1 + x2) / 2 - 1) / w, ((y1 + y2) / 2 - 1) / h, (x2 - x1) / w, (y2 - y1) / h
        lines.append(f"{NAMES.index(name)} " + " ".join(f"{v:.6f}" for v in box))
    return lines


def convert(devkit: Path, out: Path) -> None:
    """Move each set's images out of VOCdevkit and write their label files beside them."""
    for year, image_set in SETS:
        voc = devkit / f"VOC{year}"
        ids = (voc / "ImageSets" / "Main" / f"{image_set}.txt").read_text().split()
        imgs, labels = out / "images" / f"{image_set}{year}", out / "labels" / f"{image_set}{year}"
        imgs.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for i in ids:
            lines = voc_to_yolo((voc / "Annotations" / f"{i}.xml").read_text())
            (labels / f"{i}.txt").write_text("".join(f"{ln}\n" for ln in lines))
            os.replace(voc / "JPEGImages" / f"{i}.jpg", imgs / f"{i}.jpg")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT.parent / "datasets" / "VOC", help="dataset root")
    a = ap.parse_args(argv)
    out = a.out.resolve()
    devkit = out / "VOCdevkit"
    try:
        for name in ZIPS:  # each zip holds VOCdevkit/VOC<year>/...; unpacked into one tree
            download_zip_dataset(f"{assets_base()}/v1.0/{name}", devkit, "VOC.yaml")
        convert(devkit, out)
    except UserError as e:
        return report(e)
    shutil.rmtree(devkit, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
