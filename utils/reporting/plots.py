"""Training and validation plots: batch mosaics, label statistics, results curves, PR/metric curves, confusion matrix.

Every public plotting function is wrapped so that a failure is logged as a warning instead of propagating:
a broken plot must never end a training run. Tests set ``STRICT = True`` (or env ``KD_PLOTS_STRICT=1``) so
that the same failures surface as exceptions there.
"""
from __future__ import annotations

import colorsys
import functools
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import cv2
import numpy as np
import torch
from matplotlib.figure import Figure  # drawn without pyplot: no GUI backend is chosen, no window ever opens

from utils.core.boxes import xyxy2xywh
from utils.core.smoothing import smooth

LOGGER = logging.getLogger("yolov5kd")
STRICT = os.environ.get('KD_PLOTS_STRICT', '0') == '1'

__all__ = ['plot_images', 'output_to_target', 'plot_labels', 'plot_results', 'plot_pr_curve', 'plot_mc_curve',
           'plot_confusion_matrix', 'plot_evolve', 'class_colour', 'load_results_csv', 'STRICT']

F = TypeVar('F', bound=Callable[..., Any])


def _never_raise(func: F) -> F:
    """Turn exceptions into warnings unless STRICT is set."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - plotting is best-effort during training
            if STRICT:
                raise
            LOGGER.warning('WARNING: %s failed: %s: %s', func.__name__, type(e).__name__, e)
            return None

    return wrapper  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------- helpers
def class_colour(i: int, bgr: bool = False) -> tuple[int, int, int]:
    """A stable, well-separated 0-255 colour for class index i."""
    # golden-ratio hue stepping keeps neighbouring class ids visually distinct for any number of classes
    h = (int(i) * 0.618033988749895 + 0.05) % 1.0
    s = 0.80 if int(i) % 2 == 0 else 0.60
    r, g, b = colorsys.hsv_to_rgb(h, s, 0.95)
    rgb = (int(r * 255), int(g * 255), int(b * 255))
    return rgb[::-1] if bgr else rgb


def _to_numpy(x: Any) -> np.ndarray:
    if x is None:
        return np.zeros((0,))
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy() if x.dtype in (torch.float16, torch.bfloat16) else x.detach().cpu().numpy()
    return np.asarray(x)


def _name_of(names: Mapping[int, str] | Sequence[str] | None, c: int) -> str:
    if names is None:
        return str(c)
    try:
        return str(names[c])
    except (KeyError, IndexError, TypeError):
        return str(c)


def _names_list(names: Mapping[int, str] | Sequence[str] | None, nc: int) -> list[str]:
    return [_name_of(names, i) for i in range(nc)]


def _gauss_smooth(y: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """Gaussian smoothing with mirrored edges; NaNs are bridged by interpolation first."""
    y = np.asarray(y, dtype=float)
    n = len(y)
    finite = np.isfinite(y)
    if n < 3 or finite.sum() < 2:
        return y.copy()
    if not finite.all():
        idx = np.arange(n)
        y = np.interp(idx, idx[finite], y[finite])
    radius = max(1, min(int(4 * sigma + 0.5), n - 1))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(y, radius, mode='symmetric')
    return np.convolve(padded, k, mode='valid')


def _save(fig: Figure, path: Path, dpi: int = 200) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    # Figure objects built without pyplot are not tracked globally, so dropping the reference frees them


# ------------------------------------------------------------------------------------------------------ batch mosaic
@_never_raise
def plot_images(images: torch.Tensor | np.ndarray,
                targets: torch.Tensor | np.ndarray | None = None,
                paths: Sequence[str] | None = None,
                fname: Path | str = 'images.jpg',
                names: Mapping[int, str] | Sequence[str] | None = None,
                max_size: int = 1920,
                max_subplots: int = 16) -> None:
    """Write a JPEG grid of a batch of (B,3,H,W) images with their [img_idx, cls, x, y, w, h(, conf)] boxes."""
    imgs = _to_numpy(images)
    if imgs.ndim == 3:
        imgs = imgs[None]
    if imgs.ndim != 4 or imgs.shape[0] == 0:
        return
    imgs = imgs.astype(np.float32)
    if imgs.size and np.nanmax(imgs) <= 1.0:
        imgs = imgs * 255.0  # network-ready floats in [0, 1]
    imgs = np.clip(np.nan_to_num(imgs), 0, 255).astype(np.uint8)

    bs = min(imgs.shape[0], max_subplots)
    _, _, h, w = imgs.shape
    cols = math.ceil(bs ** 0.5)
    rows = math.ceil(bs / cols)
    scale = min(1.0, max_size / max(rows * h, cols * w))
    th, tw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))

    mosaic = np.full((rows * th, cols * tw, 3), 255, dtype=np.uint8)
    for i in range(bs):
        tile = np.ascontiguousarray(imgs[i].transpose(1, 2, 0)[..., ::-1])  # CHW RGB -> HWC BGR for cv2
        if tile.shape[2] == 1:
            tile = np.repeat(tile, 3, axis=2)
        if (th, tw) != (h, w):
            tile = cv2.resize(tile, (tw, th), interpolation=cv2.INTER_AREA)
        r, c = divmod(i, cols)
        mosaic[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = tile[..., :3]

    t = _to_numpy(targets)
    t = t.reshape(-1, t.shape[-1]) if t.size else np.zeros((0, 6), dtype=np.float32)
    t = t.astype(np.float64)
    has_conf = t.shape[1] >= 7
    if len(t):
        boxes = t[:, 2:6].copy()
        if np.nanmax(np.abs(boxes)) <= 1.01:  # normalised coordinates
            boxes[:, [0, 2]] *= w
            boxes[:, [1, 3]] *= h
        boxes *= scale
        x1y1 = boxes[:, :2] - boxes[:, 2:] / 2
        x2y2 = boxes[:, :2] + boxes[:, 2:] / 2
        t = np.concatenate([t[:, :2], x1y1, x2y2, t[:, 6:7] if has_conf else np.ones((len(t), 1))], 1)

    fs = max(0.4, min(th, tw) / 640 * 0.8)  # font scale follows tile size so labels stay legible
    lw = max(1, int(round(min(th, tw) / 320)))
    font = cv2.FONT_HERSHEY_SIMPLEX
    for i in range(bs):
        r, c = divmod(i, cols)
        x0, y0 = c * tw, r * th
        cv2.rectangle(mosaic, (x0, y0), (x0 + tw - 1, y0 + th - 1), (255, 255, 255), max(1, lw))
        if paths is not None and i < len(paths) and paths[i]:
            label = Path(str(paths[i])).name[:40]
            cv2.putText(mosaic, label, (x0 + 4, y0 + int(22 * fs) + 4), font, fs * 0.7, (220, 220, 220),
                        max(1, lw), cv2.LINE_AA)
        sel = t[t[:, 0].astype(int) == i] if len(t) else t
        for row in sel:
            cls, conf = int(row[1]), float(row[6])
            if has_conf and conf <= 0.25:
                continue
            p1 = (int(round(x0 + row[2])), int(round(y0 + row[3])))
            p2 = (int(round(x0 + row[4])), int(round(y0 + row[5])))
            colour = class_colour(cls, bgr=True)
            cv2.rectangle(mosaic, p1, p2, colour, lw, cv2.LINE_AA)
            text = _name_of(names, cls) + (f' {conf:.1f}' if has_conf else '')
            (txw, txh), base = cv2.getTextSize(text, font, fs * 0.7, 1)
            ty = p1[1] - 2 if p1[1] - txh - 4 >= y0 else p1[1] + txh + 2  # keep text inside the tile
            cv2.rectangle(mosaic, (p1[0], ty - txh - 2), (p1[0] + txw + 2, ty + base - 1), colour, -1)
            cv2.putText(mosaic, text, (p1[0] + 1, ty - 1), font, fs * 0.7, (255, 255, 255), 1, cv2.LINE_AA)

    fname = Path(fname)
    fname.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(fname), mosaic):
        raise OSError(f'cv2.imwrite could not write {fname}')


def output_to_target(output: Sequence[torch.Tensor], max_det: int = 300) -> torch.Tensor:
    """Per-image NMS outputs (n,6) [x1,y1,x2,y2,conf,cls] -> (N,7) [img_idx, cls, x, y, w, h, conf] in pixels."""
    rows = []
    for i, o in enumerate(output):
        o = torch.as_tensor(o).detach().cpu().float()[:max_det]
        if o.numel() == 0:
            continue
        o = o.reshape(-1, o.shape[-1])
        idx = torch.full((len(o), 1), float(i))
        rows.append(torch.cat((idx, o[:, 5:6], xyxy2xywh(o[:, :4]), o[:, 4:5]), 1))
    return torch.cat(rows, 0) if rows else torch.zeros((0, 7))


# ------------------------------------------------------------------------------------------------------ label stats
@_never_raise
def plot_labels(labels: np.ndarray | torch.Tensor,
                names: Mapping[int, str] | Sequence[str] | None = None,
                save_dir: Path | str = Path('')) -> None:
    """Write labels.jpg (class counts, centre and size distributions, box overlay) and labels_correlogram.jpg."""
    save_dir = Path(save_dir)
    lb = _to_numpy(labels).astype(np.float64)
    lb = lb.reshape(-1, 5) if lb.size else np.zeros((0, 5))
    c = lb[:, 0].astype(int)
    nc = max(len(names) if names is not None else 0, int(c.max()) + 1 if len(c) else 0)
    xywh = lb[:, 1:5]

    fig = Figure(figsize=(8, 8), tight_layout=True)
    ax = fig.subplots(2, 2).ravel()

    counts = np.bincount(c, minlength=nc) if len(c) else np.zeros(nc, dtype=int)
    bars = ax[0].bar(range(nc), counts, width=0.8)
    for i, b in enumerate(bars):
        b.set_color(np.array(class_colour(i)) / 255)
    ax[0].set_ylabel('instances')
    if 0 < nc < 30:
        ax[0].set_xticks(range(nc))
        ax[0].set_xticklabels(_names_list(names, nc), rotation=90, fontsize=8)
    else:
        ax[0].set_xlabel('classes')

    # 2-D histograms show density where a scatter of 100k points would just be a solid blob
    bins = 50
    if len(lb):
        ax[1].hist2d(xywh[:, 0], xywh[:, 1], bins=bins, range=[[0, 1], [0, 1]], cmap='Blues')
        ax[3].hist2d(xywh[:, 2], xywh[:, 3], bins=bins, range=[[0, 1], [0, 1]], cmap='Blues')
    ax[1].set(xlabel='x', ylabel='y', xlim=(0, 1), ylim=(0, 1))
    ax[3].set(xlabel='width', ylabel='height', xlim=(0, 1), ylim=(0, 1))

    # overlay of up to 1000 boxes at their true positions hints at placement and aspect bias
    canvas = np.full((1000, 1000, 3), 255, dtype=np.uint8)
    for cls, (x, y, bw, bh) in zip(c[:1000], xywh[:1000]):
        p1 = (int((x - bw / 2) * 1000), int((y - bh / 2) * 1000))
        p2 = (int((x + bw / 2) * 1000), int((y + bh / 2) * 1000))
        cv2.rectangle(canvas, p1, p2, class_colour(cls), 1)
    ax[2].imshow(canvas, extent=(0, 1, 1, 0))
    ax[2].set_title('boxes (first 1000)', fontsize=9)
    ax[2].axis('off')
    for a in (ax[0], ax[1], ax[3]):
        for side in ('top', 'right'):
            a.spines[side].set_visible(False)
    _save(fig, save_dir / 'labels.jpg')

    _plot_correlogram(xywh, save_dir / 'labels_correlogram.jpg')


def _plot_correlogram(xywh: np.ndarray, path: Path) -> None:
    keys = ('x', 'y', 'width', 'height')
    fig = Figure(figsize=(8, 8))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.07, top=0.98, wspace=0.25, hspace=0.25)
    axs = fig.subplots(4, 4)
    data = xywh[:20000]  # a subsample is enough to show the shape of the joint distributions
    for i in range(4):
        for j in range(4):
            a = axs[i, j]
            if len(data):
                if i == j:
                    a.hist(data[:, i], bins=50, range=(0, 1), color='tab:blue')
                else:
                    a.hist2d(data[:, j], data[:, i], bins=50, range=[[0, 1], [0, 1]], cmap='Blues')
            a.set_xlim(0, 1)
            if i != j:
                a.set_ylim(0, 1)
            a.tick_params(labelsize=6)
            if i == 3:
                a.set_xlabel(keys[j], fontsize=8)
            if j == 0:
                a.set_ylabel(keys[i], fontsize=8)
    _save(fig, path, dpi=150)


# --------------------------------------------------------------------------------------------------- results.csv
def load_results_csv(path: Path | str) -> dict[str, list[float]]:
    """Parse a results.csv into {stripped header: column values}; {} when absent or empty."""
    path = Path(path)
    if not path.is_file():
        return {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        return {}
    keys = [k.strip() for k in lines[0].split(',')]
    out: dict[str, list[float]] = {k: [] for k in keys}
    for ln in lines[1:]:
        parts = ln.split(',')
        for k, v in zip(keys, parts):
            try:
                out[k].append(float(v))
            except ValueError:
                out[k].append(float('nan'))
        for k in keys[len(parts):]:  # a truncated last line (crash mid-write) still lines up
            out[k].append(float('nan'))
    return out


@_never_raise
def plot_results(file: Path | str = 'results.csv') -> None:
    """Plot every results.csv column against epoch, with a smoothed trend, into results.png beside it."""
    file = Path(file)
    if file.is_dir():
        file = file / 'results.csv'
    data = load_results_csv(file)
    if not data:
        LOGGER.warning('WARNING: plot_results: no data in %s', file)
        return
    keys = list(data)
    x = np.asarray(data.get('epoch', range(len(data[keys[0]]))), dtype=float)
    cols = [k for k in keys if k != 'epoch']
    n = max(1, len(cols))
    ncols = math.ceil(n / 2)
    fig = Figure(figsize=(2.2 * ncols + 1, 5.5))
    # fixed margins instead of tight_layout: the layout solver costs more than the drawing on 16 panels
    fig.subplots_adjust(left=0.03, right=0.99, bottom=0.06, top=0.93, wspace=0.3, hspace=0.3)
    axs = np.atleast_1d(fig.subplots(2, ncols)).ravel()
    for a, k in zip(axs, cols):
        y = np.asarray(data[k], dtype=float)
        a.plot(x, y, marker='.', label='results', linewidth=2, markersize=6)
        if len(y) >= 3:
            a.plot(x, _gauss_smooth(y), ':', label='smooth', linewidth=2)
        a.set_title(k, fontsize=10)
        a.tick_params(labelsize=7)
    for a in axs[len(cols):]:
        a.axis('off')
    if cols:
        axs[0].legend(fontsize=7)
    _save(fig, file.with_name('results.png'))


# ------------------------------------------------------------------------------------------------- metric curves
@_never_raise
def plot_pr_curve(px: np.ndarray, py: Sequence[np.ndarray] | np.ndarray, ap: np.ndarray,
                  save_dir: Path | str = Path('pr_curve.png'),
                  names: Mapping[int, str] | Sequence[str] = ()) -> None:
    """Precision-recall curves per class (if fewer than 21) and their mean, labelled with AP@0.5."""
    px = np.asarray(px, dtype=float)
    curves = [np.asarray(p, dtype=float).ravel() for p in py] if len(py) else []
    ap = np.asarray(ap, dtype=float)
    ap50 = ap.reshape(len(ap), -1)[:, 0] if ap.size else np.zeros(0)
    fig = Figure(figsize=(9, 6), tight_layout=True)
    ax = fig.subplots(1, 1)
    if 0 < len(curves) < 21:
        for i, y in enumerate(curves):
            a = f' {ap50[i]:.3f}' if i < len(ap50) else ''
            ax.plot(px, y, linewidth=1, label=f'{_name_of(names, i)}{a}')
    elif curves:
        for y in curves:
            ax.plot(px, y, linewidth=1, color='grey')
    if curves:
        mean = np.stack(curves, 0).mean(0)
        ax.plot(px, mean, linewidth=3, color='blue', label=f'all classes {ap50.mean() if len(ap50) else 0.0:.3f} mAP@0.5')
        ax.legend(bbox_to_anchor=(1.04, 1), loc='upper left', fontsize=8)
    ax.set(xlabel='Recall', ylabel='Precision', xlim=(0, 1), ylim=(0, 1), title='Precision-Recall Curve')
    _save(fig, Path(save_dir), dpi=200)


@_never_raise
def plot_mc_curve(px: np.ndarray, py: np.ndarray, save_dir: Path | str = Path('mc_curve.png'),
                  names: Mapping[int, str] | Sequence[str] = (), xlabel: str = 'Confidence',
                  ylabel: str = 'Metric') -> None:
    """Metric-vs-confidence curves per class (if fewer than 21) and a smoothed mean labelled with its peak."""
    px = np.asarray(px, dtype=float)
    py = np.asarray(py, dtype=float)
    if py.ndim == 1:
        py = py[None] if py.size else py.reshape(0, len(px))
    fig = Figure(figsize=(9, 6), tight_layout=True)
    ax = fig.subplots(1, 1)
    if 0 < len(py) < 21:
        for i, y in enumerate(py):
            ax.plot(px, y, linewidth=1, label=_name_of(names, i))
    elif len(py):
        for y in py:
            ax.plot(px, y, linewidth=1, color='grey')
    if len(py):
        y = smooth(py.mean(0), 0.05)
        j = int(np.argmax(y))
        ax.plot(px, y, linewidth=3, color='blue', label=f'all classes {y[j]:.2f} at {px[j]:.3f}')
        ax.legend(bbox_to_anchor=(1.04, 1), loc='upper left', fontsize=8)
    ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1), title=f'{ylabel}-{xlabel} Curve')
    _save(fig, Path(save_dir), dpi=200)


# ---------------------------------------------------------------------------------------------- confusion matrix
@_never_raise
def plot_confusion_matrix(matrix: np.ndarray, nc: int, save_dir: Path | str = Path(''),
                          names: Mapping[int, str] | Sequence[str] = (), normalize: bool = True) -> None:
    """Heatmap of the (nc+1)^2 matrix (rows predicted, columns true, last index background) to confusion_matrix.png."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.size == 0:
        m = np.zeros((nc + 1, nc + 1))
    n = m.shape[0]
    if normalize:
        m = m / (m.sum(0, keepdims=True) + 1e-9)  # each true-class column sums to 1
    shown = m.copy()
    shown[shown < 0.005] = np.nan  # blank out near-zero cells so the structure stands out

    labels = _names_list(names, n - 1) + ['background']  # unnamed classes fall back to their index
    fig = Figure(figsize=(12, 9), tight_layout=True)
    ax = fig.subplots(1, 1)
    vmax = 1.0 if normalize else (np.nanmax(shown) if np.isfinite(shown).any() else 1.0)
    im = ax.imshow(np.ma.masked_invalid(shown), cmap='Blues', vmin=0.0, vmax=vmax, aspect='auto')
    fig.colorbar(im, ax=ax)
    annotate = nc < 30
    if annotate:
        fs = 8 if n > 10 else 10
        for r in range(n):
            for c in range(n):
                v = shown[r, c]
                if np.isfinite(v):
                    txt = f'{v:.2f}' if normalize else f'{v:.0f}'
                    ax.text(c, r, txt, ha='center', va='center', fontsize=fs,
                            color='white' if v > 0.5 * vmax else 'black')
    if annotate:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(labels, rotation=90, fontsize=8)
        ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel('True')
    ax.set_ylabel('Predicted')
    ax.set_title('Confusion Matrix' + (' (normalised per true class)' if normalize else ''))
    _save(fig, Path(save_dir) / 'confusion_matrix.png', dpi=200)


