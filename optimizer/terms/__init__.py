"""The distillation terms, one file each, every one a `Term` (base.py) that the distiller sums.

TERMS lists the term classes in the order they run: the order their losses are added to the detection loss
and their parts follow the detection parts in results.csv. `build_terms` asks each class for its term; a class
whose setting is off gives None. Adding a term is one file here and one line in TERMS
(docs/guide/adding-a-term.md).
"""
from __future__ import annotations

from optimizer.config import KDConfig
from optimizer.terms.base import Term, TermContext
from optimizer.terms.features import FeatureTerm
from optimizer.terms.localisation import LocalisationTerm
from optimizer.terms.output import OutputTerm
from optimizer.terms.pseudo import PseudoTerm

TERMS: tuple[type[Term], ...] = (
    OutputTerm,  # dbox, dobj, dcls: the student's maps against the teacher's
    LocalisationTerm,  # dloc: the student's box error on labelled objects beyond the teacher's (--dist_loc)
    FeatureTerm,  # dfeat: the head inputs through adapters (--feat_kd)
    PseudoTerm,  # pseudo, pboxes: the teacher's detections as the unlabelled images' targets (--pseudo_conf)
)


def build_terms(config: KDConfig, ctx: TermContext) -> list[Term]:
    """The run's terms, in TERMS order."""
    terms = (cls.build(config, ctx) for cls in TERMS)
    return [t for t in terms if t is not None]
