#!/usr/bin/env python
"""Fetch COCO 2017 in YOLOv5's layout: YOLOv5's label zip (labels/ and the image lists), then the COCO site's
image zips into images/. Run by train.py / val.py when data/coco.yaml's val images are missing."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.core.download import assets_base, download_zip_dataset
from utils.core.errors import UserError, report

ROOT = Path(__file__).resolve().parents[2]

IMAGES_URL = "http://images.cocodataset.org/zips"
SPLITS = ("train2017", "val2017", "test2017")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT.parent / "datasets" / "coco", help="dataset root")
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="image zips to fetch")
    a = ap.parse_args(argv)
    out = a.out.resolve()
    try:
        if not (out / "labels").exists():
            download_zip_dataset(f"{assets_base()}/v1.0/coco2017labels.zip", out, "coco.yaml")
        for split in a.splits:
            if not (out / "images" / split).exists():
                (out / "images").mkdir(parents=True, exist_ok=True)
                download_zip_dataset(f"{IMAGES_URL}/{split}.zip", out / "images" / split, "coco.yaml")
    except UserError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
