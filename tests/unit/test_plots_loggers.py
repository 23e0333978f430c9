"""Tests for utils/reporting/plots.py and utils/reporting/loggers.py: results.csv format, TensorBoard, and that every plot writes a file."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from utils.reporting import plots
from utils.reporting.loggers import KD_KEYS, RESULTS_KEYS, RunLogger, read_results_csv
from utils.reporting.plots import (output_to_target, plot_confusion_matrix, plot_images, plot_labels, plot_mc_curve,
                                   plot_pr_curve, plot_results)


@pytest.fixture(autouse=True)
def strict_plots(monkeypatch):
    # plot functions swallow errors for training's sake; tests must see them
    monkeypatch.setattr(plots, 'STRICT', True)


def _nonempty(p):
    return p.is_file() and p.stat().st_size > 0


# ---------------------------------------------------------------------------------------------------- results.csv
def test_results_keys_official_order():
    assert RESULTS_KEYS == ['epoch', 'train/box_loss', 'train/obj_loss', 'train/cls_loss', 'metrics/precision',
                            'metrics/recall', 'metrics/mAP_0.5', 'metrics/mAP_0.5:0.95', 'val/box_loss',
                            'val/obj_loss', 'val/cls_loss', 'x/lr0', 'x/lr1', 'x/lr2']
    assert KD_KEYS == ['train/dbox_loss', 'train/dobj_loss', 'train/dcls_loss']


def _log(lg, epoch, kd_vals=True):
    tl = [0.1 + epoch, 0.2, 0.3] + ([0.04, 0.05, 0.06] if kd_vals else [])
    lg.log_epoch(epoch, tl, [0.5, 0.25, 0.125, 0.0625, 0.01, 0.02, 0.03], [0.001, 0.0123456789, 123456.0])


def test_results_csv_format(tmp_path):
    lg = RunLogger(tmp_path, tensorboard=False, plots=False)
    _log(lg, 0, kd_vals=False)
    _log(lg, 1, kd_vals=True)  # extra KD values ignored on a non-KD run
    lg.close()
    lines = (tmp_path / 'results.csv').read_text().splitlines()
    assert len(lines) == 3
    head = lines[0].split(',')
    assert len(head) == 14
    assert all(len(h) == 20 for h in head)
    assert [h.strip() for h in head] == RESULTS_KEYS
    assert head[0] == ' ' * 15 + 'epoch'
    row = lines[1].split(',')
    assert len(row) == 14 and all(len(v) == 20 for v in row)
    expected = [0, 0.1, 0.2, 0.3, 0.5, 0.25, 0.125, 0.0625, 0.01, 0.02, 0.03, 0.001, 0.0123456789, 123456.0]
    assert lines[1] == ','.join('%20.5g' % v for v in expected)
    assert row[0] == '%20s' % '0'
    assert row[12].strip() == '0.012346' and row[13].strip() == '1.2346e+05'


def test_results_csv_kd_columns_and_append(tmp_path):
    lg = RunLogger(tmp_path, kd=True, tensorboard=False, plots=False)
    _log(lg, 0)
    lg.close()
    # a second instance (resume) appends without a second header
    lg2 = RunLogger(tmp_path, kd=True, tensorboard=False, plots=False)
    assert lg2.epochs_logged == 1
    _log(lg2, 1)
    _log(lg2, 2, kd_vals=False)  # KD run without distillation terms still writes full rows
    lg2.close()
    lines = (tmp_path / 'results.csv').read_text().splitlines()
    assert len(lines) == 4
    assert [h.strip() for h in lines[0].split(',')] == RESULTS_KEYS + KD_KEYS
    assert all(len(ln.split(',')) == 17 for ln in lines)
    data = read_results_csv(tmp_path / 'results.csv')
    assert list(data) == RESULTS_KEYS + KD_KEYS
    assert data['epoch'] == [0.0, 1.0, 2.0]
    assert data['train/box_loss'] == pytest.approx([0.1, 1.1, 2.1])
    assert data['train/dcls_loss'] == pytest.approx([0.06, 0.06, 0.0])
    assert data['x/lr1'] == pytest.approx([0.012346] * 3)


def test_log_epoch_rejects_bad_lengths(tmp_path):
    lg = RunLogger(tmp_path, tensorboard=False, plots=False)
    with pytest.raises(ValueError):
        lg.log_epoch(0, [1, 2], [0] * 7, [0] * 3)
    with pytest.raises(ValueError):
        lg.log_epoch(0, [1, 2, 3], [0] * 6, [0] * 3)
    assert not (tmp_path / 'results.csv').exists()


def test_read_results_csv_missing(tmp_path):
    assert read_results_csv(tmp_path / 'nope.csv') == {}


def test_tensorboard_event_file_and_end(tmp_path):
    lg = RunLogger(tmp_path, hyp={'lr0': 0.01}, opt={'epochs': 2}, kd=True, tensorboard=True, plots=True)
    _log(lg, 0)
    _log(lg, 1, kd_vals=False)
    imgs = torch.randint(0, 255, (2, 3, 64, 96), dtype=torch.uint8)
    tg = torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.3], [1, 0, 0.3, 0.3, 0.1, 0.1]])
    for ni in range(4):
        lg.log_batch_images(ni, imgs, tg, ['a.jpg', 'b.jpg'], {0: 'cat', 1: 'dog'})
    lg.on_train_end()
    lg.close()  # idempotent
    assert list(tmp_path.glob('events.out.tfevents.*'))
    for ni in range(3):
        assert _nonempty(tmp_path / f'train_batch{ni}.jpg')
    assert not (tmp_path / 'train_batch3.jpg').exists()
    assert _nonempty(tmp_path / 'results.png')


def test_tensorboard_missing_warns_once(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # makes the import raise ImportError
    lg = RunLogger(tmp_path, tensorboard=True, plots=False)
    with pytest.warns(UserWarning, match='TensorBoard') as rec:
        _log(lg, 0)
        _log(lg, 1)
    assert len([w for w in rec if 'TensorBoard' in str(w.message)]) == 1
    lg.close()
    assert len(read_results_csv(tmp_path / 'results.csv')['epoch']) == 2
    assert not list(tmp_path.glob('events.out.tfevents.*'))


# -------------------------------------------------------------------------------------------------- plot_results
def _write_csv(path, keys, n):
    rng = np.random.default_rng(0)
    with open(path, 'w') as f:
        f.write(','.join('%20s' % k for k in keys) + '\n')
        for e in range(n):
            f.write(','.join('%20.5g' % v for v in [e] + list(rng.random(len(keys) - 1))) + '\n')


@pytest.mark.parametrize('keys,n', [(RESULTS_KEYS, 12), (RESULTS_KEYS + KD_KEYS, 12), (RESULTS_KEYS + KD_KEYS, 1),
                                    (RESULTS_KEYS, 0)])
def test_plot_results(tmp_path, keys, n):
    csv = tmp_path / 'results.csv'
    _write_csv(csv, keys, n)
    plot_results(csv)
    assert _nonempty(tmp_path / 'results.png')


def test_plot_results_missing_file_does_not_raise(tmp_path):
    plot_results(tmp_path / 'results.csv')
    assert not (tmp_path / 'results.png').exists()


# ---------------------------------------------------------------------------------------------------- plot_images
@pytest.mark.parametrize('kind', ['normalised', 'pixels', 'conf', 'empty'])
def test_plot_images(tmp_path, kind):
    b, h, w = 5, 80, 120
    imgs = torch.rand(b, 3, h, w)  # float in [0, 1]
    norm = torch.tensor([[0, 0, 0.5, 0.5, 0.4, 0.4], [2, 3, 0.2, 0.3, 0.1, 0.2], [4, 1, 0.9, 0.9, 0.2, 0.2]])
    if kind == 'normalised':
        tg = norm
    elif kind == 'pixels':
        tg = norm.clone()
        tg[:, [2, 4]] *= w
        tg[:, [3, 5]] *= h
    elif kind == 'conf':
        tg = output_to_target([torch.tensor([[10., 10., 50., 40., 0.9, 2.], [0., 0., 5., 5., 0.1, 1.]]),
                               torch.zeros((0, 6)), torch.tensor([[20., 20., 60., 70., 0.5, 0.]])])
    else:
        tg = torch.zeros((0, 6))
    f = tmp_path / 'sub' / f'{kind}.jpg'
    plot_images(imgs, tg, [f'im{i}.jpg' for i in range(b)], f, names={0: 'a', 1: 'b', 2: 'c', 3: 'd'})
    assert _nonempty(f)
    im = cv2.imread(str(f))
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    assert im.shape == (rows * h, cols * w, 3)


def test_plot_images_uint8_numpy_and_downscale(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (4, 3, 640, 640), dtype=np.uint8)
    tg = np.array([[0, 0, 320, 320, 100, 100]], dtype=np.float32)
    f = tmp_path / 'big.jpg'
    plot_images(imgs, tg, fname=f, max_size=640)
    assert cv2.imread(str(f)).shape == (640, 640, 3)


def test_plot_images_empty_batch(tmp_path):
    plot_images(torch.zeros((0, 3, 32, 32)), torch.zeros((0, 6)), fname=tmp_path / 'x.jpg')
    assert not (tmp_path / 'x.jpg').exists()


def test_plot_images_failure_is_swallowed_when_not_strict(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, 'STRICT', False)
    plot_images(torch.zeros((1, 3, 8, 8)), [[0, 0, 'bad']], fname=tmp_path / 'x.jpg')  # must not raise
    monkeypatch.setattr(plots, 'STRICT', True)
    with pytest.raises(Exception):
        plot_images(torch.zeros((1, 3, 8, 8)), [[0, 0, 'bad']], fname=tmp_path / 'x.jpg')


# ----------------------------------------------------------------------------------------------- output_to_target
def test_output_to_target_numbers():
    out = [torch.tensor([[10., 20., 50., 60., 0.9, 3.], [0., 0., 4., 2., 0.3, 1.]]),
           torch.zeros((0, 6)),
           torch.tensor([[100., 100., 110., 140., 0.5, 0.]])]
    t = output_to_target(out)
    expected = torch.tensor([[0, 3, 30, 40, 40, 40, 0.9],
                             [0, 1, 2, 1, 4, 2, 0.3],
                             [2, 0, 105, 120, 10, 40, 0.5]])
    assert t.shape == (3, 7)
    assert torch.allclose(t, expected)
    assert output_to_target(out, max_det=1).shape == (2, 7)
    assert output_to_target([]).shape == (0, 7)
    assert output_to_target([torch.zeros((0, 6))]).shape == (0, 7)


# ----------------------------------------------------------------------------------------- labels / curves / matrix
def test_plot_labels(tmp_path):
    rng = np.random.default_rng(1)
    lb = np.concatenate([rng.integers(0, 3, (200, 1)), rng.random((200, 4)) * 0.5 + 0.25], 1)
    plot_labels(lb, {0: 'a', 1: 'b', 2: 'c'}, tmp_path)
    assert _nonempty(tmp_path / 'labels.jpg')
    assert _nonempty(tmp_path / 'labels_correlogram.jpg')


def test_plot_labels_empty(tmp_path):
    plot_labels(np.zeros((0, 5)), {0: 'a'}, tmp_path)
    assert _nonempty(tmp_path / 'labels.jpg')


@pytest.mark.parametrize('nc', [0, 3, 21])
def test_pr_and_mc_curves(tmp_path, nc):
    px = np.linspace(0, 1, 1000)
    rng = np.random.default_rng(nc)
    py = [np.sort(rng.random(1000))[::-1] for _ in range(nc)]
    ap = rng.random((nc, 10))
    names = {i: f'c{i}' for i in range(nc)}
    plot_pr_curve(px, py, ap, tmp_path / 'PR_curve.png', names)
    plot_pr_curve(px, np.array(py).reshape(nc, 1000), ap, tmp_path / 'PR2.png', names)
    plot_mc_curve(px, rng.random((nc, 1000)), tmp_path / 'F1_curve.png', names, ylabel='F1')
    for f in ('PR_curve.png', 'PR2.png', 'F1_curve.png'):
        assert _nonempty(tmp_path / f)


@pytest.mark.parametrize('nc,normalize', [(3, True), (3, False), (0, True), (40, True)])
def test_plot_confusion_matrix(tmp_path, nc, normalize):
    m = np.random.default_rng(0).integers(0, 20, (nc + 1, nc + 1)).astype(float)
    plot_confusion_matrix(m, nc, tmp_path, names=[f'c{i}' for i in range(nc)], normalize=normalize)
    assert _nonempty(tmp_path / 'confusion_matrix.png')
