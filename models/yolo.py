"""Detect head, DetectionModel (alias Model) and the yaml → modules builder."""
from __future__ import annotations

import ast
import contextlib
import logging
import math
import re
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn as nn

from models.common import C3, SPP, SPPF, Bottleneck, BottleneckCSP, Concat, Conv, DWConv, Focus
from utils.core.config import find_file, read_yaml
from utils.core.errors import UserError

LOGGER = logging.getLogger("yolov5kd")
MODELS_DIR = Path(__file__).resolve().parent

# Explicit name → class table: the yaml's module strings are looked up here, never evaluated.
MODULES: dict[str, type[nn.Module]] = {
    "Conv": Conv, "DWConv": DWConv, "Bottleneck": Bottleneck, "BottleneckCSP": BottleneckCSP, "C3": C3,
    "SPP": SPP, "SPPF": SPPF, "Focus": Focus, "Concat": Concat,
    "nn.Upsample": nn.Upsample, "nn.Conv2d": nn.Conv2d, "nn.BatchNorm2d": nn.BatchNorm2d,
    "nn.MaxPool2d": nn.MaxPool2d, "nn.Identity": nn.Identity,
}
# Modules whose first two arguments are (input channels, output channels), output scaled by width.
CHANNEL_MODULES = (Conv, DWConv, Bottleneck, BottleneckCSP, C3, SPP, SPPF, Focus, nn.Conv2d)
# Modules that take the repeat count as their third argument instead of being stacked.
REPEAT_MODULES = (BottleneckCSP, C3)
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "nn.SiLU": nn.SiLU, "nn.ReLU": nn.ReLU, "nn.ReLU6": nn.ReLU6, "nn.LeakyReLU": nn.LeakyReLU,
    "nn.Hardswish": nn.Hardswish, "nn.Mish": nn.Mish, "nn.GELU": nn.GELU, "nn.Identity": nn.Identity,
}
INPLACE_TYPES = (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU)


def make_divisible(x: float, divisor) -> int:
    """Smallest multiple of divisor that is >= x."""
    if isinstance(divisor, torch.Tensor):
        divisor = int(divisor.max())
    return math.ceil(x / divisor) * divisor


def check_img_size(imgsz: int, s: int = 32, floor: int = 0) -> int:
    """Round an image size up to a multiple of the stride s (with a warning when it changes)."""
    new = max(make_divisible(int(imgsz), int(s)), floor)
    if new != imgsz:
        LOGGER.warning(f"--imgsz {imgsz} must be a multiple of max stride {s}, updating to {new}")
    return new


class Detect(nn.Module):
    """Per-level 1x1 conv head; raw maps in training, (decoded boxes, raw maps) in eval."""

    stride = None  # replaced by an instance tensor once the model is built
    dynamic = False
    export = False

    def __init__(self, nc=80, anchors=(), ch=(), inplace=True):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        self.anchor_grid = [torch.empty(0) for _ in range(self.nl)]
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.inplace = inplace

    def forward(self, x):
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                if self.dynamic or self.grid[i].shape[2:4] != x[i].shape[2:4]:
                    self.grid[i], self.anchor_grid[i] = self._make_grid(nx, ny, i)
                xy, wh, conf = x[i].sigmoid().split((2, 2, self.nc + 1), 4)
                xy = (xy * 2 + self.grid[i]) * self.stride[i]
                wh = (wh * 2) ** 2 * self.anchor_grid[i]
                z.append(torch.cat((xy, wh, conf), 4).view(bs, self.na * nx * ny, self.no))
        if self.training:
            return x
        return (torch.cat(z, 1),) if self.export else (torch.cat(z, 1), x)

    def set_pixel_anchors(self, anchors: torch.Tensor) -> None:
        """Store anchors given in pixels as grid units of each level, levels reordered to rise with the stride."""
        with torch.no_grad():
            self.anchors[:] = torch.as_tensor(anchors).to(self.anchors).view_as(self.anchors)
            area = self.anchors.prod(-1).mean(-1).view(-1)
            da, ds = area[-1] - area[0], self.stride[-1] - self.stride[0]
            if da and da.sign() != ds.sign():  # a yaml (or k-means) listing the big anchors first
                LOGGER.info("AutoAnchor: reversing anchor order")
                self.anchors[:] = self.anchors.flip(0)
            self.anchors /= self.stride.to(self.anchors.device).view(-1, 1, 1)

    def _make_grid(self, nx: int, ny: int, i: int):
        d, t = self.anchors[i].device, self.anchors[i].dtype
        shape = 1, self.na, ny, nx, 2
        yv, xv = torch.meshgrid(torch.arange(ny, device=d, dtype=t), torch.arange(nx, device=d, dtype=t),
                                indexing="ij")
        # cell centre offset -0.5 folds the "2*sigmoid - 0.5" decoding into the grid
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5
        anchor_grid = (self.anchors[i] * self.stride[i]).view((1, self.na, 1, 1, 2)).expand(shape)
        return grid, anchor_grid


