"""Image/label verification and the label cache.

Differences from YOLOv5 (deliberate, see data/README.md):
- A bad label row (wrong column count, non-numeric, negative, coordinate > 1, class id negative, not an
  integer or >= nc, zero-size box) is dropped with a warning; the image keeps its good rows instead of
  being discarded.
- Box or polygon is decided per row (5 values: box; odd count >= 7: polygon), so one polygon row does
  not turn the box rows of its file into 2-point polygons.
- A label file that is not UTF-8 marks the image corrupt (skipped): its objects cannot be read,
  and training on it as a background image would teach the model that those objects are background.
- The cache is an .npz archive (no pickle) holding JSON metadata plus flat arrays.

The dataset reads labels through one function, `read_labels` (YOLO .txt files, cached); `read_images` is the
same contract for images without labels. A new label format is one more function of that shape (a `LabelReader`,
set as `DataSettings.reader`).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps

from utils.core.config import atomic_write
from utils.core.errors import UserError

LOGGER = logging.getLogger("yolov5kd")
# bumped whenever the row rules change, so caches built under older rules are rebuilt
CACHE_VERSION = "yolov5kd-labels-3"
IMG_FORMATS = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm")
MIN_SIDE = 10
NUM_THREADS = min(8, max(1, os.cpu_count() or 1))

# lets PIL read truncated JPEGs so they can be restored by re-saving rather than dropped
ImageFile.LOAD_TRUNCATED_IMAGES = True


def img2label_paths(img_paths: Sequence[str]) -> list[str]:
    """Label path for each image: the last /images/ becomes /labels/ and the suffix .txt."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return [sb.join(p.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt" for p in img_paths]


def _one_line(e: object) -> str:
    return " ".join(str(e).split())


def _exif_size(im: Image.Image) -> tuple[int, int]:
    w, h = im.size
    try:
        orientation = im.getexif().get(274)
        if orientation in (6, 8):  # rotated 90/270: stored size is transposed
            w, h = h, w
    except Exception:
        pass
    return w, h


