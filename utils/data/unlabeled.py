"""Unlabelled images for distillation: a stream of augmented batches drawn alongside the labelled loader.

The labelled loader defines the epoch; this stream hands out one unlabelled batch per labelled batch. It is
reseeded at the start of every epoch from (seed, rank, epoch), so which unlabelled images an epoch sees does
not depend on earlier epochs and a resumed run replays exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from utils.core.errors import UserError
from utils.data.datasets import GENERATOR_SEED, DataSettings, LoadImagesAndLabels, create_dataloader, list_images
from utils.data.labels import read_images

LOGGER = logging.getLogger("yolov5kd")
# Keeps the unlabelled stream's shuffling independent of the labelled loader's (which uses GENERATOR_SEED + ...).
STREAM_SEED_OFFSET = 7919
# A restart within one epoch (fewer unlabelled batches than labelled ones) gets its own permutation.
RESTARTS_PER_EPOCH = 1000


def unlabeled_batch_size(ratio: float, labelled_batch: int) -> int:
    """Unlabelled images per step: ratio x the per-process labelled batch, at least 1 when ratio > 0."""
    return max(1, round(ratio * labelled_batch)) if ratio > 0 else 0


class UnlabeledStream:
    """Endless, per-epoch reseeded batches of unlabelled images (uint8 NCHW, like the labelled loader's)."""

    def __init__(self, loader: DataLoader, seed: int, rank: int, labelled_batch: int):
        self.loader = loader
        self.labelled_batch = labelled_batch  # the per-process labelled batch each unlabelled one goes beside
        self.dataset = loader.dataset
        self.seed = seed
        self.rank = max(rank, 0)
        self._it: Iterator | None = None
        self._epoch = 0
        self._restarts = 0

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def batch_size(self) -> int:
        """Images per batch (per process)."""
        return int(self.loader.batch_size)

    def _reseed(self) -> None:
        k = self._epoch * RESTARTS_PER_EPOCH + self._restarts
        sampler = self.loader.sampler
        if hasattr(sampler, "set_epoch"):  # DDP: each rank draws its own share of a common permutation
            sampler.set_epoch(k)
        self.loader.generator.manual_seed(GENERATOR_SEED + STREAM_SEED_OFFSET + self.seed + self.rank + k)
        self._it = iter(self.loader)

    def start_epoch(self, epoch: int) -> None:
        """Restart the stream for this epoch (call before the epoch's first batch)."""
        self._epoch, self._restarts = epoch, 0
        self._reseed()

    def next_batch(self) -> torch.Tensor:
        """The next unlabelled image batch; starts a new pass over the images when one runs out."""
        if self._it is None:
            self.start_epoch(self._epoch)
        for _ in range(2):
            try:
                imgs = next(self._it)[0]
            except StopIteration:
                self._restarts += 1
                self._reseed()
                continue
            if imgs.shape[0]:
                return imgs
        raise UserError("unlabeled: no image of the unlabelled set could be read; is the dataset still there?")


def build_unlabeled_stream(paths: str | Path | Sequence[str | Path], ratio: float, labelled: DataSettings, *,
                           workers: int, rank: int, world_size: int, seed: int) -> UnlabeledStream | None:
    """The stream for a dataset yaml's 'unlabeled:' entry beside the labelled loader built with `labelled` (its
    batch size, image size, stride, hyp and image cache), or None when unlabeled_ratio is 0."""
    batch = unlabeled_batch_size(ratio, labelled.batch_size)
    if batch == 0:
        LOGGER.warning("WARNING: unlabeled_ratio is 0, so the 'unlabeled:' images are not used")
        return None
    settings = DataSettings(imgsz=labelled.imgsz, batch_size=batch, augment=True, hyp=labelled.hyp,
                            cache=labelled.cache, stride=labelled.stride, prefix="unlabeled: ", reader=read_images)
    loader = create_dataloader(LoadImagesAndLabels(paths, settings), workers=workers, shuffle=True, rank=rank,
                               world_size=world_size, seed=seed)
    return UnlabeledStream(loader, seed, rank, labelled.batch_size)


def _real_paths(paths: Sequence[str]) -> set[str]:
    """The files with their folders resolved (links, '..'), so two spellings of one image compare equal."""
    # each folder is resolved once, not each file: an unlabelled set may hold a million images
    real: dict[str, str] = {}
    out = set()
    for f in paths:
        folder, name = os.path.split(os.path.abspath(f))
        if folder not in real:
            real[folder] = os.path.realpath(folder)
        out.add(os.path.join(real[folder], name))
    return out


def check_unlabeled_overlap(unlabeled: str | Path | Sequence[str | Path],
                            scored: Mapping[str, str | Path | Sequence[str | Path] | None], where: str) -> None:
    """Refuse 'unlabeled:' images that are also in a split the run is scored on (val:, test:), in one line with
    the count: the teacher's maps and pseudo-labels of those images would leak them into the scores."""
    mine = _real_paths(list_images(unlabeled, "unlabeled: "))
    for split, paths in scored.items():
        items = [] if not paths else [paths] if isinstance(paths, (str, Path)) else list(paths)
        items = [x for x in items if Path(x).exists()]  # a listed test: split need not be there
        both = len(mine & _real_paths(list_images(items, f"{split}: "))) if items else 0
        if both:
            raise UserError(f"{where}: {both} image(s) listed under 'unlabeled:' are also in '{split}:', so training "
                            f"on them would leak the {split} images into the scores; remove them from 'unlabeled:'")
