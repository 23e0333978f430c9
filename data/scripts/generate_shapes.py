#!/usr/bin/env python
"""Write the offline 'shapes' demo detection dataset in YOLO format, deterministically.

Eight look-alike classes (circle/ellipse, square/rectangle/diamond, triangle, plus/cross) in random
colours and sizes (about 8-120 px) on noisy gradient backgrounds, with unlabelled clutter (outlines,
polygons, lines) and partial occlusion. Same arguments -> byte-identical files. Needs only numpy and
OpenCV; never touches the network.

    python data/scripts/generate_shapes.py [--out datasets/shapes] [--n-train 1000] [--n-val 200] [--seed 0]

`--variant many` draws 16 classes instead (the eight above plus pentagon, hexagon, star, ring, frame,
parallelogram, trapezoid, semicircle; objects from 16 px; clutter without filled polygons or outlines,
which are classes there): a capacity-bound version for the demo-data pilot in docs/experiments/2026-12-04-data-v4-pilot/data_v4_pilot.md.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["circle", "ellipse", "square", "rectangle", "diamond", "triangle", "plus", "cross"]
MANY_NAMES = NAMES + ["pentagon", "hexagon", "star", "ring", "frame", "parallelogram", "trapezoid", "semicircle"]
VARIANTS = {"v2": NAMES, "many": MANY_NAMES}
FORMAT_VERSION = 2  # 2: 256 px images, objects 12-96 px (1: 320 px, 8-120 px)
JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_OPTIMIZE, 0, cv2.IMWRITE_JPEG_PROGRESSIVE, 0]
SHIFT = 4  # fixed-point bits for cv2.fillPoly: sub-pixel outlines
ONE = 1 << SHIFT
# Objects of at least 12 px: below that the look-alike classes cannot be told apart at 256 px, and
# learning them only slows every model down without separating a strong model from a weak one.
MIN_SIZE, MAX_SIZE = 12.0, 96.0
MANY_MIN_SIZE = 16.0  # pentagon against hexagon needs a few more pixels than circle against ellipse
DEFAULT_IMGSZ = 256


def _rot(pts: np.ndarray, deg: float) -> np.ndarray:
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    return pts @ np.array([[c, s], [-s, c]])


def _ellipse(a: float, b: float, deg: float, n: int = 40) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return _rot(np.stack([a * np.cos(t), b * np.sin(t)], 1), deg)


def _rect(w: float, h: float, deg: float) -> np.ndarray:
    return _rot(np.array([[-w, -h], [w, -h], [w, h], [-w, h]], float) / 2, deg)


def _bar_pair(size: float, thick: float, deg: float) -> list[np.ndarray]:
    return [_rect(size, thick, deg), _rect(thick, size, deg)]


def object_polygons(cls: int, size: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Polygons (centred on 0) whose union draws one object of class cls at roughly `size` px."""
    small_tilt = rng.uniform(-8, 8)
    if cls == 0:  # circle
        return [_ellipse(size / 2, size / 2, 0)]
    if cls == 1:  # ellipse: aspect kept clearly above 1 but close enough to confuse with a circle
        return [_ellipse(size / 2, size / 2 / rng.uniform(1.45, 2.0), rng.uniform(0, 180))]
    if cls == 2:  # square, nearly axis-aligned
        side = size / math.sqrt(2) * 1.2
        return [_rect(side, side, small_tilt)]
    if cls == 3:  # rectangle, either orientation
        long = size
        deg = small_tilt + (90 if rng.random() < 0.5 else 0)
        return [_rect(long, long / rng.uniform(1.5, 2.4), deg)]
    if cls == 4:  # diamond: a square stood on its corner
        side = size / math.sqrt(2)
        return [_rect(side, side, 45 + small_tilt)]
    if cls == 5:  # triangle, any rotation
        r = size / 2
        t = np.radians(rng.uniform(0, 360) + np.array([0, 120, 240]))
        return [np.stack([r * np.cos(t), r * np.sin(t)], 1)]
    if cls == 6:  # plus
        return _bar_pair(size, size * rng.uniform(0.22, 0.32), small_tilt)
    if cls == 7:  # cross: a plus turned by 45 degrees
        return _bar_pair(size, size * rng.uniform(0.22, 0.32), 45 + small_tilt)
    return _many_polygons(cls, size, rng)


