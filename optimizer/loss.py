"""Output (logit) knowledge distillation: the student's raw Detect maps are pulled towards the teacher's."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from optimizer.box_ciou import decoded_ciou_loss
from optimizer.config import check_kd_values
from utils.core.distributed import de_parallel
from utils.core.errors import UserError
from utils.training.loss import BALANCE_3, BALANCE_N

LOGGER = logging.getLogger("yolov5kd")

# How each level's term is normalised (dist_norm; its choices, DIST_NORMS, live with the settings in config.py):
#   mean     - the seed formula: mean over every element of D·w (w = sigmoid(teacher obj logit));
#   weighted - weighted average over cells, Σ_c w_c·D_c / max(Σ_c w_c, 1), D_c averaged over the
#              cell's box / class channels: independent of the grid size and of how many cells are empty;
#   soft     - box and class as weighted; objectness over ALL cells as the binary KL between
#              sigmoid(p_obj) and sigmoid(t_obj) (soft-target BCE minus the teacher's entropy), mean over
#              cells and × the detection loss's per-level balance, like the detection objectness loss;
#   iou      - objectness and class as soft; box as 1 - CIoU between the student's and the teacher's decoded
#              boxes, weighted average over cells: each term then uses its detection counterpart's own
#              divergence, so the box term is on the detection box loss's scale (l2 on box logits is ~100x
#              smaller there) and pulls on localisation, which mAP50-95 rewards.
KL_OBJ_NORMS = ("soft", "iou")  # forms whose objectness part is a binary KL over every cell
# Denominator floor for weighted/soft: one fully confident teacher cell. A level where the teacher sees
# (almost) nothing then adds Σ w·D ≈ 0 instead of a full-strength average over cells it calls empty
# (a tiny eps would turn Σ w·D / Σ w into exactly that), and Σ w never divides by ~0.
MIN_WEIGHT_SUM = 1.0
# Smallest decoded width/height (grid units) the iou box term compares; far below any real box.
MIN_BOX_WH = 1e-6
# Anchors that differ only by fp16 rounding (checkpoints store fp16) still count as the same anchors.
ANCHOR_RTOL = 1e-3


def _detect_anchors(model: Any) -> torch.Tensor:
    """The student's Detect anchors (nl, na, 2) in grid units."""
    m = de_parallel(model)
    try:
        return m.model[-1].anchors
    except (AttributeError, IndexError, TypeError):
        raise UserError(f"{type(m).__name__}: has no Detect head with anchors (model.model[-1].anchors)") from None


def anchors_differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two anchor tensors (nl, na, 2) differ by more than fp16 rounding."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return a.shape != b.shape or not torch.allclose(a, b, rtol=ANCHOR_RTOL, atol=0.0)


