"""Mosaic geometry: where each of four tiles lands around the centre, and the two ways to draw them.

A tile is (source image, (h, w) it is drawn at, (x1, y1, x2, y2) on the 2s x 2s canvas, (padw, padh) offset of the
tile's own pixels on that canvas). `paste_canvas` is the reference layout (resize, paste, then one warp of the whole
canvas); `compose_scaled` draws a scale/translate warp of the same layout in one resampling per tile.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from utils.data.augment import GRAY

Tile = tuple[np.ndarray, tuple[int, int], tuple[int, int, int, int], tuple[int, int]]


def tile_place(i: int, xc: int, yc: int, h: int, w: int, s: int) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """Tile i (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) of an (h, w) image around the centre
    (xc, yc) of a 2s x 2s canvas: its rectangle on the canvas and the offset (padw, padh) of its pixels."""
    if i == 0:  # top-left tile: its bottom-right corner sits on the centre
        x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
        x1b, y1b = w - (x2a - x1a), h - (y2a - y1a)
    elif i == 1:  # top-right
        x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, 2 * s), yc
        x1b, y1b = 0, h - (y2a - y1a)
    elif i == 2:  # bottom-left
        x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(2 * s, yc + h)
        x1b, y1b = w - (x2a - x1a), 0
    else:  # bottom-right
        x1a, y1a, x2a, y2a = xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h)
        x1b, y1b = 0, 0
    return (x1a, y1a, x2a, y2a), (x1a - x1b, y1a - y1b)


def paste_canvas(tiles: list[Tile], canvas: np.ndarray) -> np.ndarray:
    """Reference layout: resize each tile and paste it into `canvas` (2s x 2s, filled grey first)."""
    canvas.fill(GRAY)
    for src, (h, w), (x1a, y1a, x2a, y2a), (padw, padh) in tiles:
        if src.shape[:2] != (h, w):
            src = cv2.resize(src, (w, h), interpolation=cv2.INTER_LINEAR)
        canvas[y1a:y2a, x1a:x2a] = src[y1a - padh:y2a - padh, x1a - padw:x2a - padw]
    return canvas


def compose_scaled(tiles: list[Tile], M: np.ndarray, width: int, height: int) -> np.ndarray:
    """Mosaic + scale/translate warp in one resampling per tile, written straight into the output.

    With no rotation/shear/perspective each tile lands on an axis-aligned rectangle of the output,
    so the 2s x 2s canvas, the per-tile resize and the full-canvas warp are not needed. Each output
    pixel samples the same source point as the reference chain (resize, paste, warp); only the
    interpolation differs (one bilinear step instead of two), and seams between tiles do not blend.
    """
    out = np.full((height, width, 3), GRAY, np.uint8)
    mx, my, tx, ty = M[0, 0], M[1, 1], M[0, 2], M[1, 2]
    for src, (h, w), (x1a, y1a, x2a, y2a), (padw, padh) in tiles:
        # output pixels whose canvas position falls inside this tile's pasted rectangle
        X0, X1 = max(math.ceil(mx * x1a + tx), 0), min(math.ceil(mx * x2a + tx), width)
        Y0, Y1 = max(math.ceil(my * y1a + ty), 0), min(math.ceil(my * y2a + ty), height)
        if X1 <= X0 or Y1 <= Y0:
            continue
        kx, ky = src.shape[1] / w, src.shape[0] / h  # original -> resized tile (1 when not resized)
        # output x -> canvas (x - tx)/mx -> tile (.. - padw) -> original pixel centre convention of cv2.resize
        ax, bx = kx / mx, ((-tx / mx) - padw + 0.5) * kx - 0.5
        ay, by = ky / my, ((-ty / my) - padh + 0.5) * ky - 0.5
        inv = np.array([[ax, 0.0, ax * X0 + bx], [0.0, ay, ay * Y0 + by]])
        cv2.warpAffine(src, inv, (X1 - X0, Y1 - Y0), dst=out[Y0:Y1, X0:X1],
                       flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    return out
