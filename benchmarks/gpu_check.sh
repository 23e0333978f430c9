#!/usr/bin/env bash
# GPU check, for any machine with a CUDA device (about 3-5 minutes): the CUDA test layer (tests/cuda: fp16
# autocast + GradScaler distillation steps, the fp16 teacher, --device 0 end to end, 2-GPU nccl DDP when
# there are two GPUs) and the distillation step benchmark, printed as one table.
#
#     bash benchmarks/gpu_check.sh            # PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="$(mktemp -d)"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device here')" || exit 1
timeout 240 "$PY" -m pytest tests/cuda -m cuda -q -p no:cacheprovider --junitxml "$OUT/cuda.xml" >"$OUT/pytest.log" 2>&1
timeout 150 "$PY" benchmarks/bench_kd_step.py --device 0 --batch 32 --imgsz 640 --iters 20 --feat mse >"$OUT/bench.log" 2>&1
"$PY" - "$OUT" <<'PY'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

out = Path(sys.argv[1])
rows = [("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", f"{torch.cuda.device_count()} GPU(s), torch {torch.__version__}")]
try:
    for case in ET.parse(out / "cuda.xml").getroot().iter("testcase"):
        state = "failed" if case.find("failure") is not None or case.find("error") is not None else (
            "skipped" if case.find("skipped") is not None else "passed")
        note = next((e.get("message", "")[:80] for e in case if e.tag in ("failure", "error", "skipped")), "")
        rows.append((f"test {case.get('name')}", state, note or f"{float(case.get('time', 0)):.1f} s"))
except (OSError, ET.ParseError):
    rows.append(("tests/cuda", "did not finish", (out / "pytest.log").read_text()[-200:].replace("\n", " ")))
bench = (out / "bench.log").read_text().splitlines() if (out / "bench.log").exists() else []
figures = [ln for ln in bench if ln.startswith(("plain step", "KD step", "teacher forward", "KD/plain", "KD+", "peak"))]
rows += [("bench_kd_step, batch 32, 640 px, AMP", "measured", " ".join(ln.split())) for ln in figures] or [
    ("bench_kd_step", "did not finish", " ".join(bench[-3:])[:200])]
print("| check | result | detail |\n|---|---|---|")
for r in rows:
    print("| " + " | ".join(str(x).replace("|", "/") for x in r) + " |")
PY
