"""The feature term (--feat_kd): the student's head inputs, through trained adapters, pulled towards the teacher's.

The maths (the forms, the adapters) is optimizer/features.py; the term owns the adapters (and their DDP wrapper),
their warm-up, and the first epoch's gradient probe for the balance report.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from optimizer.balance import FEATURE_GRAD
from optimizer.config import KDConfig
from optimizer.features import FeatureAdapters, FeatureDistillationLoss, build_adapters
from optimizer.terms.base import StepMaps, Term, TermContext
from optimizer.terms.output import output_settings
from utils.core.distributed import de_parallel

LOGGER = logging.getLogger("yolov5kd")

FEATURE_PART = "dfeat"
# Epochs in which the feature adapters train alone: the feature term's gradient reaches the student only
# afterwards. Fresh adapters are random projections, and the gradient through them pulls the student's neck in
# random directions: at the 8-class plateau (feature gradient ~1x the detection terms' at the neck) the
# student lost 7 (mse) to 20 (cross) mAP50-95 points in its first epoch (docs/results/convergence.md).
FEAT_WARMUP_EPOCHS = 1


class FeatureTerm(Term):
    """Feature distillation through one adapter per level; the adapters train beside the student."""

    parts = (FEATURE_PART,)
    needs_features = True
    scheduled = True

    def __init__(self, loss: FeatureDistillationLoss, adapters: FeatureAdapters, config: KDConfig,
                 world_size: int = 1):
        self.loss = loss
        self.adapters = adapters
        self.config = config
        self._adapt: nn.Module = adapters  # the adapters as called: DDP-wrapped under torchrun
        if world_size > 1:  # their gradients are averaged over the ranks like the student's
            self._adapt = nn.parallel.DistributedDataParallel(adapters)
        self.feed_student = False  # set per epoch by start_epoch(): after the adapters' warm-up
        self._grads = [0.0, 0.0]  # first-epoch sums of |d dfeat / d neck| and |d detection / d neck|

    @classmethod
    def build(cls, config: KDConfig, ctx: TermContext) -> FeatureTerm | None:
        """With --feat_kd: the loss, and the adapters (initialised from the run's seed) on the student's device."""
        if config.feat_kd == "none":
            return None
        loss = FeatureDistillationLoss(config.feat_kd, config.feat_ratio, ctx.teacher, output_settings(config, ctx))
        adapters = build_adapters(de_parallel(ctx.student), ctx.teacher, ctx.seed).to(ctx.forward.device)
        return cls(loss, adapters, config, ctx.forward.world_size)

    def start_epoch(self, epoch: int) -> None:
        """Whether the term's gradient reaches the student yet."""
        self.feed_student = epoch >= FEAT_WARMUP_EPOCHS

    def __call__(self, step: StepMaps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student's head inputs of all the step's images through the adapters against the teacher's (fp32
        inside); while the balance report measures, the gradient it sends into the student's neck too."""
        s_feats, u_feats = step.s_feats, step.u_feats
        feats = s_feats if u_feats is None else [torch.cat((s, u), 0) for s, u in zip(s_feats, u_feats)]
        # during the warm-up the adapters learn on detached maps; the student gets no feature gradient yet
        dfeat = self.loss(self._adapt(feats if self.feed_student else [f.detach() for f in feats]),
                          step.t_feats, step.t_maps)
        if step.measuring and s_feats[0].requires_grad:
            # the gradient the feature term sends (or, in the warm-up, will send) into the student's neck;
            # the bare adapters, so a DDP module never runs two forwards in one step
            probe = dfeat if self.feed_student else self.loss(self.adapters(feats), step.t_feats, step.t_maps)
            self._measure_gradients(step.det_loss, probe, s_feats)
        return dfeat, {FEATURE_PART: dfeat.detach() / step.batch}

    def _measure_gradients(self, det_loss: torch.Tensor, dfeat: torch.Tensor, feats: list[torch.Tensor]) -> None:
        """Add this batch's gradient norms at the student's neck (the labelled images' head inputs): of the
        feature term and of the detection terms (the graph is kept for the step's own backward)."""
        norms = []
        for term in (dfeat, det_loss):
            grads = torch.autograd.grad(term.sum(), feats, retain_graph=True, allow_unused=True)
            norms.append(float(sum(g.float().square().sum() for g in grads if g is not None)) ** 0.5)
        if all(map(math.isfinite, norms)):
            self._grads[0] += norms[0]
            self._grads[1] += norms[1]

    def balance(self, means: Mapping[str, float], batches: int) -> tuple[list[str], dict[str, float]]:
        """The feature term's gradient at the neck next to the detection terms'."""
        if not self._grads[1] > 0:
            return [], {}
        g_feat, g_det = (g / batches for g in self._grads)
        ratio = g_feat / g_det
        warm = "" if self.feed_student else \
            f" (the adapters train alone for {FEAT_WARMUP_EPOCHS} epoch(s); then the student gets it)"
        line = (f"Feature distillation balance over the first {batches} batches ({self.config.feat_kd}): gradient "
                f"at the neck of dfeat {g_feat:.4g} / of box+obj+cls {g_det:.4g} = {ratio:.3g}{warm}")
        return [line], {FEATURE_GRAD: ratio}

    def describe(self) -> list[str]:
        """The form, the adapters' widths and size."""
        widths = ", ".join(f"{a[0].in_channels}->{a[-1].out_channels}" for a in self.adapters.levels)
        n = sum(p.numel() for p in self.adapters.parameters())
        return [f"Feature distillation: {self.config.feat_kd} on the head inputs ({widths} channels), "
                f"feat_ratio {self.config.feat_ratio:g}; adapters {n} parameters, trained beside the student, "
                f"kept in last.pt only"]

    def trainable(self) -> nn.Module:
        """The adapters."""
        return self.adapters

    def state_dict(self) -> dict[str, Any]:
        """The adapters' fp32 weights, contiguous."""
        return {"adapters": {k: v.detach().contiguous().clone() for k, v in self.adapters.state_dict().items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The adapters of a resumed run; a checkpoint without them starts them afresh, with one warning."""
        if "adapters" not in state:
            LOGGER.warning("WARNING: --resume: this checkpoint holds no feature adapters (best.pt or a periodic "
                           "save never does); they start afresh, so the run is not an exact continuation")
            return
        self.adapters.load_state_dict(state["adapters"])
