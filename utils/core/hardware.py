"""What this CPU can do: the one bf16 check behind the teacher's precision and the student's autocast."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# /proc/cpuinfo flags of native bf16 arithmetic: x86 AVX512-BF16 and AMX-BF16, Arm's BF16 extension
_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below the first with bf16 dot products: with one of these set, oneDNN
# emulates bf16 whatever the CPU has, so it is slower than fp32 (the AVX2-only test mode sets AVX2)
_ONEDNN_ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                                       "AVX512_CORE_VNNI"})


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (Linux /proc/cpuinfo flags), oneDNN is built in and its
    instruction set is not capped below them (ONEDNN_MAX_CPU_ISA)."""
    # Not torch's own check: oneDNN also "supports" bf16 on plain AVX512 by emulation, which is slower than
    # fp32. Other systems (no /proc/cpuinfo) answer False, so auto stays on fp32 there.
    if not sys.platform.startswith("linux") or not torch.backends.mkldnn.is_available():
        return False
    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", ""))
    if isa_cap.upper() in _ONEDNN_ISAS_WITHOUT_BF16:
        return False
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features") and _BF16_CPU_FLAGS & set(value.split()):
            return True
    return False
