"""benchmarks/run_curves.py: best epoch, plateau test and ratio from hand-written results.csv files."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

import run_curves

from utils.reporting.loggers import RESULTS_KEYS, format_header, format_row


def _write_run(folder: Path, map5095: list[float]) -> Path:
    folder.mkdir(parents=True)
    rows = [format_header(RESULTS_KEYS)]
    for e, m in enumerate(map5095):
        vals = {k: 0.0 for k in RESULTS_KEYS}
        vals.update({"epoch": e, "metrics/mAP_0.5": min(1.0, m + 0.2), "metrics/mAP_0.5:0.95": m})
        rows.append(format_row([vals[k] for k in RESULTS_KEYS]))
    (folder / "results.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_plateau_and_ratio(tmp_path, capsys):
    # 10 epochs: the last 20 % are epochs 8-9; best before them 0.600 (epoch 6), best in them 0.604
    flat = _write_run(tmp_path / "flat", [0.1, 0.3, 0.45, 0.55, 0.58, 0.59, 0.60, 0.598, 0.604, 0.601])
    # still climbing: last 20 % gain 0.72 - 0.65 -> not plateaued
    climb = _write_run(tmp_path / "climb", [0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.72])
    s = run_curves.summarise(flat, marks=[0, 9, 42])
    assert s["epochs"] == 10 and s["best_epoch"] == 8
    assert s["map"] == pytest.approx(0.604) and s["map50"] == pytest.approx(0.804)
    assert s["plateau"] == pytest.approx(0.004)
    assert set(s["at"]) == {0, 9}  # an epoch the run never reached is left out
    assert run_curves.summarise(climb, marks=[])["plateau"] == pytest.approx(0.07)

    assert run_curves.main([str(climb), str(flat / "results.csv")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].endswith("| +7.00 | no | 1.19× |")  # 0.72 / 0.604
    assert out[3].endswith("| +0.40 | yes | 1.00× |")


def test_missing_results_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="no results rows"):
        run_curves.summarise(tmp_path, marks=[])
