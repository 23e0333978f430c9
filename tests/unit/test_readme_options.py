"""The README stays a short user's document whose figures match the code, and the docs stay linked.

- the distillation options table states each default as train.py's parser and the default hyp yaml have it;
- the README is at most 300 lines and its Quickstart block holds exactly two commands;
- every relative link in README.md and docs/ resolves (file and, for markdown targets, #anchor), and every
  file under docs/ is reachable by links from the README.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

from optimizer.config import SETTINGS

# every distillation setting must be in the table: the list comes from the settings table, so it cannot drift
KD_DESTS = {st.name for st in SETTINGS}


def _section(text: str, heading: str) -> str:
    """The body of the '## heading' section (up to the next '## ')."""
    m = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, f"README has no '## {heading}' section"
    return m.group(1)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_options_table(text: str) -> dict[str, dict[str, str | None]]:
    """{dest: {'flag', 'hyp', 'default'}} from the first table of the README's distillation options."""
    body = _section(text, "Distillation options")
    rows = [ln for ln in body.splitlines() if ln.startswith("|")]
    header = [c.lower() for c in _cells(rows[0])]
    col = {name: header.index(name) for name in ("flag", "hyp key", "default")}
    out = {}
    for ln in rows[2:]:
        c = _cells(ln)
        flag = re.match(r"`(--[\w-]+)", c[col["flag"]])
        assert flag, f"no flag in options row: {ln}"
        hyp = re.match(r"`(\w+)`", c[col["hyp key"]])
        default = re.fullmatch(r"`([^`]*)`", c[col["default"]])
        assert default, f"the default of {flag.group(1)} must be one code span: {c[col['default']]!r}"
        out[flag.group(1).lstrip("-").replace("-", "_")] = {
            "flag": flag.group(1), "hyp": hyp.group(1) if hyp else None, "default": default.group(1)}
    return out


def _same(stated: str, actual) -> bool:
    if actual is None:
        return stated.lower() == "none"
    if isinstance(actual, bool):
        return stated.lower() == str(actual).lower()
    if isinstance(actual, (int, float)):
        try:
            return float(stated) == float(actual)
        except ValueError:
            return False
    return stated == str(actual)


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def table(readme) -> dict:
    return parse_options_table(readme)


def test_readme_at_most_300_lines(readme):
    n = len(readme.splitlines())
    assert n <= 300, f"README.md has {n} lines; move detail to docs/ (limit 300)"


def test_quickstart_has_exactly_two_commands(readme):
    body = _section(readme, "Quickstart")
    blocks = re.findall(r"^```\w*\n(.*?)^```", body, flags=re.M | re.S)
    assert blocks, "the Quickstart has no code block"
    commands = [ln for ln in blocks[0].splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(commands) == 2, commands
    assert commands[1] == "python -m pytest tests"
    assert "train.py" in commands[0] and "--t_weights" in commands[0]
    assert re.search(r"^ {4}Summary: student mAP50-95 ", body, flags=re.M), "the expected Summary line is missing"


def missing_settings(table: dict) -> list[str]:
    """The settings-table rows the README's options table lacks, or lists with the wrong flag or hyp key."""
    out = []
    for st in SETTINGS:
        row = table.get(st.name)
        if row is None or row["flag"] != st.option or (row["hyp"] == st.name) != st.hyp:
            out.append(st.name)
    return out


def test_options_table_lists_every_distillation_setting(table):
    assert not missing_settings(table), f"README options table: missing or wrong rows {missing_settings(table)}"


def test_a_setting_missing_from_the_readme_table_fails(readme):
    """Drop one row (pseudo_weight) from the README text: the check must name it."""
    cut = re.sub(r"^\| `--pseudo_weight [^\n]*\n", "", readme, flags=re.M)
    assert cut != readme
    assert missing_settings(parse_options_table(cut)) == ["pseudo_weight"]


def test_options_table_defaults_match_the_parser(table):
    import train

    defaults = vars(train.parse_opt([]))
    for dest, row in table.items():
        assert dest in defaults, f"{row['flag']} is in the README but not a train.py flag"
        assert _same(row["default"], defaults[dest]), (
            f"README says {row['flag']} defaults to {row['default']!r}; train.py's parser has {defaults[dest]!r}")


def test_options_table_hyp_keys_match_the_default_hyp(table):
    import train

    hyp_file = Path(getattr(train, "DEFAULT_HYP", ROOT / "data/hyps/hyp.scratch-low.yaml"))
    hyp = yaml.safe_load(hyp_file.read_text())
    rows = {d: r for d, r in table.items() if r["hyp"]}
    assert rows, "no row of the options table names a hyp key"
    for row in rows.values():
        assert row["hyp"] in hyp, f"{row['hyp']} (README) is not a key of {hyp_file.name}"
        assert _same(row["default"], hyp[row["hyp"]]), (
            f"README says {row['hyp']} defaults to {row['default']!r}; {hyp_file.name} has {hyp[row['hyp']]!r}")


def test_table_parser_catches_a_wrong_default(readme):
    """The check above must fail when a stated default is wrong (here: dist_norm written as 'weighted')."""
    import train

    wrong = re.sub(r"(\| `--dist_norm [^|]*\|[^|]*\| )`iou`", r"\1`weighted`", readme)
    assert wrong != readme
    stated = parse_options_table(wrong)["dist_norm"]["default"]
    assert not _same(stated, vars(train.parse_opt([]))["dist_norm"])


# ---------------------------------------------------------------- links in README.md and docs/

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _md_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _strip_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    s = re.sub(r"[`*_]", lambda m: "_" if m.group(0) == "_" else "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    seen: dict[str, int] = {}
    out = set()
    for h in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M):
        s = _slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def _links(path: Path) -> list[tuple[str, Path | None, str]]:
    """(raw target, resolved file or None for same-file, anchor) of every relative link in path."""
    out = []
    for target in LINK.findall(_strip_code(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):
            continue  # http:, https:, mailto:
        file, _, anchor = target.partition("#")
        out.append((target, (path.parent / file).resolve() if file else None, anchor))
    return out


def test_every_relative_link_resolves():
    broken = []
    for md in _md_files():
        for target, file, anchor in _links(md):
            dest = file or md
            if not dest.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_doc_is_reachable_from_the_readme():
    seen, todo = set(), [README.resolve()]
    while todo:
        md = todo.pop()
        if md in seen:
            continue
        seen.add(md)
        for _, file, _ in _links(md):
            if file is None or not file.exists():
                continue
            if file.is_dir():
                file = file / "README.md"
            if file.suffix == ".md" and file.is_relative_to(ROOT) and file.exists():
                todo.append(file)
            else:
                seen.add(file)
    orphans = [str(p.relative_to(ROOT)) for p in sorted(DOCS.rglob("*")) if p.is_file() and p.resolve() not in seen]
    assert not orphans, "files under docs/ linked from nowhere:\n" + "\n".join(orphans)
