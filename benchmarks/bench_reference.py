#!/usr/bin/env python
"""Side-by-side training time against a reference YOLOv5 checkout, runs interleaved on one machine.

    python benchmarks/bench_reference.py --reference /path/to/yolov5 [--pairs 3] [--variants plain fp32]

Both trainers run the same job as whole processes: YOLOv5n from scratch on the demo data, imgsz 320,
batch 16, 2 workers, 2 epochs, plots off, validation every epoch as both do by default. For each variant of
this project (`plain` = train.py's defaults, bf16 autocast on a CPU with native bf16; `fp32` = --no-amp; `amp`
= --amp; `compile` = --compile) the runs alternate reference, project, reference, project ... so that a drift
in the machine's speed hits both sides alike; the ratio is taken pair by pair and its median printed. The
reference is not part of this repository: pass the folder that holds its train.py (a git checkout, or the
`yolov5` folder of the pip package), and with --pythonpath whatever it needs that this venv lacks:
benchmarks/setup_reference.sh sets both up from PyPI, and docs/results/perf_reference.md says why each piece
is there. Writes perf_reference.md into a new dated folder, docs/experiments/<YYYY-MM-DD>-perf-reference/ (or
--out), carrying over that setup section; add a row for the folder to docs/experiments/index.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from experiments import experiment_dir, remind_index

ROOT = Path(__file__).resolve().parents[1]
SETUP_DOC = ROOT / "docs" / "results" / "perf_reference.md"
VARIANT_FLAGS = {"plain": [], "fp32": ["--no-amp"], "amp": ["--amp"], "compile": ["--compile"]}


def job_args(data: str, imgsz: int, batch: int, workers: int, epochs: int, project: str, name: str) -> list[str]:
    """The train.py arguments both trainers understand, for one run."""
    return ["--data", data, "--cfg", "yolov5n.yaml", "--weights", "", "--imgsz", str(imgsz),
            "--batch-size", str(batch), "--workers", str(workers), "--epochs", str(epochs), "--noplots",
            "--project", project, "--name", name, "--exist-ok"]


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    """Wall seconds of one whole process (start-up included); raises with the log's tail if it fails."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        r = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    dt = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {r.returncode}), log {log}:\n{log.read_text()[-3000:]}")
    return dt


def absolute_data_yaml(src: Path, dst: Path) -> Path:
    """A copy of the dataset yaml whose `path` is absolute, so the reference finds the images from its cwd."""
    d = yaml.safe_load(src.read_text())
    d["path"] = str((ROOT / d["path"]).resolve())
    d.pop("download", None)
    dst.write_text(yaml.safe_dump(d, sort_keys=False))
    return dst


