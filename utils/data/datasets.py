"""The data layer's three steps: a dataset yaml becomes a DatasetSpec (check_dataset), a split and its DataSettings
become a dataset (LoadImagesAndLabels: labels through settings.reader, mosaic, rect batches), and a dataset becomes
a DataLoader (create_dataloader)."""
from __future__ import annotations

import logging
import math
import os
import random
import shlex
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Sequence, Union

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, distributed

from utils.core.boxes import xyn2xy, xywhn2xyxy, xyxy2xywhn
from utils.core.config import find_file, read_yaml
from utils.core.download import dataset_download_plan, download_zip_dataset
from utils.core.errors import EXIT_CODE, ReportedError, UserError
from utils.data.augment import (augment_hsv, letterbox, mixup, random_affine_matrix, random_perspective, warp_image,
                                warp_targets)
from utils.data.labels import IMG_FORMATS, NUM_THREADS, LabelReader, img2label_paths, read_images, read_labels
from utils.data.mosaic import compose_scaled, paste_canvas, tile_place

__all__ = ["IMG_FORMATS", "img2label_paths", "DatasetSpec", "check_dataset", "available_memory", "batch_memory_need",
           "list_images", "DataSettings", "LoadImagesAndLabels", "read_labels", "read_images", "create_dataloader",
           "reseed_loader", "seed_worker"]

LOGGER = logging.getLogger("yolov5kd")
ROOT = Path(__file__).resolve().parents[2]  # repository root; relative dataset paths hang off it
GENERATOR_SEED = 6148914691236517205
MAX_NAME_CHARS = 200  # class names are labels on plots and in results, not documents
SPLITS = ("train", "val", "test", "unlabeled")


# ----------------------------------------------------------------------------------------------- dataset yaml
def _run_download(value: str, yaml_file: Path, path: Path) -> None:
    """Act on a dataset yaml's `download:` value: fetch its .zip URL or run its script from data/scripts/ (no shell);
    anything else is refused in one line before anything runs."""
    plan = dataset_download_plan(value, ROOT, yaml_file, path)
    if isinstance(plan, str):
        LOGGER.info(f"Dataset not found, downloading {plan}")
        download_zip_dataset(plan, path, yaml_file.name)
        return
    LOGGER.info(f"Dataset not found, running {shlex.join(plan)}")
    r = subprocess.run([sys.executable, *plan], cwd=ROOT)
    if r.returncode == EXIT_CODE:
        # the project's own scripts exit 2 after printing their one-line ERROR: not a second line for it
        raise ReportedError(f"{yaml_file}: {value} failed")
    if r.returncode != 0:
        raise UserError(f"{yaml_file}: download script failed with exit code {r.returncode}: {value}")


Split = Union[str, list, None]  # one path or several (absolute once resolved); falsy when the yaml gives none


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset yaml, checked and resolved by check_dataset: absolute paths, class names exactly 0..nc-1."""

    yaml_file: Path  # the yaml read (Path('<dict>') when given a dict)
    path: Path  # the dataset root every relative entry hangs off
    train: Split
    val: Split
    names: dict[int, str]
    test: Split = None
    unlabeled: Split = None  # images without labels, for distillation
    download: str | None = None  # how to fetch a missing val split (see _run_download)
    annotations: str | None = None  # a COCO annotation json for --save-json (relative to path)
    keys: frozenset[str] = frozenset()  # the yaml's own keys: an 'unlabeled:' given empty is not an absent one

    @property
    def nc(self) -> int:
        """Number of classes (the names' count; a yaml's nc: must agree)."""
        return len(self.names)

    def split(self, name: str) -> Split:
        """The paths of split `name` ('train', 'val', 'test' or 'unlabeled')."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, name)