class OutputDistillationLoss:
    """Distillation loss between student and teacher raw maps; call(p, t) -> (total (1,), parts).

    norm (DIST_NORMS) picks how each level's term is normalised; "mean" is the seed formula. With reg_norm
    the weighted/soft box term averages the seed's four normalised channels per cell. Every value arrives
    already validated (a run's KDConfig, or the seed entry point), so the class has no defaults of its own.
    """

    def __init__(self, model: Any, *, dist_loss: str, T: float, distill_ratio: float, norm: str,
                 gains: Mapping[str, float], teacher_anchors: torch.Tensor | None = None,
                 reg_norm: Sequence[torch.Tensor] | None = None, weights: Mapping[str, float] | None = None):
        """nc and anchors from the student; `gains` are the train-time rescaled box/obj/cls gains; `weights`
        ({dbox, dobj, dcls}, the dist_box/obj/cls settings) multiply each term's gain (x 1.0 leaves it bit for bit)."""
        m = de_parallel(model)
        nc = getattr(m, "nc", None)
        if nc is None:
            nc = m.model[-1].nc
        self.nc = int(nc)
        self.dist_loss = dist_loss
        self.norm = norm
        self.T = float(T)
        self.distill_ratio = float(distill_ratio)
        self.gains = {"dbox": float(gains["box"]), "dobj": float(gains["obj"]), "dcls": float(gains["cls"])}
        if weights is not None:  # float x 1.0 is the float itself: weights of 1 keep every number
            self.gains = {k: g * float(weights[k]) for k, g in self.gains.items()}
        self.reg_norm = None if reg_norm is None else [r.detach().float() for r in reg_norm]
        # Raw xywh logits only mean the same box when both heads decode them with the same anchors.
        self.student_anchors = self.teacher_anchors = None
        if teacher_anchors is not None:
            student_anchors = _detect_anchors(m)
            if anchors_differ(student_anchors, teacher_anchors):
                if student_anchors.shape != teacher_anchors.shape:
                    raise UserError(f"anchor shapes differ: teacher {tuple(teacher_anchors.shape)}, student "
                                    f"{tuple(student_anchors.shape)}")
                self.student_anchors = student_anchors.detach().float().clone()
                self.teacher_anchors = teacher_anchors.detach().float().clone()
                LOGGER.info("Distillation: teacher and student anchors differ, so boxes are compared in decoded "
                            "space (centre offsets and grid-unit width/height)")
        self.decoded_box = self.teacher_anchors is not None
        if norm == "iou" and self.student_anchors is None:  # CIoU compares decoded boxes even when anchors agree
            student_anchors = _detect_anchors(m)
            if student_anchors is None:
                raise UserError("--dist_norm iou: the student's Detect head has no anchors")
            self.student_anchors = self.teacher_anchors = student_anchors.detach().float().clone()
        self._anchor_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _anchors_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._anchor_cache:
            self._anchor_cache[device] = (self.student_anchors.to(device), self.teacher_anchors.to(device))
        return self._anchor_cache[device]

    def _box_diff(self, i: int, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Elementwise squared box difference (bs, na, ny, nx, 4) for level i, in the selected box form."""
        if self.reg_norm is not None:  # the seed's optional normalised form, kept for its callers
            rn = self.reg_norm[i].to(p.device).view(1, -1, 1, 1, 2)
            ps, ts = p.sigmoid(), t.sigmoid()
            return torch.cat(((ps[..., :2] - ts[..., :2]).square(), (ps[..., 2:] - ts[..., 2:] * rn).square()), -1)
        if self.decoded_box:
            a_s, a_t = self._anchors_on(p.device)
            return (self._decode(p, a_s[i]) - self._decode(t, a_t[i])).square()
        return (p - t).square()

    def _box_term(self, i: int, p: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The seed's ("mean") box term for level i; w is (bs, na, ny, nx, 1)."""
        d = self._box_diff(i, p, t) * w
        if self.reg_norm is not None:  # seed: the xy and wh halves are two separate means
            return d[..., :2].mean() + d[..., 2:].mean()
        return d.mean()

    def _box_ciou_loss(self, i: int, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """1 - CIoU between the student's and the teacher's decoded boxes of level i, shape (bs, na, ny, nx)."""
        a_s, a_t = self._anchors_on(p.device)
        # sizes clamped: a saturated wh logit decodes to a 0-size box, where CIoU's w/h ratio would be 0/0
        return decoded_ciou_loss(p, t, a_s[i], a_t[i], MIN_BOX_WH)

    @staticmethod
    def _decode(x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Box logits -> (cell-relative centre offset, width/height in grid units), as Detect decodes them."""
        s = x.sigmoid()
        xy = s[..., :2] * 2 - 0.5
        wh = (s[..., 2:] * 2).square() * anchors.view(1, -1, 1, 1, 2)
        return torch.cat((xy, wh), -1)

    def _cls_term(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Elementwise class divergence D(p, t), same shape as p."""
        if self.dist_loss == "l2":
            return (p - t).square()
        T = self.T
        if self.dist_loss == "kl":
            # log_softmax on both sides keeps ±1e4 logits finite (a softmax would underflow to log(0))
            log_q = F.log_softmax(t / T, dim=-1)
            log_p = F.log_softmax(p / T, dim=-1)
            return log_q.exp() * (log_q - log_p) * (T * T)
        # targets are probabilities: the teacher's logits go through the sigmoid first (the seed fed raw logits)
        return F.binary_cross_entropy_with_logits(p / T, torch.sigmoid(t / T), reduction="none") * (T * T)

    def __call__(self, p: Sequence[torch.Tensor], t: Sequence[torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total distillation loss (1,) already × gains × ratio × batch size, plus detached parts."""
        if len(p) != len(t):
            raise UserError(f"distillation: teacher gives {len(t)} output levels, student {len(p)}")
        device = p[0].device
        # AMP would run these squares/softmaxes in fp16, where ±1e4 logits overflow; keep the loss in fp32
        with torch.autocast(device_type=device.type, enabled=False):
            lbox = torch.zeros((), device=device)
            lobj = torch.zeros((), device=device)
            lcls = torch.zeros((), device=device)
            balance = BALANCE_3 if len(p) == 3 else BALANCE_N[:len(p)]
            for i, (pi, ti) in enumerate(zip(p, t)):
                if pi.shape != ti.shape:
                    raise UserError(f"distillation level {i}: teacher map {tuple(ti.shape)} does not match "
                                    f"student map {tuple(pi.shape)}")
                pi = pi.float()
                ti = ti.detach().float()
                w = ti[..., 4].sigmoid()
                wb = w.unsqueeze(-1)  # broadcasts over the box/class axis without materialising copies
                if self.norm == "mean":
                    lbox = lbox + self._box_term(i, pi[..., :4], ti[..., :4], wb)
                    lobj = lobj + ((pi[..., 4] - ti[..., 4]).square() * w).mean()
                    if self.nc > 1:  # a single class has no distribution to match
                        lcls = lcls + (self._cls_term(pi[..., 5:], ti[..., 5:]) * wb).mean()
                    continue
                # weighted average over cells; Σ(D·w) / (channels · Σw) is Σ_c w_c·mean_channels(D_c) / Σw
                den = w.sum().clamp(min=MIN_WEIGHT_SUM)
                if self.norm == "iou":
                    lbox = lbox + (self._box_ciou_loss(i, pi[..., :4], ti[..., :4]) * w).sum() / den
                else:
                    lbox = lbox + (self._box_diff(i, pi[..., :4], ti[..., :4]) * wb).sum() / (4 * den)
                if self.norm in KL_OBJ_NORMS:  # BCE(p, σ(t)) − H(σ(t)) = binary KL, zero when the logits agree
                    kl = (F.binary_cross_entropy_with_logits(pi[..., 4], w, reduction="none")
                          - F.binary_cross_entropy_with_logits(ti[..., 4], w, reduction="none"))
                    lobj = lobj + kl.mean() * balance[i]
                else:  # weighted
                    lobj = lobj + ((pi[..., 4] - ti[..., 4]).square() * w).sum() / den
                if self.nc > 1:
                    lcls = lcls + (self._cls_term(pi[..., 5:], ti[..., 5:]) * wb).sum() / ((pi.shape[-1] - 5) * den)
            k = self.distill_ratio * p[0].shape[0]
            parts = {"dbox": lbox * (self.gains["dbox"] * k), "dobj": lobj * (self.gains["dobj"] * k),
                     "dcls": lcls * (self.gains["dcls"] * k)}
            total = (parts["dbox"] + parts["dobj"] + parts["dcls"]).reshape(1)
        return total, {k_: v.detach() for k_, v in parts.items()}


def compute_distillation_output_loss(p: Sequence[torch.Tensor], t_p: Sequence[torch.Tensor], model: Any,
                                     dist_loss: str = "l2", T: float = 20,
                                     reg_norm: Sequence[torch.Tensor] | None = None,
                                     distill_ratio: float = 0.5) -> torch.Tensor:
    """Seed-compatible entry point: the total distillation loss (shape (1,)) from model.hyp and model.nc, with
    the seed's formula ("mean") and its documented defaults (l2, T 20, ratio 0.5)."""
    values = check_kd_values({"dist_loss": dist_loss, "temperature": T, "distill_ratio": distill_ratio},
                             "compute_distillation_output_loss")
    hyp = getattr(de_parallel(model), "hyp", None)
    if not isinstance(hyp, Mapping):
        raise UserError("student model has no .hyp dict; attach the rescaled hyperparameters before building "
                        "the distillation loss")
    missing = [k for k in ("box", "obj", "cls") if k not in hyp]
    if missing:
        raise UserError(f"hyp lacks {', '.join(missing)}, needed by the distillation loss")
    return OutputDistillationLoss(model, dist_loss=values["dist_loss"], T=values["temperature"],
                                  distill_ratio=values["distill_ratio"], norm="mean", gains=hyp,
                                  reg_norm=reg_norm)(p, t_p)[0]
