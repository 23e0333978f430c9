"""Model building (parameter counts, strides, anchors) and golden numerical fidelity of the forward."""
import pytest
import torch

from models.common import Conv
from models.yolo import Detect, Model, parse_model, set_inplace_activations, to_training_layout
from utils.core.errors import UserError
from utils.training.checkpoint import attempt_load

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


def test_training_layout_runs_activations_out_of_place_with_equal_results():
    torch.manual_seed(0)
    ref = Model("yolov5n.yaml", nc=3).train().to(memory_format=torch.channels_last)
    acts = {id(m.act) for m in ref.modules() if isinstance(m, Conv)}
    assert len(acts) == 1 and ref.model[0].act.inplace  # one shared in-place SiLU, as YOLOv5 pickles it
    m = to_training_layout(Model("yolov5n.yaml", nc=3).train())
    m.load_state_dict(ref.state_dict())
    new = {id(c.act) for c in m.modules() if isinstance(c, Conv)}
    assert len(new) == 1 and not m.model[0].act.inplace  # still one module, now the model's own
    assert Conv.default_act.inplace, "the class-wide instance other models share must not change"
    x = torch.rand(2, 3, 64, 64)
    for net in (ref, m):
        sum(o.sum() for o in net(x.clone())).backward()
    for (k, a), b in zip(ref.named_parameters(), m.parameters()):
        assert torch.equal(b.grad, a.grad), k  # same kernels, the activation only writes elsewhere
    assert set_inplace_activations(m, True).model[0].act.inplace


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
    ref = golden[f"{name}_inference"]
    # Pixel-scale boxes (up to ~400 px) are checked relative: the same 1e-5-ish float error of the conv
    # kernels is up to 6e-4 px absolute, and oneDNN's AVX-512 and AVX2 paths round differently (measured
    # 2.4e-6 / 3.3e-6 relative on AVX2 / AMX machines). Objectness and class probabilities and the raw maps
    # (logits) are checked absolute, as the brief's 1e-4 (measured: at most 3e-6 and 1.9e-5).
    assert torch.allclose(y[..., :4], ref[..., :4], rtol=1e-5, atol=0), "pixel-scale boxes"
    assert torch.allclose(y[..., 4:], ref[..., 4:], atol=1e-4, rtol=0), "objectness and class probabilities"
    for a, b in zip(raw, golden[f"{name}_raw"]):
        assert torch.allclose(a, b, atol=1e-4, rtol=0), "raw maps"


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


V50_S = """
nc: 80
depth_multiple: 0.33
width_multiple: 0.50
anchors:
  - [10,13, 16,30, 33,23]
  - [30,61, 62,45, 59,119]
  - [116,90, 156,198, 373,326]
backbone:
  [[-1, 1, Focus, [64, 3]],
   [-1, 1, Conv, [128, 3, 2]],
   [-1, 3, C3, [128]],
   [-1, 1, Conv, [256, 3, 2]],
   [-1, 9, C3, [256]],
   [-1, 1, Conv, [512, 3, 2]],
   [-1, 9, C3, [512]],
   [-1, 1, Conv, [1024, 3, 2]],
   [-1, 1, SPP, [1024, [5, 9, 13]]],
   [-1, 3, C3, [1024, False]],
  ]
head:
  [[-1, 1, Conv, [512, 1, 1]],
   [-1, 1, nn.Upsample, [None, 2, 'nearest']],
   [[-1, 6], 1, Concat, [1]],
   [-1, 3, C3, [512, False]],
   [-1, 1, Conv, [256, 1, 1]],
   [-1, 1, nn.Upsample, [None, 2, 'nearest']],
   [[-1, 4], 1, Concat, [1]],
   [-1, 3, C3, [256, False]],
   [-1, 1, Conv, [256, 3, 2]],
   [[-1, 14], 1, Concat, [1]],
   [-1, 3, C3, [512, False]],
   [-1, 1, Conv, [512, 3, 2]],
   [[-1, 10], 1, Concat, [1]],
   [-1, 3, C3, [1024, False]],
   [[17, 20, 23], 1, Detect, [nc, anchors]],
  ]
"""


def test_v50_layout_focus_spp_and_legacy_update(tmp_path):
    """The v5.0 table (Focus stem, SPP) builds to its known size; v5.0 Detect buffers are updated on load."""
    import yaml

    from utils.training.checkpoint import update_legacy

    m = Model(yaml.safe_load(V50_S))
    assert sum(p.numel() for p in m.parameters()) == 7_276_605
    d = m.model[-1]
    # v5.0 pickles kept a pixel anchor_grid buffer and Upsample without recompute_scale_factor
    del d.anchor_grid
    d.register_buffer("anchor_grid", torch.zeros(3, 1, 3, 1, 1, 2))
    del m.model[11].recompute_scale_factor
    m.names = ["a"] * 80
    update_legacy(m)
    assert isinstance(d.anchor_grid, list) and m.model[11].recompute_scale_factor is None
    assert m.names[0] == "a" and isinstance(m.names, dict)
    m.eval()
    with torch.no_grad():
        y, _ = m(torch.zeros(1, 3, 64, 64))
    assert y.shape == (1, 3 * (64 + 16 + 4), 85)
    # SPPF(5) equals SPP(5, 9, 13) once their 1x1 convs share weights
    from models.common import SPP, SPPF
    spp, sppf = SPP(16, 16).eval(), SPPF(16, 16).eval()
    sppf.load_state_dict(spp.state_dict(), strict=False)
    sppf.cv1.load_state_dict(spp.cv1.state_dict())
    sppf.cv2.load_state_dict(spp.cv2.state_dict())
    x = torch.rand(1, 16, 20, 20)
    assert torch.allclose(spp(x), sppf(x), atol=1e-6)
