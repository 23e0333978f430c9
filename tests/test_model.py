"""Model building (parameter counts, strides, anchors) and golden numerical fidelity of the forward."""
import pytest
import torch

from models.yolo import Detect, Model, parse_model
from utils.checkpoint import attempt_load
from utils.errors import UserError

PARAMS = {"n": 1_872_157, "s": 7_235_389, "m": 21_190_557, "l": 46_563_709, "x": 86_749_405}


@pytest.mark.parametrize("size", list(PARAMS))
def test_parameter_counts(size):
    m = Model(f"yolov5{size}.yaml")
    assert sum(p.numel() for p in m.parameters()) == PARAMS[size]


def test_yolov5s_structure():
    m = Model("yolov5s.yaml")
    assert m.save == [4, 6, 10, 14, 17, 20, 23]
    assert len(list(m.modules())) == 214
    assert len(m.state_dict()) == 349
    d = m.model[-1]
    assert isinstance(d, Detect)
    assert d.stride.tolist() == [8.0, 16.0, 32.0]
    expected = torch.tensor([[[1.25, 1.625], [2.0, 3.75], [4.125, 2.875]],
                             [[1.875, 3.8125], [3.875, 2.8125], [3.6875, 7.4375]],
                             [[3.625, 2.8125], [4.875, 6.1875], [11.65625, 10.1875]]])
    assert torch.allclose(d.anchors, expected)
    bn = m.model[0].bn
    assert bn.eps == 1e-3 and bn.momentum == 0.03
    assert m.model[4].type == "models.common.C3" and m.model[11].type == "torch.nn.modules.upsampling.Upsample"
    m.eval()
    with torch.no_grad():
        y, raw = m(torch.zeros(1, 3, 640, 512))
    assert y.shape == (1, 20160, 85) and len(raw) == 3 and raw[0].shape == (1, 3, 80, 64, 85)
    m.fuse()
    assert sum(p.numel() for p in m.parameters()) == 7_225_885
    assert len(list(m.modules())) == 157


def test_train_forward_returns_raw_maps():
    m = Model("yolov5n.yaml", nc=4).train()
    out = m(torch.zeros(2, 3, 64, 64))
    assert isinstance(out, list) and [o.shape for o in out] == [(2, 3, 8, 8, 9), (2, 3, 4, 4, 9), (2, 3, 2, 2, 9)]


def test_bias_init():
    m = Model("yolov5n.yaml", nc=80)
    d = m.model[-1]
    b = d.m[0].bias.view(3, -1)
    # pytorch's default init is uniform in +-1/sqrt(fan_in); the prior offsets dominate it
    assert torch.all((b[:, 4] + 6.684612).abs() < 0.3)
    assert torch.all((b[:, 5:] + 4.880274).abs() < 0.3)


def test_info_reports_gflops():
    n_l, n_p, gflops = Model("yolov5s.yaml").info()
    assert n_p == 7_235_389
    assert 15.5 < gflops < 17.0


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_golden_forward(name, golden, fixtures_dir):
    model = attempt_load(fixtures_dir / f"{name}.pt", fuse=False)
    im = golden["images_uint8"].float() / 255
    with torch.no_grad():
        y, raw = model(im)
    assert torch.allclose(y, golden[f"{name}_inference"], atol=1e-4, rtol=0)
    for a, b in zip(raw, golden[f"{name}_raw"]):
        assert torch.allclose(a, b, atol=1e-4, rtol=0)


def test_fused_forward_close_to_unfused(golden, fixtures_dir):
    model = attempt_load(fixtures_dir / "student.pt", fuse=True)
    im = golden["images_uint8"][:2].float() / 255
    with torch.no_grad():
        _, raw = model(im)
    for a, b in zip(raw, golden["student_raw"]):
        assert torch.allclose(a, b[:2], atol=1e-4, rtol=0)


def test_unknown_module_is_a_user_error(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("nc: 2\ndepth_multiple: 1\nwidth_multiple: 1\nanchors: 3\n"
                   "backbone: [[-1, 1, NotAModule, [16, 3, 2]]]\nhead: []\n")
    with pytest.raises(UserError, match=r"bad\.yaml: unknown module 'NotAModule'"):
        Model(cfg)


def test_yaml_strings_are_never_evaluated(tmp_path):
    cfg = tmp_path / "evil.yaml"
    cfg.write_text("nc: 2\ndepth_multiple: 1\nwidth_multiple: 1\nanchors: 3\n"
                   "backbone: [[-1, 1, \"__import__('os').system('touch PWNED')\", [16]]]\nhead: []\n")
    with pytest.raises(UserError, match="unknown module"):
        Model(cfg)
    with pytest.raises(UserError, match="unknown activation"):
        parse_model({"nc": 1, "depth_multiple": 1, "width_multiple": 1, "anchors": 3, "activation": "os.system('x')",
                     "backbone": [], "head": []}, ch=[3])


def test_missing_model_yaml():
    with pytest.raises(UserError, match="model yaml not found"):
        Model("does-not-exist.yaml")
