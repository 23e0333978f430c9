"""What this CPU can do: the one bf16 check behind the teacher's precision and the student's autocast."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

# /proc/cpuinfo flags of native bf16 arithmetic: x86 AVX512-BF16 and AMX-BF16, Arm's BF16 extension
_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (Linux /proc/cpuinfo flags) and oneDNN is built in."""
    # Not torch's own check: oneDNN also "supports" bf16 on plain AVX512 by emulation, which is slower than
    # fp32. Other systems (no /proc/cpuinfo) answer False, so auto stays on fp32 there.
    if not sys.platform.startswith("linux") or not torch.backends.mkldnn.is_available():
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
