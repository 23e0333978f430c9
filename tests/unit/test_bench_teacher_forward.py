"""benchmarks/bench_teacher_forward.py: the teacher variants it times (the timings themselves are benchmarks)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.yolo import Model
from optimizer.int8 import int8_unavailable

ROOT = Path(__file__).resolve().parents[2]

import bench_teacher_forward as btf


@pytest.mark.skipif(bool(int8_unavailable()), reason="int8 teacher unavailable in this torch")
def test_variants_run_at_their_own_precision_and_leave_the_source_model_alone() -> None:
    torch.manual_seed(0)
    model = Model("yolov5n.yaml", nc=3).eval().fuse()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    variants = btf.build_variants(model, [torch.rand(1, 3, 64, 64) for _ in range(2)])
    assert list(variants) == list(btf.VARIANTS)

    x = torch.rand(2, 3, 64, 64)
    ref = variants["fp32"].raw(x)
    for name, v in variants.items():
        raw = v.raw(x)
        assert [r.shape for r in raw] == [r.shape for r in ref] and all(r.dtype == torch.float32 for r in raw), name
        pred, maps = v(x)  # what val.evaluate() calls
        assert pred.dtype == torch.float32 and pred.shape == (2, 3 * (8 * 8 + 4 * 4 + 2 * 2), 8), name
        assert v.float() is v and v.half() is v  # val.evaluate() must not cast a variant back to fp32
        assert len(list(v.parameters())) >= 1  # val.evaluate() reads the device from a parameter

    int8 = variants["int8"].model
    assert any(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in int8.modules())
    bf16 = variants["bf16-weights"].model
    convs = [m for m in bf16.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.dtype == torch.bfloat16 for c in convs)
    assert bf16.model[-1].anchors.dtype == torch.float32  # so its boxes decode in fp32
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="unknown variant 'fp8'"):
        btf.build_variants(model, [], names=["fp8"])
