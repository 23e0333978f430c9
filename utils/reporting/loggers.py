"""Per-run logging on rank 0: results.csv rows, TensorBoard scalars, first training-batch mosaics, final plots."""
from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from utils.reporting import plots as _plots
from utils.reporting.plots import load_results_csv

LOGGER = logging.getLogger("yolov5kd")

RESULTS_KEYS = [
    'epoch',
    'train/box_loss', 'train/obj_loss', 'train/cls_loss',
    'metrics/precision', 'metrics/recall', 'metrics/mAP_0.5', 'metrics/mAP_0.5:0.95',
    'val/box_loss', 'val/obj_loss', 'val/cls_loss',
    'x/lr0', 'x/lr1', 'x/lr2',
]
KD_KEYS = ['train/dbox_loss', 'train/dobj_loss', 'train/dcls_loss']  # the columns a distilled run adds

__all__ = ['RESULTS_KEYS', 'KD_KEYS', 'RunLogger', 'trim_results_csv', 'read_results_csv', 'format_header', 'format_row']


def read_results_csv(path: Path | str) -> dict[str, list[float]]:
    """Columns of a results.csv keyed by stripped header name; {} if the file is missing or empty."""
    return load_results_csv(path)


def format_header(keys: Sequence[str]) -> str:
    """The results.csv header line (no newline): each name right-aligned to width 20, comma-separated."""
    return ','.join('%20s' % k for k in keys)


def format_row(values: Sequence[float]) -> str:
    """One results.csv data line (no newline): each value as %20.5g, comma-separated."""
    return ','.join('%20.5g' % float(v) for v in values)


def _part(key: str) -> str:
    """The loss part behind a train/<part>_loss column."""
    return key[len('train/'):-len('_loss')]


# the criterion's first parts, behind YOLOv5's own train/ columns: box, obj, cls
_YOLO_PARTS = tuple(_part(k) for k in RESULTS_KEYS if k.startswith('train/'))


def _scalar(v: Any) -> float:
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


def _snapshot(x: Any) -> Any:
    # the training loop reuses/mutates its batch tensors, so the plotting thread gets its own copy
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().clone()
    if isinstance(x, np.ndarray):
        return x.copy()
    return x


def trim_results_csv(csv: Path | str, last_epoch: int) -> int:
    """Drop results.csv rows of epochs after `last_epoch` (rows a resumed run will write again); returns
    how many were dropped. A kill during a checkpoint save leaves a row whose weights were never saved."""
    csv = Path(csv)
    if not csv.is_file():
        return 0
    lines = csv.read_text().splitlines(keepends=True)
    if len(lines) < 2:
        return 0
    keep = [lines[0]]
    for ln in lines[1:]:
        try:
            epoch = float(ln.split(',', 1)[0])
        except ValueError:
            continue  # a row cut short by the kill
        if epoch <= last_epoch:
            keep.append(ln)
    dropped = len(lines) - len(keep)
    if dropped:
        tmp = csv.with_name(csv.name + '.tmp')
        tmp.write_text(''.join(keep))
        os.replace(tmp, csv)
    return dropped


