"""val.py as a user runs it: text/JSON outputs, per-class table, pycocotools scoring, one-line errors."""
import json
import shutil

import pytest

from conftest import DEMO_NAMES as NAMES
from conftest import ROOT, random_checkpoint, run_cli


@pytest.fixture(scope="module")
def numeric_val_set(tiny_data, tmp_path_factory):
    """The tiny val images renamed 000001.jpg … with a COCO annotation file built from their labels."""
    import cv2

    src = tiny_data.parent / "shapes"
    root = tmp_path_factory.mktemp("coco_like")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    images, annotations = [], []
    for k, im in enumerate(sorted((src / "images" / "val").iterdir()), 1):
        shutil.copy(im, root / "images" / f"{k:06d}.jpg")
        lb = src / "labels" / "val" / f"{im.stem}.txt"
        rows = [r.split() for r in lb.read_text().splitlines() if r.strip()] if lb.exists() else []
        shutil.copy(lb, root / "labels" / f"{k:06d}.txt") if lb.exists() else None
        h, w = cv2.imread(str(im)).shape[:2]
        images.append({"id": k, "file_name": f"{k:06d}.jpg", "width": w, "height": h})
        for c, x, y, bw, bh in ((int(r[0]), *map(float, r[1:5])) for r in rows):
            annotations.append({"id": len(annotations) + 1, "image_id": k, "category_id": c, "iscrowd": 0,
                                "bbox": [(x - bw / 2) * w, (y - bh / 2) * h, bw * w, bh * h], "area": bw * w * bh * h})
    cats = [{"id": i, "name": n} for i, n in enumerate(NAMES)]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    yml = root / "data.yaml"
    yml.write_text(f"path: {root}\ntrain: images\nval: images\nannotations: instances.json\nnames: {NAMES}\n")
    return yml


@pytest.fixture(scope="module")
def random_student(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("w") / "student8.pt", "yolov5n.yaml")


