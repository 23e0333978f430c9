"""process_batch, ap_per_class, fitness and the confusion matrix: golden data and facts §8, §10 cases."""
import sys
import types

import numpy as np
import pytest
import torch

from utils.core.boxes import xywh2xyxy
from utils.evaluation.metrics import ConfusionMatrix, ap_per_class, compute_ap, fitness, process_batch, smooth

IOUV = torch.linspace(0.5, 0.95, 10)


def _correct_from_nms(golden) -> torch.Tensor:
    """val.py's correct matrix from the golden NMS output; 320×320 images so no rescale."""
    targets = golden["targets"].clone()
    targets[:, 2:] *= 320
    out = []
    for si, pred in enumerate(golden["nms_val"]):
        lab = targets[targets[:, 0] == si, 1:]
        labels = torch.cat((lab[:, :1], xywh2xyxy(lab[:, 1:5])), 1)
        out.append(process_batch(pred, labels, IOUV))
    return torch.cat(out, 0)


def test_golden_correct_matrix(golden):
    correct = _correct_from_nms(golden)
    assert correct.dtype == torch.bool
    assert torch.equal(correct, golden["stats"][0])


def test_golden_ap_per_class(golden):
    stats = [x.numpy() for x in golden["stats"]]
    tp, fp, p, r, f1, ap, cls = ap_per_class(*stats)
    ref = golden["ap_per_class"]
    for got, key in zip((tp, fp, p, r, f1, ap), ("tp", "fp", "p", "r", "f1", "ap")):
        np.testing.assert_allclose(got, ref[key].numpy(), rtol=1e-6, atol=1e-9, err_msg=key)
    assert cls.tolist() == ref["ap_class"].tolist()


def _one_class_ap(tp_rows, conf, n_labels=1, pred_cls=None):
    tp = np.array(tp_rows, dtype=bool).reshape(len(conf), -1)
    pred_cls = np.zeros(len(conf)) if pred_cls is None else np.array(pred_cls, dtype=float)
    return ap_per_class(tp, np.array(conf, dtype=float), pred_cls, np.zeros(n_labels))


def test_ap_perfect_is_0995():
    *_, ap, cls = _one_class_ap([[True] * 10], [0.9])
    np.testing.assert_allclose(ap, np.full((1, 10), 0.995), atol=1e-12)
    assert cls.tolist() == [0]


def test_ap_iou_072_via_process_batch():
    labels = torch.tensor([[0.0, 0.0, 0.0, 10.0, 10.0]])
    det = torch.tensor([[0.0, 0.0, 10.0, 7.2, 0.9, 0.0]])
    correct = process_batch(det, labels, IOUV)
    assert correct[0].tolist() == [True] * 5 + [False] * 5
    *_, ap, _ = ap_per_class(correct.numpy(), np.array([0.9]), np.array([0.0]), np.array([0.0]))
    assert ap[0, 0] == pytest.approx(0.995)
    assert ap.mean(1)[0] == pytest.approx(0.4975)


@pytest.mark.parametrize("rows, conf, want", [
    ([[True] * 10, [False] * 10], [0.9, 0.3], 0.995),  # TP ranked first
    ([[False] * 10, [True] * 10], [0.9, 0.3], 0.4975),  # FP ranked first
    ([[True] * 10, [False] * 10], [0.3, 0.9], 0.4975),  # order decided by confidence, not row order
])
def test_ap_tp_fp_order(rows, conf, want):
    *_, ap, _ = _one_class_ap(rows, conf)
    np.testing.assert_allclose(ap, np.full((1, 10), want), atol=1e-12)


def test_ap_two_labels_one_hit():
    tp, fp, p, r, f1, ap, _ = _one_class_ap([[True] * 10], [0.8], n_labels=2)
    np.testing.assert_allclose(ap, np.full((1, 10), 0.75), atol=1e-12)
    assert p[0] == pytest.approx(1.0) and r[0] == pytest.approx(0.5, abs=1e-6)
    assert tp[0] == 1 and fp[0] == 0


def test_ap_false_positive_only_and_foreign_class():
    *_, ap, _ = _one_class_ap([[False] * 10], [0.8])
    assert (ap == 0).all()
    # a detection of a class that has no labels is ignored
    base = _one_class_ap([[True] * 10], [0.5])
    extra = _one_class_ap([[True] * 10, [False] * 10], [0.5, 0.99], pred_cls=[0, 7])
    for a, b in zip(base, extra):
        np.testing.assert_array_equal(a, b)


def test_ap_per_class_no_labels():
    out = ap_per_class(np.ones((2, 10), bool), np.array([0.9, 0.8]), np.zeros(2), np.zeros(0))
    assert all(len(x) == 0 for x in out)
    assert out[5].shape == (0, 10)