class RunLogger:
    """Rank-0 logger writing results.csv, TensorBoard scalars and train_batch mosaics into save_dir."""

    def __init__(self, save_dir: Path | str, hyp: Mapping[str, Any] | None = None,
                 opt: Mapping[str, Any] | None = None, kd: bool = False,
                 tensorboard: bool = True, plots: bool = True, parts: Sequence[str] | None = None,
                 figures: Mapping[str, str] | None = None, columns: Sequence[str] = ()) -> None:
        """Prepare the run folder; results.csv is created on the first log_epoch (or appended to on resume).

        `parts` are the training criterion's loss parts in its order; the first three are YOLOv5's columns and
        each further part adds a `train/<part>_loss` column, or `train/<figures[part]>` for a part that is a count,
        not a loss (pseudo boxes per image). `kd=True` is short for the distillation parts. `columns` add x/<name>
        columns after x/lr0..2 (the distillation schedule's multiplier, x/distill), given to log_epoch by name."""
        self.save_dir = Path(save_dir)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        self.hyp = dict(hyp) if hyp else {}
        self.opt = dict(vars(opt)) if opt is not None and not isinstance(opt, Mapping) else dict(opt or {})
        if parts is None:
            parts = _YOLO_PARTS + (tuple(_part(k) for k in KD_KEYS) if kd else ())
        if tuple(parts[:3]) != _YOLO_PARTS:
            raise ValueError(f'the first loss parts must be {_YOLO_PARTS}, got {tuple(parts)}')
        self.parts = tuple(parts)
        self.kd = len(self.parts) > 3
        self.plots = bool(plots)
        figures = dict(figures or {})
        self.columns = tuple(columns)
        lr_end = RESULTS_KEYS.index('x/lr2') + 1
        self.keys = RESULTS_KEYS[:lr_end] + [f'x/{c}' for c in self.columns] + RESULTS_KEYS[lr_end:] + \
            [f'train/{figures[k]}' if k in figures else f'train/{k}_loss' for k in self.parts[3:]]
        self.csv = self.save_dir / 'results.csv'
        self._use_tb = bool(tensorboard)
        self._tb: Any = None
        self._tb_failed = False
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._check_existing_header()

    # ------------------------------------------------------------------------------------------------ results.csv
    def _check_existing_header(self) -> None:
        if not self.csv.is_file() or self.csv.stat().st_size == 0:
            return
        with open(self.csv) as f:
            first = f.readline()
        found = [k.strip() for k in first.split(',')]
        if found != self.keys:
            # appending rows of a different width would silently misalign every later column
            LOGGER.warning('WARNING: %s has columns %s but this run logs %s; rows may not line up',
                           self.csv, found, self.keys)

    @property
    def epochs_logged(self) -> int:
        """Number of data rows already in results.csv."""
        return len(read_results_csv(self.csv).get('epoch', []))

    def log_epoch(self, epoch: int, train_losses: Mapping[str, float] | Sequence[float], results: Sequence[float],
                  lrs: Sequence[float], columns: Mapping[str, float] | None = None) -> None:
        """Append one results.csv row (and TensorBoard scalars) for this epoch; losses by part name or in order;
        `columns` the x/ columns' values by name."""
        if isinstance(train_losses, Mapping):
            train_losses = [train_losses.get(k, 0.0) for k in self.parts]
        tl = [_scalar(v) for v in train_losses]
        res = [_scalar(v) for v in results]
        lr = [_scalar(v) for v in lrs]
        if len(tl) not in (3, 6, len(self.parts)):  # 6: any run's output-distillation parts
            raise ValueError(f'train_losses needs 3 or {len(self.parts)} values ({", ".join(self.parts)}), '
                             f'got {len(tl)}')
        if len(res) != 7:
            raise ValueError(f'results needs 7 values (P, R, mAP50, mAP50-95, val box, obj, cls), got {len(res)}')
        if len(lr) != 3:
            raise ValueError(f'lrs needs 3 values, got {len(lr)}')
        missing = [c for c in self.columns if c not in (columns or {})]
        if missing:
            raise ValueError(f'log_epoch needs the value of {", ".join(missing)}')
        values = [float(epoch)] + tl[:3] + res + lr + [_scalar(columns[c]) for c in self.columns]
        if self.kd:
            # a KD run whose epoch carried no distillation term still needs a full-width row
            extra = tl[3:len(self.parts)]
            values += extra + [0.0] * (len(self.parts) - 3 - len(extra))
        new = not self.csv.is_file() or self.csv.stat().st_size == 0
        with open(self.csv, 'a') as f:
            if new:
                f.write(format_header(self.keys) + '\n')
            f.write(format_row(values) + '\n')
        self._tb_scalars(dict(zip(self.keys[1:], values[1:])), int(epoch))

    # ------------------------------------------------------------------------------------------------ TensorBoard
    def _writer(self) -> Any:
        if not self._use_tb or self._tb_failed:
            return None
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.save_dir))
            except Exception as e:  # noqa: BLE001 - TensorBoard is optional
                self._tb_failed = True
                warnings.warn(f'TensorBoard unavailable ({type(e).__name__}: {e}); continuing without it')
                return None
            try:
                if self.hyp:
                    self._tb.add_text('hyp', '\n'.join(f'{k}: {v}' for k, v in self.hyp.items()), 0)
                if self.opt:
                    self._tb.add_text('opt', '\n'.join(f'{k}: {v}' for k, v in self.opt.items()), 0)
            except Exception as e:  # noqa: BLE001
                LOGGER.warning('WARNING: TensorBoard text logging failed: %s', e)
        return self._tb

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Extra TensorBoard scalars (not in results.csv), e.g. the distillation balance ratios."""
        self._tb_scalars(scalars, step)

    def _tb_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        tb = self._writer()
        if tb is None:
            return
        for k, v in scalars.items():
            tb.add_scalar(k, v, step)
        tb.flush()  # so a crashed run still has its curves on disk

    # -------------------------------------------------------------------------------------------------- images
    def log_batch_images(self, ni: int, images: Any, targets: Any, paths: Sequence[str] | None = None,
                         names: Mapping[int, str] | Sequence[str] | None = None, suffix: str = '') -> None:
        """Write train_batch{ni}{suffix}.jpg for the first three batches, off the training thread."""
        if not self.plots or ni >= 3 or self._closed:
            return
        args = (_snapshot(images), _snapshot(targets), list(paths) if paths is not None else None,
                self.save_dir / f'train_batch{ni}{suffix}.jpg', names)
        th = threading.Thread(target=_plots.plot_images, args=args, name=f'plot_train_batch{ni}{suffix}',
                              daemon=True)
        th.start()
        self._threads.append(th)

    def _join(self) -> None:
        for th in self._threads:
            th.join()
        self._threads.clear()

    # ---------------------------------------------------------------------------------------------------- end
    def on_train_end(self) -> None:
        """Finish image threads, draw results.png and close TensorBoard."""
        self._join()
        if self.plots and self.csv.is_file():
            _plots.plot_results(self.csv)
        self.close()

    def close(self) -> None:
        """Join pending image threads and close TensorBoard; safe to call twice."""
        self._join()
        if self._tb is not None:
            try:
                self._tb.close()
            finally:
                self._tb = None
        self._closed = True

    def __enter__(self) -> 'RunLogger':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
