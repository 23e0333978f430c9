"""The pseudo-label term (--pseudo_conf): the teacher's confident detections on the unlabelled images are their
detection targets.

The labelling is optimizer/pseudo.py's PseudoLabeller; the loss is the student's own detection loss on the
unlabelled images' maps, on its own batch, so the labelled images' detection loss stays exactly what it was.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from optimizer.balance import DETECTION_PARTS
from optimizer.config import KDConfig
from optimizer.pseudo import PseudoBatch, PseudoLabeller
from optimizer.terms.base import StepMaps, Term, TermContext
from utils.core.errors import UserError

PSEUDO_PARTS = ("pseudo", "pboxes")  # the pseudo-label detection loss, and pseudo boxes per unlabelled image


class PseudoTerm(Term):
    """The detection loss of the unlabelled images against the teacher's detections, x pseudo_weight."""

    parts = PSEUDO_PARTS
    figures = {PSEUDO_PARTS[1]: "pseudo_boxes_per_image"}
    needs_unlabelled = True

    def __init__(self, labeller: PseudoLabeller, compute_loss: Any, config: KDConfig, device: torch.device):
        self.labeller = labeller
        self.compute_loss = compute_loss
        self.config = config
        self.device = device
        self.last: tuple[torch.Tensor, PseudoBatch] | None = None  # the last step's images and their labels
        self.note = f"pseudo-labels at {config.pseudo_conf:g}"
        self.unlabelled_use = (f"pseudo-labels: the teacher's detections scoring at least {config.pseudo_conf:g} "
                               f"(weight {config.pseudo_weight:g}"
                               + (f"; cells it scores in [{config.pseudo_ignore:g}, {config.pseudo_conf:g}) are "
                                  f"not taught background)" if labeller.ignore_below > 0 else ")"))

    @classmethod
    def build(cls, config: KDConfig, ctx: TermContext) -> PseudoTerm | None:
        """With pseudo_conf > 0: the labeller on the teacher's Detect; refused without unlabelled images."""
        if not config.pseudo_conf > 0:
            return None
        if not ctx.unlabelled:
            raise UserError(f"pseudo_conf {config.pseudo_conf:g}: pseudo-labels are made on unlabelled images, "
                            f"and this run uses none (no 'unlabeled:' in the dataset yaml, or unlabeled_ratio 0)"
                            f"; add them or set pseudo_conf 0")
        labeller = PseudoLabeller(ctx.teacher.model[-1], config.pseudo_conf, config.pseudo_ignore)
        return cls(labeller, ctx.compute_loss, config, ctx.forward.device)

    def __call__(self, step: StepMaps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Label the unlabelled images from the teacher's maps of them, then the detection loss of their maps."""
        bs = step.batch
        with torch.autocast(device_type=step.u_imgs.device.type, enabled=False):  # decoded and NMS'd in fp32
            pseudo = self.labeller([m[bs:] for m in step.t_maps], *step.u_imgs.shape[2:])
        self.last = (step.u_imgs, pseudo)
        # the same detection loss as the labelled images', on its own batch: theirs is left exactly as it was
        loss, _ = self.compute_loss(step.u_pred, pseudo.targets.to(self.device), ignore=pseudo.ignore)
        loss = loss * self.config.pseudo_weight
        boxes = torch.tensor(len(pseudo.targets) / max(pseudo.images, 1), device=loss.device)
        return loss, {PSEUDO_PARTS[0]: loss.detach().reshape(()) / bs, PSEUDO_PARTS[1]: boxes}

    def balance(self, means: Mapping[str, float], batches: int) -> tuple[list[str], dict[str, float]]:
        """Pseudo boxes per image, and the pseudo-label loss next to the labelled images' detection loss."""
        if PSEUDO_PARTS[0] not in means:
            return [], {}
        det = sum(means[k] for k in DETECTION_PARTS)
        ratio = means[PSEUDO_PARTS[0]] / det if det > 0 else float("nan")
        return [f"Pseudo-labels over the first {batches} batches: {means[PSEUDO_PARTS[1]]:.3g} boxes per unlabelled "
                f"image; their detection loss {means[PSEUDO_PARTS[0]]:.4g} / the labelled images' {det:.4g} = "
                f"{ratio:.3g}"], {}

    def samples(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The last step's unlabelled images with their pseudo boxes (and scores), under 'pseudo'."""
        if self.last is None:
            return {}
        u_imgs, pseudo = self.last
        return {"pseudo": (u_imgs, pseudo.plot_targets())}
