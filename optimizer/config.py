"""The distillation settings: resolved once (flag > hyp yaml > default), validated once, stored once."""
from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, make_dataclass
from typing import Any

from utils.core.errors import UserError
from utils.training.hyp import EVOLVE_SWITCH, HypSpec, check_value

# The choices of the settings that name a form. They live with the settings: the modules that implement the forms
# import them from here, and this module imports nothing of optimizer/.
DIST_LOSSES = ("l2", "kl", "bce")  # the class term's divergence (optimizer/loss.py)
DIST_NORMS = ("mean", "weighted", "soft", "iou")  # how each output term is normalised (optimizer/loss.py)
FEAT_FORMS = ("none", "mse", "pkd", "cross")  # feature distillation, none = off (optimizer/features.py)
TEACHER_PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")  # --teacher-precision (optimizer/teacher.py)
DISTILL_DECAYS = ("none", "linear", "cos")  # the schedule of the teacher's weight (optimizer/schedule.py)

# The settings table: one row per distillation setting, the only place its flag, default, rule (range or
# choices), hyp key, evolve bounds and help text are written. The flags (add_kd_args), the checks
# (check_kd_values), the hyp yaml's keys and evolve bounds (KD_SPECS), KDConfig's fields and the README options
# table's test are all derived from it.
#
# Why the defaults are what they are:
# - dist_norm 'iou' at distill_ratio 0.05 measured best in the convergence benchmark on both demo datasets
#   (README). Norm and ratio move together: the weighted-over-the-teacher's-objects forms (weighted, soft, iou)
#   give terms ~50x larger than the seed's 'mean' terms, whose ratio was 0.5.
# - --evolve mutates the hyp keys only when a teacher is given. unlabeled_ratio and feat_kd are carried, never
#   mutated (gain 0): they set the cost of a step, and the fitness would simply favour more compute.
# - feat_kd is off: no form gained at the 8-class plateau or in the Quickstart's setting
#   (docs/results/convergence.md). Turned on, feat_ratio 0.02 cost least there (pkd alone -0.16 on three seeds;
#   the feature gradient at the neck ~1/20 of the detection terms'); 0.1 (~1/4) cost 1-3 points alone, ~1x 2-7.5,
#   so its evolve range stays below 1.
# - pseudo_conf 0 is off. Evolution multiplies values, so an off run stays off and an on run stays on.
# - dist_box, dist_obj, dist_cls are 1: the seed's formula (one distill_ratio x the detection gains) until a
#   measurement moves them; the balance report suggests a multiplier for a term under 10% of its counterpart.
# - dist_loc 0 is off (the term is not built) until measured. Like pseudo_conf, evolution keeps it off or on.
# - distill_decay cos: the teacher's weight falls from 1 to distill_floor over the run. It led the constant
#   weight in the Quickstart's setting (+1.05 against +0.38 mAP50-95 over no teacher, three seeds), in the
#   pruned YOLOv5s's recovery (+1.12 against +0.51), and matched it at the 8-class plateau (-0.25 against
#   -0.28; no setting beat the student alone there; docs/results/convergence.md).
#   Not evolved (gain 0): a schedule changes what the last epochs train on, which a short evolution run cannot
#   judge. distill_floor 0.01 is YOLOv6's end value: the labels alone finish the boxes, while the distillation
#   parts stay logged (non-zero).


_NO_VALUE = object()


@dataclass(frozen=True)
class Setting:
    """One distillation setting: its rule and default (`spec`; None for a free string), whether a hyp yaml may
    carry it, its flag, the value that switches its part off, and its help text."""

    name: str
    spec: HypSpec | None
    help: str
    hyp: bool = True
    flag: str = ""  # '' = --<name>
    off: Any = _NO_VALUE  # typed without a teacher, this value is no mistake: it asks for nothing

    @property
    def default(self) -> Any:
        """The value when neither the command line nor the hyp yaml gives one."""
        return None if self.spec is None else self.spec.default

    @property
    def option(self) -> str:
        """The command-line flag."""
        return self.flag or f"--{self.name}"


