"""prune.py and utils/training/prune.py: what pruning keeps, what it removes, the file it writes, its refusals."""
import itertools

import pytest
import torch
import torch.nn as nn
import yaml

import prune
from conftest import DEMO_NAMES, FIXTURES, ROOT, random_checkpoint
from models.yolo import Detect, Model
from utils.training.checkpoint import torch_load
from utils.training.prune import (RECIPE_KEY, file_sha256, load_detection_model, parameter_count, prune_model,
                                  raw_maps)

NC = len(DEMO_NAMES)
IMG = torch.zeros(1, 3, 64, 64)

# yolov5n6's layer table (four detection levels, strides 8 to 64); models/ ships only the P5 yamls
P6 = {
    "nc": NC, "depth_multiple": 0.33, "width_multiple": 0.25,
    "anchors": [[19, 27, 44, 40, 38, 94], [96, 68, 86, 152, 180, 137], [140, 301, 303, 264, 238, 542],
                [436, 615, 739, 380, 925, 792]],
    "backbone": [[-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C3", [128]],
                 [-1, 1, "Conv", [256, 3, 2]], [-1, 6, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]],
                 [-1, 9, "C3", [512]], [-1, 1, "Conv", [768, 3, 2]], [-1, 3, "C3", [768]],
                 [-1, 1, "Conv", [1024, 3, 2]], [-1, 3, "C3", [1024]], [-1, 1, "SPPF", [1024, 5]]],
    "head": [[-1, 1, "Conv", [768, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]], [[-1, 8], 1, "Concat", [1]],
             [-1, 3, "C3", [768, False]],
             [-1, 1, "Conv", [512, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]], [[-1, 6], 1, "Concat", [1]],
             [-1, 3, "C3", [512, False]],
             [-1, 1, "Conv", [256, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]], [[-1, 4], 1, "Concat", [1]],
             [-1, 3, "C3", [256, False]],
             [-1, 1, "Conv", [256, 3, 2]], [[-1, 20], 1, "Concat", [1]], [-1, 3, "C3", [512, False]],
             [-1, 1, "Conv", [512, 3, 2]], [[-1, 16], 1, "Concat", [1]], [-1, 3, "C3", [768, False]],
             [-1, 1, "Conv", [768, 3, 2]], [[-1, 12], 1, "Concat", [1]], [-1, 3, "C3", [1024, False]],
             [[23, 26, 29, 32], 1, "Detect", ["nc", "anchors"]]],
}


