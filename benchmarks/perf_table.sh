#!/usr/bin/env bash
# Run every speed/memory benchmark back to back on this machine (one run, one machine) and print the figures
# the README's performance table is made of. Usage: bash benchmarks/perf_table.sh [--device cpu|0]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
echo "machine: $(nproc) CPUs, $(uname -m), torch $($PY -c 'import torch; print(torch.__version__)')"
$PY benchmarks/bench_loader.py --imgsz 320 640 2>&1 | grep -E "^imgsz|CPUs"
$PY benchmarks/bench_train.py "$@" 2>&1 | grep -E "^train"
$PY benchmarks/bench_train.py --kd "$@" 2>&1 | grep -E "^train"
$PY benchmarks/bench_kd_step.py "$@" 2>&1 | grep -vE "Scanning|^$"
$PY benchmarks/bench_val.py "$@" 2>&1 | grep -E "^val"
