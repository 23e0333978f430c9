"""benchmarks/kd_gain.py: converge arms and their run folders (no training)."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

import kd_gain

FLAGS = argparse.Namespace(dist_loss="l2", temperature=5.0, distill_ratio=0.5)


def test_arm_takes_what_it_omits_from_the_flags() -> None:
    assert kd_gain.parse_arm("mean", FLAGS) == ("mean r0.5", {"dist_loss": "l2", "T": 5.0, "ratio": 0.5,
                                                              "norm": "mean"})
    assert kd_gain.parse_arm("soft:0.05", FLAGS)[1]["ratio"] == 0.05
    label, kd = kd_gain.parse_arm("soft:0.5:bce:1", FLAGS)
    assert label == "soft r0.5 bce T1"
    assert kd == {"dist_loss": "bce", "T": 1.0, "ratio": 0.5, "norm": "soft"}


@pytest.mark.parametrize("bad", ["", "soft:0.5:bce:1:x", ":0.5"])
def test_malformed_arm_is_refused(bad: str) -> None:
    with pytest.raises(SystemExit, match="norm\\[:ratio"):
        kd_gain.parse_arm(bad, FLAGS)


def test_runs_at_other_loss_or_temperature_get_their_own_folder() -> None:
    default = kd_gain._conv_name("soft", kd_gain.parse_arm("soft:0.5", FLAGS)[1], 0)
    other = kd_gain._conv_name("soft", kd_gain.parse_arm("soft:0.5:bce:1", FLAGS)[1], 0)
    assert default == "conv_soft_r0.5_s0"  # the folders earlier results were written to keep their names
    assert other == "conv_soft_r0.5_bceT1_s0"
    assert kd_gain._conv_name("baseline", None, 1, a_flags="--amp") == "conv_baseline_amp_s1"


def test_main_and_finetune_runs_are_named_by_settings_that_differ_from_the_folder_defaults() -> None:
    old = argparse.Namespace(dist_loss="l2", temperature=5.0, distill_ratio=0.5, dist_norm="mean")
    kd, tag = kd_gain._kd_flags(old)
    assert tag == "" and kd["norm"] == "mean"  # folders written before the default moved keep their names
    kd, tag = kd_gain._kd_flags(argparse.Namespace(**{**vars(old), "distill_ratio": 0.05, "dist_norm": "weighted"}))
    assert tag == "_weighted0.05_l2T5" and kd == {"dist_loss": "l2", "T": 5.0, "ratio": 0.05, "norm": "weighted"}


def test_unlabeled_runs_also_name_their_unlabeled_ratio() -> None:
    old = argparse.Namespace(dist_loss="l2", temperature=5.0, distill_ratio=0.5, dist_norm="mean", unlabeled_ratio=1.0)
    assert kd_gain._kd_flags(old, unlabeled=True)[1] == ""  # the folders of docs/kd_unlabeled.md
    assert kd_gain._kd_flags(argparse.Namespace(**{**vars(old), "unlabeled_ratio": 2.0}), unlabeled=True)[1] == \
        "_mean0.5_l2T5_u2"
    assert kd_gain._kd_flags(argparse.Namespace(**{**vars(old), "distill_ratio": 0.05}), unlabeled=True)[1] == \
        "_mean0.05_l2T5_u1"  # the folders of docs/kd_unlabeled_r0.05.md


def test_pseudo_arms_name_every_setting_and_alone_means_no_soft_terms() -> None:
    soft = {"dist_loss": "bce", "T": 1.0, "ratio": 0.5, "norm": "soft", "unlabeled_ratio": 1.0}
    label, kd, stem = kd_gain.pseudo_arm("soft+0.5", soft, "_soft0.5_bceT1_u1")
    assert (kd["ratio"], kd["pseudo_conf"], kd["pseudo_ignore"], kd["pseudo_weight"]) == (0.5, 0.5, 0.1, 1.0)
    assert stem == "unl_pl0.5_i0.1_w1_soft0.5_bceT1_u1" and label.endswith("+ soft KD")
    label, kd, stem = kd_gain.pseudo_arm("0.4:0:2", soft, "_soft0.5_bceT1_u1")
    assert (kd["ratio"], kd["pseudo_conf"], kd["pseudo_ignore"], kd["pseudo_weight"]) == (0.0, 0.4, 0.0, 2.0)
    assert stem == "unl_pl0.4_i0_w2_alone_u1" and label.endswith("alone")
    for bad in ("", "soft+", "0", "1.5", "0.5:0.1:1:3", "x"):
        with pytest.raises(SystemExit, match=r"\[soft\+\]conf"):
            kd_gain.parse_pseudo(bad)
    assert kd_gain.batches_per_epoch(200, 16) == 13 and kd_gain.batches_per_epoch(1000, 16) == 63


def _stored_run(tmp_path: Path, data: str, imgsz: int = 160) -> argparse.Namespace:
    """A finished 2-epoch converge baseline folder, as train.py leaves it; returns the benchmark's args."""
    run = tmp_path / "conv_baseline_s0"
    (run / "weights").mkdir(parents=True)
    (run / "weights/best.pt").write_bytes(b"")
    header = "epoch,metrics/precision,metrics/recall,metrics/mAP_0.5,metrics/mAP_0.5:0.95\n"
    (run / "results.csv").write_text(header + "0,0.5,0.5,0.5,0.3\n1,0.6,0.6,0.6,0.4\n")
    (run / "opt.yaml").write_text(f"weights: checkpoint/yolov5n-shapes16.pt\ndata: {data}\nimgsz: {imgsz}\nepochs: 2\n")
    return argparse.Namespace(project=str(tmp_path), data="shapes16.yaml", imgsz=160, teacher="t.pt")


