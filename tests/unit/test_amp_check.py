"""benchmarks/amp_check.py: the rule that decides the CPU autocast default (no training)."""
from __future__ import annotations

import pytest

import amp_check
from optimizer.config import KDConfig


@pytest.mark.parametrize("diffs, ok", [
    ([0.1, -0.2, 0.3], True),     # mean +0.07, worst 0.3
    ([0.3, 0.3, 0.3], True),      # mean exactly at the limit
    ([0.4, 0.4, 0.3], False),     # mean +0.37 is past 0.3
    ([0.8, -0.5, -0.2], False),   # mean +0.03 but one seed past 0.7
    ([-0.7, 0.2, 0.1], True),     # a seed exactly at its limit
    ([-0.35, -0.35, -0.35], False),  # a loss counts as a gain does
])
def test_the_rule_bounds_the_mean_and_every_seed(diffs, ok):
    passed, why = amp_check.verdict(diffs, 0.3, 0.7)
    assert passed is ok
    assert ("within" if ok else "outside") in why


def test_the_teacher_arm_uses_train_py_defaults():
    d = KDConfig()
    assert amp_check.default_kd() == {"dist_loss": d.dist_loss, "T": d.temperature, "ratio": d.distill_ratio,
                                      "norm": d.dist_norm}