def _nano(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Model("yolov5n.yaml", nc=NC)


def _head_state(model: nn.Module) -> dict:
    """Everything about the Detect head that pruning must not change, and the shapes of the model's outputs."""
    det = model.model[-1]
    model.eval()
    with torch.no_grad():
        decoded, maps = model(IMG)
    return {"nc": det.nc, "na": det.na, "no": det.no, "nl": det.nl, "anchors": det.anchors.clone(),
            "stride": det.stride.clone(), "decoded": decoded.shape, "maps": [m.shape for m in maps],
            "out_convs": [(c.in_channels, c.out_channels) for c in det.m]}


def _assert_head_kept(before: dict, model: nn.Module) -> None:
    after = _head_state(model)
    for k in ("nc", "na", "no", "nl", "decoded", "maps"):
        assert after[k] == before[k], k
    assert torch.equal(after["anchors"], before["anchors"]) and torch.equal(after["stride"], before["stride"])
    # Detect's output convolutions keep their outputs; their inputs shrink with the layers feeding them
    assert [o for _, o in after["out_convs"]] == [o for _, o in before["out_convs"]]
    assert all(a[0] < b[0] for a, b in zip(after["out_convs"], before["out_convs"]))


def expected_params(model: nn.Module, ratio: float) -> int:
    """The parameter count per-layer pruning must leave: every coupled channel group keeps int(C * (1 - ratio))
    of its C channels, so each conv keeps that share of its outputs (Detect's: all) and of its inputs (the image's
    3: all), and each BatchNorm that share of its channels. Exact for yolov5n, whose widths are multiples of 8
    (a Concat's input then shrinks by the same rule as its parts)."""
    det = set(model.model[-1].m)
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            o = m.out_channels if m in det else int(m.out_channels * (1 - ratio))
            i = m.in_channels if m.in_channels == 3 else int(m.in_channels * (1 - ratio))
            n += o * i * m.kernel_size[0] * m.kernel_size[1] // m.groups + (o if m.bias is not None else 0)
        elif isinstance(m, nn.BatchNorm2d):
            n += 2 * int(m.num_features * (1 - ratio))
    return n


def _taylor_batches(tiny_data, n: int = 2):
    from utils.data.datasets import DataSettings, LoadImagesAndLabels, check_dataset, create_dataloader

    data = check_dataset(tiny_data)
    loader = create_dataloader(LoadImagesAndLabels(data.train, DataSettings(imgsz=64, batch_size=4, nc=NC)), workers=0,
                               shuffle=True)
    return itertools.islice(loader, n)


@pytest.mark.parametrize("importance", ["l1", "l2", "bn", "lamp", "taylor"])
def test_each_importance_keeps_the_head_and_removes_the_expected_share(importance, tiny_data):
    from optimizer.config import KD_SPECS
    from utils.training.hyp import load_hyp

    model = _nano()
    before, n0, want = _head_state(model), parameter_count(model), expected_params(model, 0.5)
    kw = {}
    if importance == "taylor":
        kw = {"batches": _taylor_batches(tiny_data), "hyp": load_hyp(ROOT / "data/hyps/hyp.scratch-low.yaml", KD_SPECS),
              "imgsz": 64}
    prune_model(model, 0.5, importance, **kw)
    _assert_head_kept(before, model)
    # per layer, the criterion only chooses which channels go, never how many
    assert parameter_count(model) == want
    # half the channels of a conv's inputs and of its outputs: about (1 - 0.5)^2 of its weights stay; the first
    # conv (3 image channels) and Detect's (whole outputs) keep a little more
    assert 0.25 <= want / n0 < 0.27
    assert all(p.grad is None for p in model.parameters())  # taylor's gradients are not left behind
    assert all(layer.np == sum(p.numel() for p in layer.parameters()) for layer in model.model)


def test_global_ranking_and_round_to():
    model = _nano()
    before, n0 = _head_state(model), parameter_count(model)
    prune_model(model, 0.5, "l1", global_pruning=True)
    _assert_head_kept(before, model)
    # half of all channels go, but not evenly: the share of weights left moves around the even split's 0.254
    assert 0.15 < parameter_count(model) / n0 < 0.40
    assert parameter_count(model) != expected_params(_nano(), 0.5)

    model = _nano()
    before = _head_state(model)
    prune_model(model, 0.3, "l1", round_to=8)
    _assert_head_kept(before, model)
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m not in set(model.model[-1].m)]
    assert all(w % 8 == 0 for w in widths), widths
    assert widths[0] == 8  # 16 * 0.7 = 11.2 channels, rounded down to a multiple of 8


def test_p6_model_prunes():
    torch.manual_seed(0)
    model = Model(P6)
    assert model.model[-1].nl == 4 and int(model.stride.max()) == 64
    before, n0 = _head_state(model), parameter_count(model)
    prune_model(model, 0.5, "l1")
    _assert_head_kept(before, model)
    assert parameter_count(model) == expected_params(Model(P6), 0.5)
    assert len(raw_maps(model, torch.zeros(1, 3, 128, 128))) == 4


def test_v5_0_layout_prunes():
    """Official v5.0 checkpoints use Focus, SPP and BottleneckCSP (a BatchNorm over a Concat) instead of C3/SPPF."""
    from models.yolo import load_model_yaml

    d = load_model_yaml("yolov5n.yaml")
    d["nc"] = NC
    d["backbone"][0] = [-1, 1, "Focus", [64, 3]]
    d["backbone"][9] = [-1, 1, "SPP", [1024, [5, 9, 13]]]
    for part in ("backbone", "head"):
        d[part] = [[f, n, "BottleneckCSP" if m == "C3" else m, a] for f, n, m, a in d[part]]
    torch.manual_seed(0)
    model = Model(d)
    before, n0 = _head_state(model), parameter_count(model)
    prune_model(model, 0.5, "l1")
    _assert_head_kept(before, model)
    assert 0.25 <= parameter_count(model) / n0 < 0.27


def test_official_checkpoint_prunes():
    """tests/fixtures/student.pt was written by the reference YOLOv5 (a stripped fp16 yolov5n, requires_grad off)."""
    model = load_detection_model(FIXTURES / "student.pt")
    before, n0 = _head_state(model), parameter_count(model)
    prune_model(model, 0.5, "l2")
    _assert_head_kept(before, model)
    assert parameter_count(model) == expected_params(load_detection_model(FIXTURES / "student.pt"), 0.5)


