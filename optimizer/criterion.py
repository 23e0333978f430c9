"""The training criterion: one callable that runs a training step's forward passes and returns (loss, parts).

    loss, parts = criterion(model, imgs, targets)   # plain: {box, obj, cls}; distilled: + {dbox, dobj, dcls}
                                                    # (+ {dfeat} with feature distillation, + {pseudo, pboxes}
                                                    # with pseudo-labels)

The distiller owns the teacher, the feature adapters, the unlabelled stream and the balance report: each step
it draws the unlabelled batch, runs the teacher once on the labelled and unlabelled images together (before the student,
so the teacher's activations are freed first), then the student. The detection loss sees only the labelled
images, the distillation loss all of them; with pseudo-labels, the teacher's detections on the unlabelled images
are their detection targets. The training loop knows nothing about any of this: it logs
whatever `parts` holds.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from optimizer.config import KDConfig
from optimizer.features import FeatureDistillationLoss, build_adapters
from optimizer.loss import KL_OBJ_NORMS, OutputDistillationLoss
from optimizer.pseudo import PseudoBatch, PseudoLabeller
from optimizer.teacher import Teacher, load_teacher, preflight
from utils.core.distributed import de_parallel
from utils.core.errors import UserError
from utils.data.unlabeled import UnlabeledStream
from utils.training.forward import StudentForward, to_input

LOGGER = logging.getLogger("yolov5kd")

DETECTION_PARTS = ("box", "obj", "cls")
DISTILLATION_PARTS = ("dbox", "dobj", "dcls")
FEATURE_PART = "dfeat"
PSEUDO_PARTS = ("pseudo", "pboxes")  # the pseudo-label detection loss, and pseudo boxes per unlabelled image
# A distillation part outside [LOW, HIGH] x its detection counterpart is reported once, with the knob to turn.
BALANCE_LOW, BALANCE_HIGH = 0.01, 10.0
BALANCE_BATCHES = 20  # the first-epoch balance report averages this many batches (or the whole epoch)
# A teacher whose highest objectness over those batches stays below detect.py's default confidence finds no
# objects: its maps teach only background, which no distill_ratio can change.
TEACHER_SEES_NOTHING = 0.25
# Epochs in which the feature adapters train alone: the feature term's gradient reaches the student only
# afterwards. Fresh adapters are random projections, and the gradient through them pulls the student's neck in
# random directions: at the 8-class plateau (feature gradient ~1x the detection terms' at the neck) the
# student lost 7 (mse) to 20 (cross) mAP50-95 points in its first epoch (docs/results/convergence.md).
FEAT_WARMUP_EPOCHS = 1


class DetectionCriterion:
    """YOLOv5's detection loss as a criterion: (loss, {box, obj, cls})."""

    parts = DETECTION_PARTS
    # the parts that are counts, not losses: progress column under the part's name, results.csv column
    # train/<value>
    figures: Mapping[str, str] = {}
    progress_note = ""  # shown beside the progress bar

    def __init__(self, compute_loss: Any, forward: StudentForward):
        """Wrap a ComputeLoss (its call gives (loss * bs, tensor([box, obj, cls]))) and how the student runs."""
        self.compute_loss = compute_loss
        self.forward = forward

    def start_epoch(self, epoch: int) -> None:
        """Called by the loop before each epoch."""

    def __call__(self, model: nn.Module, imgs: torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student's forward on `imgs`, then the total loss (for backward) and its detached parts."""
        with self.forward.autocast():
            pred = self.forward(model, imgs)
            return self._detection(pred, targets.to(self.forward.device))

    def _detection(self, pred: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss, items = self.compute_loss(pred, targets)
        return loss, dict(zip(DETECTION_PARTS, items.detach()))

    def end_epoch(self) -> None:
        """Called by the loop after each epoch."""

    def nonfinite_advice(self, parts: Sequence[str]) -> str:
        """What to do when training stops on a non-finite loss; `parts` are the non-finite parts (none when only
        the total was)."""
        fix = "lower lr0 in the hyp file, and check the labels and the starting weights"
        return f"the detection loss is at fault: {fix}" if parts else fix

    def describe(self) -> list[str]:
        """Lines for the start of training (nothing for the detection loss alone)."""
        return []

    def epoch_scalars(self, mloss: Mapping[str, float]) -> dict[str, float]:
        """Extra per-epoch figures for TensorBoard, from the epoch's mean parts."""
        return {}

    def reference_model(self) -> tuple[str, nn.Module] | None:
        """(name, model) of a model whose mAP bounds the student's, measured before training; None if none."""
        return None

    def trainable(self) -> nn.Module | None:
        """Modules the criterion trains beside the student (in the optimizer, in last.pt, never in the
        student's checkpoint); None when there are none."""
        return None

    def samples(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Images the last step trained on beyond the loader's batch, with their targets, by mosaic name suffix."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What an exact --resume needs of the criterion (saved in last.pt only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what state_dict() gave."""


class Distiller(DetectionCriterion):
    """Detection loss plus output distillation from a frozen teacher; owns the teacher, the pre-flight, the
    unlabelled stream and the balance report."""

    def __init__(self, config: KDConfig, compute_loss: Any, teacher: Teacher, student: nn.Module, imgsz: int,
                 forward: StudentForward, unlabeled: UnlabeledStream | None = None, seed: int = 0):
        """Check the pair once (raises UserError naming both values) and build the losses from the result;
        with feature distillation, the adapters (initialised from `seed`) on the student's device."""
        super().__init__(compute_loss, forward)
        self.config = config
        self.teacher = teacher
        self.unlabeled = unlabeled
        checks = preflight(teacher, student, imgsz)
        # the output terms use the detection loss's own (train-time rescaled) box/obj/cls gains
        terms = {"dist_loss": config.dist_loss, "T": config.temperature, "norm": config.dist_norm,
                 "gains": compute_loss.hyp}
        self.loss = OutputDistillationLoss(student, distill_ratio=config.distill_ratio,
                                           teacher_anchors=checks["teacher_anchors"], **terms)
        self.parts = DETECTION_PARTS + DISTILLATION_PARTS
        self.features: FeatureDistillationLoss | None = None
        self.adapters: nn.Module | None = None
        self._adapt: nn.Module | None = None  # the adapters as called: DDP-wrapped under torchrun
        if config.feat_kd != "none":
            self.features = FeatureDistillationLoss(config.feat_kd, config.feat_ratio, teacher.model, terms)
            self.adapters = build_adapters(de_parallel(student), teacher.model, seed).to(forward.device)
            self._adapt = self.adapters
            if forward.world_size > 1:  # their gradients are averaged over the ranks like the student's
                self._adapt = nn.parallel.DistributedDataParallel(self.adapters)
            self.parts += (FEATURE_PART,)
        self.pseudo: PseudoLabeller | None = None
        self._last_pseudo: tuple[torch.Tensor, PseudoBatch] | None = None
        if config.pseudo_conf > 0:
            if unlabeled is None:
                raise UserError(f"pseudo_conf {config.pseudo_conf:g}: pseudo-labels are made on unlabelled images, "
                                f"and this run uses none (no 'unlabeled:' in the dataset yaml, or unlabeled_ratio 0)"
                                f"; add them or set pseudo_conf 0")
            self.pseudo = PseudoLabeller(teacher.model.model[-1], config.pseudo_conf, config.pseudo_ignore)
            self.parts += PSEUDO_PARTS
            self.figures = {PSEUDO_PARTS[1]: "pseudo_boxes_per_image"}
        self.feed_student = False  # set per epoch by start_epoch(): after the adapters' warm-up
        self._sums: dict[str, float] = {}
        self._grads = [0.0, 0.0]  # first-epoch sums of |d dfeat / d neck| and |d detection / d neck|
        self._seen = 0
        self._teacher_score = 0.0  # the teacher's highest objectness over the batches the report averages
        self.reported = False
        if unlabeled is not None:
            self.progress_note = f"+{unlabeled.batch_size} of {len(unlabeled)} unlabelled/step"
            if self.pseudo is not None:
                self.progress_note += f", pseudo-labels at {config.pseudo_conf:g}"

    @classmethod
    def build(cls, config: KDConfig, compute_loss: Any, student: nn.Module, imgsz: int, forward: StudentForward,
              trust: bool = False, unlabeled: UnlabeledStream | None = None, seed: int = 0) -> Distiller:
        """Load the teacher named by the config (safe loader, fused, frozen) and check it against the student."""
        if not config.enabled:
            raise UserError("distillation needs a teacher checkpoint (--t_weights)")
        teacher = load_teacher(config.t_weights, device=forward.device, trust=trust,
                               precision=config.teacher_precision)
        teacher.model.to(memory_format=torch.channels_last)  # same NHWC layout as the student's input
        return cls(config, compute_loss, teacher, student, imgsz, forward, unlabeled, seed)

    def start_epoch(self, epoch: int) -> None:
        """The unlabelled stream's shuffle for this epoch, and whether the feature term reaches the student yet."""
        if self.unlabeled is not None:
            self.unlabeled.start_epoch(epoch)
        self.feed_student = epoch >= FEAT_WARMUP_EPOCHS

    def __call__(self, model: nn.Module, imgs: torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher on labelled + unlabelled images, then the student; detection loss on the labelled images,
        distillation loss on all of them, and the parts."""
        u_imgs = self._unlabeled_batch(imgs)
        feat = self.features is not None
        # The teacher runs first: its activations are freed before the student's fill memory (measured on 2 CPU
        # cores, the KD step then costs ~2% over plain step + teacher forward, instead of ~6%).
        t_maps, t_feats = self.teacher.run(imgs if u_imgs is None else torch.cat((imgs, u_imgs), 0), features=feat)
        pseudo = None
        if self.pseudo is not None and u_imgs is not None:
            bs = imgs.shape[0]
            pseudo = self.pseudo([m[bs:] for m in t_maps], *u_imgs.shape[2:])
            self._last_pseudo = (u_imgs, pseudo)
        with self.forward.autocast():
            pred, s_feats = _split(self.forward(model, imgs, features=feat), feat)
            targets = targets.to(self.forward.device)
            # the student runs the unlabelled images in a second pass, so that batch-norm statistics, and with
            # them the detection loss of the labelled images, are exactly what they would be without them
            u_pred = u_feats = None
            if u_imgs is not None:
                u_pred, u_feats = _split(self.forward.second_pass(model, u_imgs, features=feat), feat)
            return self.losses(pred, targets, t_maps, u_pred, s_feats, t_feats, u_feats, pseudo)

    def losses(self, pred: list[torch.Tensor], targets: torch.Tensor, t_maps: list[torch.Tensor],
               u_pred: list[torch.Tensor] | None = None, s_feats: list[torch.Tensor] | None = None,
               t_feats: list[torch.Tensor] | None = None, u_feats: list[torch.Tensor] | None = None,
               pseudo: PseudoBatch | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Detection loss on `pred` (the labelled images) + distillation loss on `pred` and `u_pred` together
        against the teacher's maps of both (and, with feature distillation, the student's head inputs of both
        through the adapters against the teacher's; with `pseudo`, the detection loss of `u_pred` against the
        pseudo-labels, times pseudo_weight), and the parts."""
        loss, parts = self._detection(pred, targets)
        bs = pred[0].shape[0]
        p_loss = None
        if pseudo is not None and u_pred is not None:
            # the same detection loss as the labelled images', on its own batch: theirs is left exactly as it was
            p_loss, _ = self.compute_loss(u_pred, pseudo.targets.to(self.forward.device), ignore=pseudo.ignore)
            p_loss = p_loss * self.config.pseudo_weight
            parts[PSEUDO_PARTS[0]] = p_loss.detach().reshape(()) / bs
            parts[PSEUDO_PARTS[1]] = torch.tensor(len(pseudo.targets) / max(pseudo.images, 1),
                                                   device=p_loss.device)
        if u_pred is not None:
            pred = [torch.cat((p, u), 0) for p, u in zip(pred, u_pred)]
        kd_loss, kd_parts = self.loss(pred, t_maps)  # fp32 inside, whatever the autocast state
        # The detection parts are per-image means (the loss is their sum x batch size) while the seed's KD
        # parts already carry the batch size: put them on the detection parts' scale, so that logged columns
        # and balance ratios compare what each part weighs in the gradient (sum(parts) x bs == loss).
        parts.update({k: v / bs for k, v in kd_parts.items()})
        total = loss + kd_loss.to(loss.dtype)
        if p_loss is not None:
            total = total + p_loss.to(loss.dtype)
        if self.features is not None:
            feats = s_feats if u_feats is None else [torch.cat((s, u), 0) for s, u in zip(s_feats, u_feats)]
            # during the warm-up the adapters learn on detached maps; the student gets no feature gradient yet
            dfeat = self.features(self._adapt(feats if self.feed_student else [f.detach() for f in feats]),
                                  t_feats, t_maps)  # fp32 inside
            if not self.reported and s_feats[0].requires_grad:
                # the gradient the feature term sends (or, in the warm-up, will send) into the student's neck;
                # the bare adapters, so a DDP module never runs two forwards in one step
                probe = dfeat if self.feed_student else self.features(self.adapters(feats), t_feats, t_maps)
                self._measure_gradients(loss, probe, s_feats)
            parts[FEATURE_PART] = dfeat.detach() / bs
            total = total + dfeat.to(loss.dtype)
        if not self.reported:
            top = max(float(m[..., 4].float().max().sigmoid()) for m in t_maps)
            self._teacher_score = max(self._teacher_score, top)
            self._accumulate(parts)
        return total, parts

    def _measure_gradients(self, det_loss: torch.Tensor, dfeat: torch.Tensor, feats: list[torch.Tensor]) -> None:
        """Add this batch's gradient norms at the student's neck (the labelled images' head inputs): of the
        feature term and of the detection terms (the graph is kept for the step's own backward)."""
        norms = []
        for term in (dfeat, det_loss):
            grads = torch.autograd.grad(term.sum(), feats, retain_graph=True, allow_unused=True)
            norms.append(float(sum(g.float().square().sum() for g in grads if g is not None)) ** 0.5)
        if all(map(_finite, norms)):
            self._grads[0] += norms[0]
            self._grads[1] += norms[1]

    def _unlabeled_batch(self, imgs: torch.Tensor) -> torch.Tensor | None:
        if self.unlabeled is None:
            return None
        u_imgs = to_input(self.unlabeled.next_batch(), self.forward.device)
        if u_imgs.shape[2:] != imgs.shape[2:]:  # multi-scale: one size for the teacher's combined batch
            u_imgs = F.interpolate(u_imgs, size=imgs.shape[2:], mode="bilinear", align_corners=False)
        return u_imgs

    def describe(self) -> list[str]:
        """The feature distillation and the unlabelled stream, when there are."""
        lines = []
        if self.adapters is not None:
            widths = ", ".join(f"{a[0].in_channels}->{a[-1].out_channels}" for a in self.adapters.levels)
            n = sum(p.numel() for p in self.adapters.parameters())
            lines.append(f"Feature distillation: {self.config.feat_kd} on the head inputs ({widths} channels), "
                         f"feat_ratio {self.config.feat_ratio:g}; adapters {n} parameters, trained beside the student"
                         f", kept in last.pt only")
        if self.unlabeled is not None:
            u, c = self.unlabeled, self.config
            use = ("distillation and pseudo-labels: the teacher's detections scoring at least "
                   f"{c.pseudo_conf:g} (weight {c.pseudo_weight:g}"
                   + (f"; cells it scores in [{c.pseudo_ignore:g}, {c.pseudo_conf:g}) are not taught background)"
                      if self.pseudo.ignore_below > 0 else ")")
                   if self.pseudo is not None else "distillation only")
            lines.append(f"Unlabelled images: {len(u)} ({u.batch_size} per step beside {u.labelled_batch} labelled, "
                         f"unlabeled_ratio {c.unlabeled_ratio:g}), {use}")
        return lines

    def nonfinite_advice(self, parts: Sequence[str]) -> str:
        """The teacher and the distillation knobs when only distillation parts are non-finite; else the detection
        loss's advice."""
        if parts and not any(k in DETECTION_PARTS for k in parts):
            return ("the distillation loss is at fault: check the teacher checkpoint, and lower distill_ratio or "
                    "temperature")
        return super().nonfinite_advice(parts)

    def samples(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The last step's unlabelled images with their pseudo boxes (and scores), under 'pseudo'."""
        if self._last_pseudo is None:
            return {}
        u_imgs, pseudo = self._last_pseudo
        return {"pseudo": (u_imgs, pseudo.plot_targets())}

    def epoch_scalars(self, mloss: Mapping[str, float]) -> dict[str, float]:
        """Each distillation part over its detection counterpart."""
        return {f"kd_balance/{k}": v for k, v in balance_ratios(mloss).items()}

    def reference_model(self) -> tuple[str, nn.Module] | None:
        """The teacher: the student's ceiling."""
        return f"Teacher {self.config.t_weights}", self.teacher.model

    def trainable(self) -> nn.Module | None:
        """The feature adapters (None without feature distillation)."""
        return self.adapters

    def state_dict(self) -> dict[str, Any]:
        """The adapters' fp32 weights, contiguous."""
        if self.adapters is None:
            return {}
        return {"adapters": {k: v.detach().contiguous().clone() for k, v in self.adapters.state_dict().items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The adapters of a resumed run; a checkpoint without them starts them afresh, with one warning."""
        if self.adapters is None:
            return
        if "adapters" not in state:
            LOGGER.warning("WARNING: --resume: this checkpoint holds no feature adapters (best.pt or a periodic "
                           "save never does); they start afresh, so the run is not an exact continuation")
            return
        self.adapters.load_state_dict(state["adapters"])

    def _accumulate(self, parts: Mapping[str, torch.Tensor]) -> None:
        vals = {k: float(v) for k, v in parts.items()}
        if not all(map(_finite, vals.values())):
            return
        for k, v in vals.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._seen += 1
        if self._seen >= BALANCE_BATCHES:
            self.report_balance()

    def end_epoch(self) -> None:
        """A first epoch shorter than BALANCE_BATCHES still gets its balance report."""
        if not self.reported and self._seen:
            self.report_balance()

    def report_balance(self) -> None:
        """Once: each distillation part next to its detection counterpart (and the feature term's gradient at the
        neck next to the detection terms'), and a warning per part out of range."""
        means = {k: v / self._seen for k, v in self._sums.items()}
        ratios = balance_ratios(means) if self.config.distill_ratio > 0 else {}
        if ratios:
            LOGGER.info("Distillation balance over the first %d batches (%s norm): %s", self._seen,
                        self.config.dist_norm, ", ".join(f"{d} {means[d]:.4g} / {c} {means[c]:.4g} = {r:.3g}"
                                                         for (d, c), r in zip(_PAIRS, ratios.values())))
        if self.features is not None and self._grads[1] > 0:
            g_feat, g_det = (g / self._seen for g in self._grads)
            ratios[FEATURE_GRAD] = g_feat / g_det
            LOGGER.info("Feature distillation balance over the first %d batches (%s): gradient at the neck of dfeat "
                        "%.4g / of box+obj+cls %.4g = %.3g%s", self._seen, self.config.feat_kd, g_feat, g_det,
                        ratios[FEATURE_GRAD], "" if self.feed_student else
                        f" (the adapters train alone for {FEAT_WARMUP_EPOCHS} epoch(s); then the student gets it)")
        if PSEUDO_PARTS[0] in means:
            det = sum(means[k] for k in DETECTION_PARTS)
            LOGGER.info("Pseudo-labels over the first %d batches: %.3g boxes per unlabelled image; their detection "
                        "loss %.4g / the labelled images' %.4g = %.3g", self._seen, means[PSEUDO_PARTS[1]],
                        means[PSEUDO_PARTS[0]], det, means[PSEUDO_PARTS[0]] / det if det > 0 else float("nan"))
        for line in balance_warnings(ratios, self.config, self._teacher_score):
            LOGGER.warning(line)
        self.reported = True


_PAIRS = tuple(zip(DISTILLATION_PARTS, DETECTION_PARTS))
FEATURE_GRAD = "dfeat/det gradient"  # the feature term's entry in the balance report


def _split(out: Any, features: bool) -> tuple[Any, Any]:
    return out if features else (out, None)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def balance_ratios(parts: Mapping[str, float]) -> dict[str, float]:
    """{dbox/box, dobj/obj, dcls/cls} from part values (NaN where the detection part is 0)."""
    out = {}
    for d, c in _PAIRS:
        den = float(parts.get(c, 0.0))
        out[f"{d}/{c}"] = float(parts.get(d, 0.0)) / den if den > 0 else float("nan")
    return out


def balance_warnings(ratios: Mapping[str, float], config: KDConfig, teacher_score: float | None = None) -> list[str]:
    """One line for each distillation part below 1% or above 10x its detection counterpart (the feature term:
    its gradient at the neck against the detection terms'), naming the knob; with `teacher_score` (the teacher's
    highest objectness) below TEACHER_SEES_NOTHING, one line saying the teacher finds no objects instead of
    advice to raise distill_ratio, which cannot help then."""
    lines = []
    blind = teacher_score is not None and teacher_score < TEACHER_SEES_NOTHING
    if blind:
        lines.append(f"WARNING: the teacher finds no objects on these images (its highest objectness is "
                     f"{teacher_score:.3g}, below {TEACHER_SEES_NOTHING:g}), so its maps teach only background and "
                     f"no distill_ratio can help; check that --t_weights was trained for this dataset's classes")
    for name, r in ratios.items():
        if not _finite(r) or (blind and name != FEATURE_GRAD and r < BALANCE_LOW):
            continue
        if name == FEATURE_GRAD:
            if r < BALANCE_LOW:
                lines.append(f"WARNING: the feature term's gradient at the neck is {r:.3g} x the detection terms', "
                             f"below {BALANCE_LOW:g}: the teacher's features hardly count; raise feat_ratio")
            elif r > BALANCE_HIGH:
                lines.append(f"WARNING: the feature term's gradient at the neck is {r:.3g} x the detection terms', "
                             f"above {BALANCE_HIGH:g}: the teacher's features outweigh the labels; lower feat_ratio")
            continue
        if r < BALANCE_LOW:
            if config.dist_norm == "mean":
                fix = ("use --dist_norm soft (or weighted), which averages over the teacher's objects instead of "
                       "every cell, or raise distill_ratio")
            elif name == "dobj/obj" and config.dist_norm in KL_OBJ_NORMS:
                # a KL is ~0 wherever the student already agrees with the teacher, unlike the detection BCE
                # beside it, so a small ratio here is no imbalance by itself; raising the ratio for it alone
                # would push the class term (already ~1.5x its counterpart at the default) past 10x
                fix = ("its objectness term is a KL over every cell, near 0 where the student already agrees "
                       "with the teacher; raise distill_ratio only if the other parts are low too")
            else:
                fix = "raise distill_ratio"
            lines.append(f"WARNING: distillation part {name} = {r:.3g} is below {BALANCE_LOW:g}: the teacher "
                         f"hardly counts there; {fix}")
        elif r > BALANCE_HIGH:
            fix = "lower distill_ratio" + (" or use --dist_norm soft" if config.dist_norm == "weighted" else "")
            lines.append(f"WARNING: distillation part {name} = {r:.3g} is above {BALANCE_HIGH:g}: the teacher "
                         f"outweighs the labels there; {fix}")
    return lines
