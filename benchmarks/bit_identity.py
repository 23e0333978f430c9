"""Fingerprints of three fixed-seed distillation runs, to show a restructuring changed no number.

    python benchmarks/bit_identity.py                       # this checkout
    python benchmarks/bit_identity.py --repo /tmp/old-tree  # another checkout (e.g. a git worktree of main)

Runs, each 2 epochs on the shapes16 pair at 160 px, seed 0, one thread, workers 0:
  plain-kd  the default output distillation;
  pkd       the same with --feat_kd pkd --feat_ratio 0.02;
  pseudo    200 labelled images + the other 800 as 'unlabeled:', --pseudo_conf 0.5.
Prints, per run, the SHA-256 of results.csv and of the EMA weights in last.pt (every tensor's bytes, in
state_dict order). Equal hashes before and after a change mean the change kept every number.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
COMMON = ["--weights", "checkpoint/yolov5n-shapes16.pt", "--t_weights", "checkpoint/yolov5s-shapes16.pt",
          "--hyp", "hyp.finetune.yaml", "--imgsz", "160", "--epochs", "2", "--seed", "0", "--workers", "0",
          "--noplots", "--exist-ok"]
RUNS = {"plain-kd": [], "pkd": ["--feat_kd", "pkd", "--feat_ratio", "0.02"], "pseudo": ["--pseudo_conf", "0.5"]}
# weights only: the project's own loader, so this script trusts nothing it would not
WEIGHTS_HASH = ("import hashlib, sys\n"
                "from utils.training.checkpoint import torch_load\n"
                "h = hashlib.sha256()\n"
                "for k, v in torch_load(sys.argv[1])['model'].state_dict().items():\n"
                "    h.update(k.encode()); h.update(v.contiguous().cpu().numpy().tobytes())\n"
                "print(h.hexdigest())\n")


def split_yaml(repo: Path, out: Path) -> Path:
    """shapes16 with its first 200 training images labelled and the other 800 listed as 'unlabeled:'."""
    root = (repo / "datasets" / "shapes16").resolve()
    images = sorted((root / "images" / "train").glob("*.png")) or sorted((root / "images" / "train").glob("*.jpg"))
    if len(images) < 1000:
        raise SystemExit(f"ERROR: {root} holds {len(images)} training images; run plain-kd first to generate it")
    out.mkdir(parents=True, exist_ok=True)
    (out / "labelled.txt").write_text("".join(f"{p}\n" for p in images[:200]))
    (out / "unlabeled.txt").write_text("".join(f"{p}\n" for p in images[200:]))
    names = "\n".join(f"  {i}: c{i}" for i in range(16))
    y = out / "split.yaml"
    y.write_text(f"path: {root}\ntrain: {out / 'labelled.txt'}\nval: images/val\n"
                 f"unlabeled: {out / 'unlabeled.txt'}\nnames:\n{names}\n")
    return y


def run(repo: Path, project: Path, name: str, data: str, extra: list[str]) -> tuple[str, str]:
    """Train one run in `repo` and return (results.csv hash, EMA weights hash)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "train.py", "--data", data, *COMMON, *extra, "--project", str(project), "--name", name]
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"ERROR: {name} failed:\n{r.stderr[-2000:]}")
    run_dir = project / name
    csv = hashlib.sha256((run_dir / "results.csv").read_bytes()).hexdigest()
    w = subprocess.run([sys.executable, "-c", WEIGHTS_HASH, str(run_dir / "weights" / "last.pt")], cwd=repo,
                       env=env, capture_output=True, text=True, check=True).stdout.strip()
    return csv, w


def main() -> int:
    """Train the three runs and print their hashes."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=HERE, help="the checkout to run (default: this one)")
    p.add_argument("--project", type=Path, default=None, help="run folder (default: <repo>/runs/bit_identity)")
    p.add_argument("--only", nargs="*", choices=list(RUNS), default=list(RUNS))
    a = p.parse_args()
    repo = a.repo.resolve()
    project = (a.project or repo / "runs" / "bit_identity").resolve()
    print(f"repo {repo}  commit {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=repo, text=True, capture_output=True).stdout.strip()}")
    print(f"{'run':10s} {'results.csv sha256':64s}  {'EMA weights sha256':64s}")
    for name in a.only:
        data = "shapes16.yaml" if name != "pseudo" else str(split_yaml(repo, project / "split"))
        csv, w = run(repo, project, name, data, RUNS[name])
        print(f"{name:10s} {csv}  {w}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
