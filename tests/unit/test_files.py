"""atomic_write: whole files only, secrets never readable by others, nothing left behind."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from bk_sim.files import SECRET_MODE, atomic_write


def test_writes_bytes_and_text_and_creates_the_folder(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "results.json"
    assert atomic_write(target, "{}\n") == target
    assert target.read_text() == "{}\n"
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert list(target.parent.iterdir()) == [target]


def test_a_secret_is_owner_only_even_over_an_open_file(tmp_path: Path) -> None:
    target = tmp_path / "leaves.json"
    target.write_text("old")
    target.chmod(0o644)
    atomic_write(target, "token", mode=SECRET_MODE)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_text() == "token"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    target.write_text("old page")

    class Boom(str):
        def encode(self, *args: object, **kwargs: object) -> bytes:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, Boom("new page"))
    assert target.read_text() == "old page"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
