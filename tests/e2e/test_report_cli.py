"""Reports of real runs: junit.xml against results.json, re-rendering, comparison, and
report.html opened in a real headless Chromium (no console errors, no network requests).

Two smoke runs are made once per module through the real CLI: one that passes and one
whose platform drops a leaf from every aggregate (``platform.faults.aggregation``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from tests.support import unavailable

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "scenarios" / "smoke.yaml"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def _bk_sim(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bk_sim.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=dict(os.environ),
    )


def _smoke(tmp: Path, *overrides: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    reports = tmp / "reports"
    args = ["run", str(SMOKE), "--set", f"report.dir={reports}"]
    for o in overrides:
        args += ["--set", o]
    proc = _bk_sim(*args, cwd=tmp, timeout=240)
    runs = sorted(reports.glob("*/results.json"))
    assert runs, proc.stdout + proc.stderr
    return proc, runs[-1].parent


@pytest.fixture(scope="module")
def passed_run(
    management: Any, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess[str], Path]:
    proc, run_dir = _smoke(tmp_path_factory.mktemp("passed"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, run_dir


@pytest.fixture(scope="module")
def failed_run(
    management: Any, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess[str], Path]:
    proc, run_dir = _smoke(
        tmp_path_factory.mktemp("failed"), "platform.faults.aggregation=drop_leaf"
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return proc, run_dir


def _junit_cases(run_dir: Path) -> tuple[ET.Element, list[ET.Element]]:
    root = ET.parse(run_dir / "junit.xml").getroot()
    suite = root.find("testsuite")
    assert suite is not None
    return suite, suite.findall("testcase")


def _assert_junit_matches_results(run_dir: Path) -> None:
    checks = json.loads((run_dir / "results.json").read_text())["checks"]
    suite, cases = _junit_cases(run_dir)
    assert [c.get("name") for c in cases] == [c["name"] for c in checks]
    for case, check in zip(cases, checks, strict=True):
        failure = case.find("failure")
        assert (failure is None) == check["passed"], check["name"]
        if failure is not None:
            assert failure.get("message") == check["message"]
    assert suite.get("tests") == str(len(checks))
    assert suite.get("failures") == str(sum(not c["passed"] for c in checks))


def test_passed_run_writes_junit_and_report(
    passed_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, run_dir = passed_run
    _assert_junit_matches_results(run_dir)
    page = (run_dir / "report.html").read_text()
    # The terminal and the page lead with the same verdict sentence.
    first = proc.stdout.splitlines()[0]
    assert first.startswith("PASSED  all ")
    sentence = first.removeprefix("PASSED  ")
    assert sentence[:1].upper() + sentence[1:] + "." in page
    assert "What failed" not in page
    assert page.count("<svg") >= 5


def test_failed_run_report_shows_failure_and_forensics_first(
    failed_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, run_dir = failed_run
    _assert_junit_matches_results(run_dir)
    _, cases = _junit_cases(run_dir)
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failed == ["round 1: aggregate correct", "round 2: aggregate correct"]
    page = (run_dir / "report.html").read_text()
    top = page[: page.index("Key figures")]
    assert "FAILED" in top and "2 of 5 checks failed; first: round 1: aggregate correct" in top
    assert "was dropped" in top and "<td class='no'>dropped</td>" in top
    assert proc.stdout.startswith("FAILED  2 of 5 checks failed")


def test_report_command_rerenders_and_compares(
    passed_run: tuple[subprocess.CompletedProcess[str], Path],
    failed_run: tuple[subprocess.CompletedProcess[str], Path],
    tmp_path: Path,
) -> None:
    _, base = passed_run
    _, run_dir = failed_run
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report.html", "junit.xml"))
    proc = _bk_sim("report", str(copy), "--compare", str(base), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (copy / "junit.xml").is_file()
    assert f"compared with {base.name}: " in proc.stdout
    assert "worse  failed checks: 0 -> 2" in proc.stdout
    page = (copy / "report.html").read_text()
    assert f"Compared with {base.name}" in page
    not_a_run = _bk_sim("report", str(tmp_path), cwd=tmp_path)
    assert not_a_run.returncode == 2
    assert not_a_run.stderr.strip() == f"bk-sim: {tmp_path}: not a run folder (no results.json)"


# ---------------------------------------------------------------- headless Chromium


def _chromium() -> str:
    """Chromium's path, installing Debian's package when missing; skip (fail under CI=true)
    if it cannot be."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            "apt-get update -qq && apt-get install -y -qq chromium",
            shell=True,
            capture_output=True,
            timeout=280,
        )
        found = shutil.which("chromium")
        if found:
            return found
    unavailable("chromium is not installed and `apt-get install chromium` did not work")