def _check_names(d: dict, yaml_file: Path) -> dict[int, str]:
    """The yaml's names as {0: str, ..., nc-1: str}; nc: must agree with them."""
    names = d["names"]
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise UserError(f"{yaml_file}: 'names' must be a non-empty list or mapping")
    for k, v in names.items():
        # checked before str(): a nested value (e.g. a yaml alias) would expand into a huge string
        if isinstance(v, bool) or not isinstance(v, (str, int, float)) or len(str(v)) > MAX_NAME_CHARS:
            what = type(v).__name__ if not isinstance(v, (str, int, float)) else f"{len(str(v))} characters"
            raise UserError(f"{yaml_file}: class name {k!r} must be a short string (at most {MAX_NAME_CHARS} "
                            f"characters), got {what}")
    try:
        names = {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError):
        raise UserError(f"{yaml_file}: 'names' keys must be integers") from None
    n = len(names)
    # class ids index the names, so a gap would make metrics and plots refer to classes that do not exist
    if sorted(names) != list(range(n)):
        raise UserError(f"{yaml_file}: 'names' keys must be exactly 0..{n - 1}, got {sorted(names)}")
    if d.get("nc") is not None:
        try:
            nc_ok = float(d["nc"]) == n
        except (TypeError, ValueError):
            nc_ok = False
        if not nc_ok:
            raise UserError(f"{yaml_file}: nc: {d['nc']} contradicts the {n} entries of 'names'")
    return names


def _resolve_paths(d: dict, yaml_file: Path) -> tuple[Path, dict[str, Split]]:
    """(dataset root, each split's entries joined to it and resolved); a '../x' entry that is not there is tried
    as 'x' inside the root."""
    # checked before the paths are joined and resolved, for the same reason as the names
    for k in ("path", *SPLITS, "download"):
        v = d.get(k)
        listed = k not in ("path", "download") and isinstance(v, (list, tuple))
        if not (v is None or isinstance(v, (str, Path)) or (listed and all(isinstance(x, (str, Path)) for x in v))):
            kind = "a string or a list of strings" if k not in ("path", "download") else "a string"
            raise UserError(f"{yaml_file}: '{k}' must be {kind}, got {type(v).__name__}")
    path = Path(d.get("path") or "")
    if not path.is_absolute():
        path = (ROOT / path).resolve()
    splits: dict[str, Split] = {}
    for k in SPLITS:
        v = d.get(k)
        if not v:
            splits[k] = v
            continue
        items = [v] if isinstance(v, (str, Path)) else list(v)
        out = []
        for item in items:
            x = (path / str(item)).resolve()
            if not x.exists() and str(item).startswith("../"):
                x = (path / str(item)[3:]).resolve()
            out.append(str(x))
        splits[k] = out[0] if isinstance(v, (str, Path)) else out
    return path, splits


def check_dataset(data: str | Path | dict, autodownload: bool = True) -> DatasetSpec:
    """Load a dataset yaml (path or short name like 'shapes.yaml', or its dict), check its names, resolve its
    paths; fetch a missing val split if allowed."""
    if isinstance(data, dict):
        d, yaml_file = dict(data), Path("<dict>")
    else:
        yaml_file = find_file(data, [ROOT, ROOT / "data"], "dataset yaml")
        d = read_yaml(yaml_file, "dataset yaml")
    for k in ("train", "val", "names"):
        if k not in d:
            raise UserError(f"{yaml_file}: dataset yaml is missing the '{k}' key")
    names = _check_names(d, yaml_file)
    path, splits = _resolve_paths(d, yaml_file)
    vals = splits["val"] if isinstance(splits["val"], list) else [splits["val"]]
    missing = [v for v in vals if not Path(v).exists()]
    if missing:
        dl = d.get("download")
        if dl and autodownload:
            _run_download(str(dl).strip(), yaml_file, path)
            missing = [v for v in vals if not Path(v).exists()]
        if missing:
            raise UserError(f"{yaml_file}: dataset not found, missing {', '.join(missing)}")
    return DatasetSpec(yaml_file=yaml_file, path=path, names=names, **splits, download=d.get("download"),
                       annotations=d.get("annotations"), keys=frozenset(str(k) for k in d))


