"""Prune a YOLOv5 checkpoint's channels (Torch-Pruning), to distil it back afterwards with train.py.

    python prune.py --weights yolov5s.pt --ratio 0.5
    python prune.py --weights best.pt --ratio 0.5 --importance taylor --data shapes16.yaml --imgsz 160
    python train.py --data shapes16.yaml --weights runs/prune/exp/pruned.pt --t_weights best.pt   # recover

Writes <project>/<name>/pruned.pt (an official-layout checkpoint of the smaller model) and prune.yaml (how it
was made). This file parses flags and wires the pieces; the pruning is utils.training.prune.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import sys
from copy import deepcopy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from models.yolo import check_img_size
from utils.core.download import ensure_weights
from utils.core.errors import UserError, report
from utils.core.log import increment_path, setup_logging
from utils.training.prune import (IMPORTANCE, check_options, load_detection_model, make_recipe, measure_latency,
                                  prune_model, save_pruned, summarise)

if TYPE_CHECKING:
    from utils.data.datasets import DatasetSpec

ROOT = Path(__file__).resolve().parent

LOGGER = logging.getLogger("yolov5kd")
DEFAULT_HYP = ROOT / "data/hyps/hyp.scratch-low.yaml"


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Prune the channels of a YOLOv5 checkpoint (Detect's outputs stay whole).")
    p.add_argument("--weights", type=str, default="yolov5s.pt", help="checkpoint to prune")
    p.add_argument("--ratio", type=float, default=0.5, help="share of the prunable channels to remove, in (0, 1)")
    p.add_argument("--importance", default="l1", choices=IMPORTANCE,
                   help="channel ranking: l1/l2 weight magnitude, bn BatchNorm scale, lamp, taylor (needs --data)")
    p.add_argument("--global", dest="global_pruning", action="store_true",
                   help="rank all layers' channels together (default: remove --ratio of every layer)")
    p.add_argument("--round-to", type=int, default=None, help="keep each pruned width a multiple of this")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640,
                   help="image size for GFLOPs, latency, mAP and taylor batches (pixels)")
    p.add_argument("--data", type=str, default=None, help="dataset yaml: mAP before and after, and taylor's images")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of the mAP pass and the taylor batches")
    p.add_argument("--taylor-batches", type=int, default=4, help="labelled train batches taylor takes gradients on")
    p.add_argument("--hyp", type=str, default=str(DEFAULT_HYP), help="hyp yaml whose loss gains taylor uses")
    p.add_argument("--latency-runs", type=int, default=10, help="timed CPU forwards per model (0: no latency)")
    p.add_argument("--workers", type=int, default=8, help="max dataloader workers")
    p.add_argument("--project", default=str(ROOT / "runs/prune"), help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of a checkpoint you trust (runs code stored in the file)")
    return p.parse_args(argv)


def _loaders(opt: argparse.Namespace, model: nn.Module, imgsz: int):
    """(dataset spec, val dataloader, train batches for taylor or None) for --data; refuses a class mismatch."""
    from utils.data.datasets import DataSettings, LoadImagesAndLabels, check_dataset, create_dataloader

    data = check_dataset(opt.data)
    nc = data.nc
    if nc != int(model.model[-1].nc):
        raise UserError(f"{opt.weights}: model has nc={model.model[-1].nc} classes but {opt.data} has nc={nc}; "
                        f"pass the matching --data")
    if not data.val:
        raise UserError(f"{opt.data}: dataset has no 'val' split")
    stride = int(model.stride.max())
    val = DataSettings(imgsz=imgsz, batch_size=opt.batch_size, rect=True, stride=stride, pad=0.5, prefix="val: ",
                       nc=nc, substitute_failed=False)
    val_loader = create_dataloader(LoadImagesAndLabels(data.val, val), workers=opt.workers)
    batches = None
    if opt.importance == "taylor":
        if opt.taylor_batches < 1:
            raise UserError(f"--taylor-batches {opt.taylor_batches}: must be at least 1")
        if not data.train:
            raise UserError(f"{opt.data}: dataset has no 'train' split for the taylor gradients")
        train = DataSettings(imgsz=imgsz, batch_size=opt.batch_size, stride=stride, prefix="taylor: ", nc=nc,
                             substitute_failed=False)
        loader = create_dataloader(LoadImagesAndLabels(data.train, train), workers=opt.workers, shuffle=True)
        batches = itertools.islice(loader, opt.taylor_batches)
    return data, val_loader, batches


def evaluate_map(model: nn.Module, data: DatasetSpec, loader) -> tuple[float, float]:
    """(mAP50-95, mAP50) by val.run, on what val.py will load from the saved file: fp16-rounded, fused."""
    import val

    m = deepcopy(model).half().float().eval().fuse()
    results, _, _ = val.run(data, model=m, dataloader=loader, half=False, plots=False)
    return float(results[3]), float(results[2])


def _row(label: str, before, after, fmt: str, share: bool = False) -> str:
    if before is None or after is None:
        return ""
    tail = f"  ({after / before:.1%})" if share and before else ""
    return f"{label:<22}{format(before, fmt):>14} -> {format(after, fmt):<14}{tail}"


def run(opt: argparse.Namespace) -> Path:
    """Prune opt.weights as the options say; returns the written checkpoint's path."""
    check_options(opt.ratio, opt.importance, opt.round_to, bool(opt.data))
    ensure_weights(opt.weights)  # an official name (yolov5s.pt) that is not here is fetched, as val.py does
    model = load_detection_model(opt.weights, trust=opt.trust_checkpoint)
    imgsz = check_img_size(opt.imgsz, s=int(model.stride.max()))
    data = val_loader = batches = hyp = None
    if opt.data:
        data, val_loader, batches = _loaders(opt, model, imgsz)
    if opt.importance == "taylor":
        from optimizer.config import KD_SPECS  # the hyp files also hold the distillation keys
        from utils.training.hyp import load_hyp
        hyp = load_hyp(opt.hyp, KD_SPECS)

    before = summarise(model, imgsz)
    map_before = evaluate_map(model, data, val_loader) if data else None
    original = deepcopy(model) if opt.latency_runs > 0 else None  # timed beside the pruned one, turn by turn
    prune_model(model, opt.ratio, opt.importance, opt.global_pruning, opt.round_to, batches=batches, hyp=hyp,
                imgsz=imgsz)
    after = summarise(model, imgsz)
    map_after = evaluate_map(model, data, val_loader) if data else None
    if original is not None:
        before["latency_ms"], after["latency_ms"] = measure_latency([original, model], imgsz, opt.latency_runs)
        del original

    mode = "global" if opt.global_pruning else "per layer"
    rt = f", round-to {opt.round_to}" if opt.round_to else ""
    lines = [f"Pruned {opt.weights}: {opt.ratio:g} of the channels, {opt.importance}, {mode}{rt}",
             f"{'':<22}{'before':>14}    {'after':<14}",
             _row("parameters", before["params"], after["params"], ",d", share=True),
             _row(f"GFLOPs @{imgsz}", before["gflops"], after["gflops"], ".3g", share=True),
             _row("CPU latency bs1 (ms)", before.get("latency_ms"), after.get("latency_ms"), ".1f", share=True)]
    if map_before is not None and map_after is not None:
        lines += [_row("mAP50-95", map_before[0], map_after[0], ".4f"),
                  _row("mAP50", map_before[1], map_after[1], ".4f")]
    if opt.latency_runs > 0:
        n = torch.get_num_threads()
        lines.append(f"(latency: median of {opt.latency_runs} runs each, taking turns, fused fp32, {n} thread"
                     f"{'s' if n != 1 else ''})")
    LOGGER.info("\n".join(ln for ln in lines if ln))

    extra = {}
    if map_before is not None and map_after is not None:
        extra = {"map50_95_before": round(map_before[0], 5), "map50_95_after": round(map_after[0], 5),
                 "map50_before": round(map_before[1], 5), "map50_after": round(map_after[1], 5)}
    if opt.importance == "taylor":
        extra["taylor_batches"] = opt.taylor_batches
        extra["batch_size"] = opt.batch_size
    recipe = make_recipe(opt.weights, opt.ratio, opt.importance, opt.global_pruning, opt.round_to, imgsz, before,
                         after, data=opt.data, extra=extra)
    save_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok)
    path = save_pruned(model, recipe, save_dir)
    LOGGER.info(f"Saved {path} and {save_dir / 'prune.yaml'}; recover it with: python train.py --data <data.yaml> "
                f"--weights {path} --t_weights {opt.weights}")
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI entry: prune, printing user errors as one line (exit 2, nothing written)."""
    setup_logging()
    opt = parse_opt(argv)
    try:
        run(opt)
    except UserError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
