"""The localisation term (--dist_loc): on the cells the detection loss assigns to labelled objects, the part of
the student's box error that the teacher does not make (dloc).

Teacher-bounded regression (Chen et al., 2017) in the detection loss's own measure: per assigned cell, the
student's and the teacher's fit to the label box, each 1 - CIoU (utils.core.boxes.bbox_iou, as the box loss),
and the penalty

    max(0, L_s - L_t + LOC_MARGIN)

averaged over each level's assigned cells and summed over the levels, as the detection box loss is, then
x dist_loc x the detection box gain (train-time rescaled) x batch size. So dloc is on the box part's scale:
with dist_loc 1 it is at most the box part, the share of the box loss the teacher shows can be removed. It is not
x distill_ratio: dist_loc is its own weight, relative to the box loss. Where the teacher fits the label no better
than the student it is 0 and pulls nothing; where it fits better, its gradient is the box loss's own on that
cell. The teacher side is decoded with the teacher's anchors (which may differ from the student's), under
no_grad, so the teacher gets no gradient. Only the labelled images have labels, so only they count.

LOC_MARGIN is 0: a positive margin would pull even where the student already fits as well as the teacher, which
the box loss already does (and this term would then no longer be 0 there); a negative one would excuse errors
the teacher does not make.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from optimizer.balance import DETECTION_PARTS
from optimizer.config import KDConfig
from optimizer.terms.base import StepMaps, Term, TermContext
from utils.core.boxes import bbox_iou
from utils.core.errors import UserError

LOC_PART = "dloc"
LOC_MARGIN = 0.0


def _decode(x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(n, 4) box logits -> (cell-relative centre, width/height in grid units), as the detection loss decodes them."""
    s = x.sigmoid()
    return torch.cat((s[:, :2] * 2 - 0.5, (s[:, 2:] * 2) ** 2 * anchors), 1)


def assignment(compute_loss: Any, pred: Sequence[torch.Tensor], targets: torch.Tensor) -> tuple:
    """build_targets' (tcls, tbox, indices, anch) for these maps and labels: the detection loss's own from its
    last call when that call had the same labels tensor and map shapes (the distiller runs it first on the same
    step), else computed anew (it depends only on the labels, the map sizes and the anchors)."""
    last = getattr(compute_loss, "last_assignment", None)
    if last is not None and last[0] is targets and last[1] == tuple(p.shape[:4] for p in pred):
        return last[2]
    return compute_loss.build_targets(pred, targets)


def localisation_loss(pred: Sequence[torch.Tensor], t_maps: Sequence[torch.Tensor], targets: torch.Tensor,
                      compute_loss: Any, teacher_anchors: torch.Tensor, margin: float = LOC_MARGIN,
                      count: bool = False) -> tuple[torch.Tensor, int, int]:
    """(sum over levels of the mean over assigned cells of max(0, L_s - L_t + margin), cells where the student
    fits worse than the teacher, cells; both counts only with `count`, else 0): unweighted, fp32. `pred` and
    `t_maps` are the labelled images' raw maps, `compute_loss` the detection loss whose build_targets assigns the
    cells (and holds the student's anchors)."""
    _, tbox, indices, anch = assignment(compute_loss, pred, targets)
    total = torch.zeros((), device=pred[0].device)
    worse = cells = 0
    for i, (p, t) in enumerate(zip(pred, t_maps)):
        b, a, gj, gi = indices[i]
        if not b.shape[0]:
            continue
        box = tbox[i].float()
        l_s = 1.0 - bbox_iou(_decode(p[b, a, gj, gi, :4].float(), anch[i].float()), box, CIoU=True).squeeze(-1)
        with torch.no_grad():
            t_anch = teacher_anchors[i].to(device=box.device, dtype=torch.float32)[a]
            l_t = 1.0 - bbox_iou(_decode(t[b, a, gj, gi, :4].detach().float(), t_anch), box, CIoU=True).squeeze(-1)
        # relu, not clamp: its gradient is 0 at a tie too, so a student as good as the teacher is pulled nowhere
        excess = torch.relu(l_s - l_t + margin)
        total = total + excess.mean()
        if count:  # a host sync, only while the balance report measures
            worse += int((l_s.detach() > l_t).sum())
            cells += b.shape[0]
    return total, worse, cells


class LocalisationTerm(Term):
    """max(0, L_s - L_t) on the labelled objects' cells, x dist_loc x the box gain."""

    parts = (LOC_PART,)
    scheduled = True

    def __init__(self, compute_loss: Any, teacher_anchors: torch.Tensor, config: KDConfig):
        self.compute_loss = compute_loss
        self.teacher_anchors = teacher_anchors.detach().float().clone()
        self.config = config
        self.gain = float(compute_loss.hyp["box"]) * float(config.dist_loc)
        self._cells = [0, 0]  # while the balance report measures: cells where the student fits worse, cells

    @classmethod
    def build(cls, config: KDConfig, ctx: TermContext) -> LocalisationTerm | None:
        """With dist_loc > 0: the term on the detection loss's assignment; the teacher's anchors per level."""
        if not config.dist_loc > 0:
            return None
        student = tuple(ctx.compute_loss.anchors.shape)
        if tuple(ctx.teacher_anchors.shape) != student:
            raise UserError(f"dist_loc {config.dist_loc:g}: the localisation term compares the teacher's box on "
                            f"each of the student's assigned anchors, but the anchor shapes differ: teacher "
                            f"{tuple(ctx.teacher_anchors.shape)}, student {student}")
        return cls(ctx.compute_loss, ctx.teacher_anchors, config)

    def __call__(self, step: StepMaps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The term on the labelled images (fp32, whatever the autocast state)."""
        bs = step.batch
        device = step.pred[0].device
        with torch.autocast(device_type=device.type, enabled=False):
            loss, worse, cells = localisation_loss(step.pred, [t[:bs] for t in step.t_maps], step.targets,
                                                   self.compute_loss, self.teacher_anchors, count=step.measuring)
            loss = loss * (self.gain * bs)
        if step.measuring:
            self._cells[0] += worse
            self._cells[1] += cells
        return loss, {LOC_PART: loss.detach() / bs}

    def balance(self, means: Mapping[str, float], batches: int) -> tuple[list[str], dict[str, float]]:
        """dloc next to the box part, and the share of assigned cells where the teacher fits the label better."""
        if LOC_PART not in means:
            return [], {}
        box = means[DETECTION_PARTS[0]]
        ratio = means[LOC_PART] / box if box > 0 else float("nan")
        share = self._cells[0] / self._cells[1] if self._cells[1] else float("nan")
        return [f"Localisation balance over the first {batches} batches (dist_loc {self.config.dist_loc:g}): dloc "
                f"{means[LOC_PART]:.4g} / box {box:.4g} = {ratio:.3g}; the teacher fits the label better on "
                f"{share:.1%} of the {self._cells[1]} assigned cells"], {}

    def describe(self) -> list[str]:
        """The form and its weight."""
        return [f"Localisation distillation: on the cells assigned to labelled objects, max(0, student's 1 - CIoU "
                f"- teacher's) x dist_loc {self.config.dist_loc:g} x the box gain"]