# ---------------------------------------------------------------------------------------------------- memory
def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable, else free pages); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for ln in f:
                if ln.startswith("MemAvailable:"):
                    return int(ln.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def batch_memory_need(imgsz: int, batch_size: int, workers: int) -> int:
    """A lower bound on the bytes one training batch takes before the model sees it: each loader process's
    mosaic canvas (2*imgsz square, uint8 BGR) plus the collated uint8 batch and its float copy."""
    canvas = (2 * imgsz) ** 2 * 3
    return canvas * max(workers, 1) + batch_size * 3 * imgsz ** 2 * (1 + 4)


# --------------------------------------------------------------------------------------------- image listing
def list_images(path: str | Path | Sequence[str | Path], prefix: str = "") -> list[str]:
    """Image files from folders (recursive), .txt lists, or single files; sorted, suffix-filtered."""
    files: list[str] = []
    for p in path if isinstance(path, (list, tuple)) else [path]:
        p = Path(p)
        if p.is_dir():
            files += [str(f) for f in p.rglob("*.*")]
        elif p.is_file() and p.suffix.lower() == ".txt":
            parent = str(p.parent) + os.sep
            try:
                lines = p.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM is not part of the path
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"{prefix}{p}: cannot read image list ({' '.join(str(e).split())})") from None
            files += [parent + x[2:] if x.startswith("./") else x for x in (ln.strip() for ln in lines) if x]
        elif p.is_file():
            files.append(str(p))
        else:
            raise UserError(f"{prefix}{p} does not exist")
    return sorted(f for f in files if f.rsplit(".", 1)[-1].lower() in IMG_FORMATS)


# --------------------------------------------------------------------------------------------------- dataset
class UnreadableImage(Exception):
    """An image that passed the scan but can no longer be read."""


@dataclass(frozen=True)
class DataSettings:
    """Every knob of a dataset in one value: how its images are sized, batched, augmented, cached and labelled."""

    imgsz: int = 640  # long side of a letterboxed image; a mosaic is imgsz square
    batch_size: int = 16  # images per batch (rect batches share one shape)
    augment: bool = False  # training augmentation (mosaic, perspective, HSV, flips, mixup)
    hyp: dict | None = None  # the augmentation hyperparameters (mosaic, mixup, degrees, ..., fliplr)
    rect: bool = False  # rectangular batches sorted by aspect ratio (no mosaic)
    cache: str | bool | None = None  # images held in 'ram' (True too) or as .npy files on 'disk'
    single_cls: bool = False  # every label becomes class 0
    stride: int = 32  # rect batch shapes are multiples of it
    pad: float = 0.0  # rect batch padding, in strides
    prefix: str = ""  # starts every log line ('train: ', 'val: ', ...)
    nc: int | None = None  # label rows with a class id >= nc are dropped
    # serve another sample for an image that fails to load (training) instead of dropping it (evaluation);
    # None: when augmenting
    substitute_failed: bool | None = None
    reader: LabelReader = read_labels  # the label format: read_labels (YOLO .txt) or read_images (none)


