"""Validate a YOLOv5 checkpoint (or an in-memory model during training) on a detection dataset.

    python val.py --data shapes.yaml --weights runs/train/exp/weights/best.pt --imgsz 320
    python val.py --data shapes.yaml --weights best.pt --task speed   # time the model on the val images

`evaluate` is the pass itself (an in-memory model over a given dataloader), in four steps: `predict` (a batch through
the model and NMS), `match` (detections against labels), `summarise` (P, R, mAP) and `plot_batch`. `run` keeps
YOLOv5's signature (data: a yaml path, its dict or a DatasetSpec) and wraps the pass with the checkpoint loading,
dataloader, run folder and output files of the command line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from models.yolo import check_img_size
from utils.core.boxes import scale_boxes, xywh2xyxy, xyxy2xywh
from utils.core.distributed import de_parallel
from utils.core.download import ensure_weights
from utils.core.errors import UserError, report
from utils.core.log import increment_path, setup_logging
from utils.core.runtime import keep_freed_memory
from utils.data.datasets import DatasetSpec
from utils.evaluation.metrics import ConfusionMatrix, ap_per_class, process_batch
from utils.evaluation.nms import non_max_suppression
from utils.training.checkpoint import attempt_load

ROOT = Path(__file__).resolve().parent

LOGGER = logging.getLogger("yolov5kd")
COCO91 = ([*range(1, 12)] + [*range(13, 26)] + [27, 28] + [*range(31, 45)] + [*range(46, 66)] + [67, 70]
          + [*range(72, 83)] + [*range(84, 91)])  # COCO's 80 training classes in its 91-id numbering
TASKS = ("train", "val", "test", "speed")
HEADER = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")

# Called once per image that has detections: (detections [x1,y1,x2,y2,conf,cls] in original-image pixels,
# image path, original (h, w)).
PredictionSink = Callable[[torch.Tensor, Path, tuple], None]


class Profile:
    """Accumulating wall-clock timer (synchronises CUDA so GPU time is counted)."""

    def __init__(self, device: torch.device | None = None):
        self.t = 0.0
        self.cuda = device is not None and device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *args):
        if self.cuda:
            torch.cuda.synchronize()
        self.t += time.perf_counter() - self.start


@dataclass
class Evaluation:
    """What one pass over a dataloader measured."""

    results: tuple[float, ...]  # P, R, mAP50, mAP50-95, then the mean val box, obj, cls loss (0 without compute_loss)
    class_map: dict[int, float]  # mAP50-95 of each class that has labels
    times: tuple[float, float, float]  # pre-process, inference, NMS milliseconds per image
    images: list[str]  # the images evaluated: those that failed to load are not among them
    ap_iou: tuple[float, ...] = ()  # mAP at each IoU threshold 0.50:0.05:0.95 (empty without a true positive)

    def maps(self, nc: int, fill: float | None = None) -> np.ndarray:
        """Per-class mAP50-95 over all nc classes; classes without labels get `fill` (default: the mean)."""
        maps = np.zeros(nc) + (self.results[3] if fill is None else fill)
        for c, v in self.class_map.items():
            maps[c] = v
        return maps


def save_one_txt(predn: torch.Tensor, save_conf: bool, shape: tuple, file: Path) -> None:
    """Write one image's detections as YOLO label rows (normalised to the original image)."""
    gn = torch.tensor(shape)[[1, 0, 1, 0]]
    lines = []
    for *xyxy, conf, cls in predn.tolist():
        xywh = (xyxy2xywh(torch.tensor(xyxy).view(1, 4)) / gn).view(-1).tolist()
        row = (cls, *xywh, conf) if save_conf else (cls, *xywh)
        lines.append(("%g " * len(row)).rstrip() % row)
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "a") as f:
        f.write("".join(line + "\n" for line in lines))