def test_a_stored_run_of_the_same_settings_is_reused(tmp_path: Path) -> None:
    a = _stored_run(tmp_path, "shapes16.yaml")
    res = kd_gain.train_run("conv_baseline_s0", a, seed=0, epochs=2, kd=None,
                            weights="/elsewhere/checkpoint/yolov5n-shapes16.pt")
    assert res["metrics/mAP_0.5:0.95"] == [0.3, 0.4]


@pytest.mark.parametrize("data,imgsz,weights,what", [
    ("shapes.yaml", 160, "checkpoint/yolov5n-shapes16.pt", "data 'shapes.yaml'"),
    ("shapes16.yaml", 256, "checkpoint/yolov5n-shapes16.pt", "imgsz 256"),
    ("shapes16.yaml", 160, "checkpoint/yolov5n-shapes.pt", "weights"),
])
def test_a_stored_run_of_other_data_is_refused_not_reused(tmp_path: Path, data, imgsz, weights, what) -> None:
    a = _stored_run(tmp_path, data, imgsz)
    with pytest.raises(SystemExit, match=f"trained with {what}"):
        kd_gain.train_run("conv_baseline_s0", a, seed=0, epochs=2, kd=None, weights=weights)
    assert (tmp_path / "conv_baseline_s0/results.csv").exists()  # nothing was deleted


def test_a_finished_run_of_another_length_is_refused_not_deleted(tmp_path: Path) -> None:
    a = _stored_run(tmp_path, "shapes16.yaml")
    with pytest.raises(SystemExit, match="trained with epochs 2, not 3"):
        kd_gain.train_run("conv_baseline_s0", a, seed=0, epochs=3, kd=None, weights="checkpoint/yolov5n-shapes16.pt")
    assert (tmp_path / "conv_baseline_s0/results.csv").exists()


def test_converge_starts_the_slower_kd_runs_first(tmp_path: Path, monkeypatch) -> None:
    started = []

    def fake_run(name, a, *, seed, epochs, kd, weights=""):
        started.append(name)
        return {"epoch": [0], "metrics/precision": [0.5], "metrics/recall": [0.5], "metrics/mAP_0.5": [0.5],
                "metrics/mAP_0.5:0.95": [0.3 if kd is None else 0.32]}

    monkeypatch.setattr(kd_gain, "train_run", fake_run)
    monkeypatch.setattr(kd_gain, "start_map", lambda a, w: (0.5, 0.3))
    monkeypatch.setattr(kd_gain, "plot_arms", lambda *args, **kw: None)
    evaluated = {}
    monkeypatch.setattr(kd_gain, "iou_lines", lambda a, ckpts: evaluated.update(ckpts) or ["per IoU"])
    a = argparse.Namespace(**vars(FLAGS), norms=["iou:0.05"], seeds=[0, 1], jobs=1, teacher_precision="auto",
                           train_flags="", ft_epochs=1, start="s.pt", teacher="t.pt", imgsz=64, batch=2,
                           out=str(tmp_path), tag="", project=str(tmp_path))
    lines = kd_gain.converge(a)
    assert any(line.startswith("| 0 | 30.00 | 32.00 (+2.00) |") for line in lines)  # results keyed by arm, not order
    assert started == ["conv_iou_r0.05_s0", "conv_iou_r0.05_s1", "conv_baseline_s0", "conv_baseline_s1"]
    # AP per IoU threshold: the baseline's and the best arm's best.pt of each seed
    assert evaluated == {"baseline": [tmp_path / f"conv_baseline_s{s}/weights/best.pt" for s in (0, 1)],
                         "iou r0.05": [tmp_path / f"conv_iou_r0.05_s{s}/weights/best.pt" for s in (0, 1)]}
    assert lines[-1] == "per IoU"


def test_the_unlabelled_split_names_absolute_lists_from_a_relative_project(tiny_data, tmp_path, monkeypatch) -> None:
    import yaml

    from utils.data.datasets import check_dataset

    monkeypatch.chdir(tmp_path)
    a = argparse.Namespace(data=str(tiny_data), split_seed=0, labelled_fraction=0.25, project="runs/kd_unl")
    yl, yu, nl, nu = kd_gain.make_split(a)
    assert (nl, nu) == (2, 6)
    for y in (yl, yu):
        d = yaml.safe_load(Path(y).read_text())
        assert Path(d["train"]).is_absolute() and Path(d["train"]).is_file()
        assert len(check_dataset(y).train) > 0  # resolves wherever the yaml is read from
    assert Path(yaml.safe_load(Path(yu).read_text())["unlabeled"]).is_absolute()


def test_arm_settings_after_a_comma_reach_the_label_and_the_folder() -> None:
    label, kd = kd_gain.parse_arm("iou:0.05,dist_box=14,dist_obj=50,dist_loc=1,distill_decay=cos", FLAGS)
    assert kd["extra"] == {"dist_box": "14", "dist_obj": "50", "dist_loc": "1", "distill_decay": "cos"}
    assert label == "iou r0.05 box14 obj50 loc1 cos"
    assert kd_gain._conv_name("iou", kd, 2, a_flags="--no-amp") == "conv_iou_r0.05_box14_obj50_loc1_cos_no-amp_s2"
    # an arm without settings keeps the folder name earlier results were written to
    assert kd_gain._conv_name("iou", kd_gain.parse_arm("iou:0.05", FLAGS)[1], 0) == "conv_iou_r0.05_s0"


@pytest.mark.parametrize("bad", ["iou:0.05,dist_box", "iou:0.05,lr0=0.1", "iou:0.05,dist_obj="])
def test_unknown_or_empty_arm_setting_is_refused(bad: str) -> None:
    with pytest.raises(SystemExit, match="setting=value"):
        kd_gain.parse_arm(bad, FLAGS)