class LoadImagesAndLabels(Dataset):
    """Images and labels (read by settings.reader) with YOLOv5 augmentation (mosaic, perspective, HSV, flips,
    mixup)."""

    def __init__(self, path: str | Path | Sequence[str | Path], settings: DataSettings | None = None):
        s = settings or DataSettings()
        self.settings = s
        self.path = path
        self.img_size, self.batch_size, self.stride = s.imgsz, s.batch_size, int(s.stride)
        self.augment, self.rect, self.prefix = s.augment, s.rect, s.prefix
        self.hyp = s.hyp or {}
        self.mosaic = s.augment and not s.rect  # rect batches share one shape, a mosaic would break it
        self.mosaic_border = [-s.imgsz // 2, -s.imgsz // 2]
        self._canvas: np.ndarray | None = None
        # one-resample mosaic for rotation-free hyps (see compose_scaled); False = reference pixel chain
        self.fast_mosaic = True
        self.read_failures: set[str] = set()
        self.bad_npy: set[str] = set()  # .npy disk-cache files already reported as unusable
        # Training keeps going on a stand-in sample; evaluation must not count any image twice, so there
        # a failed sample is dropped (None, removed by collate_fn).
        self.substitute_failed = s.augment if s.substitute_failed is None else s.substitute_failed

        im_files = list_images(path, s.prefix)
        if not im_files:
            raise UserError(f"{s.prefix}no images found in {path}")
        found = s.reader(im_files, path, s.nc, s.prefix)
        self.im_files, self.label_files = list(found.im_files), list(found.label_files)
        self.labels, self.shapes, self.segments = list(found.labels), found.shapes, list(found.segments)
        if s.augment and self.hyp.get("copy_paste", 0) and any(self.segments):
            LOGGER.warning(f"{s.prefix}WARNING copy_paste={self.hyp['copy_paste']} is not implemented here; "
                           "polygon labels are used for box refitting only")
        if s.single_cls:
            for lb in self.labels:
                lb[:, 0] = 0
        self.n = n = len(self.im_files)
        self.batch = np.floor(np.arange(n) / s.batch_size).astype(int)
        self.indices = np.arange(n)
        if self.rect:
            self._set_rect(s.batch_size, s.pad)
        self._cache_images(s.cache)

    def _set_rect(self, batch_size: int, pad: float) -> None:
        ar = self.shapes[:, 1] / self.shapes[:, 0]  # h / w
        order = ar.argsort(kind="stable")
        self.im_files = [self.im_files[i] for i in order]
        self.label_files = [self.label_files[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.segments = [self.segments[i] for i in order]
        self.shapes = self.shapes[order]
        ar = ar[order]
        nb = int(self.batch[-1]) + 1
        shapes = np.ones((nb, 2))
        for b in range(nb):
            a = ar[self.batch == b]
            lo, hi = a.min(), a.max()
            if hi < 1:
                shapes[b] = [hi, 1]
            elif lo > 1:
                shapes[b] = [1, 1 / lo]
        self.batch_shapes = (np.ceil(shapes * self.img_size / self.stride + pad).astype(int) * self.stride)

    def _cache_images(self, mode: str | bool | None) -> None:
        """Hold every image in RAM (resized) or write each as an .npy file beside it ('disk'); None: neither."""
        n = self.n
        self.ims: list[np.ndarray | None] = [None] * n
        self.im_hw0: list[tuple[int, int] | None] = [None] * n
        self.im_hw: list[tuple[int, int] | None] = [None] * n
        self.npy_files = [str(Path(f).with_suffix(".npy")) for f in self.im_files]
        if mode is True:
            mode = "ram"
        if mode not in (None, False, "ram", "disk"):
            raise UserError(f"unknown image cache mode {mode!r} (use 'ram' or 'disk')")
        if mode == "ram" and not self._ram_ok():
            mode = None
        if mode:
            fn = self._cache_to_disk if mode == "disk" else self.load_image
            with ThreadPool(NUM_THREADS) as pool:
                for i, x in enumerate(pool.imap(fn, range(n))):
                    if mode == "ram":
                        self.ims[i], self.im_hw0[i], self.im_hw[i] = x

    def _ram_ok(self) -> bool:
        sample = min(self.n, 30)
        need = 0.0
        for i in range(sample):
            w0, h0 = self.shapes[i]
            r = self.img_size / max(w0, h0)
            need += math.ceil(w0 * r) * math.ceil(h0 * r) * 3
        need *= self.n / max(sample, 1)
        avail = available_memory()
        if avail is None:
            return True
        if need * 1.2 > avail:
            LOGGER.warning(f"{self.prefix}WARNING image RAM cache needs {need / 2**30:.1f} GB, only "
                           f"{avail / 2**30:.1f} GB free: not caching images")
            return False
        return True

    def _cache_to_disk(self, i: int) -> None:
        f = Path(self.npy_files[i])
        if not f.exists():
            im = cv2.imread(self.im_files[i])
            if im is not None:
                np.save(f, im)

    def __len__(self) -> int:
        return len(self.im_files)

    def _read(self, i: int) -> np.ndarray:
        """Original-size BGR image i from the .npy disk cache or the image file."""
        fn = self.npy_files[i]
        if os.path.exists(fn):
            try:
                im = np.load(fn, allow_pickle=False)
                problem = self._npy_problem(i, im)
            except Exception as e:
                problem = f"unreadable ({' '.join(str(e).split())[:120]})"
            if not problem:
                return im
            if fn not in self.bad_npy:  # once per file, not once per epoch
                self.bad_npy.add(fn)
                LOGGER.warning(f"{self.prefix}WARNING {fn}: disk cache {problem}, reading the image instead")
        im = cv2.imread(self.im_files[i])
        if im is None:
            raise UnreadableImage(f"{self.prefix}cannot read image {self.im_files[i]}")
        return im

    def _npy_problem(self, i: int, im: np.ndarray) -> str:
        """Why a cached array cannot stand in for image i ('' if it can): it must be the image's HxWx3 uint8."""
        w0, h0 = (int(x) for x in self.shapes[i])
        if im.dtype != np.uint8 or im.shape != (h0, w0, 3):
            return f"holds a {'x'.join(map(str, im.shape))} {im.dtype} array, not the {h0}x{w0}x3 uint8 image"
        return ""

    def _resized_hw(self, h0: int, w0: int) -> tuple[int, int]:
        r = self.img_size / max(h0, w0)
        return (math.ceil(h0 * r), math.ceil(w0 * r)) if r != 1 else (h0, w0)

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """Image i as BGR uint8 resized so its long side is img_size; returns (im, (h0, w0), (h, w))."""
        im = self.ims[i]
        if im is not None:
            return im, self.im_hw0[i], self.im_hw[i]
        im = self._read(i)
        h0, w0 = im.shape[:2]
        h, w = self._resized_hw(h0, w0)
        if (h, w) != (h0, w0):
            interp = cv2.INTER_LINEAR if (self.augment or w > w0) else cv2.INTER_AREA
            im = cv2.resize(im, (w, h), interpolation=interp)
        return im, (h0, w0), im.shape[:2]

    def __getitem__(self, index: int):
        # A file that vanished or broke after the scan must not kill a long run: skip it (one warning)
        # and serve the next sample instead, or nothing when substitutes are off.
        if not self.substitute_failed:
            try:
                return self._load_item(index)
            except UnreadableImage as e:
                if str(e) not in self.read_failures:
                    self.read_failures.add(str(e))
                    LOGGER.warning(f"WARNING {e}; excluded from evaluation")
                return None
        for attempt in range(min(self.n, 10)):
            try:
                return self._load_item((index + attempt) % self.n)
            except UnreadableImage as e:
                if str(e) not in self.read_failures:
                    self.read_failures.add(str(e))
                    LOGGER.warning(f"{e}; sample skipped ({len(self.read_failures)} unreadable so far)")
        raise UserError(f"{self.prefix}{min(self.n, 10)} images in a row could not be read; is the dataset still there?")

    def _load_item(self, index: int):
        index = int(self.indices[index])
        if self.mosaic and random.random() < self.hyp.get("mosaic", 1.0):
            img, labels, shapes = self._mosaic_item(index)
        else:
            img, labels, shapes = self._letterbox_item(index)
        return self._finish_item(img, labels, shapes, index)

    def _mosaic_item(self, index: int) -> tuple[np.ndarray, np.ndarray, None]:
        """A mosaic around image `index`, mixed with a second mosaic at probability hyp['mixup']; pixel xyxy labels."""
        img, labels = self.load_mosaic(index)
        if random.random() < self.hyp.get("mixup", 0.0):
            img, labels = mixup(img, labels, *self.load_mosaic(random.choice(self.indices)))
        return img, labels, None

    def _letterbox_item(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple]:
        """Image `index` letterboxed to its rect batch shape (or img_size), warped when augmenting; pixel xyxy
        labels and the shapes val.py scales predictions back with ((h0, w0), ((h / h0, w / w0), pad))."""
        hyp = self.hyp
        img, (h0, w0), (h, w) = self.load_image(index)
        shape = self.batch_shapes[self.batch[index]] if self.rect else self.img_size
        img, ratio, pad = letterbox(img, shape, auto=False, scaleup=self.augment)
        shapes = (h0, w0), ((h / h0, w / w0), pad)
        labels = self.labels[index].copy()
        if labels.size:
            labels[:, 1:] = xywhn2xyxy(labels[:, 1:], ratio[0] * w, ratio[1] * h, padw=pad[0], padh=pad[1])
        if self.augment:
            img, labels, _ = random_perspective(img, labels, degrees=hyp.get("degrees", 0.0),
                                                translate=hyp.get("translate", 0.0),
                                                scale=hyp.get("scale", 0.0), shear=hyp.get("shear", 0.0),
                                                perspective=hyp.get("perspective", 0.0))
        return img, labels, shapes

    def _finish_item(self, img: np.ndarray, labels: np.ndarray, shapes, index: int):
        """Normalise the labels, apply HSV and flips when augmenting; (CHW RGB uint8, labels (n, 6), path, shapes)."""
        hyp = self.hyp
        nl = len(labels)
        if nl:
            labels[:, 1:5] = xyxy2xywhn(labels[:, 1:5], w=img.shape[1], h=img.shape[0], clip=True, eps=1e-3)
        if self.augment:
            augment_hsv(img, hgain=hyp.get("hsv_h", 0.0), sgain=hyp.get("hsv_s", 0.0), vgain=hyp.get("hsv_v", 0.0))
            # the draws happen even at probability 0 so the RNG sequence matches the reference
            if random.random() < hyp.get("flipud", 0.0):
                img = img[::-1]
                if nl:
                    labels[:, 2] = 1 - labels[:, 2]
            if random.random() < hyp.get("fliplr", 0.0):
                img = img[:, ::-1]
                if nl:
                    labels[:, 1] = 1 - labels[:, 1]

        labels_out = torch.zeros((nl, 6))
        if nl:
            labels_out[:, 1:] = torch.from_numpy(labels)
        # HWC BGR -> CHW RGB in one copy
        img = np.ascontiguousarray(img.transpose(2, 0, 1)[::-1])
        return torch.from_numpy(img), labels_out, self.im_files[index], shapes

    def _mosaic_tiles(self, index: int, xc: int, yc: int):
        """The four tiles of a mosaic around (xc, yc) (image `index` and three random others, shuffled), with
        their labels in canvas pixels (xyxy) and polygons (one empty per box row of an image without them)."""
        s = self.img_size
        indices = [index] + random.choices(self.indices, k=3)
        random.shuffle(indices)
        tiles, labels4, segments4 = [], [], []
        for i, idx in enumerate(indices):
            idx = int(idx)
            if self.ims[idx] is not None:
                src, (h, w) = self.ims[idx], self.im_hw[idx]
            else:  # keep the original pixels: the fast path resamples them only once
                src = self._read(idx)
                h, w = self._resized_hw(*src.shape[:2])
            box, (padw, padh) = tile_place(i, xc, yc, h, w, s)
            tiles.append((src, (h, w), box, (padw, padh)))
            labels = self.labels[idx].copy()
            if labels.size:
                labels[:, 1:] = xywhn2xyxy(labels[:, 1:], w, h, padw, padh)
            labels4.append(labels)
            segs = self.segments[idx]
            if segs:
                segments4.extend(xyn2xy(sg, w, h, padw, padh) for sg in segs)
            else:
                segments4.extend([np.zeros((0, 2), np.float32)] * len(labels))
        return tiles, labels4, segments4

    def load_mosaic(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """4-image mosaic around a random centre, then a random warp back to img_size."""
        s = self.img_size
        yc, xc = (int(random.uniform(-x, 2 * s + x)) for x in self.mosaic_border)
        tiles, labels4, segments4 = self._mosaic_tiles(index, xc, yc)
        labels4 = np.concatenate(labels4, 0)
        np.clip(labels4[:, 1:], 0, 2 * s, out=labels4[:, 1:])
        for sg in segments4:
            np.clip(sg, 0, 2 * s, out=sg)
        # segment-aware box refit only when every label has a polygon (same rule as the reference)
        segs_in = segments4 if segments4 and all(len(sg) for sg in segments4) else ()
        hyp = self.hyp
        persp = bool(hyp.get("perspective", 0.0))
        M, sc, width, height = random_affine_matrix(2 * s, 2 * s, degrees=hyp.get("degrees", 0.0),
                                                    translate=hyp.get("translate", 0.0),
                                                    scale=hyp.get("scale", 0.0), shear=hyp.get("shear", 0.0),
                                                    perspective=hyp.get("perspective", 0.0),
                                                    border=self.mosaic_border)
        if self.fast_mosaic and not persp and M[0, 1] == 0 and M[1, 0] == 0:
            img4 = compose_scaled(tiles, M, width, height)
        else:
            # reuse one canvas per worker: allocating 4*s*s*3 bytes per sample costs page faults every time
            if self._canvas is None or self._canvas.shape[0] != 2 * s:
                self._canvas = np.empty((2 * s, 2 * s, 3), np.uint8)
            img4 = warp_image(paste_canvas(tiles, self._canvas), M, width, height, persp, self.mosaic_border)
        labels4, _ = warp_targets(labels4, segs_in, M, sc, width, height, persp)
        return img4, labels4

    @staticmethod
    def collate_fn(batch):
        """Stack images, concatenate labels with the in-batch image index in column 0; drop failed (None) samples."""
        batch = [b for b in batch if b is not None]
        if not batch:  # every image of this batch failed to load
            return torch.zeros((0, 3, 0, 0), dtype=torch.uint8), torch.zeros((0, 6)), (), ()
        ims, labels, paths, shapes = zip(*batch)
        for i, lb in enumerate(labels):
            lb[:, 0] = i
        out = None
        if torch.utils.data.get_worker_info() is not None:
            # build the batch straight into shared memory, saving a copy when it crosses to the main process
            numel = sum(x.numel() for x in ims)
            storage = ims[0].untyped_storage()._new_shared(numel, device=ims[0].device)
            out = ims[0].new(storage).resize_(len(ims), *ims[0].shape)
        return torch.stack(ims, 0, out=out), torch.cat(labels, 0), paths, shapes


# ------------------------------------------------------------------------------------------------ dataloader
def seed_worker(worker_id: int) -> None:
    """Seed numpy/random per worker from torch's per-worker seed; keep OpenCV single-threaded in workers."""
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)
    cv2.setNumThreads(0)


def reseed_loader(loader: DataLoader, seed: int, rank: int, epoch: int) -> None:
    """Give an epoch its own shuffle, fixed by (seed, rank, epoch) alone, so a resumed run replays it."""
    if getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(GENERATOR_SEED + seed + max(rank, 0) + epoch)
    if isinstance(loader.sampler, distributed.DistributedSampler):
        loader.sampler.set_epoch(epoch)


def create_dataloader(dataset: LoadImagesAndLabels, workers: int = 8, shuffle: bool = False, rank: int = -1,
                      world_size: int = 1, seed: int = 0) -> DataLoader:
    """The DataLoader of a built dataset, in batches of its settings' batch_size (persistent workers, seeded
    generator, a DDP sampler when rank >= 0). A rect dataset is never shuffled: its batches share a shape."""
    if dataset.rect and shuffle:
        LOGGER.warning(f"{dataset.prefix}WARNING --rect is incompatible with DataLoader shuffle, setting shuffle=False")
        shuffle = False
    batch_size = min(dataset.batch_size, len(dataset))
    nd = torch.cuda.device_count()
    nw = min(os.cpu_count() // max(nd, 1), batch_size if batch_size > 1 else 0, workers)
    # explicit replicas/rank: works before (or without) an initialised process group, e.g. in tests
    sampler = None if rank == -1 else distributed.DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                                                     shuffle=shuffle, seed=seed)
    generator = torch.Generator()
    generator.manual_seed(GENERATOR_SEED + seed + max(rank, 0))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, num_workers=nw,
                      sampler=sampler, pin_memory=torch.cuda.is_available(),
                      collate_fn=LoadImagesAndLabels.collate_fn, worker_init_fn=seed_worker,
                      generator=generator, persistent_workers=nw > 0)
