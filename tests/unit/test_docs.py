"""The README and docs/ stay short, self-contained and current.

A user has only this repository: every relative link must resolve inside it, nothing may
point at files outside it, and the scenario key reference must be what the schema
generates now. ``BK_SIM_UPDATE_DOCS=1`` rewrites that generated reference instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from bk_sim.scenario import scenario_schema_doc

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SCENARIOS_DOC = ROOT / "docs" / "scenarios.md"
README_MAX_BYTES = 12_288

# Docs other helpers write on their branches; the coordinator removes this allowance once
# they are merged, so a link to a doc that never arrived fails.
BEGIN = "<!-- BEGIN GENERATED: bk-sim scenario schema -->\n"
END = "<!-- END GENERATED: bk-sim scenario schema -->\n"

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
_CODE_SPAN = re.compile(r"`+[^`\n]*`+")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
# Files that exist only outside the repository (the project's private background papers).
_OUTSIDE = re.compile(
    r"\.\./shared|/work/|\b(?:PROTOCOL|DESIGN|PERFORMANCE|STYLE|FEDERATED-ANALYTICS)\.md\b"
)


def _docs() -> list[Path]:
    """The README, every page in docs/, and the run-folder guide the README links to."""
    return [README, ROOT / "reports" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose(text: str) -> str:
    """The text with fenced code blocks and code spans removed (links there are not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _targets(text: str) -> list[str]:
    prose = _prose(text)
    return _LINK.findall(prose) + _REF_DEF.findall(prose)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in _HEADING.findall(_FENCE.sub("", path.read_text()))}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_readme_is_at_most_12_kib() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size:,} bytes, over {README_MAX_BYTES:,}: move detail into docs/"
    )


def test_readme_carries_the_exact_test_command_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = next(line for line in ci if line.startswith("python3 -m venv .venv"))
    assert command in README.read_text().splitlines(), (
        f".ci/run runs {command!r}, which README.md no longer shows byte for byte"
    )


@pytest.mark.parametrize("doc", _docs(), ids=_rel)
def test_every_relative_link_resolves_inside_the_repository(doc: Path) -> None:
    problems = []
    for target in _targets(doc.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:...
            if target.lower().startswith("file:"):
                problems.append(f"{target}: a file URL")
            continue
        path_part, _, fragment = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        if path_part.startswith("/") or not dest.is_relative_to(ROOT):
            problems.append(f"{target}: outside the repository")
            continue
        rel = _rel(dest)
        if not dest.exists():
            problems.append(f"{target}: {rel} does not exist")
            continue
        if fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            problems.append(f"{target}: no heading #{fragment} in {rel}")
    assert not problems, f"{_rel(doc)}: " + "; ".join(problems)


@pytest.mark.parametrize("doc", _docs(), ids=_rel)
def test_no_doc_points_outside_the_repository(doc: Path) -> None:
    hits = sorted({m.group(0) for m in _OUTSIDE.finditer(doc.read_text())})
    assert not hits, f"{_rel(doc)} refers to files a user does not have: {hits}"


def test_the_link_checker_catches_what_it_must() -> None:
    """Guard the checker itself: a broken, an escaping and a code-span link."""
    text = "[a](docs/nope.md) [b](../shared/PROTOCOL.md) `[c](x.md)`\n```\n[d](y.md)\n```\n"
    assert _targets(text) == ["docs/nope.md", "../shared/PROTOCOL.md"]
    assert _slug("How a run is judged") == "how-a-run-is-judged"
    assert _slug("Chaos (`bk-sim chaos`)") == "chaos-bk-sim-chaos"


def test_scenario_reference_is_what_the_schema_generates() -> None:
    text = SCENARIOS_DOC.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "markers missing in docs/scenarios.md"
    head, rest = text.split(BEGIN)
    current, tail = rest.split(END)
    wanted = scenario_schema_doc()
    if current != wanted and os.environ.get("BK_SIM_UPDATE_DOCS") == "1":
        SCENARIOS_DOC.write_text(head + BEGIN + wanted + END + tail)
        current = wanted
    assert current == wanted, (
        "docs/scenarios.md is stale: regenerate it with "
        "`BK_SIM_UPDATE_DOCS=1 .venv/bin/python -m pytest -q tests/unit/test_docs.py -k scenario`"
    )