class BaseModel(nn.Module):
    """Layer-stack forward, fusion, summary and device moves shared by YOLOv5 models."""

    def forward(self, x, augment: bool = False, profile: bool = False, visualize: bool = False,
                features: bool = False):
        """Layer-stack forward; see Detect for what comes back in train and eval mode. features=True returns
        (output, the head's inputs): the neck maps P3, P4, P5 that feature distillation compares."""
        if augment:
            raise UserError("test-time augmentation (augment=True) is not supported by this implementation")
        return self._forward_once(x, features)

    def _forward_once(self, x, features: bool = False):
        y = []
        head_inputs = None
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if features and m is self.model[-1]:
                head_inputs = list(x)  # Detect may write into its input list; keep the maps themselves
            x = m(x)
            y.append(x if m.i in self.save else None)
        return (x, head_inputs) if features else x

    def fuse(self) -> "BaseModel":
        """Fold every Conv's BatchNorm into its convolution (inference only)."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval
        for m in self.model.modules():
            if isinstance(m, Conv) and hasattr(m, "bn"):
                m.conv = fuse_conv_bn_eval(m.conv.eval(), m.bn.eval())
                delattr(m, "bn")
                m.forward = m.forward_fuse
        return self

    def info(self, verbose: bool = False, imgsz: int = 640) -> tuple[int, int, float]:
        """Log and return (layers, parameters, GFLOPs at imgsz)."""
        n_p = sum(p.numel() for p in self.parameters())
        n_g = sum(p.numel() for p in self.parameters() if p.requires_grad)
        n_l = len(list(self.modules()))
        flops = model_gflops(self, imgsz)
        fs = f", {flops:.1f} GFLOPs" if flops else ""
        name = Path(getattr(self, "yaml_file", "") or "").stem.replace("yolov5", "YOLOv5") or "Model"
        LOGGER.info(f"{name} summary: {n_l} layers, {n_p} parameters, {n_g} gradients{fs}")
        return n_l, n_p, flops

    def _apply(self, fn, *args, **kwargs):
        # stride, grid and anchor_grid are plain attributes, so .to()/.half() must move them by hand
        self = super()._apply(fn, *args, **kwargs)
        m = self.model[-1]
        if isinstance(m, Detect):
            if isinstance(m.stride, torch.Tensor):
                m.stride = fn(m.stride)
            # grids are caches rebuilt from `anchors` (already moved) on the next eval forward; dropping them
            # also avoids applying a 4-D memory format to these 5-D tensors
            m.grid = [torch.empty(0, device=m.anchors.device) for _ in range(m.nl)]
            m.anchor_grid = [torch.empty(0, device=m.anchors.device) for _ in range(m.nl)]
        return self


def model_gflops(model: nn.Module, imgsz: int = 640) -> float:
    """GFLOPs of one forward at imgsz, counted by torch.utils.flop_counter on a small input and scaled."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        p = next(model.parameters())
        stride = int(model.stride.max()) if isinstance(getattr(model, "stride", None), torch.Tensor) else 32
        s = max(stride, 32)
        ch = model.yaml.get("ch", 3) if isinstance(getattr(model, "yaml", None), dict) else 3
        im = torch.zeros((1, ch, s, s), device=p.device, dtype=p.dtype)
        was_training = model.training
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(im)
        model.train(was_training)
        return fc.get_total_flops() / 1e9 * (imgsz / s) ** 2
    except Exception:  # a summary figure must never stop a run
        return 0.0