# ------------------------------------------------------------------------------------------ hyperparameter evolution
@_never_raise
def plot_evolve(values: Mapping[str, Sequence[Any]], fit: Sequence[float], save_path: Path | str = 'evolve.png',
                best: int | None = None) -> None:
    """One panel per hyp key: fitness of every generation against the key's value, coloured by fitness, the
    best generation (index `best`, else the highest fitness) marked with a cross and named in the title.
    Categorical values (strings) are placed at their choice's index."""
    f = np.asarray(fit, dtype=float)
    keys = list(values)
    if not keys or not len(f):
        return
    j = int(np.argmax(f)) if best is None else int(best)
    ncols = min(6, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(2.3 * ncols, 2.2 * nrows + 0.3))
    # fixed margins: tight_layout's solver costs more than the drawing on ~30 panels
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.05, top=1 - 0.35 / (2.2 * nrows + 0.3), wspace=0.35,
                        hspace=0.5)
    axs = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    order = np.argsort(f)  # best drawn last, on top
    for a, k in zip(axs, keys):
        raw = list(values[k])
        labels = sorted({str(v) for v in raw}) if any(isinstance(v, str) for v in raw) else None
        x = np.array([labels.index(str(v)) for v in raw] if labels else raw, dtype=float)
        a.scatter(x[order], f[order], c=f[order], cmap='viridis', s=12, edgecolors='none', alpha=0.8)
        a.plot(x[j], f[j], 'k+', markersize=12, markeredgewidth=1.5)
        shown = raw[j] if labels else f'{x[j]:.3g}'
        a.set_title(f'{k} = {shown}', fontsize=8)
        a.tick_params(labelsize=6)
        if labels:
            a.set_xticks(range(len(labels)))
            a.set_xticklabels(labels)
    for a in axs[len(keys):]:
        a.axis('off')
    axs[0].set_ylabel('fitness', fontsize=7)
    _save(fig, Path(save_path), dpi=150)