def cpu_model() -> str:
    """The CPU's marketing name where /proc/cpuinfo has it (Linux), else the platform's word for it."""
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True, help="folder holding the reference YOLOv5 train.py")
    ap.add_argument("--pythonpath", default="", help="extra PYTHONPATH for the reference only")
    ap.add_argument("--python", default=sys.executable, help="interpreter for both trainers")
    ap.add_argument("--variants", nargs="+", default=["plain", "fp32"], choices=sorted(VARIANT_FLAGS))
    ap.add_argument("--pairs", type=int, default=3, help="reference/project pairs per variant")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", default=str(ROOT / "data" / "shapes.yaml"))
    ap.add_argument("--out", default=None, help="file to write (default: perf_reference.md in a new dated folder "
                    "docs/experiments/<YYYY-MM-DD>-perf-reference/)")
    a = ap.parse_args()

    ref = Path(a.reference).resolve()
    if not (ref / "train.py").is_file():
        raise SystemExit(f"{ref}: no train.py there; pass the folder of a reference YOLOv5 checkout")
    work = Path(tempfile.mkdtemp(prefix="bench_reference_"))
    data = absolute_data_yaml(Path(a.data), work / "data.yaml")
    env = {**os.environ}
    ref_env = {**env, "HF_HUB_OFFLINE": "1",
               # The reference's final strip calls torch.load() without weights_only, which torch >= 2.6
               # turns into a weights-only load that its own numpy-carrying checkpoints fail.
               "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    if a.pythonpath:
        ref_env["PYTHONPATH"] = os.pathsep.join(p for p in (a.pythonpath, env.get("PYTHONPATH", "")) if p)

    import torch
    machine = (f"{os.cpu_count()} CPUs ({platform.machine()}, {cpu_model()}), torch "
               f"{torch.__version__}, load average {os.getloadavg()[0]:.2f} at start")
    print(machine, flush=True)
    job = f"YOLOv5n from scratch, imgsz {a.imgsz}, batch {a.batch}, {a.workers} workers, {a.epochs} epochs"
    rows = []
    for variant in a.variants:
        t_ref, t_proj = [], []
        for i in range(a.pairs):
            rcmd = [a.python, str(ref / "train.py"),
                    *job_args(str(data), a.imgsz, a.batch, a.workers, a.epochs, str(work / "ref"), f"{variant}{i}")]
            pcmd = [a.python, str(ROOT / "train.py"), *VARIANT_FLAGS[variant],
                    *job_args(str(data), a.imgsz, a.batch, a.workers, a.epochs, str(work / "proj"), f"{variant}{i}")]
            t_ref.append(timed(rcmd, ref, ref_env, work / f"ref_{variant}{i}.log"))
            t_proj.append(timed(pcmd, ROOT, env, work / f"proj_{variant}{i}.log"))
            print(f"pair {i} ({variant}): reference {t_ref[-1]:.1f} s, project {t_proj[-1]:.1f} s, "
                  f"ratio {t_ref[-1] / t_proj[-1]:.3f}", flush=True)
        ratios = [r / p for r, p in zip(t_ref, t_proj)]
        line = (f"project {variant}: {statistics.median(t_proj):.1f} s per process (min {min(t_proj):.1f}, "
                f"max {max(t_proj):.1f}); reference {statistics.median(t_ref):.1f} s (min {min(t_ref):.1f}, "
                f"max {max(t_ref):.1f}); speed ratio project/reference {statistics.median(ratios):.2f}x "
                f"(median of {len(ratios)} interleaved pairs, range {min(ratios):.2f}-{max(ratios):.2f})")
        print(line, flush=True)
        rows.append(f"| {variant} (`{' '.join(VARIANT_FLAGS[variant]) or 'defaults'}`) | "
                    f"{statistics.median(t_proj):.1f} s | {statistics.median(t_ref):.1f} s | "
                    f"**{statistics.median(ratios):.2f}×** ({min(ratios):.2f}–{max(ratios):.2f}) |")
    out = Path(a.out) if a.out else experiment_dir("perf-reference") / "perf_reference.md"
    reproduce = ("python benchmarks/bench_reference.py --reference REF" + (" --pythonpath DEPS" if a.pythonpath else "")
                 + f" --variants {' '.join(a.variants)} --pairs {a.pairs} --epochs {a.epochs} --imgsz {a.imgsz}"
                 f" --batch {a.batch} --workers {a.workers}")
    body = [f"# Training time against the reference YOLOv5, side by side\n",
            f"Reproduce: `{reproduce}`\n", f"Machine: {machine}.\n", f"Job: {job}; whole processes, start-up and "
            "validation included, reference and project interleaved.\n",
            "| this project | project, median per process | reference, median per process | "
            "speed ratio (reference time / project time, median of pairs, range) |", "|---|---|---|---|", *rows, ""]
    setup_from = out if out.exists() else SETUP_DOC  # a new file takes the setup notes of the results page
    if setup_from.exists():
        setup = setup_from.read_text().split("## How the reference was set up", 1)
        if len(setup) == 2:
            section = setup[1].split("\n## ", 1)[0] if setup_from == SETUP_DOC else setup[1]
            body.append("## How the reference was set up" + section.rstrip() + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(body))
    print(f"written {out} (logs in {work})")
    remind_index(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
