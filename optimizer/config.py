"""The distillation settings: resolved once (flag > hyp yaml > default), validated once, stored once."""
from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from utils.core.errors import UserError
from utils.training.hyp import EVOLVE_SWITCH, HypSpec, check_value

# The choices of the settings that name a form. They live with the settings: the modules that implement the forms
# import them from here, and this module imports nothing of optimizer/.
DIST_LOSSES = ("l2", "kl", "bce")  # the class term's divergence (optimizer/loss.py)
DIST_NORMS = ("mean", "weighted", "soft", "iou")  # how each output term is normalised (optimizer/loss.py)
FEAT_FORMS = ("none", "mse", "pkd", "cross")  # feature distillation, none = off (optimizer/features.py)
TEACHER_PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")  # --teacher-precision (optimizer/teacher.py)

# The distillation settings a hyp yaml may carry, with their defaults and valid ranges. train.py hands
# them to utils.training.hyp.load_hyp, so a hyp file is checked in one pass.
# dist_norm 'iou' at distill_ratio 0.05 measured best in the convergence benchmark on both demo datasets
# (README, Results). Norm and ratio move together: the weighted-over-the-teacher's-objects forms (weighted,
# soft, iou) give terms ~50x larger than the seed's 'mean' terms, whose ratio was 0.5.
# train.py --evolve mutates them only when a teacher is given; unlabeled_ratio is carried, not mutated (gain 0):
# it sets the cost of a step, and the fitness would simply favour more compute.
# Off by default (feat_kd none): no form gained at the 8-class plateau or in the Quickstart's setting
# (docs/results/convergence.md). When it is turned on, 0.02 is the weight that cost least there (pkd alone
# -0.16 on three seeds; the feature gradient at the neck ~1/20 of the detection terms'); 0.1 (~1/4) cost 1-3
# points alone, and ~1x cost 2-7.5.
FEAT_RATIO_DEFAULT = 0.02
PSEUDO_IGNORE_DEFAULT = 0.1
KD_SPECS: dict[str, HypSpec] = {
    "distill_ratio": HypSpec(0.05, 0.0, 1e6, evolve=(1, 0.01, 5.0)),
    "temperature": HypSpec(5.0, 0.0, 1e4, lo_open=True, evolve=(1, 1.0, 10.0)),
    "dist_norm": HypSpec("iou", kind=str, choices=DIST_NORMS, evolve=EVOLVE_SWITCH),
    # unlabelled images per labelled image in each step, used when the dataset yaml has 'unlabeled:'
    "unlabeled_ratio": HypSpec(1.0, 0.0, 64.0, evolve=(0, 0.0, 64.0)),
    # feature distillation (optimizer/features.py): the form is carried, never switched by --evolve (forms
    # differ in cost, as unlabeled_ratio does); its weight is evolved, below 1 (at the 8-class plateau, weights
    # whose gradient at the neck matched the detection terms' cost 2-7 mAP50-95 points)
    "feat_kd": HypSpec("none", kind=str, choices=FEAT_FORMS, evolve=(0, 0.0, 0.0)),
    "feat_ratio": HypSpec(FEAT_RATIO_DEFAULT, 0.0, 1e6, evolve=(1, 0.005, 1.0)),
    # pseudo-labels on the unlabelled images (optimizer/pseudo.py); pseudo_conf 0 is off. Evolution multiplies
    # values, so an off run stays off and an on run stays on (the bounds start at 0).
    "pseudo_conf": HypSpec(0.0, 0.0, 1.0, evolve=(1, 0.0, 0.95)),
    "pseudo_weight": HypSpec(1.0, 0.0, 1e6, evolve=(1, 0.0, 4.0)),
    "pseudo_ignore": HypSpec(PSEUDO_IGNORE_DEFAULT, 0.0, 1.0, evolve=(1, 0.0, 0.9)),
}
KD_HYP_KEYS = tuple(KD_SPECS)
# Typed values that switch a part off: they need no teacher, so typing them without one is not refused.
OFF_VALUES: dict[str, Any] = {"pseudo_conf": 0.0, "feat_kd": "none"}
_NO_VALUE = object()
_FLAGS = {"teacher_precision": "--teacher-precision"}  # every other setting's flag is --<name>


