"""A damaged ledger is refused, never mistaken for a new one: the fault matrix of issue 23.

Zero bytes, truncation at every page boundary, random bytes, another SQLite file, an edited row, an older copy put
back (rollback), a ledger missing where its anchor says one existed: each is refused with one line saying how to
restore it, and nothing is written. A lagging anchor (a kill between commit and anchor write) is not damage. A
schema-1 ledger (fedpriv before the chain) is migrated. ``fedpriv ledger reset`` is the one way to start again.
The region-level half (nothing trained) is in tests/adversary/test_ledger_faults.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3

import pytest

from fedpriv.cli import main
from fedpriv.privacy.ledger import LedgerDamaged, PrivacyLedger, Release, anchor_path, compact_history

DELTA = 1e-5


def rel(run_id="job-a", rnd=1, steps=18, q=0.05, sigma=1.1) -> Release:
    return Release(run_id=run_id, round=rnd, steps=steps, sample_rate=q, noise_multiplier=sigma,
                   max_grad_norm=1.0, delta=DELTA)


def make_ledger(path, rows: int):
    with PrivacyLedger(path) as led:
        for i in range(rows):
            led.record(rel(f"job-{i % 7}", i, steps=5 + i % 3))
    assert not path.with_name(path.name + "-wal").exists()  # closed: everything is in the main file
    return path


def assert_refused(path, *match: str):
    before = path.read_bytes() if path.exists() else None
    with pytest.raises(LedgerDamaged) as info:
        PrivacyLedger(path)
    text = str(info.value)
    assert "\n" not in text and "fedpriv ledger reset --ledger" in text and "restore" in text, text
    for m in match:
        assert m in text, text
    assert (path.read_bytes() if path.exists() else None) == before  # nothing written, nothing created
    return text


def test_zero_bytes_is_refused_not_a_new_ledger(tmp_path):
    path = make_ledger(tmp_path / "l.sqlite", 3)
    path.write_bytes(b"")
    assert_refused(path, "empty (0 bytes)")
    anchor_path(path).unlink()  # even without its anchor, 0 bytes is a truncated ledger
    assert_refused(path, "empty (0 bytes)")


def test_truncation_at_every_page_boundary_is_refused(tmp_path):
    good = make_ledger(tmp_path / "good.sqlite", 400)
    blob = good.read_bytes()
    conn = sqlite3.connect(good)
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    pages = len(blob) // page
    assert pages >= 4, pages
    for k in range(pages):  # 0 .. pages-1 whole pages kept
        path = tmp_path / f"t{k}" / "l.sqlite"
        path.parent.mkdir()
        path.write_bytes(blob[:k * page])
        shutil.copy(anchor_path(good), anchor_path(path))
        with pytest.raises(LedgerDamaged, match="fedpriv ledger reset"):
            PrivacyLedger(path)


def test_random_bytes_and_foreign_sqlite_files_are_refused(tmp_path):
    path = tmp_path / "l.sqlite"
    path.write_bytes(os.urandom(8192))
    assert_refused(path, "cannot open as a ledger")
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    assert_refused(other, "not a fedpriv privacy ledger")


def test_a_rolled_back_copy_is_refused(tmp_path):
    path = make_ledger(tmp_path / "l.sqlite", 3)
    old = path.read_bytes()
    with PrivacyLedger(path) as led:
        led.record(rel("job-x", 1))
        led.record(rel("job-x", 2))
    path.write_bytes(old)  # an older copy put back: two releases forgotten
    assert_refused(path, "holds 3 release(s) where its anchor recorded 5")


def test_an_edited_or_removed_row_breaks_the_chain(tmp_path):
    path = make_ledger(tmp_path / "l.sqlite", 4)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE releases SET noise_multiplier = 50.0 WHERE seq = 2")  # spent less, says the edit
    conn.commit()
    conn.close()
    assert_refused(path, "hash chain")
    path = make_ledger(tmp_path / "m.sqlite", 4)
    anchor_path(path).unlink()  # no anchor to compare with: the chain alone catches a removed row
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM releases WHERE seq = 2")
    conn.commit()
    conn.close()
    assert_refused(path, "hash chain")


def test_a_missing_ledger_with_its_anchor_is_refused_and_not_recreated(tmp_path):
    path = make_ledger(tmp_path / "l.sqlite", 2)
    path.unlink()
    assert_refused(path, "missing, but its anchor records a ledger of 2 release(s)")
    assert not path.exists()


def test_another_ledger_in_its_place_is_refused(tmp_path):
    path = make_ledger(tmp_path / "a" / "l.sqlite", 2)
    other = make_ledger(tmp_path / "b" / "l.sqlite", 2)
    shutil.copy(other, path)
    assert_refused(path, "another ledger than its anchor records")


def test_a_lagging_anchor_is_advanced_not_refused(tmp_path):
    path = make_ledger(tmp_path / "l.sqlite", 3)
    anchor = json.loads(anchor_path(path).read_text())
    with PrivacyLedger(path) as led:
        led.record(rel("job-x", 1))
    anchor_path(path).write_text(json.dumps(anchor))  # killed after the commit, before the anchor write
    with PrivacyLedger(path) as led:
        assert len(led) == 4
    assert json.loads(anchor_path(path).read_text())["rows"] == 4
    assert (anchor_path(path).stat().st_mode & 0o077) == 0


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE releases (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, round INTEGER NOT NULL CHECK (round >= 0),
    steps INTEGER NOT NULL CHECK (steps >= 1), sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier >= 0), max_grad_norm REAL NOT NULL CHECK (max_grad_norm > 0),
    delta REAL NOT NULL CHECK (delta > 0 AND delta < 1), accountant TEXT NOT NULL, created_at TEXT NOT NULL,
    UNIQUE (run_id, round));
INSERT INTO meta VALUES ('schema_version', '1');
"""