def _parse_rows(text: str, nc: int | None) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """Parse label text into (n, 5) boxes, polygons (only if every kept row is one), and notes on dropped rows."""
    problems: list[str] = []
    boxes, segments = [], []
    for lineno, r in enumerate((ln.split() for ln in text.splitlines()), 1):
        if not r:
            continue
        try:
            vals = np.array(r, dtype=np.float64)
        except ValueError:
            problems.append(f"row {lineno}: non-numeric")
            continue
        if not np.isfinite(vals).all():
            problems.append(f"row {lineno}: not finite")
            continue
        # decided per row: one polygon in a file must not reinterpret its box rows
        is_polygon = len(vals) >= 7 and len(vals) % 2 == 1
        if len(vals) != 5 and not is_polygon:
            problems.append(f"row {lineno}: {len(vals)} values, expected 5 (box) or an odd count >= 7 (polygon)")
            continue
        c = vals[0]
        if c != int(c):
            problems.append(f"row {lineno}: class {c:g} is not an integer")
            continue
        if c < 0:
            problems.append(f"row {lineno}: class {c:g} is negative")
            continue
        if nc is not None and c >= nc:
            problems.append(f"row {lineno}: class {c:g} >= nc {nc}")
            continue
        if (vals[1:] < 0).any():
            problems.append(f"row {lineno}: negative value")
            continue
        if (vals[1:] > 1).any():
            problems.append(f"row {lineno}: coordinate > 1")
            continue
        if is_polygon:
            pts = vals[1:].reshape(-1, 2).astype(np.float32)
            (x1, y1), (x2, y2) = pts.min(0), pts.max(0)
            box = [c, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
        else:
            pts, box = None, vals
        if np.float32(box[3]) <= 0 or np.float32(box[4]) <= 0:  # as stored: float32
            problems.append(f"row {lineno}: zero-size box ({box[3]:g} x {box[4]:g})")
            continue
        boxes.append(box)
        segments.append(pts)
    lb = np.array(boxes, dtype=np.float32).reshape(-1, 5)
    # Mosaic refits boxes from polygons only when every label has one, so polygons of a file that
    # mixes boxes and polygons would never be used; dropping them keeps segments aligned with boxes.
    segs = segments if segments and all(s is not None for s in segments) else []
    return lb, segs, problems


def verify_image_label(args: tuple[str, str, str, int | None]):
    """Check one image and its label file; returns (im_file|None, labels, shape, segments, nm, nf, ne, nc, msgs)."""
    im_file, lb_file, prefix, nc = args
    nm = nf = ne = ncorrupt = 0
    msgs: list[str] = []
    segments: list[np.ndarray] = []
    try:
        with Image.open(im_file) as im:
            im.verify()
        with Image.open(im_file) as im:  # verify() leaves the object unusable, so reopen
            shape = _exif_size(im)
            fmt = (im.format or "").lower()
        if fmt not in IMG_FORMATS:
            raise ValueError(f"unsupported image format {fmt or 'unknown'}")
        if shape[0] < MIN_SIDE or shape[1] < MIN_SIDE:
            raise ValueError(f"image size {shape[0]}x{shape[1]} < {MIN_SIDE} pixels")
        if fmt in ("jpg", "jpeg"):
            with open(im_file, "rb") as f:
                f.seek(-2, 2)
                if f.read() != b"\xff\xd9":
                    _restore_jpeg(im_file)
                    msgs.append(f"{prefix}WARNING {im_file}: corrupt JPEG restored and saved")
    except Exception as e:
        return None, None, None, None, nm, nf, ne, 1, [f"{prefix}WARNING {im_file}: ignoring corrupt image: {_one_line(e)}"]

    if not os.path.isfile(lb_file):
        if os.path.exists(lb_file):
            msgs.append(f"{prefix}WARNING {lb_file}: label path is not a file, image used as background")
        return im_file, np.zeros((0, 5), np.float32), shape, [], 1, 0, 0, 0, msgs
    nf = 1
    try:
        with open(lb_file, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8-sig")  # -sig: a leading byte-order mark is not part of the first row
    except UnicodeDecodeError:
        return None, None, None, None, 0, 1, 0, 1, [
            f"{prefix}WARNING {lb_file}: ignoring image, label file is not UTF-8 text"]
    except Exception as e:
        return None, None, None, None, 0, 1, 0, 1, [
            f"{prefix}WARNING {lb_file}: ignoring image, unreadable label file: {_one_line(e)}"]

    lb, segments, problems = _parse_rows(text, nc)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        msgs.append(f"{prefix}WARNING {lb_file}: skipped {len(problems)} bad label row(s): {shown}")
    if len(lb):
        _, idx = np.unique(lb, axis=0, return_index=True)
        if len(idx) < len(lb):
            msgs.append(f"{prefix}WARNING {lb_file}: {len(lb) - len(idx)} duplicate label row(s) removed")
            lb = lb[idx]
            if segments:
                segments = [segments[k] for k in idx]
    else:
        ne = 1
    return im_file, lb, shape, segments, nm, nf, ne, ncorrupt, msgs


def _restore_jpeg(path: str) -> None:
    """Re-save a truncated JPEG (EXIF applied, quality 100, 4:4:4) atomically in place."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        buf = io.BytesIO()
        im.save(buf, "JPEG", subsampling=0, quality=100)
    atomic_write(Path(path), buf.getvalue())


def files_hash(paths: Sequence[str], extra: str = "") -> str:
    """SHA-256 over each path and its size, so any add/remove/resize invalidates the cache."""
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        try:
            size = os.path.getsize(p)
        except OSError:
            size = -1
        h.update(f"{p}\0{size}\n".encode())
    return h.hexdigest()


def save_cache(path: Path, cache: dict) -> bool:
    """Write the cache atomically as .npz (no pickled objects); returns False if the folder is read-only."""
    files = list(cache["labels"])
    labels = [cache["labels"][f] for f in files]
    segs = [cache["segments"][f] for f in files]
    seg_flat = [s for ss in segs for s in ss]
    meta = {"version": cache["version"], "hash": cache["hash"], "results": list(cache["results"]),
            "msgs": cache["msgs"], "files": files}
    arrays = {
        "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        "labels": np.concatenate(labels, 0) if labels else np.zeros((0, 5), np.float32),
        "label_counts": np.array([len(x) for x in labels], dtype=np.int64),
        "shapes": np.array([cache["shapes"][f] for f in files], dtype=np.int64).reshape(-1, 2),
        "seg_points": np.concatenate(seg_flat, 0) if seg_flat else np.zeros((0, 2), np.float32),
        "seg_sizes": np.array([len(s) for s in seg_flat], dtype=np.int64),
        "seg_counts": np.array([len(ss) for ss in segs], dtype=np.int64),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        atomic_write(path, buf.getvalue())
        return True
    except OSError as e:
        LOGGER.warning(f"WARNING {path}: cache not saved, directory not writeable ({_one_line(e)})")
        return False


def load_cache(path: Path, expected_hash: str) -> dict | None:
    """Return the cache dict if it is ours, current and intact; None means rebuild."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("version") != CACHE_VERSION or meta.get("hash") != expected_hash:
                return None
            files = meta["files"]
            counts, shapes = z["label_counts"], z["shapes"]
            flat, seg_points = z["labels"], z["seg_points"]
            seg_sizes, seg_counts = z["seg_sizes"], z["seg_counts"]
        if not (len(counts) == len(shapes) == len(files) == len(seg_counts)) or counts.sum() != len(flat):
            return None
        if seg_sizes.sum() != len(seg_points) or seg_counts.sum() != len(seg_sizes):
            return None
        lab = np.split(flat.astype(np.float32), np.cumsum(counts)[:-1]) if len(files) else []
        pts = np.split(seg_points.astype(np.float32), np.cumsum(seg_sizes)[:-1]) if len(seg_sizes) else []
        seg_per_image, k = [], 0
        for c in seg_counts:
            seg_per_image.append(pts[k:k + c])
            k += c
        return {"version": meta["version"], "hash": meta["hash"], "results": tuple(meta["results"]),
                "msgs": meta["msgs"], "labels": dict(zip(files, lab)),
                "shapes": {f: tuple(int(v) for v in s) for f, s in zip(files, shapes)},
                "segments": dict(zip(files, seg_per_image))}
    except Exception:  # missing, truncated, not an npz, foreign layout: all mean "rebuild"
        return None


def build_cache(im_files: Sequence[str], label_files: Sequence[str], nc: int | None, prefix: str,
                desc: str, file_hash: str) -> dict:
    """Verify every image/label pair in a thread pool and collect the results into a cache dict."""
    labels, shapes, segments, msgs = {}, {}, {}, []
    nm = nf = ne = ncorrupt = 0
    jobs = [(i, l, prefix, nc) for i, l in zip(im_files, label_files)]
    with ThreadPool(NUM_THREADS) as pool:
        for im_file, lb, shape, segs, m, f, e, c, ms in pool.imap(verify_image_label, jobs, chunksize=16):
            nm, nf, ne, ncorrupt = nm + m, nf + f, ne + e, ncorrupt + c
            msgs.extend(ms)
            if im_file:
                labels[im_file], shapes[im_file], segments[im_file] = lb, shape, segs
    return {"version": CACHE_VERSION, "hash": file_hash, "results": (nf, nm, ne, ncorrupt, len(im_files)),
            "msgs": msgs, "labels": labels, "shapes": shapes, "segments": segments, "desc": desc}


# ------------------------------------------------------------------------------------------------ the seam
@dataclass(frozen=True)
class LabelSet:
    """What a label reader found for a list of images: the usable images in the order given, with their labels,
    original sizes and polygons."""

    im_files: list[str]
    label_files: list[str]  # the label file of each image ('' where the format has none)
    labels: list[np.ndarray]  # (n, 5) float32 rows [cls, x, y, w, h], normalised to the image
    shapes: np.ndarray  # (n, 2) int64 original (w, h), EXIF orientation applied
    segments: list[list[np.ndarray]]  # each image's polygons (normalised (k, 2) float32), or [] when boxes only


# (image files, the path they were listed from, nc (rows with a class >= nc are dropped) or None, log prefix)
LabelReader = Callable[[Sequence[str], Any, "int | None", str], LabelSet]


def _cache_path(source: Any, label_files: Sequence[str]) -> Path:
    p = Path(source[-1] if isinstance(source, (list, tuple)) else source)
    if p.is_file():
        return p.with_suffix(".cache")
    return Path(label_files[0]).parent.with_suffix(".cache")


def _orphan_labels(im_files: Sequence[str], label_files: Sequence[str]) -> int:
    """Label files in the scanned label folders that no image points at (cheap: one listdir per folder)."""
    expected = set(label_files)
    n = 0
    for d in {os.path.dirname(f) for f in label_files}:
        try:
            n += sum(1 for e in os.scandir(d) if e.name.endswith(".txt") and os.path.join(d, e.name) not in expected)
        except OSError:
            pass
    return n


def _label_set(im_files: Sequence[str], cache: dict, source: Any, prefix: str, labelled: bool) -> LabelSet:
    """The images the scan kept, in the order given; none kept is a one-line error."""
    kept = [f for f in im_files if f in cache["labels"]]
    if not kept:
        n_total, ncor = cache["results"][4], cache["results"][3]
        raise UserError(f"{prefix}no usable images in {source} ({n_total} found, {ncor} corrupt)")
    return LabelSet(kept, img2label_paths(kept) if labelled else [""] * len(kept), [cache["labels"][f] for f in kept],
                    np.array([cache["shapes"][f] for f in kept], dtype=np.int64).reshape(-1, 2),
                    [cache["segments"][f] for f in kept])


def read_labels(im_files: Sequence[str], source: Any, nc: int | None, prefix: str) -> LabelSet:
    """YOLO .txt labels of the images (images/ -> labels/), verified and cached beside them; one scan line."""
    im_files = list(im_files)
    label_files = img2label_paths(im_files)
    cache_file = _cache_path(source, label_files)
    fhash = files_hash(label_files + im_files, extra=f"nc={nc}")
    cache = load_cache(cache_file, fhash)
    from_cache = cache is not None
    if not from_cache:
        cache = build_cache(im_files, label_files, nc, prefix, str(cache_file), fhash)
        save_cache(cache_file, cache)
    for m in cache["msgs"]:
        LOGGER.warning(m)
    nf, nm, ne, ncor, n_total = cache["results"]
    orphans = _orphan_labels(im_files, label_files)
    LOGGER.info(f"{prefix}Scanning {cache_file.with_suffix('')}... {n_total} images found, {nm} missing labels, "
                f"{ne} empty, {ncor} corrupt" + (f", {orphans} labels without image" if orphans else "")
                + (" (cached)" if from_cache else ""))
    return _label_set(im_files, cache, source, prefix, labelled=True)


def read_images(im_files: Sequence[str], source: Any, nc: int | None, prefix: str) -> LabelSet:
    """Images only, every one without boxes (the 'unlabeled:' images of distillation): label files beside them
    are never read (one notice says how many were ignored). Not cached: verifying images is cheap, and a cache
    file here could shadow a labelled scan's."""
    im_files = list(im_files)
    beside = sum(os.path.isfile(f) for f in img2label_paths(im_files))
    cache = build_cache(im_files, [""] * len(im_files), None, prefix, "", "")
    for m in cache["msgs"]:
        LOGGER.warning(m)
    ncor, n_total = cache["results"][3], cache["results"][4]
    LOGGER.info(f"{prefix}{n_total} unlabelled images found, {ncor} corrupt (skipped)")
    if beside:
        LOGGER.info(f"{prefix}NOTE: {beside} label file(s) sit beside these images and are ignored: images "
                    f"listed under 'unlabeled:' are labelled by the teacher only")
    return _label_set(im_files, cache, source, prefix, labelled=False)
