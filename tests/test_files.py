"""Atomic writes: readers see the old file or the whole new one."""

from __future__ import annotations

from pathlib import Path

import pytest

from buzz_lm_eval import files


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "result.json"
    files.write_atomic(target, "new")
    files.write_atomic(target, b"newer")
    assert target.read_text(encoding="utf-8") == "newer"
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]


def test_write_atomic_keeps_the_old_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "result.json"
    target.write_text("old", encoding="utf-8")

    def fail(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError):
        files.write_atomic(target, "new")
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