SETTINGS: tuple[Setting, ...] = (
    Setting("t_weights", None, "teacher checkpoint; enables distillation", hyp=False),
    Setting("dist_loss", HypSpec("l2", kind=str, choices=DIST_LOSSES), "class-term divergence", hyp=False),
    Setting("distill_ratio", HypSpec(0.05, 0.0, 1e6, evolve=(1, 0.01, 5.0)), "weight of the distillation loss"),
    Setting("temperature", HypSpec(5.0, 0.0, 1e4, lo_open=True, evolve=(1, 1.0, 10.0)),
            "softening temperature for kl/bce"),
    Setting("dist_norm", HypSpec("iou", kind=str, choices=DIST_NORMS, evolve=EVOLVE_SWITCH),
            "how each distillation term is normalised"),
    Setting("unlabeled_ratio", HypSpec(1.0, 0.0, 64.0, evolve=(0, 0.0, 64.0)),
            "unlabelled images per labelled image in each step, when the dataset yaml has 'unlabeled:'"),
    Setting("feat_kd", HypSpec("none", kind=str, choices=FEAT_FORMS, evolve=(0, 0.0, 0.0)),
            "feature distillation of the neck maps: mse (weighted by the teacher's scores), pkd (standardised), "
            "cross (through the teacher's head)", off="none"),
    Setting("feat_ratio", HypSpec(0.02, 0.0, 1e6, evolve=(1, 0.005, 1.0)),
            "weight of the feature distillation loss"),
    Setting("pseudo_conf", HypSpec(0.0, 0.0, 1.0, evolve=(1, 0.0, 0.95)),
            "with 'unlabeled:' images: the teacher's detections scoring at least this become labels for them; "
            "0 = off", off=0.0),
    Setting("pseudo_weight", HypSpec(1.0, 0.0, 1e6, evolve=(1, 0.0, 4.0)),
            "weight of the pseudo-label detection loss"),
    Setting("pseudo_ignore", HypSpec(0.1, 0.0, 1.0, evolve=(1, 0.0, 0.9)),
            "cells the teacher scores in [pseudo_ignore, pseudo_conf) are not taught background; 0 = no band"),
    Setting("dist_box", HypSpec(1.0, 0.0, 1e6, evolve=(1, 0.0, 20.0)),
            "multiplier on the output box term (dbox) alone"),
    Setting("dist_obj", HypSpec(1.0, 0.0, 1e6, evolve=(1, 0.0, 20.0)),
            "multiplier on the output objectness term (dobj) alone"),
    Setting("dist_cls", HypSpec(1.0, 0.0, 1e6, evolve=(1, 0.0, 20.0)),
            "multiplier on the output class term (dcls) alone"),
    Setting("dist_loc", HypSpec(0.0, 0.0, 1e6, evolve=(1, 0.0, 20.0)),
            "weight of the localisation term (dloc): on the cells assigned to labelled objects, the student's "
            "1 - CIoU to the label beyond the teacher's, x the box gain; 0 = off", off=0.0),
    Setting("distill_decay", HypSpec("cos", kind=str, choices=DISTILL_DECAYS, evolve=(0, 0.0, 0.0)),
            "schedule of the output, feature and localisation terms over the epochs: none (constant), linear "
            "or cos, from 1 at the first epoch to distill_floor at the last", off="none"),
    Setting("distill_floor", HypSpec(0.01, 0.0, 1.0, evolve=(1, 0.0, 1.0)),
            "with distill_decay: the fraction of those terms left at the last epoch"),
    Setting("teacher_precision", HypSpec("auto", kind=str, choices=TEACHER_PRECISIONS),
            "teacher forward precision; auto: fp16 on CUDA, bf16 on a CPU with native bf16, else fp32; int8 (CPU, "
            "opt-in): quantised convolutions, faster, but the teacher may lose accuracy",
            hyp=False, flag="--teacher-precision"),
)
SETTING = {s.name: s for s in SETTINGS}
# the hyp-yaml keys, for utils.training.hyp.load_hyp (so a hyp file is checked in one pass) and --evolve
KD_SPECS: dict[str, HypSpec] = {s.name: s.spec for s in SETTINGS if s.hyp}
KD_HYP_KEYS = tuple(KD_SPECS)


