"""Where benchmark scripts write by default: a dated folder under docs/experiments/, indexed by hand."""
from __future__ import annotations

import datetime
import shlex
from collections.abc import Sequence
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "docs" / "experiments"


def experiment_dir(name: str) -> Path:
    """docs/experiments/<today>-<name>, the default home of a run's files (underscores become dashes)."""
    return EXPERIMENTS / f"{datetime.date.today().isoformat()}-{name.replace('_', '-')}"


def remind_index(path: Path) -> None:
    """One line asking for the index row when a run's folder (or a file in it) lies under docs/experiments/."""
    folder = (path if not path.suffix else path.parent).resolve()
    if EXPERIMENTS in folder.parents:
        print(f"add a row for {folder.relative_to(EXPERIMENTS)} to docs/experiments/index.md")


def write_report(out: Path, title: str, script: str, args: Sequence[str], lines: Sequence[str]) -> None:
    """Write a run's markdown (title, the command that reproduces it, its lines), print the lines, and remind
    about the index row."""
    cmd = " ".join(["python", f"benchmarks/{script}", *(shlex.quote(x) for x in args)])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {title}\n\nReproduce: `{cmd}`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten {out}")
    remind_index(out.parent)
