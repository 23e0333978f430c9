"""Pseudo-labels (optimizer/pseudo.py): the teacher's maps decoded and suppressed into targets exactly as a hand
decode plus NMS gives them, the ignore band, the detection loss with it, the labelled images' loss left alone,
no gradient into the teacher, and the refusals."""
from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision

from data_helpers import FixedStream
from conftest import ROOT
from models.yolo import Model
from optimizer.config import KD_SPECS, KDConfig
from optimizer.criterion import Distiller, Student
from optimizer.pseudo import PSEUDO_IOU, PseudoLabeller, cell_scores, decode_maps
from optimizer.teacher import Teacher
from optimizer.terms.pseudo import PSEUDO_PARTS, PseudoTerm
from utils.core.errors import UserError
from utils.training.forward import StudentForward
from utils.training.hyp import load_hyp
from utils.training.loss import ComputeLoss, scale_hyp

LOW = ROOT / "data/hyps/hyp.scratch-low.yaml"
NC = 4
STRIDES = (8.0, 16.0, 32.0)
ANCHORS = torch.tensor([[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
                       dtype=torch.float32).view(3, 3, 2) / torch.tensor(STRIDES).view(3, 1, 1)


def _head() -> SimpleNamespace:
    """What PseudoLabeller reads of a Detect: anchors in grid units and strides."""
    return SimpleNamespace(anchors=ANCHORS.clone(), stride=torch.tensor(STRIDES))


def _maps(bs: int = 2, size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """Raw maps with a spread of scores: a few cells well above any threshold, most far below."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in STRIDES:
        n = int(size // s)
        m = torch.randn(bs, 3, n, n, 5 + NC, generator=g) * 2.0
        m[..., 4] -= 2.0
        out.append(m)
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _hand_decode(maps: list[torch.Tensor]) -> np.ndarray:
    """YOLOv5's eval decode written out in numpy, cell by cell: (bs, N, 5 + nc)."""
    rows = []
    for i, m in enumerate(maps):
        y = _sigmoid(m.double().numpy())
        bs, na, ny, nx, no = y.shape
        level = np.zeros_like(y)
        for a in range(na):
            for r in range(ny):
                for c in range(nx):
                    v = y[:, a, r, c]
                    level[:, a, r, c, 0] = (v[:, 0] * 2 - 0.5 + c) * STRIDES[i]
                    level[:, a, r, c, 1] = (v[:, 1] * 2 - 0.5 + r) * STRIDES[i]
                    level[:, a, r, c, 2] = (v[:, 2] * 2) ** 2 * float(ANCHORS[i, a, 0]) * STRIDES[i]
                    level[:, a, r, c, 3] = (v[:, 3] * 2) ** 2 * float(ANCHORS[i, a, 1]) * STRIDES[i]
                    level[:, a, r, c, 4:] = v[:, 4:]
        rows.append(level.reshape(bs, -1, no))
    return np.concatenate(rows, 1)


def _hand_pseudo(maps: list[torch.Tensor], conf: float, size: int) -> list[np.ndarray]:
    """Per image, the boxes a hand decode plus per-class NMS keeps at score >= conf: [cls, x, y, w, h, score]
    (normalised, clipped to the image; a box wholly outside it dropped), best first."""
    rows = _hand_decode(maps)
    out = []
    for img in rows:
        score = img[:, 4] * img[:, 5:].max(1)
        cls = img[:, 5:].argmax(1)
        keep = (img[:, 4] >= conf) & (score >= conf)
        b, s, c = img[keep, :4], score[keep], cls[keep]
        xyxy = np.stack((b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2), 1)
        kept = []
        for k in np.unique(c):  # NMS class by class
            idx = np.nonzero(c == k)[0]
            nms = torchvision.ops.nms(torch.tensor(xyxy[idx]), torch.tensor(s[idx]), PSEUDO_IOU).numpy()
            kept += list(idx[nms])
        kept = sorted(kept, key=lambda j: -s[j])
        xyxy = np.clip(xyxy[kept], 0, size)
        xywh = np.stack(((xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2, xyxy[:, 2] - xyxy[:, 0],
                         xyxy[:, 3] - xyxy[:, 1]), 1) / size
        rows_i = np.concatenate((c[kept, None], xywh, s[kept, None]), 1)
        out.append(rows_i[(xywh[:, 2] > 0) & (xywh[:, 3] > 0)])  # a box clipped to nothing is no target
    return out


# ------------------------------------------------------------------------------------------------------ decode
def test_decode_matches_a_hand_decode():
    maps = _maps()
    got = decode_maps(maps, ANCHORS, torch.tensor(STRIDES)).double().numpy()
    np.testing.assert_allclose(got, _hand_decode(maps), rtol=1e-5, atol=1e-4)


def test_decode_matches_detect_in_eval_mode():
    torch.manual_seed(0)
    model = Model("yolov5n.yaml", nc=NC).eval()
    with torch.no_grad():
        decoded, raw = model(torch.rand(2, 3, 64, 96))
    head = model.model[-1]
    torch.testing.assert_close(decode_maps(raw, head.anchors, head.stride), decoded, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("conf", [0.25, 0.5, 0.7])
def test_pseudo_targets_equal_a_hand_decode_plus_nms(conf):
    maps = _maps(bs=3, seed=1)
    got = PseudoLabeller(_head(), conf)(maps, 64, 64)
    want = _hand_pseudo(maps, conf, 64)
    assert got.images == 3 and sum(len(w) for w in want) > 3  # the fixture gives each image several boxes
    for i, w in enumerate(want):
        mine = got.targets[got.targets[:, 0] == i]
        np.testing.assert_array_equal(mine[:, 1].numpy(), w[:, 0])
        np.testing.assert_allclose(mine[:, 2:].numpy(), w[:, 1:5], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.conf[got.targets[:, 0] == i].numpy(), w[:, 5], rtol=1e-5, atol=1e-6)
    assert (got.conf >= conf).all()


def test_a_box_scoring_exactly_pseudo_conf_is_kept():
    maps = [torch.full((1, 3, s, s, 5 + NC), -20.0) for s in (8, 4, 2)]
    maps[0][0, 0, 3, 3, :4] = 0.0
    maps[0][0, 0, 3, 3, 4] = 20.0  # sigmoid 1.0 in float32
    maps[0][0, 0, 3, 3, 5 + 2] = 0.0  # class 2 at sigmoid 0.5: the score is exactly 0.5
    got = PseudoLabeller(_head(), 0.5)(maps, 64, 64)
    assert got.targets[:, :2].tolist() == [[0.0, 2.0]] and got.conf.tolist() == [0.5]
    assert len(PseudoLabeller(_head(), 0.51)(maps, 64, 64).targets) == 0


# -------------------------------------------------------------------------------------------------- ignore band
def test_the_ignore_band_holds_exactly_the_cells_scored_inside_it():
    maps = _maps(seed=2)
    got = PseudoLabeller(_head(), 0.5, ignore=0.1)(maps, 64, 64)
    for band, m in zip(got.ignore, maps):
        y = _sigmoid(m.double().numpy())
        score = y[..., 4] * y[..., 5:].max(-1)
        want = (score >= 0.1) & (score < 0.5)
        assert 0 < want.sum() < want.size
        np.testing.assert_array_equal(band.numpy(), want)
    assert PseudoLabeller(_head(), 0.5, ignore=0.0)(maps, 64, 64).ignore is None  # 0: no band


def test_cell_scores_are_objectness_times_the_best_class():
    maps = _maps(seed=3)
    for s, m in zip(cell_scores(maps), maps):
        y = m.sigmoid()
        torch.testing.assert_close(s, y[..., 4] * y[..., 5:].max(-1).values)


@functools.lru_cache(maxsize=None)
def _student(nc: int = NC) -> Model:
    torch.manual_seed(0)
    return Model("yolov5n.yaml", nc=nc)


def _loss(nc: int = NC, fl_gamma: float = 0.0) -> tuple[Model, ComputeLoss]:
    model = copy.deepcopy(_student(nc)).train()
    hyp = {**load_hyp(LOW, KD_SPECS), "fl_gamma": fl_gamma}
    return model, ComputeLoss(model, hyp=scale_hyp(hyp, 3, nc, 64))


@pytest.mark.parametrize("fl_gamma", [0.0, 1.5], ids=["bce", "focal"])
def test_the_band_masks_the_objectness_of_its_cells_and_nothing_else(fl_gamma):
    model, loss_fn = _loss(fl_gamma=fl_gamma)
    imgs = torch.rand(2, 3, 64, 64)
    # small boxes for P3/P4, a large one for P5's anchors
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3], [1, 3, 0.3, 0.6, 0.2, 0.4], [1, 2, 0.5, 0.5, 0.95, 0.9]])
    g = torch.Generator().manual_seed(0)
    pred = [p.detach().requires_grad_(True) for p in model(imgs)]
    ignore = [torch.rand(p.shape[:4], generator=g) < 0.3 for p in pred]
    _, _, indices, _ = loss_fn.build_targets(pred, targets)
    for band, idx in zip(ignore, indices):
        band[idx] = True  # every positive inside the band: it must still be learnt

    def obj_grads(mask):
        for p in pred:
            p.grad = None
        loss_fn(pred, targets, ignore=mask)[0].backward()
        return [p.grad[..., 4].clone() for p in pred]

    plain, masked = obj_grads(None), obj_grads(ignore)
    for i, (a, b) in enumerate(zip(plain, masked)):
        pos = torch.zeros_like(ignore[i])
        pos[indices[i]] = True
        skipped = ignore[i] & ~pos
        assert skipped.any() and pos.any()
        assert (b[skipped] == 0).all() and (a[skipped] != 0).all()  # band cells are taught nothing ...
        torch.testing.assert_close(b[~skipped], a[~skipped], rtol=1e-6, atol=1e-12)  # ... the rest as before
    ones = [torch.zeros_like(m) for m in ignore]  # an empty band is the plain loss
    torch.testing.assert_close(loss_fn(pred, targets, ignore=ones)[0], loss_fn(pred, targets)[0])


# ------------------------------------------------------------------------------------------------ the distiller


def _distiller(pseudo_conf: float, unlabeled=None, distill_ratio: float = 0.05,
               pseudo_weight: float = 1.0) -> tuple[Model, Distiller]:
    model, loss_fn = _loss()
    torch.manual_seed(3)
    teacher = Teacher(Model("yolov5s.yaml", nc=NC).fuse())
    head = teacher.model.model[-1]
    with torch.no_grad():  # a confident teacher: objectness and one class near 0.73, so scores straddle 0.5
        for conv in head.m:
            conv.bias.view(3, -1)[:, 4] = 1.0
            conv.bias.view(3, -1)[:, 6] = 1.0
    kd = KDConfig(t_weights="t.pt", pseudo_conf=pseudo_conf, distill_ratio=distill_ratio, pseudo_weight=pseudo_weight)
    return model, Distiller(kd, teacher, Student(model, loss_fn, StudentForward(torch.device("cpu")), 64), unlabeled)


def _last_pseudo(crit: Distiller):
    """The pseudo term's last (unlabelled images, pseudo-labels)."""
    (term,) = [t for t in crit.terms if isinstance(t, PseudoTerm)]
    return term.last


def _batch():
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(2, 3, 64, 64, generator=g)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3], [1, 3, 0.3, 0.6, 0.2, 0.4]])
    u = torch.randint(0, 255, (3, 3, 64, 64), dtype=torch.uint8, generator=g)
    return imgs, targets, u


