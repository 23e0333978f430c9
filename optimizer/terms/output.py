"""The output terms: the student's raw Detect maps pulled towards the teacher's (dbox, dobj, dcls).

The maths is OutputDistillationLoss (optimizer/loss.py); here it sees the labelled and unlabelled maps together.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from optimizer.balance import DISTILLATION_PARTS, PAIRS, WEIGHT_KEYS, balance_ratios, weight_suggestions
from optimizer.config import KDConfig
from optimizer.loss import OutputDistillationLoss
from optimizer.terms.base import StepMaps, Term, TermContext


def output_settings(config: KDConfig, ctx: TermContext) -> dict[str, Any]:
    """The output comparison in effect (dist_loss, T, norm, gains), shared with the feature term's `cross` form;
    the gains are the detection loss's own (train-time rescaled) box/obj/cls gains."""
    return {"dist_loss": config.dist_loss, "T": config.temperature, "norm": config.dist_norm,
            "gains": ctx.compute_loss.hyp}


def output_weights(config: KDConfig) -> dict[str, float]:
    """The per-term multipliers {dbox, dobj, dcls} (dist_box, dist_obj, dist_cls); the output term's alone, not
    the feature term's `cross` form, which has feat_ratio."""
    return {part: float(getattr(config, WEIGHT_KEYS[part])) for part in DISTILLATION_PARTS}


class OutputTerm(Term):
    """Output distillation on every image of the step, labelled and unlabelled; always on with a teacher."""

    parts = DISTILLATION_PARTS
    scheduled = True

    def __init__(self, loss: OutputDistillationLoss, config: KDConfig):
        self.loss = loss
        self.config = config

    @classmethod
    def build(cls, config: KDConfig, ctx: TermContext) -> OutputTerm:
        """The loss on the student's classes and anchors, checked against the teacher's."""
        return cls(OutputDistillationLoss(ctx.student, distill_ratio=config.distill_ratio,
                                          teacher_anchors=ctx.teacher_anchors, weights=output_weights(config),
                                          **output_settings(config, ctx)), config)

    def __call__(self, step: StepMaps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of all the step's maps against the teacher's (fp32 inside, whatever the autocast state)."""
        pred = step.pred
        if step.u_pred is not None:
            pred = [torch.cat((p, u), 0) for p, u in zip(pred, step.u_pred)]
        kd_loss, kd_parts = self.loss(pred, step.t_maps)
        # The detection parts are per-image means (the loss is their sum x batch size) while the seed's KD
        # parts already carry the batch size: put them on the detection parts' scale, so that logged columns
        # and balance ratios compare what each part weighs in the gradient (sum(parts) x bs == loss).
        return kd_loss, {k: v / step.batch for k, v in kd_parts.items()}

    def balance(self, means: Mapping[str, float], batches: int) -> tuple[list[str], dict[str, float]]:
        """Each part over its detection counterpart (nothing at distill_ratio 0)."""
        if not self.config.distill_ratio > 0:
            return [], {}
        ratios = balance_ratios(means)
        pairs = ", ".join(f"{d} {means[d]:.4g} / {c} {means[c]:.4g} = {r:.3g}"
                          for (d, c), r in zip(PAIRS, ratios.values()))
        line = f"Distillation balance over the first {batches} batches ({self.config.dist_norm} norm): {pairs}"
        return [line, *weight_suggestions(ratios, output_weights(self.config))], ratios