def coco_records(predn: torch.Tensor, path: Path, class_map: list[int]) -> list[dict]:
    """COCO-format detections of one image (bbox as x_min, y_min, w, h in original pixels)."""
    image_id = int(path.stem) if path.stem.isnumeric() else path.stem
    box = xyxy2xywh(predn[:, :4])
    box[:, :2] -= box[:, 2:] / 2
    return [{"image_id": image_id, "category_id": class_map[int(p[5])], "bbox": [round(x, 3) for x in b],
             "score": round(p[4], 5)} for p, b in zip(predn.tolist(), box.tolist())]


def _coco_eval(anno_json: Path, pred_json: Path, im_files: list[str]) -> tuple[float, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    anno = COCO(str(anno_json))
    pred = anno.loadRes(str(pred_json))
    ev = COCOeval(anno, pred, "bbox")
    ev.params.imgIds = [int(s) if s.isnumeric() else s for s in (Path(x).stem for x in im_files)]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats[1], ev.stats[0]


def _is_coco(data: DatasetSpec) -> bool:
    val_path = data.val
    return isinstance(val_path, str) and val_path.replace("\\", "/").endswith("coco/val2017.txt")


@dataclass(frozen=True)
class NMSSettings:
    """How raw predictions become detections."""

    conf_thres: float = 0.001
    iou_thres: float = 0.6
    max_det: int = 300
    agnostic: bool = False  # one class for all (single_cls)
    hybrid: bool = False  # the labels join the detections (--save-hybrid)


@dataclass
class Summary:
    """The metrics of a pass: means over the classes with labels, and per class (None without any prediction)."""

    mp: float
    mr: float
    map50: float
    map: float
    nt: np.ndarray  # labels per class
    p: np.ndarray | None = None
    r: np.ndarray | None = None
    ap50: np.ndarray | None = None
    ap: np.ndarray | None = None  # mAP50-95 per class of ap_class
    ap_class: np.ndarray | None = None
    ap_iou: np.ndarray | None = None  # mean over classes at each IoU threshold 0.50:0.05:0.95


def predict(model: nn.Module, im: torch.Tensor, targets: torch.Tensor, half: bool, dt: tuple, nms: NMSSettings,
            compute_loss: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor, list, torch.Tensor | None]:
    """One batch through the model and NMS; returns (the input as the model saw it, the targets in its pixels,
    detections [x1,y1,x2,y2,conf,cls] per image, the val loss parts (box, obj, cls) or None)."""
    device = next(model.parameters()).device
    with dt[0]:
        im = im.to(device, non_blocking=True, memory_format=torch.channels_last)
        targets = targets.to(device)
        im = im.half() if half else im.float()
        im /= 255
        nb, _, height, width = im.shape
    with dt[1]:
        preds, train_out = model(im)
    parts = None if compute_loss is None else compute_loss([x.float() for x in train_out], targets)[1][:3]

    targets[:, 2:] *= torch.tensor((width, height, width, height), device=device)
    lb = [targets[targets[:, 0] == i, 1:] for i in range(nb)] if nms.hybrid else []
    with dt[2]:
        preds = non_max_suppression(preds, nms.conf_thres, nms.iou_thres, labels=lb, multi_label=True,
                                    agnostic=nms.agnostic, max_det=nms.max_det)
    return im, targets, preds, parts


def match(preds: list, im: torch.Tensor, targets: torch.Tensor, paths, shapes, iouv: torch.Tensor,
          confusion: ConfusionMatrix | None, sink: PredictionSink | None) -> list[tuple]:
    """Match each image's detections to its labels in original-image pixels; returns one (correct (n, len(iouv)),
    conf, cls, label classes) per image that has detections or labels. Feeds `confusion` and `sink` when given."""
    stats = []
    for si, pred in enumerate(preds):
        labels = targets[targets[:, 0] == si, 1:]
        nl, npr = labels.shape[0], pred.shape[0]
        path, shape = Path(paths[si]), shapes[si][0]
        correct = torch.zeros(npr, len(iouv), dtype=torch.bool, device=iouv.device)
        if npr == 0:
            if nl:
                stats.append((correct, *torch.zeros((2, 0), device=iouv.device), labels[:, 0]))
                if confusion is not None:
                    confusion.process_batch(detections=None, labels=labels[:, 0])
            continue
        predn = pred.clone()
        scale_boxes(im[si].shape[1:], predn[:, :4], shape, shapes[si][1])
        if nl:
            tbox = xywh2xyxy(labels[:, 1:5])
            scale_boxes(im[si].shape[1:], tbox, shape, shapes[si][1])
            labelsn = torch.cat((labels[:, 0:1], tbox), 1)
            correct = process_batch(predn, labelsn, iouv)
            if confusion is not None:
                confusion.process_batch(predn, labelsn)
        stats.append((correct, pred[:, 4], pred[:, 5], labels[:, 0]))
        if sink is not None:
            sink(predn, path, shape)
    return stats


def summarise(stats: list[tuple], nc: int, names: dict, plots: bool, save_dir: Path) -> Summary:
    """P, R, mAP50 and mAP50-95 over the matched images (and the P/R/F1 curves when plotting)."""
    stats = [torch.cat(x, 0).cpu().numpy() for x in zip(*stats)]
    nt = np.bincount(stats[3].astype(int), minlength=nc) if len(stats) else np.zeros(nc, dtype=int)
    if not (len(stats) and len(stats[0])):  # with no true positive every figure is 0, but the curves still get drawn
        return Summary(0.0, 0.0, 0.0, 0.0, nt)
    _, _, p, r, _, ap, ap_class = ap_per_class(*stats, plot=plots, save_dir=save_dir, names=names)
    ap50, ap_iou, ap = ap[:, 0], ap.mean(0), ap.mean(1)
    return Summary(p.mean(), r.mean(), ap50.mean(), ap.mean(), nt, p, r, ap50, ap, ap_class, ap_iou)


def log_summary(s: Summary, seen: int, names: dict, per_class: bool) -> None:
    """The metrics table: the 'all' row, then one row per class with per_class."""
    pf = "%22s" + "%11i" * 2 + "%11.3g" * 4
    LOGGER.info(HEADER)
    LOGGER.info(pf % ("all", seen, s.nt.sum(), s.mp, s.mr, s.map50, s.map))
    if s.nt.sum() == 0:
        LOGGER.warning("no labels found in the evaluated images, can not compute metrics without labels")
    if per_class and s.ap_class is not None:
        for i, c in enumerate(s.ap_class):
            LOGGER.info(pf % (names.get(int(c), str(c)), seen, s.nt[c], s.p[i], s.r[i], s.ap50[i], s.ap[i]))


def plot_batch(im: torch.Tensor, targets: torch.Tensor, preds: list, paths, names: dict, fname: Path) -> None:
    """Two JPEG grids of a batch: its labels ({fname}_labels.jpg) and its detections ({fname}_pred.jpg)."""
    from utils.reporting.plots import output_to_target, plot_images

    plot_images(im, targets, paths, fname.with_name(f"{fname.name}_labels.jpg"), names)
    plot_images(im, output_to_target(preds), paths, fname.with_name(f"{fname.name}_pred.jpg"), names)


def _expected_images(dataloader: Iterable, seen: int) -> int:
    """How many images the dataloader holds (`seen` for an iterable that is no DataLoader)."""
    try:
        return len(dataloader.sampler)
    except (AttributeError, TypeError):  # not a DataLoader: nothing to compare against
        return seen


@torch.no_grad()
def evaluate(model: nn.Module, dataloader: Iterable, data: DatasetSpec, *, compute_loss: Callable | None = None,
             half: bool = True, single_cls: bool = False, conf_thres: float = 0.001, iou_thres: float = 0.6,
             max_det: int = 300, save_hybrid: bool = False, plots: bool = True, save_dir: Path = Path(""),
             verbose: bool = False, progress: bool = False,
             on_predictions: PredictionSink | None = None) -> Evaluation:
    """One pass of an in-memory model over a dataloader: P, R, mAP, the val loss (with compute_loss), timings."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    half &= device.type != "cpu"
    model.half() if half else model.float()
    # NHWC is faster; in-training and standalone validation use the same layout so their numbers agree
    model.eval().to(memory_format=torch.channels_last)
    nc = 1 if single_cls else data.nc
    iouv = torch.linspace(0.5, 0.95, 10, device=device)
    nms = NMSSettings(conf_thres, iou_thres, max_det, agnostic=single_cls, hybrid=save_hybrid)
    confusion = ConfusionMatrix(nc=nc)
    names = getattr(model, "names", None) or data.names
    names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else names
    dt = Profile(device), Profile(device), Profile(device)
    loss = torch.zeros(3, device=device)
    stats, evaluated, seen = [], [], 0
    pbar = tqdm(dataloader, desc=HEADER, bar_format="{l_bar}{bar:10}{r_bar}", disable=not progress)
    for batch_i, (im, targets, paths, shapes) in enumerate(pbar):
        if not len(paths):  # every image of the batch failed to load (collate_fn dropped them)
            continue
        evaluated.extend(paths)
        im, targets, preds, parts = predict(model, im, targets, half, dt, nms, compute_loss)
        if parts is not None:
            loss += parts
        if single_cls:
            for pred in preds:
                pred[:, 5] = 0
        stats += match(preds, im, targets, paths, shapes, iouv, confusion if plots else None, on_predictions)
        seen += len(preds)
        if plots and batch_i < 3:
            plot_batch(im, targets, preds, paths, names, save_dir / f"val_batch{batch_i}")

    s = summarise(stats, nc, names, plots, save_dir)
    # images that failed to load are dropped by collate_fn, so metrics cover only the images evaluated
    expected = _expected_images(dataloader, seen)
    if seen < expected:
        LOGGER.warning(f"WARNING {expected - seen} of {expected} images could not be read and were skipped; "
                       f"metrics cover the {seen} images evaluated")
    log_summary(s, seen, names, verbose and nc > 1)
    if plots:
        confusion.plot(save_dir=save_dir, names=list(names.values()))
    model.float()

    class_map = {} if s.ap_class is None else {c: s.ap[i] for i, c in enumerate(s.ap_class)}
    losses = (loss.cpu() / max(len(dataloader), 1)).tolist()
    times = tuple(x.t / max(seen, 1) * 1e3 for x in dt)
    ap_iou = () if s.ap_iou is None else tuple(float(x) for x in s.ap_iou)
    return Evaluation((s.mp, s.mr, s.map50, s.map, *losses), class_map, times, evaluated, ap_iou)


def _file_sink(save_dir: Path, save_txt: bool, save_conf: bool, records: list[dict] | None,
               class_map: list[int]) -> PredictionSink | None:
    """The per-image writer of --save-txt label files and --save-json records (None when neither is asked)."""
    if not save_txt and records is None:
        return None

    def sink(predn: torch.Tensor, path: Path, shape: tuple) -> None:
        if save_txt:
            save_one_txt(predn, save_conf, shape, save_dir / "labels" / f"{path.stem}.txt")
        if records is not None:
            records.extend(coco_records(predn, path, class_map))

    return sink


def _save_json(records: list[dict], images: list[str], data: DatasetSpec, save_dir: Path, stem: str,
               map50: float, map_: float) -> tuple[float, float]:
    """Write the COCO predictions file; with the dataset's annotation file, pycocotools' mAP50 and mAP50-95
    replace the figures given."""
    pred_json = save_dir / f"{stem}_predictions.json"
    pred_json.write_text(json.dumps(records))
    LOGGER.info(f"Saved {len(records)} detections to {pred_json}")
    anno_json = data.annotations or ("annotations/instances_val2017.json" if _is_coco(data) else None)
    if anno_json and not Path(anno_json).is_absolute():
        anno_json = data.path / anno_json
    if anno_json and Path(anno_json).exists():
        try:
            map50, map_ = _coco_eval(Path(anno_json), pred_json, images)
            LOGGER.info(f"pycocotools: mAP50 {map50:.4f}, mAP50-95 {map_:.4f} (these replace the figures above)")
        except ImportError:
            LOGGER.warning("pycocotools is not installed; COCO mAP skipped")
        except Exception as e:  # a broken annotation file must not lose the metrics already computed
            LOGGER.warning(f"{anno_json}: pycocotools evaluation failed: {e}")
    return map50, map_


def _standalone_setup(data, w, batch_size: int, imgsz: int, task: str, device: str, workers: int,
                      single_cls: bool, save_txt: bool, project, name: str, exist_ok: bool,
                      trust_checkpoint: bool) -> tuple[nn.Module, Iterable, DatasetSpec, Path, int]:
    """The command line's side of run(): device, run folder, checkpoint, dataset and its dataloader;
    returns (model, dataloader, data, save_dir, imgsz)."""
    from utils.core.distributed import select_device
    from utils.data.datasets import DataSettings, LoadImagesAndLabels, check_dataset, create_dataloader

    device = select_device(device, batch_size)
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
    (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)
    model = attempt_load(w, device=device, fuse=True, trust=trust_checkpoint)
    stride = int(model.stride.max())
    imgsz = check_img_size(imgsz, s=stride)
    data = check_dataset(data)
    data_nc = data.nc
    # the Detect head decides how many classes are predicted; a model object need not carry .nc itself
    layers = getattr(de_parallel(model), "model", None)
    model_nc = getattr(layers[-1], "nc", None) if isinstance(layers, torch.nn.Sequential) else None
    if model_nc is not None and int(model_nc) != data_nc and not single_cls:
        raise UserError(f"{w}: model has nc={model_nc} classes but the dataset has nc={data_nc}; "
                        f"pass the matching --data")
    split = "val" if task == "speed" else task
    if not data.split(split):
        raise UserError(f"dataset has no '{split}' split")
    # speed: square letterboxed batches without padding, as YOLOv5 times its models
    pad, rect = (0.0, False) if task == "speed" else (0.5, True)
    # nc drops label rows whose class the dataset does not have; no stand-in samples in evaluation
    settings = DataSettings(imgsz=imgsz, batch_size=batch_size, rect=rect, single_cls=single_cls, stride=stride,
                            pad=pad, prefix=f"{split}: ", nc=data_nc, substitute_failed=False)
    dataloader = create_dataloader(LoadImagesAndLabels(data.split(split), settings), workers=workers)
    return model, dataloader, data, save_dir, imgsz


@torch.no_grad()
def run(data, weights=None, batch_size: int = 32, imgsz: int = 640, conf_thres: float = 0.001,
        iou_thres: float = 0.6, max_det: int = 300, task: str = "val", device: str = "", workers: int = 8,
        single_cls: bool = False, augment: bool = False, verbose: bool = False, save_txt: bool = False,
        save_hybrid: bool = False, save_conf: bool = False, save_json: bool = False, project=ROOT / "runs/val",
        name: str = "exp", exist_ok: bool = False, half: bool = True, dnn: bool = False, model=None,
        dataloader=None, save_dir: Path = Path(""), plots: bool = True, callbacks=None, compute_loss=None,
        trust_checkpoint: bool = False) -> tuple[tuple, np.ndarray, tuple]:
    """Evaluate; returns ((P, R, mAP50, mAP50-95, box, obj, cls), per-class mAP50-95, (pre, inf, nms) ms).

    With `model` (training) the caller's model, dataloader and save_dir are used and weights, batch_size,
    imgsz, task, device, workers, project, name and exist_ok are ignored; without it the checkpoint
    `weights` is loaded and evaluated on the `task` split. `callbacks` is accepted for YOLOv5 signature
    compatibility and unused; augment=True and dnn=True are refused.
    """
    if augment:
        raise UserError("augment=True: test-time augmentation is not supported")
    if dnn:
        raise UserError("dnn=True: OpenCV DNN (ONNX) inference is not supported; pass a .pt checkpoint")
    standalone = model is None
    w = weights[0] if isinstance(weights, (list, tuple)) else weights
    if standalone:
        if task not in TASKS:
            raise UserError(f"--task {task}: not supported (one of {', '.join(TASKS)})")
        if not w:
            raise UserError("--weights: give a checkpoint to validate")
        if isinstance(weights, (list, tuple)) and len(weights) > 1:
            raise UserError("--weights: give one checkpoint (model ensembles are not supported)")
        ensure_weights(w)  # an official name (yolov5s.pt, the default) is fetched as YOLOv5 does
        model, dataloader, data, save_dir, imgsz = _standalone_setup(
            data, w, batch_size, imgsz, task, device, workers, single_cls, save_txt, project, name, exist_ok,
            trust_checkpoint)
    elif not isinstance(data, DatasetSpec):  # YOLOv5's callers pass a yaml path or its dict
        from utils.data.datasets import check_dataset
        data = check_dataset(data)
    nc = 1 if single_cls else data.nc

    records = [] if save_json else None
    sink = _file_sink(save_dir, save_txt, save_conf, records, COCO91 if _is_coco(data) else list(range(1000)))
    ev = evaluate(model, dataloader, data, compute_loss=compute_loss, half=half, single_cls=single_cls,
                  conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det, save_hybrid=save_hybrid,
                  plots=plots, save_dir=save_dir, verbose=verbose or (standalone and nc < 50),
                  progress=standalone or verbose, on_predictions=sink)
    mp, mr, map50, map_, *losses = ev.results
    if standalone:
        shape = (batch_size, 3, imgsz, imgsz)
        LOGGER.info(f"Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape {shape}" % ev.times)
    if records:
        map50, map_ = _save_json(records, ev.images, data, save_dir, Path(w or "model").stem, map50, map_)
    if standalone:
        if save_txt:
            LOGGER.info(f"{len(list(save_dir.glob('labels/*.txt')))} labels saved to {save_dir / 'labels'}")
        LOGGER.info(f"Results saved to {save_dir}")
    return (mp, mr, map50, map_, *losses), ev.maps(nc, map_), ev.times


@torch.no_grad()
def ap_by_iou(data, weights: str, imgsz: int = 640, batch_size: int = 32, device: str = "", workers: int = 8,
              project=ROOT / "runs/val", name: str = "exp") -> tuple[float, ...]:
    """mAP of a checkpoint on the val split at each IoU threshold 0.50, 0.55, ..., 0.95 (AP50 first, AP75 sixth):
    where a gain in mAP50-95 lands. The same pass as run(), without plots or files."""
    model, dataloader, data, save_dir, _ = _standalone_setup(data, weights, batch_size, imgsz, "val", device, workers,
                                                             False, False, project, name, True, False)
    return evaluate(model, dataloader, data, plots=False, save_dir=save_dir).ap_iou


def check_run_folder(project: str | Path, name: str) -> None:
    """One-line errors, before anything is written, for a --name that leaves --project (../x, an absolute path,
    '.') and for a --project that cannot be a folder (an existing file, a path under /proc, no permission)."""
    norm = os.path.normpath(str(name))
    if os.path.isabs(str(name)) or norm in (".", "..") or norm.startswith(f"..{os.sep}"):
        raise UserError(f"--name {name}: must name a folder inside --project {project} (such as exp)")
    here = Path(project)
    while not here.exists() and here != here.parent:  # the deepest part of the path that is there
        here = here.parent
    if not here.is_dir():
        raise UserError(f"--project {project}: {here} is a file, not a folder")
    try:  # a probe: permissions and special file systems (/proc) only show when a folder is made
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=here))
    except OSError as e:
        raise UserError(f"--project {project}: no folder can be made in {here} ({e.strerror or e})") from None


def check_flags(opt: argparse.Namespace) -> None:
    """One-line errors for numeric flags out of range, before anything loads."""
    checks = (
        ("--batch-size", opt.batch_size, opt.batch_size >= 1, ">= 1"),
        ("--imgsz", opt.imgsz, opt.imgsz >= 32, ">= 32"),
        ("--conf-thres", opt.conf_thres, 0 <= opt.conf_thres <= 1, "within [0, 1]"),
        ("--iou-thres", opt.iou_thres, 0 <= opt.iou_thres <= 1, "within [0, 1]"),
        ("--max-det", opt.max_det, opt.max_det >= 1, ">= 1"),
        ("--workers", opt.workers, opt.workers >= 0, ">= 0"),
    )
    for flag, value, ok, need in checks:
        if not ok:  # NaN fails every comparison, so it lands here too
            raise UserError(f"{flag} {value}: must be {need}")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (YOLOv5's names and defaults)."""
    p = argparse.ArgumentParser(description="Validate a YOLOv5 checkpoint on a dataset.")
    p.add_argument("--data", type=str, default="shapes.yaml", help="dataset yaml (short names resolve to data/)")
    p.add_argument("--weights", nargs="+", type=str, default="yolov5s.pt", help="checkpoint path")
    p.add_argument("--batch-size", type=int, default=32, help="batch size")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="inference size (pixels)")
    p.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    p.add_argument("--iou-thres", type=float, default=0.6, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    p.add_argument("--task", default="val", help="train, val, test or speed (time each --weights on the val "
                                                 "images: conf 0.25, IoU 0.45, FP16 on CUDA, no plots)")
    p.add_argument("--device", default="", help="cuda device, i.e. 0 or cpu")
    p.add_argument("--workers", type=int, default=8, help="max dataloader workers")
    p.add_argument("--single-cls", action="store_true", help="treat as single-class dataset")
    p.add_argument("--verbose", action="store_true", help="report mAP by class")
    p.add_argument("--save-txt", action="store_true", help="save results to *.txt")
    p.add_argument("--save-hybrid", action="store_true", help="save label+prediction hybrid results to *.txt")
    p.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    p.add_argument("--save-json", action="store_true", help="save a COCO-JSON results file")
    p.add_argument("--project", default=ROOT / "runs/val", help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    p.add_argument("--half", action="store_true", help="use FP16 half-precision inference (CUDA only)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of a checkpoint you trust (runs code stored in the file)")
    opt = p.parse_args(argv)
    opt.save_json |= str(opt.data).endswith("coco.yaml")
    opt.save_txt |= opt.save_hybrid
    return opt


def main(argv: list[str] | None = None) -> int:
    """CLI entry: run validation, printing user errors as one line."""
    setup_logging()
    opt = parse_opt(argv)
    keep_freed_memory()  # as train.py: reuse freed activation memory rather than page-fault it in per batch
    try:
        check_flags(opt)
        check_run_folder(opt.project, opt.name)
        if opt.task == "speed":
            # YOLOv5's speed settings: timing at deployment thresholds, FP16 where the device has it
            opt.conf_thres, opt.iou_thres, opt.save_json, opt.half = 0.25, 0.45, False, True
            for w in (opt.weights if isinstance(opt.weights, list) else [opt.weights]):
                run(**{**vars(opt), "weights": w}, plots=False)
        else:
            run(**vars(opt))
    except UserError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