def _regular(m: int, r: float, deg: float, inner: float = 1.0) -> np.ndarray:
    """A regular m-gon (or, with inner < 1, an m-pointed star) of circumradius r turned by deg."""
    k = 2 * m if inner < 1 else m
    t = np.radians(deg) + np.linspace(0, 2 * math.pi, k, endpoint=False)
    rad = np.full(k, r)
    rad[1::2] *= inner if inner < 1 else 1.0
    return np.stack([rad * np.cos(t), rad * np.sin(t)], 1)


def _many_polygons(cls: int, size: float, rng: np.random.Generator) -> list[np.ndarray]:
    """The classes only `--variant many` has; a list of two polygons is a shape with a hole (even-odd fill)."""
    r, deg = size / 2, rng.uniform(0, 360)
    if cls == 8:  # pentagon: round-ish, a look-alike of circle and hexagon
        return [_regular(5, r, deg)]
    if cls == 9:  # hexagon
        return [_regular(6, r, deg)]
    if cls == 10:  # five-pointed star
        return [_regular(5, r, deg, inner=rng.uniform(0.4, 0.55))]
    if cls == 11:  # ring: a circle with a hole
        q = rng.uniform(0.45, 0.65)
        return [_ellipse(r, r, 0), _ellipse(r * q, r * q, 0)]
    if cls == 12:  # frame: a square with a square hole
        side = size / math.sqrt(2) * 1.2
        tilt = rng.uniform(-8, 8)
        q = rng.uniform(0.45, 0.65)
        return [_rect(side, side, tilt), _rect(side * q, side * q, tilt)]
    if cls == 13:  # parallelogram: a sheared rectangle, either orientation
        w, h = size, size / rng.uniform(1.5, 2.2)
        sh = h * rng.uniform(0.4, 0.7) * (1 if rng.random() < 0.5 else -1)
        pts = np.array([[-w / 2 + sh / 2, -h / 2], [w / 2 + sh / 2, -h / 2], [w / 2 - sh / 2, h / 2],
                        [-w / 2 - sh / 2, h / 2]])
        return [_rot(pts, rng.uniform(-8, 8) + (90 if rng.random() < 0.5 else 0))]
    if cls == 14:  # trapezoid: a rectangle with a narrower top, any rotation
        w, h = size, size / rng.uniform(1.3, 2.0)
        top = w * rng.uniform(0.45, 0.7)
        pts = np.array([[-top / 2, -h / 2], [top / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
        return [_rot(pts, deg)]
    # semicircle, any rotation
    t = np.linspace(0, math.pi, 24)
    return [_rot(np.stack([r * np.cos(t), r * np.sin(t) - r / 2], 1), deg)]


def _background(rng: np.random.Generator, imgsz: int) -> np.ndarray:
    c1, c2 = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    t = np.linspace(0, 1, imgsz)
    ang = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(ang) * t[None, :] + np.sin(ang) * t[:, None])
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-9)
    img = c1 + (c2 - c1) * ramp[..., None]
    # low-frequency blotches
    k = int(rng.integers(3, 9))
    blot = cv2.resize(rng.uniform(-35, 35, (k, k, 3)), (imgsz, imgsz), interpolation=cv2.INTER_CUBIC)
    img += blot
    kind = rng.integers(0, 3)
    if kind == 1:  # faint stripes
        period = rng.uniform(6, 30)
        stripes = np.sin(2 * math.pi * (np.arange(imgsz)[None, :] * math.cos(ang) + np.arange(imgsz)[:, None]
                                         * math.sin(ang)) / period)
        img += rng.uniform(5, 18) * stripes[..., None]
    elif kind == 2:  # faint checkerboard
        cell = int(rng.integers(8, 40))
        yy, xx = np.indices((imgsz, imgsz)) // cell
        img += rng.uniform(5, 18) * (((yy + xx) % 2) * 2 - 1)[..., None]
    return img


HOLED = {11, 12}  # ring and frame: their two polygons are drawn in one even-odd call, which cuts the hole


def _fill(img: np.ndarray, polys: list[np.ndarray], cx: float, cy: float, color, holes: bool = False) -> None:
    pts = [np.round((p + (cx, cy)) * ONE).astype(np.int32) for p in polys]
    for group in ([pts] if holes else [[p] for p in pts]):
        # one call per polygon otherwise: a single multi-polygon call would punch holes where bars cross
        cv2.fillPoly(img, group, color, lineType=cv2.LINE_AA, shift=SHIFT)


def _color(rng: np.random.Generator, avoid: np.ndarray) -> tuple[float, float, float]:
    """A random colour with visible contrast against the local background colour `avoid`."""
    for _ in range(20):
        c = rng.uniform(0, 255, 3)
        if np.abs(c - avoid).sum() > 150:
            break
    return tuple(float(v) for v in c)


def _distractor(img: np.ndarray, rng: np.random.Generator, imgsz: int, max_size: float, many: bool = False) -> None:
    """Unlabelled clutter: outlines, other polygons, lines and dots (only the last three with `many`)."""
    size = float(np.exp(rng.uniform(math.log(6), math.log(max_size))))
    cx, cy = rng.uniform(0, imgsz, 2)
    color = tuple(float(v) for v in rng.uniform(0, 255, 3))
    kind = rng.integers(2, 5) if many else rng.integers(0, 5)
    if kind == 0:  # hollow ring or square outline: same silhouette as an object, but not filled
        poly = _ellipse(size / 2, size / 2, 0) if rng.random() < 0.5 else _rect(size, size, rng.uniform(0, 90))
        pts = np.round((poly + (cx, cy)) * ONE).astype(np.int32)
        cv2.polylines(img, [pts], True, color, int(rng.integers(1, 3)), cv2.LINE_AA, SHIFT)
    elif kind == 1:  # pentagon/hexagon/star: round-ish filled shapes that are not circles
        m = int(rng.integers(5, 7))
        t = np.linspace(0, 2 * math.pi, 2 * m if rng.random() < 0.4 else m, endpoint=False) + rng.uniform(0, 6.3)
        r = np.full(len(t), size / 2)
        if len(t) == 2 * m:
            r[1::2] *= 0.45
        _fill(img, [np.stack([r * np.cos(t), r * np.sin(t)], 1)], cx, cy, color)
    elif kind == 2:  # line
        ang = rng.uniform(0, math.pi)
        d = np.array([math.cos(ang), math.sin(ang)]) * size * 1.5
        p1, p2 = np.round((np.array([cx, cy]) - d) * ONE).astype(int), np.round((np.array([cx, cy]) + d) * ONE).astype(int)
        cv2.line(img, tuple(int(v) for v in p1), tuple(int(v) for v in p2), color, int(rng.integers(1, 4)),
                 cv2.LINE_AA, SHIFT)
    elif kind == 3:  # dots
        for _ in range(int(rng.integers(3, 12))):
            px, py = rng.uniform(0, imgsz, 2)
            cv2.circle(img, (int(px * ONE), int(py * ONE)), int(rng.uniform(1, 3.5) * ONE), color, -1,
                       cv2.LINE_AA, SHIFT)
    else:  # thin rectangle strip (looks like part of a rectangle or a plus arm)
        _fill(img, [_rect(size, max(2.0, size * rng.uniform(0.05, 0.12)), rng.uniform(0, 180))], cx, cy, color)


def _overlaps(box: np.ndarray, boxes: list[np.ndarray]) -> bool:
    """Reject placements that would hide more than ~40% of an earlier object (or vice versa)."""
    for b in boxes:
        iw = min(box[2], b[2]) - max(box[0], b[0])
        ih = min(box[3], b[3]) - max(box[1], b[1])
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        a1 = (box[2] - box[0]) * (box[3] - box[1])
        a2 = (b[2] - b[0]) * (b[3] - b[1])
        if inter > 0.4 * min(a1, a2):
            return True
    return False


def make_image(rng: np.random.Generator, imgsz: int = DEFAULT_IMGSZ,
               variant: str = "v2") -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    """One BGR uint8 image and its labels [(cls, x, y, w, h) normalised]."""
    many = variant == "many"
    names, min_size = VARIANTS[variant], MANY_MIN_SIZE if many else MIN_SIZE
    img = _background(rng, imgsz)
    for _ in range(int(rng.integers(0, 4))):  # clutter behind the objects
        _distractor(img, rng, imgsz, 48, many)
    n_obj = int(rng.integers(0, 9))
    boxes: list[np.ndarray] = []
    labels = []
    for _ in range(n_obj):
        for _attempt in range(10):
            cls = int(rng.integers(0, len(names)))
            size = float(np.exp(rng.uniform(math.log(min_size), math.log(MAX_SIZE))))
            polys = object_polygons(cls, size, rng)
            allp = np.concatenate(polys, 0)
            lo, hi = allp.min(0), allp.max(0)
            if (hi - lo).max() >= imgsz - 2:
                continue
            cx = rng.uniform(-lo[0] + 1, imgsz - hi[0] - 1)
            cy = rng.uniform(-lo[1] + 1, imgsz - hi[1] - 1)
            box = np.array([cx + lo[0], cy + lo[1], cx + hi[0], cy + hi[1]])
            if _overlaps(box, boxes):
                continue
            ix, iy = int(np.clip(cx, 0, imgsz - 1)), int(np.clip(cy, 0, imgsz - 1))
            _fill(img, polys, cx, cy, _color(rng, img[iy, ix]), holes=many and cls in HOLED)
            boxes.append(box)
            x1, y1, x2, y2 = np.clip(box, 0, imgsz) / imgsz
            labels.append((cls, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1))
            break
    for _ in range(int(rng.integers(0, 3))):  # small occluders in front
        _distractor(img, rng, imgsz, 20, many)
    img += rng.normal(0, rng.uniform(2, 9), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), labels


def _complete(out: Path, meta: dict) -> bool:
    try:
        return json.loads((out / ".complete.json").read_text()) == meta
    except (OSError, ValueError):
        return False


def generate(out: Path, n_train: int, n_val: int, seed: int = 0, imgsz: int = DEFAULT_IMGSZ,
             variant: str = "v2") -> Path:
    """Write images/{train,val} and labels/{train,val} under out; skip if already complete."""
    out = Path(out)
    meta = {"version": FORMAT_VERSION, "n_train": n_train, "n_val": n_val, "seed": seed, "imgsz": imgsz,
            "names": VARIANTS[variant]}
    if _complete(out, meta):
        return out
    (out / ".complete.json").unlink(missing_ok=True)
    for split_id, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        im_dir, lb_dir = out / "images" / split, out / "labels" / split
        for d in (im_dir, lb_dir):  # only our own split folders: never wipe anything else under out
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
        (out / "labels" / f"{split}.cache").unlink(missing_ok=True)
        for i in range(n):
            # one stream per image: output does not depend on generation order
            rng = np.random.default_rng([seed, split_id, i])
            img, labels = make_image(rng, imgsz, variant)
            ok, buf = cv2.imencode(".jpg", img, JPEG_PARAMS)
            if not ok:
                raise RuntimeError("JPEG encoding failed")
            stem = f"{split}_{i:05d}"
            (im_dir / f"{stem}.jpg").write_bytes(buf.tobytes())
            (lb_dir / f"{stem}.txt").write_text("".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n"
                                                        for c, x, y, w, h in labels))
    (out / ".complete.json").write_text(json.dumps(meta))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate the offline 'shapes' demo dataset (YOLO format).")
    ap.add_argument("--out", type=Path, default=ROOT / "datasets" / "shapes", help="output folder")
    ap.add_argument("--n-train", type=int, default=1000, help="number of training images")
    ap.add_argument("--n-val", type=int, default=200, help="number of validation images")
    ap.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    ap.add_argument("--imgsz", type=int, default=DEFAULT_IMGSZ, help="image side in pixels")
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="v2",
                    help="v2: the 8 demo classes; many: 16 classes (see the module docstring)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = generate(a.out, a.n_train, a.n_val, a.seed, a.imgsz, a.variant)
    print(f"shapes dataset ready at {out} ({a.n_train} train, {a.n_val} val) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