def test_pseudo_labels_leave_the_labelled_images_detection_loss_unchanged():
    imgs, targets, u = _batch()
    model, plain = _distiller(0.0, FixedStream(u))
    _, with_pseudo = _distiller(0.5, FixedStream(u))
    a = plain(model, imgs, targets)[1]
    b = with_pseudo(model, imgs, targets)[1]
    for k in ("box", "obj", "cls", "dbox", "dobj", "dcls"):
        assert torch.equal(a[k], b[k]), k  # bit-identical: the pseudo loss is a separate term on its own batch
    assert b["pboxes"] > 0 and b["pseudo"] > 0
    assert with_pseudo.parts[-2:] == PSEUDO_PARTS and set(with_pseudo.figures) == {"pboxes"}


def test_the_pseudo_term_is_the_detection_loss_on_the_pseudo_targets():
    imgs, targets, u = _batch()
    model, crit = _distiller(0.5, FixedStream(u), distill_ratio=0.0)
    loss, parts = crit(model, imgs, targets)
    u_imgs, batch = _last_pseudo(crit)
    assert batch.ignore is not None  # the default band (pseudo_ignore 0.1) is on
    det, _ = crit.compute_loss(model(imgs), targets)
    want, _ = crit.compute_loss(model(u_imgs), batch.targets, ignore=batch.ignore)
    torch.testing.assert_close(loss, det + want, rtol=1e-5, atol=1e-6)  # pseudo_weight 1, no soft terms
    assert float(parts["pboxes"]) == pytest.approx(len(batch.targets) / 3)
    assert batch.plot_targets().shape == (len(batch.targets), 7)  # [image, class, x, y, w, h, conf] for the mosaic
    assert crit.samples()["pseudo"][0] is u_imgs