def test_ap_per_class_calls_plots(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("utils.reporting.plots")
    fake.plot_pr_curve = lambda px, py, ap, save_dir, names: calls.append(("pr", save_dir.name, len(py), names))
    fake.plot_mc_curve = lambda px, py, save_dir, names, xlabel="Confidence", ylabel="Metric": \
        calls.append(("mc", save_dir.name, ylabel, py.shape))
    monkeypatch.setitem(sys.modules, "utils.reporting.plots", fake)
    tp = np.array([[True] * 10, [False] * 10, [True] * 10])
    ap_per_class(tp, np.array([0.9, 0.5, 0.4]), np.array([0.0, 0.0, 2.0]), np.array([0.0, 2.0, 2.0]), plot=True,
                 save_dir=tmp_path, names={0: "a", 1: "b", 2: "c"}, prefix="val_")
    assert calls[0] == ("pr", "val_PR_curve.png", 2, {0: "a", 1: "c"})
    assert {c[1] for c in calls[1:]} == {"val_F1_curve.png", "val_P_curve.png", "val_R_curve.png"}
    assert all(c[3] == (2, 1000) for c in calls[1:])


def test_compute_ap_envelope():
    ap, mpre, mrec = compute_ap(np.array([0.5, 1.0]), np.array([0.5, 1.0]))
    assert mrec.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert mpre.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert ap == pytest.approx(0.995)


def test_fitness_and_smooth():
    x = np.array([[0.5, 0.6, 0.7, 0.4], [1, 1, 0, 0]])
    np.testing.assert_allclose(fitness(x), [0.07 + 0.36, 0.0])
    y = np.full(1000, 0.3)
    s = smooth(y, 0.1)
    assert s.shape == (1000,)
    np.testing.assert_allclose(s, y)
    step = smooth(np.r_[np.zeros(500), np.ones(500)], 0.1)  # 101-tap window
    assert step[449] == 0 and step[550] == pytest.approx(1.0) and step[500] == pytest.approx(51 / 101)


def test_process_batch_first_detection_wins():
    """A label takes its lowest-index candidate (highest confidence), not its best-IoU one (facts §8.4)."""
    labels = torch.tensor([[0.0, 0.0, 0.0, 10.0, 10.0]])
    det = torch.tensor([[0.0, 0.0, 10.0, 6.4, 0.9, 0.0],   # IoU 0.64
                        [0.0, 0.0, 10.0, 9.0, 0.8, 0.0],   # IoU 0.90
                        [0.0, 0.0, 10.0, 10.0, 0.7, 1.0]])  # perfect box, wrong class
    c = process_batch(det, labels, IOUV)
    assert c[0].tolist() == [True] * 3 + [False] * 7
    assert c[1].tolist() == [False] * 3 + [True] * 6 + [False]
    assert c[2].tolist() == [False] * 10


def test_process_batch_one_detection_per_label_and_empty():
    labels = torch.tensor([[0.0, 0.0, 0.0, 10.0, 10.0], [0.0, 20.0, 0.0, 30.0, 10.0]])
    det = torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.9, 0.0], [0.0, 0.0, 10.0, 10.0, 0.8, 0.0],
                        [20.0, 0.0, 30.0, 10.0, 0.7, 0.0]])
    c = process_batch(det, labels, IOUV)
    assert c[:, 0].tolist() == [True, False, True]
    assert process_batch(det, torch.zeros(0, 5), IOUV).shape == (3, 10)
    assert process_batch(torch.zeros(0, 6), labels, IOUV).shape == (0, 10)


def test_confusion_matrix_counts():
    cm = ConfusionMatrix(nc=2)
    labels = torch.tensor([[0.0, 0, 0, 10, 10], [1.0, 20, 0, 30, 10], [1.0, 40, 0, 50, 10]])
    det = torch.tensor([[0.0, 0, 10, 10, 0.9, 0],     # matches label 0, right class
                        [20.0, 0, 30, 10, 0.8, 0],    # matches label 1, wrong class
                        [60.0, 60, 70, 70, 0.7, 1],   # nothing there: background FP
                        [40.0, 0, 50, 10, 0.1, 1]])   # below conf 0.25: ignored, label 2 missed
    cm.process_batch(det, labels)
    want = np.zeros((3, 3))
    want[0, 0] = want[0, 1] = want[1, 2] = want[2, 1] = 1
    np.testing.assert_array_equal(cm.matrix, want)
    tp, fp = cm.tp_fp()
    assert tp.tolist() == [1, 0] and fp.tolist() == [1, 1]
    cm.process_batch(None, torch.tensor([0.0, 1.0]))  # image without predictions
    assert cm.matrix[2].tolist() == [1, 2, 0]


def test_confusion_matrix_iou_strict_and_one_match_per_label():
    cm = ConfusionMatrix(nc=1, iou_thres=0.5)
    labels = torch.tensor([[0.0, 0, 0, 10, 10]])
    # IoU exactly 0.5 is not a match (strict); the two overlapping detections compete for one label
    det = torch.tensor([[0.0, 0, 10, 5, 0.9, 0], [0.0, 0, 10, 9, 0.8, 0], [0.0, 0, 10, 8, 0.7, 0]])
    cm.process_batch(det, labels)
    # best-IoU detection (row 1) takes the label; rows 0 and 2 are background FPs
    np.testing.assert_array_equal(cm.matrix, [[1, 2], [0, 0]])


def test_confusion_matrix_plot_delegates(monkeypatch, tmp_path):
    got = {}
    fake = types.ModuleType("utils.reporting.plots")
    fake.plot_confusion_matrix = lambda matrix, nc, save_dir, names, normalize=True: got.update(
        nc=nc, save_dir=save_dir, names=names, normalize=normalize, shape=matrix.shape)
    monkeypatch.setitem(sys.modules, "utils.reporting.plots", fake)
    ConfusionMatrix(nc=3).plot(normalize=False, save_dir=str(tmp_path), names=("a", "b", "c"))
    assert got == {"nc": 3, "save_dir": tmp_path, "names": ("a", "b", "c"), "normalize": False, "shape": (4, 4)}