def flag_name(key: str) -> str:
    """The command-line flag of a distillation setting (--feat_kd for feat_kd)."""
    return SETTING[key].option


def check_kd_values(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The distillation values given, checked against their rows and converted: the one place their rules are
    applied; one-line UserErrors naming `where` the value came from."""
    out = dict(values)
    for key, value in values.items():
        spec = SETTING[key].spec if key in SETTING else None
        if spec is not None:
            out[key] = check_value(key, value, spec, where)
    return out


class _KDConfigMethods:
    """What a resolved distillation config can do; its fields are the settings table's names (KDConfig below)."""

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
        for st in SETTINGS:
            if st.name in given:
                values[st.name] = flags[st.name]
            elif st.hyp and st.name in hyp:
                values[st.name] = hyp[st.name]
            else:
                values[st.name] = st.default
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
        moot = {k: v for k, v in typed.items() if k != "t_weights" and SETTING[k].off != v}
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
        # likewise a record without distill_decay trained at a constant weight (the default until 2026-12-07)
        values.setdefault("distill_decay", "none")
        return cls(**values)

    def summary(self, given: Iterable[str] = (), hyp: Mapping[str, Any] | None = None, hyp_name: str = "") -> str:
        """One line: the settings in effect and where each came from (typed, the hyp yaml, or the default)."""
        given, hyp = set(given), hyp or {}
        shown = [st for st in SETTINGS if st.name != "t_weights"]
        values = " ".join(f"{st.name}={getattr(self, st.name)}" for st in shown)
        defaulted = [st.name for st in shown if st.hyp and st.name not in given and st.name not in hyp]
        line = f"Distillation from {self.t_weights}: {values}"
        if defaulted:
            line += f" (defaults for {', '.join(defaulted)}: {hyp_name or 'the hyp yaml'} does not set them)"
        return line


# KDConfig's fields are the table's rows (plus the teacher file's fingerprint), so a new setting is one row
KDConfig = make_dataclass(
    "KDConfig",
    [(st.name, Any, field(default=st.default)) for st in SETTINGS]
    # fingerprint of the teacher file, so a resumed run gets the same teacher; teacher_precision is recorded as
    # given ("auto" is resolved for the device each time the teacher loads)
    + [("t_sha256", Any, field(default=None))],
    bases=(_KDConfigMethods,), frozen=True)
KDConfig.__module__ = __name__  # pickles and reprs as optimizer.config.KDConfig
KDConfig.__doc__ = "Everything that defines a run's distillation; `t_weights` None means no distillation."


def add_kd_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one flag per row of the settings table (--t_weights, --dist_loss, ... --teacher-precision)."""
    for st in SETTINGS:
        spec = st.spec
        kind = str if spec is None else spec.kind
        # choices are shown, not enforced, here: check_kd_values checks every value once, in one line
        metavar = "{" + ",".join(spec.choices) + "}" if spec is not None and spec.choices else None
        text = st.help + (f" (overrides hyp '{st.name}')" if st.hyp else "")
        parser.add_argument(st.option, dest=st.name, type=kind, default=st.default, metavar=metavar, help=text)
    return parser


def without_settings(opt: argparse.Namespace) -> argparse.Namespace:
    """A copy of the options without the distillation flags: once resolved, the values in effect are the
    config's, so no stale copy (an argparse default the config overrode) can be read or recorded."""
    drop = {st.name for st in SETTINGS} | {"t_sha256"}
    return argparse.Namespace(**{k: v for k, v in vars(opt).items() if k not in drop})