def test_pseudo_weight_scales_the_term():
    imgs, targets, u = _batch()
    model, crit = _distiller(0.5, FixedStream(u), distill_ratio=0.0)
    one = crit(model, imgs, targets)[1]["pseudo"]
    _, quarter = _distiller(0.5, FixedStream(u), distill_ratio=0.0, pseudo_weight=0.25)  # the same teacher (seeded)
    torch.testing.assert_close(quarter(model, imgs, targets)[1]["pseudo"], one * 0.25)


def test_no_gradient_reaches_the_teacher():
    imgs, targets, u = _batch()
    model, crit = _distiller(0.5, FixedStream(u))
    loss, _ = crit(model, imgs, targets)
    loss.backward()
    _, batch = _last_pseudo(crit)
    assert not batch.targets.requires_grad and all(not m.requires_grad for m in batch.ignore)
    assert all(p.grad is None and not p.requires_grad for p in crit.teacher.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_refusals_are_one_line_user_errors():
    with pytest.raises(UserError, match=r"^pseudo_conf 0.5: pseudo-labels are a teacher's detections; give a teacher"):
        KDConfig.resolve({"pseudo_conf": 0.5}, {}, ["pseudo_conf"])
    with pytest.raises(UserError, match=r"pseudo_ignore 0.6 must be below pseudo_conf 0.5"):
        KDConfig.resolve({"t_weights": "t.pt", "pseudo_conf": 0.5, "pseudo_ignore": 0.6}, {},
                         ["t_weights", "pseudo_conf", "pseudo_ignore"])
    with pytest.raises(UserError, match="pseudo_conf 0.5: pseudo-labels are made on unlabelled images"):
        _distiller(0.5, unlabeled=None)
    with pytest.raises(UserError, match="pseudo_conf"):
        KDConfig.resolve({"t_weights": "t.pt", "pseudo_conf": 1.5}, {}, ["t_weights", "pseudo_conf"])
    for e in (KDConfig.resolve({"t_weights": "t.pt"}, {"pseudo_conf": 0.4}, ["t_weights"]),  # from the hyp yaml
              KDConfig.resolve({"pseudo_conf": 0.0}, {}, ["pseudo_conf"])):  # 0 is off, no teacher needed
        assert e.pseudo_conf in (0.4, 0.0)


def test_the_specs_keep_an_off_run_off_under_evolution():
    assert KD_SPECS["pseudo_conf"].default == 0.0 and KD_SPECS["pseudo_conf"].evolve[1] == 0.0
    assert KDConfig().pseudo_conf == 0.0
    assert KDConfig().hyp_values()["pseudo_ignore"] == KD_SPECS["pseudo_ignore"].default


def test_pseudo_labels_under_bf16_autocast():
    imgs, targets, u = _batch()
    model, loss_fn = _loss()
    _, ref = _distiller(0.5, FixedStream(u))
    bf16 = StudentForward(torch.device("cpu"), torch.bfloat16)
    crit = Distiller(ref.config, ref.teacher, Student(model, loss_fn, bf16, 64), FixedStream(u))
    loss, parts = crit(model, imgs, targets)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and parts["pseudo"] > 0 and parts["pboxes"] > 0
    loss.backward()  # the bf16 graph of both student passes backpropagates
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
