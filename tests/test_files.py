"""fedpriv.core.files: the one atomic writer (reports, checkpoints, shards, caches, Flower configs)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fedpriv.core.files import atomic_open, atomic_write_bytes, atomic_write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as fh:
            fh.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_writes_replace_the_target_and_create_its_folder(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "model.safetensors"
    atomic_write_bytes(target, b"\x00\x01")
    atomic_write_bytes(target, b"\x02")
    assert target.read_bytes() == b"\x02"
    assert [p.name for p in target.parent.iterdir()] == ["model.safetensors"]


def test_file_mode_is_set_before_the_content_lands(tmp_path: Path) -> None:
    import os

    with atomic_open(tmp_path / "secret.key", file_mode=0o600) as fh:
        assert stat.S_IMODE(os.fstat(fh.fileno()).st_mode) == 0o600  # before a byte is written
        fh.write("key")
    target = atomic_write_text(tmp_path / "secret.key", "key", file_mode=0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_new_file_gets_the_mode_open_would_give_and_a_rewrite_keeps_the_old_mode(tmp_path: Path) -> None:
    """A report must be readable by whoever the operator's umask lets read it, as before the one writer: the
    temporary file's 0600 must not leak onto the target (it did: reports became owner-only)."""
    import os

    old = os.umask(0o022)
    try:
        report = atomic_write_text(tmp_path / "privacy_report.json", "{}")
        assert stat.S_IMODE(report.stat().st_mode) == 0o644
        os.umask(0o077)
        assert stat.S_IMODE(atomic_write_text(tmp_path / "private.md", "x").stat().st_mode) == 0o600
        report.chmod(0o640)  # an operator's choice survives the next round's rewrite
        atomic_write_text(report, '{"round": 2}')
        assert stat.S_IMODE(report.stat().st_mode) == 0o640
        assert stat.S_IMODE(atomic_write_text(report, "{}", file_mode=0o600).stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_only_write_modes_are_accepted(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'a'"):
        with atomic_open(tmp_path / "x", "a"):
            pass