def test_pruned_checkpoint_loads_safely_and_carries_the_recipe(tmp_path):
    src = random_checkpoint(tmp_path / "n.pt", "yolov5n.yaml")  # written by build_checkpoint, as training does
    n0 = parameter_count(torch_load(src)["model"])
    rc = prune.main(["--weights", str(src), "--ratio", "0.5", "--imgsz", "64", "--latency-runs", "2",
                     "--round-to", "8", "--project", str(tmp_path / "runs"), "--name", "p"])
    assert rc == 0
    out = tmp_path / "runs" / "p"
    ck = torch_load(out / "pruned.pt")  # the safe loader, no --trust-checkpoint
    assert ck["epoch"] == -1 and ck["optimizer"] is None and ck["ema"] is None and ck["best_fitness"] is None
    model = ck["model"]
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.is_contiguous() for t in tensors)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert model.yaml["pruned"] is True and isinstance(model.model[-1], Detect)
    assert model.names == dict(enumerate(DEMO_NAMES))

    recipe = ck[RECIPE_KEY]
    assert recipe["source"] == str(src) and recipe["source_sha256"] == file_sha256(src)
    assert (recipe["ratio"], recipe["importance"], recipe["global"], recipe["round_to"]) == (0.5, "l1", False, 8)
    assert recipe["params_before"] == n0 and recipe["params_after"] == parameter_count(model) < n0 * 0.3
    assert recipe["date"] and recipe["latency_ms_after"] > 0 and recipe["gflops_after"] < recipe["gflops_before"]
    assert yaml.safe_load((out / "prune.yaml").read_text()) == recipe
    with torch.no_grad():  # the file as val.py loads it
        decoded, maps = model.float().eval()(IMG)
    assert decoded.shape == (1, 3 * (8 * 8 + 4 * 4 + 2 * 2), NC + 5)


def test_prints_before_and_after_with_map(tiny_data, tmp_path, caplog):
    src = random_checkpoint(tmp_path / "n.pt", "yolov5n.yaml")
    with caplog.at_level("INFO", logger="yolov5kd"):
        rc = prune.main(["--weights", str(src), "--data", str(tiny_data), "--imgsz", "64", "--importance", "taylor",
                         "--taylor-batches", "1", "--batch-size", "4", "--workers", "0", "--latency-runs", "1",
                         "--project", str(tmp_path / "runs"), "--name", "t"])
    assert rc == 0
    text = caplog.text
    for label in ("parameters", "GFLOPs @64", "CPU latency bs1 (ms)", "mAP50-95", "mAP50 "):
        assert label in text, label
    recipe = torch_load(tmp_path / "runs" / "t" / "pruned.pt")[RECIPE_KEY]
    assert recipe["importance"] == "taylor" and recipe["data"] == str(tiny_data) and recipe["taylor_batches"] == 1
    assert 0 <= recipe["map50_95_after"] <= 1 and 0 <= recipe["map50_before"] <= 1


def _missing(folder):
    return folder / "missing.pt"


def _sequential(folder):
    torch.save({"model": nn.Sequential(nn.Conv2d(3, 8, 1)), "epoch": -1}, folder / "seq.pt")
    return folder / "seq.pt"


def _state_dict(folder):
    torch.save({"conv.weight": torch.zeros(1)}, folder / "sd.pt")
    return folder / "sd.pt"


@pytest.mark.parametrize("args, words", [
    (["--ratio", "0"], "--ratio 0.0"),
    (["--ratio", "1"], "between 0 and 1"),
    (["--ratio", "-0.2"], "between 0 and 1"),
    (["--ratio", "1.5"], "between 0 and 1"),
    (["--ratio", "0.97"], "no channel"),  # the 16-channel stem would keep int(0.48) = 0
    (["--ratio", "0.5", "--round-to", "16"], "--round-to 16"),  # the stem keeps 8, rounded down to 0
    (["--importance", "taylor"], "--data"),
    (["--round-to", "0"], "--round-to 0"),
], ids=["zero", "one", "negative", "above-one", "empties-a-layer", "round-to-empties", "taylor-no-data",
        "round-to-zero"])
def test_refusals_are_one_line_and_write_nothing(args, words, tmp_path, capsys):
    src = random_checkpoint(tmp_path / "n.pt", "yolov5n.yaml")
    rc = prune.main(["--weights", str(src), "--imgsz", "64", "--latency-runs", "0", "--project",
                     str(tmp_path / "runs"), *args])
    assert rc == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ERROR:")]
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("make, words", [(_missing, "not found"), (_sequential, "not a YOLOv5"),
                                         (_state_dict, "state_dict")], ids=["missing", "sequential", "state-dict"])
def test_bad_weights_are_refused(make, words, tmp_path, capsys):
    rc = prune.main(["--weights", str(make(tmp_path)), "--imgsz", "64", "--project", str(tmp_path / "runs")])
    assert rc == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ERROR:")]
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "runs").exists()


def test_a_model_without_detect_head_is_refused(tmp_path):
    from utils.core.errors import UserError

    model = _nano()
    model.model = nn.Sequential(*list(model.model)[:-1])
    torch.save({"model": model}, tmp_path / "headless.pt")
    with pytest.raises(UserError, match="holds no detection model"):
        load_detection_model(tmp_path / "headless.pt")
