"""Feature distillation: the student's neck maps (Detect's inputs, P3-P5) pulled towards the teacher's.

Forms (--feat_kd):
    mse   - per level, sum_cells w * mean_channels (A(s) - t)^2 / max(sum w, 1), with w the teacher's max over
            anchors of sigmoid(obj) * max sigmoid(cls), detached: the error counts where the teacher sees objects;
    pkd   - each channel of A(s) and of t standardised over the batch and the cells, then the mean squared
            error (PKD: the student matches the teacher's feature correlations, not its scale);
    cross - the teacher's own Detect convolution applied to A(s), compared with the teacher's maps by the
            output terms in effect (dist_norm, dist_loss, T): the student's neck learns in the teacher's
            output space (CrossKD).
A is one adapter per level (1x1 conv -> ReLU -> 1x1 conv) from the student's width to the teacher's, so any
pair of widths works (n<-s, n<-m, pruned students). The adapters train with the student but are never part
of its checkpoint: the student stays a plain YOLOv5 model.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from optimizer.config import FEAT_FORMS
from optimizer.loss import MIN_WEIGHT_SUM, OutputDistillationLoss
from utils.core.errors import UserError

PKD_EPS = 1e-6  # variance floor of the standardisation: a constant channel compares as all zeros


class Adapter(nn.Sequential):
    """1x1 conv -> ReLU -> 1x1 conv from c_in to c_out channels (hidden width min(c_in, c_out) unless given)."""

    def __init__(self, c_in: int, c_out: int, hidden: int | None = None):
        # the narrower width: at the teacher's, KD + mse took 1.148x the output-only KD step on 2 CPU cores,
        # at the student's 1.104x (benchmarks/bench_kd_step.py, n<-s at 320 px)
        hidden = hidden or min(c_in, c_out)
        super().__init__(nn.Conv2d(c_in, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, c_out, 1))


class FeatureAdapters(nn.Module):
    """One Adapter per level; called on the list of student maps, returns the list of adapted maps."""

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int]):
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise UserError(f"feature distillation: the student's head has {len(student_channels)} input levels, "
                            f"the teacher's {len(teacher_channels)}")
        self.levels = nn.ModuleList(Adapter(int(s), int(t)) for s, t in zip(student_channels, teacher_channels))

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Adapted maps, one per level."""
        return [a(f) for a, f in zip(self.levels, feats)]


def head_channels(model: nn.Module) -> list[int]:
    """Input channels of each Detect level (the widths of P3, P4, P5)."""
    return [int(m.in_channels) for m in model.model[-1].m]


def build_adapters(student: nn.Module, teacher: nn.Module, seed: int) -> FeatureAdapters:
    """Adapters from the student's head widths to the teacher's, initialised from `seed` without touching the
    global random state (a run's other random draws stay what they would be without them)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FeatureAdapters(head_channels(student), head_channels(teacher))


def teacher_weights(t_map: torch.Tensor) -> torch.Tensor:
    """(bs, ny, nx): max over anchors of sigmoid(obj) * max sigmoid(cls) of one teacher map (bs, na, ny, nx,
    5+nc), detached."""
    t = t_map.detach().float()
    score = t[..., 4].sigmoid() * t[..., 5:].sigmoid().amax(-1)
    return score.amax(1)


def mse_level(a: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_cells w * mean_channels (a - t)^2 / max(sum w, 1) for maps (bs, c, ny, nx) and weights (bs, ny, nx)."""
    d = (a.float() - t.float()).square().mean(1)
    return (d * w).sum() / w.sum().clamp(min=MIN_WEIGHT_SUM)


def pkd_level(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the per-channel standardised maps a and t (bs, c, ny, nx): each channel
    standardised over the batch and the cells, (x - mean) / sqrt(var + PKD_EPS)."""
    # Expanded per channel as E[a'^2] + E[t'^2] - 2 E[a' t'] of the standardised maps a', t': three reductions
    # (the moments of a and of t, and E[a t]) instead of two standardised copies and their difference. Same
    # value up to rounding (tests/unit/test_feature_kd.py checks it against numpy's direct formula).
    a, t = a.float(), t.detach().float()
    dims = (0, 2, 3)
    var_a, mean_a = torch.var_mean(a, dim=dims, unbiased=False)
    var_t, mean_t = torch.var_mean(t, dim=dims, unbiased=False)
    cov = (a * t).mean(dim=dims) - mean_a * mean_t
    per_channel = (var_a / (var_a + PKD_EPS) + var_t / (var_t + PKD_EPS)
                   - 2 * cov * ((var_a + PKD_EPS) * (var_t + PKD_EPS)).rsqrt())
    return per_channel.mean().clamp(min=0.0)  # rounding must not make a perfect match negative


class FeatureDistillationLoss:
    """The feature term of one form; call(s_feats, t_feats, t_maps) -> dfeat (0-dim, x feat_ratio x batch size).

    s_feats are the adapted student maps; t_feats and t_maps the teacher's head inputs and raw outputs."""

    def __init__(self, form: str, ratio: float, teacher: nn.Module, output_terms: dict[str, Any] | None = None):
        """`teacher` is the fused teacher model (its Detect convolutions for `cross`, copied in fp32 and
        frozen); `output_terms` the OutputDistillationLoss settings `cross` compares with (dist_loss, T, norm,
        gains)."""
        if form not in FEAT_FORMS[1:]:
            raise UserError(f"--feat_kd {form!r}: must be one of {', '.join(FEAT_FORMS)}")
        self.form = form
        self.ratio = float(ratio)
        self.head = None
        self.cross = None
        if form == "cross":
            detect = teacher.model[-1]
            self.head = [copy.deepcopy(m).float().requires_grad_(False) for m in detect.m]
            self.na, self.no = int(detect.na), int(detect.no)
            self.cross = OutputDistillationLoss(teacher, distill_ratio=1.0, **(output_terms or {}))

    def teacher_space(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """cross: the teacher's Detect convolutions applied to adapted student maps -> raw maps (bs, na, ny, nx, no)."""
        out = []
        for conv, f in zip(self.head, feats):
            if conv.weight.device != f.device:
                conv.to(f.device)
            y = conv(f.float())
            bs, _, ny, nx = y.shape
            out.append(y.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2))
        return out

    def __call__(self, s_feats: Sequence[torch.Tensor], t_feats: Sequence[torch.Tensor],
                 t_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """The feature loss, in fp32 whatever the autocast state."""
        if len(s_feats) != len(t_feats):
            raise UserError(f"feature distillation: student gives {len(s_feats)} levels, teacher {len(t_feats)}")
        device = s_feats[0].device
        with torch.autocast(device_type=device.type, enabled=False):
            for i, (s, t) in enumerate(zip(s_feats, t_feats)):
                if s.shape != t.shape:
                    raise UserError(f"feature distillation level {i}: adapted student map {tuple(s.shape)} does "
                                    f"not match the teacher's {tuple(t.shape)}")
            if self.form == "cross":
                total, _ = self.cross(self.teacher_space(s_feats), t_maps)
                return total.reshape(()) * self.ratio  # the output loss already carries the batch size
            if self.form == "mse":
                loss = sum(mse_level(s, t.detach(), teacher_weights(m)) for s, t, m in zip(s_feats, t_feats, t_maps))
            else:
                loss = sum(pkd_level(s, t.detach()) for s, t in zip(s_feats, t_feats))
            return loss * (self.ratio * s_feats[0].shape[0])