def flag_name(key: str) -> str:
    """The command-line flag of a distillation setting (--feat_kd for feat_kd)."""
    return _FLAGS.get(key, f"--{key}")


def check_kd_values(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The distillation values given, checked and converted: the one place their rules are applied (the hyp
    keys against KD_SPECS, dist_loss and teacher_precision against their choices); one-line UserErrors."""
    out = dict(values)
    for key, value in values.items():
        if key in KD_SPECS:
            out[key] = check_value(key, value, KD_SPECS[key], where)
    if "dist_loss" in values and values["dist_loss"] not in DIST_LOSSES:
        raise UserError(f"--dist_loss {values['dist_loss']!r}: must be one of {', '.join(DIST_LOSSES)}")
    if "teacher_precision" in values and values["teacher_precision"] not in TEACHER_PRECISIONS:
        raise UserError(f"--teacher-precision {values['teacher_precision']!r}: must be one of "
                        f"{', '.join(TEACHER_PRECISIONS)}")
    return out


@dataclass(frozen=True)
class KDConfig:
    """Everything that defines a run's distillation; `t_weights` None means no distillation."""

    t_weights: str | None = None
    dist_loss: str = "l2"
    temperature: float = KD_SPECS["temperature"].default
    distill_ratio: float = KD_SPECS["distill_ratio"].default
    dist_norm: str = KD_SPECS["dist_norm"].default
    unlabeled_ratio: float = KD_SPECS["unlabeled_ratio"].default
    feat_kd: str = KD_SPECS["feat_kd"].default
    feat_ratio: float = KD_SPECS["feat_ratio"].default
    pseudo_conf: float = KD_SPECS["pseudo_conf"].default
    pseudo_weight: float = KD_SPECS["pseudo_weight"].default
    pseudo_ignore: float = KD_SPECS["pseudo_ignore"].default
    t_sha256: str | None = None  # fingerprint of the teacher file, so a resumed run gets the same teacher
    teacher_precision: str = "auto"  # recorded as given: "auto" is resolved for the device each time it loads

    @property
    def enabled(self) -> bool:
        """True when a teacher is given."""
        return bool(self.t_weights)

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for opt.yaml and the checkpoint's `opt`."""
        return asdict(self)

    def hyp_values(self) -> dict[str, Any]:
        """The hyp-yaml keys in effect, written into the run's hyp.yaml."""
        return {k: getattr(self, k) for k in KD_HYP_KEYS}

    @classmethod
    def resolve(cls, flags: Mapping[str, Any], hyp: Mapping[str, Any], cli_given: Iterable[str],
                strict: bool = False) -> KDConfig:
        """A flag typed on the command line wins over the (already validated) hyp yaml, which wins over the
        default; flag values are validated here, with one-line errors. Typed without a teacher, the pseudo-label
        flags are refused, and with `strict` (train.py) every distillation flag is; the hyp yaml's keys are
        only the defaults a run with a teacher would take, so without one they are not."""
        given = set(cli_given)
        values: dict[str, Any] = {}
        for key, default in cls().as_dict().items():
            if key == "t_sha256":
                continue
            if key in given:
                values[key] = flags[key]
            elif key in KD_HYP_KEYS and key in hyp:
                values[key] = hyp[key]
            else:
                values[key] = default
        typed = check_kd_values({k: v for k, v in values.items() if k in given}, "command line")
        config = cls(**{**values, **typed})
        config.check_typed(typed if strict else {k: v for k, v in typed.items() if k.startswith("pseudo_")})
        config.check()
        return config

    def check_typed(self, typed: Mapping[str, Any]) -> None:
        """Distillation flags typed on the command line need a teacher: without one they would change nothing
        while the run's records named them (one-line UserError). A value that turns its part off is fine."""
        if self.enabled:
            return
        moot = {k: v for k, v in typed.items() if k != "t_weights" and OFF_VALUES.get(k, _NO_VALUE) != v}
        if list(moot) == ["pseudo_conf"]:
            raise UserError(f"pseudo_conf {moot['pseudo_conf']:g}: pseudo-labels are a teacher's detections; give a "
                            f"teacher (--t_weights) or set pseudo_conf 0")
        if moot:
            named = ", ".join(f"{flag_name(k)} {v:g}" if isinstance(v, float) else f"{flag_name(k)} {v}"
                              for k, v in moot.items())
            raise UserError(f"{named}: distillation setting(s) typed without a teacher, so they would have no effect; "
                            f"give a teacher (--t_weights) or remove them")

    def check(self, where: str = "") -> None:
        """The rules between keys, for a config with a teacher (without one none is in effect): the pseudo-label
        ignore band below pseudo_conf. One-line UserErrors, prefixed with `where` when given."""
        if not self.enabled or self.pseudo_conf <= 0:
            return
        if self.pseudo_ignore >= self.pseudo_conf:
            raise UserError(f"{where + ': ' if where else ''}pseudo_ignore {self.pseudo_ignore:g} must be below "
                            f"pseudo_conf {self.pseudo_conf:g}: the ignore band is [pseudo_ignore, pseudo_conf); "
                            f"0 turns it off")

    @classmethod
    def from_record(cls, opt: Mapping[str, Any]) -> KDConfig:
        """The settings a run recorded (opt.yaml or a checkpoint's opt), for --resume: never re-resolved."""
        if not opt.get("t_weights"):
            return cls()
        values = {k: opt[k] for k in cls().as_dict() if k in opt and opt[k] is not None}
        # a record without dist_norm predates the key, so it trained with the seed's formula, whatever the
        # default is now
        values.setdefault("dist_norm", "mean")
        return cls(**values)


def add_kd_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --t_weights, --dist_loss, --dist_norm, --temperature, --distill_ratio, --unlabeled_ratio, --feat_kd,
    --feat_ratio, --pseudo_conf, --pseudo_weight, --pseudo_ignore and --teacher-precision."""
    d = KDConfig()
    parser.add_argument("--t_weights", type=str, default=d.t_weights, help="teacher checkpoint; enables distillation")
    parser.add_argument("--dist_loss", type=str, choices=DIST_LOSSES, default=d.dist_loss,
                        help="class-term divergence")
    parser.add_argument("--dist_norm", type=str, choices=DIST_NORMS, default=d.dist_norm,
                        help="how each distillation term is normalised (overrides hyp 'dist_norm')")
    parser.add_argument("--temperature", type=float, default=d.temperature,
                        help="softening temperature for kl/bce (overrides hyp 'temperature')")
    parser.add_argument("--distill_ratio", type=float, default=d.distill_ratio,
                        help="weight of the distillation loss (overrides hyp 'distill_ratio')")
    parser.add_argument("--unlabeled_ratio", type=float, default=d.unlabeled_ratio,
                        help="unlabelled images per labelled image in each step, when the dataset yaml has "
                             "'unlabeled:' (overrides hyp 'unlabeled_ratio')")
    parser.add_argument("--feat_kd", type=str, choices=FEAT_FORMS, default=d.feat_kd,
                        help="feature distillation of the neck maps: mse (weighted by the teacher's scores), pkd "
                             "(standardised), cross (through the teacher's head) (overrides hyp 'feat_kd')")
    parser.add_argument("--feat_ratio", type=float, default=d.feat_ratio,
                        help="weight of the feature distillation loss (overrides hyp 'feat_ratio')")
    parser.add_argument("--pseudo_conf", type=float, default=d.pseudo_conf,
                        help="with 'unlabeled:' images: the teacher's detections scoring at least this become "
                             "labels for them; 0 = off (overrides hyp 'pseudo_conf')")
    parser.add_argument("--pseudo_weight", type=float, default=d.pseudo_weight,
                        help="weight of the pseudo-label detection loss (overrides hyp 'pseudo_weight')")
    parser.add_argument("--pseudo_ignore", type=float, default=d.pseudo_ignore,
                        help="cells the teacher scores in [pseudo_ignore, pseudo_conf) are not taught background; "
                             "0 = no band (overrides hyp 'pseudo_ignore')")
    parser.add_argument("--teacher-precision", dest="teacher_precision", type=str, choices=TEACHER_PRECISIONS,
                        default=d.teacher_precision,
                        help="teacher forward precision; auto: fp16 on CUDA, bf16 on a CPU with native bf16, "
                             "else fp32; int8 (CPU, opt-in): quantised convolutions, faster, but the teacher may "
                             "lose accuracy")
    return parser