class DetectionModel(BaseModel):
    """YOLOv5 detection model built from a yaml file or dict."""

    def __init__(self, cfg="yolov5s.yaml", ch=3, nc=None, anchors=None):
        super().__init__()
        if isinstance(cfg, dict):
            self.yaml = cfg
        else:
            self.yaml_file = Path(cfg).name
            self.yaml = load_model_yaml(cfg)
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc and nc != self.yaml["nc"]:
            LOGGER.info(f"Overriding model.yaml nc={self.yaml['nc']} with nc={nc}")
            self.yaml["nc"] = nc
        if anchors:
            LOGGER.info(f"Overriding model.yaml anchors with anchors={anchors}")
            self.yaml["anchors"] = round(anchors)
        self.model, self.save = parse_model(deepcopy(self.yaml), ch=[ch], source=getattr(self, "yaml_file", "model yaml"))
        self.names = [str(i) for i in range(self.yaml["nc"])]
        self.inplace = self.yaml.get("inplace", True)

        m = self.model[-1]
        if isinstance(m, Detect):
            s = 256
            m.inplace = self.inplace
            # the train-mode forward also sets BN running stats (mean 0, var 0.9), as the reference does
            with torch.no_grad():
                out = self._forward_once(torch.zeros(1, ch, s, s))
            m.stride = torch.tensor([s / x.shape[-2] for x in out])
            m.set_pixel_anchors(m.anchors)  # the yaml gives them in pixels
            self.stride = m.stride
            self._initialize_biases()
        initialize_weights(self)

    def _initialize_biases(self, cf=None):
        """Objectness and class priors on the Detect biases (about 8 objects per 640 image)."""
        m = self.model[-1]
        for mi, s in zip(m.m, m.stride):
            b = mi.bias.view(m.na, -1)
            b.data[:, 4] += math.log(8 / (640 / s) ** 2)
            b.data[:, 5:5 + m.nc] += math.log(0.6 / (m.nc - 0.99999)) if cf is None else torch.log(cf / cf.sum())
            mi.bias = nn.Parameter(b.view(-1), requires_grad=True)


Model = DetectionModel  # name pickled by checkpoints of v6.1 and earlier


