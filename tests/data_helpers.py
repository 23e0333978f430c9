"""Small helpers shared by the data-pipeline tests: tiny images, label files, the generator module."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_generator():
    """Import data/scripts/generate_shapes.py (data/ is not a package)."""
    spec = importlib.util.spec_from_file_location("generate_shapes", ROOT / "data" / "scripts" / "generate_shapes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def solid(h: int, w: int, bgr=(40, 80, 160)) -> np.ndarray:
    im = np.empty((h, w, 3), np.uint8)
    im[:] = bgr
    return im


def write_jpg(path: Path, im: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())
    return buf.tobytes()


def write_png(path: Path, im: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", im)
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


def write_label(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


class FixedStream:
    """A fixed unlabelled batch, in the UnlabeledStream interface (the distiller draws it every step)."""

    def __init__(self, imgs, labelled_batch: int = 2):
        self.imgs, self.batch_size, self.labelled_batch = imgs, imgs.shape[0], labelled_batch

    def __len__(self) -> int:
        return self.batch_size

    def next_batch(self):
        """The same batch every time."""
        return self.imgs

    def start_epoch(self, epoch: int) -> None:
        """A fixed batch has no shuffle to restart."""


def zip_folder(src: Path, top: str) -> bytes:
    """The files under `src` as a zip archive, under one folder `top` (as YOLOv5's dataset zips are)."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                z.write(f, f"{top}/{f.relative_to(src)}")
    return buf.getvalue()