def test_a_schema_1_ledger_is_migrated_keeping_every_release(tmp_path):
    path = tmp_path / "l.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    rows = [("job-a/1", 1, 18, 0.05, 1.1), ("job-a/1", 2, 18, 0.05, 1.1), ("job-a/2", 2, 18, 0.05, 1.1)]
    for run_id, rnd, steps, q, sigma in rows:
        conn.execute("INSERT INTO releases (run_id, round, steps, sample_rate, noise_multiplier, max_grad_norm, delta, "
                     "accountant, created_at) VALUES (?, ?, ?, ?, ?, 1.0, 1e-5, 'rdp', '2026-01-01T00:00:00')",
                     (run_id, rnd, steps, q, sigma))
    conn.commit()
    conn.close()
    with PrivacyLedger(path) as led:
        assert [(r.run_id, r.round, r.job) for r in led.releases()] == [("job-a/1", 1, "job-a"), ("job-a/1", 2, "job-a"),
                                                                         ("job-a/2", 2, "job-a")]
        assert led.release_of("job-a", 2).run_id == "job-a/1"  # a (job, round) released twice by the old key
        assert led.epsilon(DELTA) > 0 and not math.isinf(led.epsilon(DELTA))
        eps = led.epsilon(DELTA)
    assert json.loads(anchor_path(path).read_text())["rows"] == 3
    with PrivacyLedger(path) as led:  # migrated once; now checked like any ledger
        assert led.epsilon(DELTA) == eps and len(compact_history(led.history())) == 1


def test_ledger_reset_needs_the_region_name_and_starts_a_new_ledger(tmp_path, capsys, monkeypatch):
    path = make_ledger(tmp_path / "l.sqlite", 2)
    path.write_bytes(b"")
    monkeypatch.setattr("sys.stdin.isatty", lambda: False, raising=False)
    assert main(["ledger", "reset", "--ledger", str(path), "--region", "us-east"]) == 2
    assert "--yes" in capsys.readouterr().err and path.exists()
    monkeypatch.setattr("sys.stdin.isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda prompt: "eu-west")
    assert main(["ledger", "reset", "--ledger", str(path), "--region", "us-east"]) == 2
    assert "not the region's name" in capsys.readouterr().err and path.exists()
    monkeypatch.setattr("builtins.input", lambda prompt: "us-east")
    assert main(["ledger", "reset", "--ledger", str(path), "--region", "us-east"]) == 0
    assert not path.exists() and not anchor_path(path).exists()
    with PrivacyLedger(path) as led:
        assert len(led) == 0


def test_ledger_show_checks_and_lists(tmp_path, capsys):
    path = make_ledger(tmp_path / "l.sqlite", 3)
    assert main(["ledger", "show", "--ledger", str(path), "--accountant", "rdp"]) == 0
    out = capsys.readouterr().out
    assert "3 release(s)" in out and "job job-0: rounds 0" in out and "ε over the whole ledger" in out
    with PrivacyLedger(path) as led:
        assert f"{led.epsilon(DELTA, 'rdp'):.4g}" in out
    path.write_bytes(b"")
    assert main(["ledger", "show", "--ledger", str(path)]) == 2
    assert "empty (0 bytes)" in capsys.readouterr().err
    assert main(["ledger", "show", "--ledger", str(tmp_path / "none.sqlite")]) == 2
    assert not (tmp_path / "none.sqlite").exists()  # show never creates a ledger
