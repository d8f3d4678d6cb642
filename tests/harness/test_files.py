"""Atomic writes: readers see the old file or the whole new one."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from buzz_lm_eval.harness import files


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


def test_write_atomic_fsyncs_the_data_before_the_rename_and_the_folder_after(tmp_path: Path, monkeypatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = files.os.fsync, files.os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    files.write_atomic(tmp_path / "result.json", "data")
    assert events == ["fsync file", "rename", "fsync folder"]


def test_stale_temporaries_of_interrupted_writes_are_removed(tmp_path: Path) -> None:
    """A killed writer's temp file goes on the next write; a fresh one or one a live writer holds stays."""
    fcntl = pytest.importorskip("fcntl")
    stale, fresh, held = (tmp_path / f".results_{n}.json.{n:_<5}x7z.tmp" for n in ("old", "new", "held"))
    other = tmp_path / ".mine.tmp"  # not a name write_atomic makes
    for path in (stale, fresh, held, other):
        path.write_text("partial", encoding="utf-8")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(held, (hour_ago, hour_ago))
    os.utime(other, (hour_ago, hour_ago))
    with open(held, "rb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # a writer still busy with it
        files.write_atomic(tmp_path / "leaderboard.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, held.name, other.name, "leaderboard.json"])


def test_an_unwritable_folder_names_the_output_not_a_temporary(tmp_path: Path, monkeypatch) -> None:
    def denied(suffix="", prefix="", dir=None, **_):  # what a read-only folder gives mkstemp
        raise PermissionError(13, "Permission denied", os.path.join(dir, f"{prefix}abc{suffix}"))

    monkeypatch.setattr(files.tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError) as caught:
        files.write_atomic(tmp_path / "out" / "result.json", "data")
    assert caught.value.errno == 13
    assert str(caught.value) == f"[Errno 13] cannot write result.json into folder {tmp_path / 'out'}: Permission denied"
