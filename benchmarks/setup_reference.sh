#!/usr/bin/env bash
# Sets up the reference YOLOv5 that benchmarks/bench_reference.py times this project against, offline from
# then on: YOLOv5 7.0.14 as packaged on PyPI, run with this project's venv (same torch and kernels) plus a
# dependency folder that only the reference's processes see. Needs PyPI once; docs/results/perf_reference.md
# says why each piece is there.
#
#   bash benchmarks/setup_reference.sh [DIR]     # default DIR: runs/reference
#
# Prints the bench_reference.py command (with REF and DEPS filled in) and the YOLOV5_CONFIG_DIR to export.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$ROOT/runs/reference}
mkdir -p "$DIR" && DIR=$(cd "$DIR" && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
PKG=$DIR/pkg DEPS=$DIR/deps CFG=$DIR/config

"$PY" -m pip download -q yolov5==7.0.14 --no-deps -d "$DIR/dl"
rm -rf "$PKG" && mkdir -p "$PKG"
"$PY" -m zipfile -e "$DIR"/dl/yolov5-7.0.14-*.whl "$PKG"

# --no-deps throughout: their declared dependencies would pull a second torch; the venv already has the
# numeric stack, and these are the pure-Python packages the reference imports at start-up beyond it.
# numpy < 2.4: the reference calls np.trapz, which 2.4 removed.
"$PY" -m pip install -q --no-deps --target "$DEPS" gitpython gitdb smmap psutil requests urllib3 idna \
  charset-normalizer certifi pandas pytz tzdata python-dateutil six seaborn thop "setuptools<70" \
  "ultralytics==8.3.*" ultralytics-thop py-cpuinfo "huggingface_hub<0.25" "numpy<2.4" polars

# roboflow: imported at start-up, never called for a local dataset; its real package needs more than PyPI's
# wheels for this Python give. A stand-in with the two names the reference imports (roboflow.Roboflow and
# roboflow.core.version.Version).
mkdir -p "$DEPS/roboflow/core"
printf 'class Roboflow:\n    pass\n' > "$DEPS/roboflow/__init__.py"
: > "$DEPS/roboflow/core/__init__.py"
printf 'class Version:\n    pass\n' > "$DEPS/roboflow/core/version.py"

# the reference downloads Arial.ttf when it checks a dataset, even with --noplots: give it matplotlib's font
mkdir -p "$CFG"
cp "$("$PY" -c 'import matplotlib, os; print(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data/fonts/ttf/DejaVuSans.ttf"))')" "$CFG/Arial.ttf"

echo "reference ready under $DIR"
echo "export YOLOV5_CONFIG_DIR=$CFG"
echo "python benchmarks/bench_reference.py --reference $PKG/yolov5 --pythonpath $DEPS:$PKG --variants plain fp32 --pairs 3"
