"""The first epoch's balance report: what each distillation part weighs beside its detection counterpart.

The distiller feeds it every step's parts (and the teacher's maps, for its highest objectness) until
BALANCE_BATCHES finite batches are in, or the first epoch ends; then each term gives its lines and the ratios
it wants checked (`Term.balance`), and a warning names the knob for every ratio out of range.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from optimizer.config import KDConfig
from optimizer.loss import KL_OBJ_NORMS

LOGGER = logging.getLogger("yolov5kd")

DETECTION_PARTS = ("box", "obj", "cls")
DISTILLATION_PARTS = ("dbox", "dobj", "dcls")
PAIRS = tuple(zip(DISTILLATION_PARTS, DETECTION_PARTS))
WEIGHT_KEYS = {"dbox": "dist_box", "dobj": "dist_obj", "dcls": "dist_cls"}  # each output part's own multiplier
# A distillation part under SUGGEST_BELOW x its detection counterpart gets a suggested multiplier, one that would
# bring it to about SUGGEST_TARGET x (a line in the report; never applied by itself).
SUGGEST_BELOW, SUGGEST_TARGET = 0.1, 0.5
FEATURE_GRAD = "dfeat/det gradient"  # the feature term's entry among the ratios
# A distillation part outside [LOW, HIGH] x its detection counterpart is reported once, with the knob to turn.
BALANCE_LOW, BALANCE_HIGH = 0.01, 10.0
BALANCE_BATCHES = 20  # the first-epoch balance report averages this many batches (or the whole epoch)
# A teacher whose highest objectness over those batches stays below detect.py's default confidence finds no
# objects: its maps teach only background, which no distill_ratio can change.
TEACHER_SEES_NOTHING = 0.25


class BalanceReport:
    """Sums of the first finite batches' parts and the teacher's highest objectness; `report(terms)` logs once."""

    def __init__(self, config: KDConfig):
        self.config = config
        self.sums: dict[str, float] = {}
        self.seen = 0  # finite batches summed
        self.teacher_score = 0.0  # the teacher's highest objectness over the batches the report averages
        self.reported = False

    def add(self, parts: Mapping[str, torch.Tensor], t_maps: Sequence[torch.Tensor]) -> bool:
        """Add one batch (a batch with a non-finite part counts for the teacher's score only); True when the
        report is due."""
        top = max(float(m[..., 4].float().max().sigmoid()) for m in t_maps)
        self.teacher_score = max(self.teacher_score, top)
        vals = {k: float(v) for k, v in parts.items()}
        if not all(map(math.isfinite, vals.values())):
            return False
        for k, v in vals.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.seen += 1
        return self.seen >= BALANCE_BATCHES

    def report(self, terms: Sequence) -> None:
        """Once: each term's lines (`term.balance(means, batches)`), then a warning per ratio out of range."""
        means = {k: v / self.seen for k, v in self.sums.items()}
        ratios: dict[str, float] = {}
        for term in terms:
            lines, more = term.balance(means, self.seen)
            for line in lines:
                LOGGER.info(line)
            ratios.update(more)
        for line in balance_warnings(ratios, self.config, self.teacher_score):
            LOGGER.warning(line)
        self.reported = True


def balance_ratios(parts: Mapping[str, float]) -> dict[str, float]:
    """{dbox/box, dobj/obj, dcls/cls} from part values (NaN where the detection part is 0)."""
    out = {}
    for d, c in PAIRS:
        den = float(parts.get(c, 0.0))
        out[f"{d}/{c}"] = float(parts.get(d, 0.0)) / den if den > 0 else float("nan")
    return out


def suggested_weight(ratio: float, weight: float) -> float | None:
    """The multiplier that would bring a part now at `ratio` x its detection counterpart (under `weight`) to about
    SUGGEST_TARGET x: two significant digits; None when the part is not under SUGGEST_BELOW or cannot move (a
    weight of 0 is a choice, a ratio of 0 or NaN says nothing)."""
    if not (math.isfinite(ratio) and 0 < ratio < SUGGEST_BELOW and weight > 0):
        return None
    w = min(weight * SUGGEST_TARGET / ratio, 1e6)
    return round(w, 1 - math.floor(math.log10(w)))


def weight_suggestions(ratios: Mapping[str, float], weights: Mapping[str, float]) -> list[str]:
    """One line per output part under SUGGEST_BELOW x its detection counterpart, naming the dist_* value that would
    bring it to about SUGGEST_TARGET x (the parts scale linearly with their weights)."""
    lines = []
    for (d, c), r in zip(PAIRS, (ratios.get(f"{d}/{c}", float("nan")) for d, c in PAIRS)):
        w = suggested_weight(r, weights[d])
        if w is not None:
            lines.append(f"Suggestion (not applied): {d}/{c} is {r:.3g}, under {SUGGEST_BELOW:g}; "
                         f"--{WEIGHT_KEYS[d]} {w:g} (now {weights[d]:g}) would bring it to about {SUGGEST_TARGET:g} "
                         f"(docs/guide/balance-report.md#choosing-the-weights)")
    return lines


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
        if not math.isfinite(r) or (blind and name != FEATURE_GRAD and r < BALANCE_LOW):
            continue
        line = _feature_warning(r) if name == FEATURE_GRAD else _output_warning(name, r, config)
        if line:
            lines.append(line)
    return lines


def _feature_warning(r: float) -> str | None:
    if r < BALANCE_LOW:
        return (f"WARNING: the feature term's gradient at the neck is {r:.3g} x the detection terms', "
                f"below {BALANCE_LOW:g}: the teacher's features hardly count; raise feat_ratio")
    if r > BALANCE_HIGH:
        return (f"WARNING: the feature term's gradient at the neck is {r:.3g} x the detection terms', "
                f"above {BALANCE_HIGH:g}: the teacher's features outweigh the labels; lower feat_ratio")
    return None


def _output_warning(name: str, r: float, config: KDConfig) -> str | None:
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
        return (f"WARNING: distillation part {name} = {r:.3g} is below {BALANCE_LOW:g}: the teacher "
                f"hardly counts there; {fix}")
    if r > BALANCE_HIGH:
        fix = "lower distill_ratio" + (" or use --dist_norm soft" if config.dist_norm == "weighted" else "")
        return (f"WARNING: distillation part {name} = {r:.3g} is above {BALANCE_HIGH:g}: the teacher "
                f"outweighs the labels there; {fix}")
    return None
