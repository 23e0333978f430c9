#!/usr/bin/env bash
# Does a checkpoint written here work, as it is, in official YOLOv5's val.py, detect.py and export.py?
# Runs the reference YOLOv5 (7.0.14, set up by benchmarks/setup_reference.sh) on it beside this project's val.py
# and prints both validations, the detections written and the exported files.
#
#   bash benchmarks/official_tools.sh CHECKPOINT [DATA_YAML] [IMGSZ]   # defaults: shapes16.yaml 160
#
# Needs PyPI once (the ONNX packages go into REF/onnx). Two things are the reference's, not the checkpoint's, and
# are set only for its processes: torch >= 2.6 loads weights-only by default, which YOLOv5 7.0 predates (it
# unpickles every checkpoint, official ones too), hence TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1; and its plots call
# Pillow's FreeTypeFont.getsize, which Pillow 10 removed, hence a two-line stand-in loaded at start-up.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CKPT=$(realpath "$1")
DATA=${2:-shapes16.yaml}
[ -e "$DATA" ] && DATA=$(realpath "$DATA")  # a path of the caller's, before the cd below
IMGSZ=${3:-160}
REF=${REF:-$ROOT/runs/reference}
PY=${PYTHON:-$(command -v python)}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
[ -d "$REF/pkg/yolov5" ] || { echo "no reference YOLOv5 under $REF: run bash benchmarks/setup_reference.sh first" >&2; exit 2; }
if [ ! -d "$REF/onnx/onnxscript" ]; then
  "$PY" -m pip install -q --target "$REF/onnx" onnx onnxruntime "numpy<2.4"
  "$PY" -m pip install -q --target "$REF/onnx" --no-deps onnxscript onnx_ir
fi
mkdir -p "$OUT/shim"
cat > "$OUT/shim/sitecustomize.py" <<'PY'
from PIL import ImageFont
if not hasattr(ImageFont.FreeTypeFont, "getsize"):  # Pillow >= 10; YOLOv5 7.0's plots still call it
    ImageFont.FreeTypeFont.getsize = lambda self, text: tuple(self.getbbox(text)[2:])
PY
# the dataset as this project resolves it (check_dataset: a short name or a path, absolute splits), written out
# for the reference, which would resolve relative entries its own way; the first val entry is detect.py's source
IMAGES=$(cd "$ROOT" && "$PY" - "$DATA" "$OUT/data.yaml" <<'PY'
import sys
from pathlib import Path
import yaml
from utils.data.datasets import check_dataset
d = check_dataset(sys.argv[1], autodownload=False)
Path(sys.argv[2]).write_text(yaml.safe_dump({"path": str(d.path), "train": d.train, "val": d.val, "names": d.names}))
print(d.val if isinstance(d.val, str) else d.val[0])
PY
)
cp "$CKPT" "$OUT/model.pt"
echo "== this project's val.py"
(cd "$ROOT" && "$PY" val.py --data "$OUT/data.yaml" --weights "$OUT/model.pt" --imgsz "$IMGSZ" --workers 0 \
  --project "$OUT" --name ours 2>&1 | grep -E "^ +all|summary|rror")
export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 YOLOV5_CONFIG_DIR="$REF/config"
export PYTHONPATH="$OUT/shim:$REF/onnx:$REF/deps:$REF/pkg"
Y=$REF/pkg/yolov5
cd "$OUT"
echo "== official val.py"
"$PY" "$Y/val.py" --data "$OUT/data.yaml" --weights "$OUT/model.pt" --imgsz "$IMGSZ" --workers 0 --project "$OUT" --name val 2>&1 \
  | grep -E "^ +all|summary|rror"
echo "== official detect.py"
"$PY" "$Y/detect.py" --weights "$OUT/model.pt" --source "$IMAGES" --imgsz "$IMGSZ" --project "$OUT" --name det --nosave \
  --save-txt 2>&1 | grep -E "labels saved|rror"
echo "== official export.py"
"$PY" "$Y/export.py" --weights "$OUT/model.pt" --imgsz "$IMGSZ" --include torchscript onnx 2>&1 | grep -E "success|failure|rror"
echo "== official val.py on the ONNX export"
"$PY" "$Y/val.py" --data "$OUT/data.yaml" --weights "$OUT/model.onnx" --imgsz "$IMGSZ" --batch-size 1 --workers 0 --project "$OUT" \
  --name onnx 2>&1 | grep -E "^ +all|rror"