class _Page:
    """A page target over the Chrome DevTools protocol, recording requests and errors."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 0
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.loaded = False

    def _on(self, msg: dict[str, Any]) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(p["request"]["url"])
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            self.errors.append(f"console.{p['type']}: {p.get('args')}")
        elif method == "Runtime.exceptionThrown":
            self.errors.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            self.errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif method == "Network.loadingFailed":
            self.errors.append(f"loading failed: {p.get('errorText')}")
        elif method == "Page.loadEventFired":
            self.loaded = True

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv(timeout=deadline - time.monotonic()))
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return dict(msg.get("result", {}))
            self._on(msg)
        raise AssertionError(f"no answer to {method}")

    def open(self, url: str, settle_s: float = 0.7) -> None:
        """Navigate, wait for the load event, then listen a little longer for late requests."""
        self.requests, self.errors, self.loaded = [], [], False
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 30
        quiet_until = None
        while time.monotonic() < deadline:
            if self.loaded and quiet_until is None:
                quiet_until = time.monotonic() + settle_s
            if quiet_until is not None and time.monotonic() >= quiet_until:
                return
            try:
                self._on(json.loads(self.ws.recv(timeout=0.1)))
            except TimeoutError:
                continue
        raise AssertionError(f"{url} did not finish loading in 30 s")

    def eval(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return res["result"].get("value")


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[_Page]:
    chromium = _chromium()
    profile = tmp_path / "profile"
    proc = subprocess.Popen(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "--window-size=1280,2400",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.is_file() or not port_file.read_text().strip():
            assert proc.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.loads(r.read())
        url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
        with connect(url, max_size=None, open_timeout=10) as ws:
            page = _Page(ws)
            for domain in ("Page", "Network", "Runtime", "Log"):
                page.call(f"{domain}.enable")
            yield page
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_report_opens_in_chromium_without_errors_or_requests(
    browser_page: _Page,
    passed_run: tuple[subprocess.CompletedProcess[str], Path],
    failed_run: tuple[subprocess.CompletedProcess[str], Path],
    tmp_path: Path,
) -> None:
    # The detector itself: a page that fetches and logs an error must be caught.
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!doctype html><img src='http://127.0.0.1:9/x.png'><script>console.error('boom')</script>"
    )
    browser_page.open(bad.as_uri())
    assert "http://127.0.0.1:9/x.png" in browser_page.requests
    assert any("boom" in e for e in browser_page.errors)

    for (_, run_dir), verdict in ((passed_run, "PASSED"), (failed_run, "FAILED")):
        url = (run_dir / "report.html").resolve().as_uri()
        browser_page.open(url)
        assert browser_page.requests == [url], browser_page.requests
        assert browser_page.errors == []
        assert browser_page.eval("document.querySelector('header .badge').textContent") == verdict
        widths = browser_page.eval(
            "Array.from(document.querySelectorAll('.plot svg'))"
            ".map(s => s.getBoundingClientRect().width)"
        )
        assert len(widths) >= 5 and min(widths) > 300, widths
        # Nothing wider than the window: no horizontal scrolling.
        assert browser_page.eval("document.documentElement.scrollWidth") <= 1280


def test_report_screenshot(
    failed_run: tuple[subprocess.CompletedProcess[str], Path], tmp_path: Path
) -> None:
    chromium = _chromium()
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1280,2400",
            (failed_run[1] / "report.html").resolve().as_uri(),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert shot.is_file() and shot.stat().st_size > 50_000
    keep = os.environ.get("BK_SIM_REPORT_SCREENSHOT")
    if keep:  # for a person to look at: BK_SIM_REPORT_SCREENSHOT=/tmp/report.png pytest ...
        shutil.copy(shot, keep)