def initialize_weights(model: nn.Module) -> None:
    """YOLOv5's BatchNorm eps/momentum and in-place activations."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.eps = 1e-3
            m.momentum = 0.03
        elif isinstance(m, INPLACE_TYPES):
            m.inplace = True


def set_inplace_activations(model: nn.Module, inplace: bool) -> nn.Module:
    """Give `model` its own activation modules with `inplace` set; modules shared within it stay shared.

    Training runs them out of place: an in-place SiLU overwrites its input, which its backward needs, so
    autograd keeps a copy of every activation input (about 4 % of a CPU training step). Saved models get
    in-place ones back, as YOLOv5 pickles them. Copies, because `Conv.default_act` is one instance shared
    by every model built in the process."""
    memo: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, INPLACE_TYPES):
                if id(child) not in memo:
                    memo[id(child)] = deepcopy(child)
                    memo[id(child)].inplace = inplace
                setattr(parent, name, memo[id(child)])
    return model


def to_training_layout(model: nn.Module) -> nn.Module:
    """The student as train.py trains it: channels_last (faster convs on CPU via oneDNN, and on tensor cores)
    and out-of-place activations."""
    return set_inplace_activations(model.to(memory_format=torch.channels_last), False)


def load_model_yaml(cfg) -> dict:
    """Read a model yaml; a bare name (yolov5s.yaml) resolves to models/."""
    d = read_yaml(find_file(cfg, [MODELS_DIR], "model yaml"), "model yaml", required=("backbone", "head"))
    d.setdefault("nc", 80)
    d.setdefault("depth_multiple", 1.0)
    d.setdefault("width_multiple", 1.0)
    return d


_ACT_RE = re.compile(r"^\s*(nn\.\w+)\s*\((.*)\)\s*$")


def parse_activation(spec: str, source: str) -> nn.Module:
    """Turn an activation string such as 'nn.LeakyReLU(0.1)' into a module via the table."""
    mt = _ACT_RE.match(spec)
    if not mt or mt.group(1) not in ACTIVATIONS:
        raise UserError(f"{source}: unknown activation '{spec}' (known: {', '.join(ACTIVATIONS)})")
    args = ast.literal_eval(f"({mt.group(2)},)") if mt.group(2).strip() else ()
    return ACTIVATIONS[mt.group(1)](*args)


def _resolve_arg(a, names: dict):
    if isinstance(a, str):
        if a in names:
            return names[a]
        with contextlib.suppress(ValueError, SyntaxError):
            return ast.literal_eval(a)
    return a


def parse_model(d: dict, ch: list[int], source: str = "model yaml") -> tuple[nn.Sequential, list[int]]:
    """Build the layer stack of a YOLOv5 model dict; returns (nn.Sequential, sorted save list)."""
    anchors, nc, gd, gw = d.get("anchors"), d["nc"], d["depth_multiple"], d["width_multiple"]
    ch_mul = d.get("channel_multiple", 8)
    act = d.get("activation")
    previous_act = Conv.default_act
    if act:
        # Conv reads its default at construction; restore it afterwards so other models are unaffected
        Conv.default_act = parse_activation(act, source)
    try:
        return _build_layers(d, ch, source, anchors, nc, gd, gw, ch_mul)
    finally:
        Conv.default_act = previous_act


def _build_layers(d: dict, ch: list[int], source: str, anchors, nc: int, gd: float, gw: float,
                  ch_mul: int) -> tuple[nn.Sequential, list[int]]:
    na = (len(anchors[0]) // 2) if isinstance(anchors, list) else anchors
    no = na * (nc + 5)
    names = {"nc": nc, "anchors": anchors, "None": None, "True": True, "False": False}

    layers, save, c2 = [], [], ch[-1]
    for i, row in enumerate(d["backbone"] + d["head"]):
        if not isinstance(row, (list, tuple)) or len(row) != 4:
            raise UserError(f"{source}: layer {i} must be [from, number, module, args], got {row!r}")
        f, n, m_name, args = row
        if m_name == "Detect":
            m = Detect
        elif m_name in MODULES:
            m = MODULES[m_name]
        else:
            raise UserError(f"{source}: unknown module '{m_name}' in layer {i} (known: Detect, {', '.join(MODULES)})")
        args = [_resolve_arg(a, names) for a in args]
        n = max(round(n * gd), 1) if n > 1 else n

        if m in CHANNEL_MODULES:
            c1, c2 = ch[f], args[0]
            if c2 != no:
                c2 = make_divisible(c2 * gw, ch_mul)
            args = [c1, c2, *args[1:]]
            if m in REPEAT_MODULES:
                args.insert(2, n)
                n = 1
        elif m is nn.BatchNorm2d:
            args = [ch[f]]
        elif m is Concat:
            c2 = sum(ch[x] for x in f)
        elif m is Detect:
            args.append([ch[x] for x in f])
            if isinstance(args[1], int):
                args[1] = [list(range(args[1] * 2))] * len(f)
        else:
            c2 = ch[f]

        m_ = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
        t = f"{m.__module__}.{m.__name__}"
        m_.np = sum(x.numel() for x in m_.parameters())
        m_.i, m_.f, m_.type = i, f, t
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(m_)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(save)