def test_val_cli_outputs(numeric_val_set, random_student, tmp_path):
    r = run_cli([str(ROOT / "val.py"), "--data", str(numeric_val_set), "--weights", str(random_student), "--imgsz", "64",
                 "--save-txt", "--save-conf", "--save-json", "--verbose", "--project", str(tmp_path), "--name", "v",
                 "--workers", "0"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "v"
    txts = list((out / "labels").glob("*.txt"))
    assert txts, "no --save-txt output"
    row = txts[0].read_text().splitlines()[0].split()
    assert len(row) == 6 and 0 <= int(float(row[0])) < 8 and all(0 <= float(v) <= 1 for v in row[1:5])
    records = json.loads((out / "student8_predictions.json").read_text())
    assert records and set(records[0]) == {"image_id", "category_id", "bbox", "score"}
    assert isinstance(records[0]["image_id"], int)
    header = [line for line in r.stderr.splitlines() if "mAP50-95" in line and "Class" in line]
    assert header, "summary header missing"
    assert "pycocotools: mAP50" in r.stderr
    assert "Speed:" in r.stderr and "per image at shape" in r.stderr
    for f in ("confusion_matrix.png", "PR_curve.png", "val_batch0_pred.jpg"):
        assert (out / f).is_file(), f


def test_val_cli_one_line_errors(numeric_val_set, fixtures_dir, tmp_path):
    r = run_cli([str(ROOT / "val.py"), "--data", str(numeric_val_set), "--weights", str(fixtures_dir / "student.pt"),
                 "--imgsz", "64", "--project", str(tmp_path)], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nc=4" in r.stderr and "nc=8" in r.stderr
    r = run_cli([str(ROOT / "val.py"), "--data", str(tmp_path / "nope.yaml"), "--weights",
                 str(fixtures_dir / "student.pt"), "--project", str(tmp_path)], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nope.yaml" in r.stderr


# ------------------------------------------------------------------------------------ run() refusals, speed
@pytest.mark.parametrize("kwargs, word", [({"augment": True}, "augment"), ({"dnn": True}, "dnn"),
                                          ({"task": "study"}, "study")])
def test_val_run_refuses_unsupported_options(kwargs, word, random_student, tiny_data, tmp_path):
    import val
    from utils.core.errors import UserError

    with pytest.raises(UserError) as e:
        val.run(str(tiny_data), weights=str(random_student), imgsz=64, workers=0, device="cpu",
                project=tmp_path, name="v", **kwargs)
    assert word in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "v").exists(), "a refused run must not leave a run folder"


def test_val_run_refuses_an_ensemble(random_student, tiny_data, tmp_path):
    import val
    from utils.core.errors import UserError

    with pytest.raises(UserError, match="--weights"):
        val.run(str(tiny_data), weights=[str(random_student)] * 2, imgsz=64, workers=0, device="cpu",
                project=tmp_path)


def test_val_speed_task_times_square_unpadded_val_batches(random_student, tiny_data, tmp_path, monkeypatch):
    import utils.data.datasets as D
    import val
    from utils.data.datasets import check_dataset

    seen = {}
    real = D.create_dataloader

    def spy(dataset, *a, **k):
        seen.update(path=dataset.path, pad=dataset.settings.pad, rect=dataset.rect)
        return real(dataset, *a, **k)

    monkeypatch.setattr(D, "create_dataloader", spy)
    (_, _, map50, _, *_), maps, t = val.run(str(tiny_data), weights=str(random_student), imgsz=64, workers=0,
                                            device="cpu", task="speed", project=tmp_path, name="s", plots=False)
    assert seen == {"path": check_dataset(str(tiny_data)).val, "pad": 0.0, "rect": False}
    assert len(t) == 3 and all(x >= 0 for x in t) and len(maps) == len(NAMES)


def test_val_cli_speed_task(tiny_data, random_student, tmp_path):
    r = run_cli([str(ROOT / "val.py"), "--data", str(tiny_data), "--weights", str(random_student), "--imgsz", "64",
                 "--task", "speed", "--workers", "0", "--project", str(tmp_path), "--name", "s"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Speed:" in r.stderr and "per image at shape" in r.stderr
    assert not list((tmp_path / "s").glob("*.png")), "speed runs draw no plots"


def test_evaluate_is_what_run_with_a_model_returns(tiny_data, random_student, tmp_path):
    """The in-training call run(model=...) is evaluate() on the caller's model and dataloader."""
    import val
    from utils.data.datasets import DataSettings, LoadImagesAndLabels, check_dataset, create_dataloader
    from utils.training.checkpoint import attempt_load

    data = check_dataset(str(tiny_data))
    settings = DataSettings(imgsz=64, batch_size=4, rect=True, pad=0.5, nc=8, substitute_failed=False)
    loader = create_dataloader(LoadImagesAndLabels(data.val, settings), workers=0)
    model = attempt_load(random_student)
    ev = val.evaluate(model, loader, data, half=False, plots=False)
    results, maps, t = val.run(data, model=model, dataloader=loader, half=False, plots=False, callbacks=object())
    assert results == ev.results and len(t) == 3
    assert (maps == ev.maps(len(NAMES), results[3])).all()


def test_ap_by_iou_is_the_pass_run_reports(random_student, tiny_data, tmp_path):
    """AP per IoU threshold: the first is run()'s mAP50 and their mean its mAP50-95 (same pass, same model)."""
    import val

    (_, _, map50, map_, *_), _, _ = val.run(str(tiny_data), weights=str(random_student), imgsz=64, workers=0,
                                            device="cpu", project=tmp_path, name="r", plots=False)
    aps = val.ap_by_iou(str(tiny_data), str(random_student), imgsz=64, workers=0, device="cpu", project=tmp_path)
    assert len(aps) == 10
    assert aps[0] == pytest.approx(map50, abs=1e-12) and sum(aps) / 10 == pytest.approx(map_, abs=1e-12)
    assert list(aps) == sorted(aps, reverse=True), "AP cannot rise as the IoU a match needs rises"


def test_summarise_gives_ap_per_iou_threshold(tmp_path):
    """A detection that matches only at IoU 0.50-0.70 counts for the first five thresholds and not the rest."""
    import numpy as np
    import torch
    import val
    from utils.evaluation.metrics import compute_ap

    correct = torch.tensor([[True] * 10, [True] * 5 + [False] * 5])  # two detections, two labels, one class
    stats = [(correct, torch.tensor([0.9, 0.8]), torch.zeros(2), torch.zeros(2))]
    s = val.summarise(stats, nc=1, names={0: "a"}, plots=False, save_dir=tmp_path)
    assert len(s.ap_iou) == 10
    assert len(set(s.ap_iou[:5].tolist())) == 1 and len(set(s.ap_iou[5:].tolist())) == 1
    # cumulative recall and precision in confidence order: both labels found, then the second detection misses
    both = compute_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0]))[0]
    one = compute_ap(np.array([0.5, 0.5]), np.array([1.0, 0.5]))[0]
    assert s.ap_iou[0] == pytest.approx(both, abs=1e-12) and s.ap_iou[5] == pytest.approx(one, abs=1e-12)
    assert one < both
    assert s.ap_iou[0] == pytest.approx(s.map50, abs=1e-12) and s.ap_iou.mean() == pytest.approx(s.map, abs=1e-12)
