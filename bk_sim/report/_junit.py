"""``junit.xml``: one test case per check in ``results.json``, so CI shows failures by name.

Checks are grouped by the text before their first colon ("round 1", "notifications",
"chaos"...) into the case's ``classname``; the case's ``name`` is the whole check name, so
it stays unique and greppable. Built with ``xml.etree``: every string is escaped there.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bk_sim.files import atomic_write

# XML 1.0 forbids most control characters even when escaped; drop them.
_BAD_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _clean(text: Any) -> str:
    return _BAD_XML.sub("?", str(text if text is not None else ""))


def junit_tree(results: Mapping[str, Any]) -> ET.ElementTree:
    """The JUnit document for a run's checks (one ``testsuite`` in a ``testsuites``)."""
    scenario = (results.get("scenario") or {}).get("name") or "run"
    run = results.get("run") or {}
    checks = list(results.get("checks") or [])
    failures = sum(1 for c in checks if not c.get("passed"))
    duration = float(run.get("duration_s") or 0.0)
    attrs = {
        "name": _clean(f"bk-sim {scenario}"),
        "tests": str(len(checks)),
        "failures": str(failures),
        "errors": "0",
        "skipped": "0",
        "time": f"{duration:.3f}",
    }
    root = ET.Element("testsuites", attrs)
    suite = ET.SubElement(root, "testsuite", dict(attrs))
    if run.get("started_at"):
        suite.set("timestamp", _clean(run["started_at"]))
    props = ET.SubElement(suite, "properties")
    for key, value in (
        ("run_dir", run.get("dir")),
        ("verdict", results.get("verdict")),
        ("exit_code", results.get("exit_code")),
        ("scenario_source", (results.get("scenario") or {}).get("source")),
    ):
        if value is not None:
            ET.SubElement(props, "property", {"name": key, "value": _clean(value)})
    for c in checks:
        name = _clean(c.get("name") or "unnamed check")
        group = name.split(":", 1)[0].strip() if ":" in name else "run"
        case = ET.SubElement(
            suite,
            "testcase",
            {"classname": _clean(f"bk-sim.{scenario}.{group}"), "name": name, "time": "0"},
        )
        message = _clean(c.get("message") or "")
        if not c.get("passed"):
            fail = ET.SubElement(
                case, "failure", {"message": message or "check failed", "type": "CheckFailed"}
            )
            fail.text = message or "check failed"
        elif message:
            out = ET.SubElement(case, "system-out")
            out.text = message
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(results: Mapping[str, Any], path: Path) -> Path:
    """Write ``junit.xml`` atomically (a reader never sees half a file)."""
    root = junit_tree(results).getroot()
    assert root is not None  # junit_tree always builds a root
    atomic_write(path, ET.tostring(root, encoding="utf-8", xml_declaration=True))
    return path
