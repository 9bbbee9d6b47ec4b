"""Durable per-region privacy ledger: every DP release of a region's data, across all runs.

A region's privacy budget is about its *data*, not about one run: two runs that each
spend ε = 4 on the same records have spent (roughly) ε = 8 on them. The ledger is
therefore a file kept next to the region's data (see :func:`default_ledger_path`),
holding one row per DP release — one round's model update that left the region —
and ε is always recomputed from the whole ledger with the region's accountant.

Storage
    SQLite in WAL mode with ``synchronous=FULL``: a row is written in one transaction,
    and once :meth:`PrivacyLedger.record` returns, the row survives a kill -9 of the
    process (and, as far as the filesystem honours fsync, a power loss). A crash in
    the middle of a write leaves either the whole row or nothing. A new ledger is
    built in a temporary file and linked into place complete, so a file at the
    ledger's path is always a whole ledger.

Damage is refused, never mistaken for a fresh start (:class:`LedgerDamaged`)
    A lost or shrunken ledger would let a region spend its budget again, so every open
    checks, and refuses to go on when any check fails:

    * the file exists where its anchor says a ledger existed, and is not empty (SQLite
      would open 0 bytes as a new, empty database);
    * SQLite's ``PRAGMA integrity_check`` is ``ok`` and ``meta.format`` names this format
      (a random file, another SQLite database, a truncated one);
    * every row's ``chain`` is ``sha256(previous chain, row)``, from a genesis value bound
      to the ledger's random ``ledger_id`` — a row edited, removed or reordered breaks it;
    * the **anchor** ``<ledger>.anchor`` (JSON: ledger id, row count, chain head), which the
      region rewrites atomically after each committed write, is a prefix of the ledger: a
      ledger with fewer rows, another chain or another id — an older copy put back, a
      truncated file that still parses — is refused. The anchor may lag the ledger (a kill
      between commit and anchor write); it is advanced on the next open. A ledger whose
      anchor is gone gets a new one (the anchor guards against losing the *ledger*). An ``flock`` on
      ``<ledger>.lock`` orders opening (ledger read, then anchor) against anchor writes of other processes.

    Restore the newest copy of the ledger (its anchor stays), or start a new ledger on
    purpose with ``fedpriv ledger reset --ledger PATH`` (asks for the region's name).

Keys: one release per (job, round)
    A row's ``run_id`` is the job id (older ledgers: ``<job-id>/<attempt>``; :attr:`Release.job`
    reads both), with the Flower run that made it in ``attempt``. A job's round is released once:
    :meth:`reserve` with ``new_only`` refuses a second release of a (job, round) in the same write
    transaction as the insert. Its ``digest`` names the released update the region stored
    (``client/release_store.py``), so a retry of the round (resume, a lost reply) is answered with
    that same release at no new ε. Recording the same release again through :meth:`record` is a
    no-op; a *different* one under an existing key raises :class:`LedgerConflict`.

When to record — the enforcement protocol
    The DP cost is incurred when an update *leaves the region*, not when training
    finishes. A client must therefore:

    1. train locally (nothing has left the region yet);
    2. call :meth:`PrivacyLedger.reserve` (atomic check-and-record in one write
       transaction: lifetime cap *and* the job's ceiling, with the region's accountant)
       *before* sending the update; if the decision is ``allowed=False``, do not send;
    3. only then send the update.

    A kill -9 between 2 and 3 leaves a recorded release that never left the region:
    ε is over-counted, which is safe. A kill -9 before 2 loses nothing that was
    released. The opposite order (send, then record) would under-count on a crash,
    which is the failure a privacy ledger must never have.

What a decision says
    :attr:`BudgetDecision.reason` is what the region may send: the rule and the job's own
    numbers (public: a function of the mechanism the coordinator asked for) and the policy's
    caps, never the ε of the whole ledger or how many releases it holds (that reveals other
    jobs); :attr:`BudgetDecision.detail` has those, for the region's own log.

Migration
    A schema-1 ledger (fedpriv before the chain) is migrated on first open, in one write
    transaction: columns ``job_id``, ``attempt``, ``digest``, ``chain`` added, the format id,
    a ledger id and the chain written; then its anchor is created. Its rows keep their keys.

Deltas
    Each row stores the δ its run targeted, for the record. ε is always computed at
    the δ the caller asks for (:meth:`epsilon`), over all rows; mixing runs with
    different δ is fine because the accountant composes the mechanisms, not the
    (ε, δ) pairs.

Non-private releases (``noise_multiplier == 0``) are allowed in the ledger and make
ε infinite from then on — honest bookkeeping for a run with DP switched off.

This module imports Opacus lazily (only to compute ε), so opening and recording is
cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import secrets
import sqlite3
import threading
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

from fedpriv.core.errors import DataError, FedprivError
from fedpriv.core.files import atomic_write_text
from fedpriv.privacy.accountant import ACCOUNTANTS, epsilon_of
from fedpriv.privacy.accountant import compact as compact_history  # the one merge rule, under its ledger name

__all__ = [
    "ACCOUNTANTS",
    "FORMAT_ID",
    "LEDGER_FILENAME",
    "BudgetDecision",
    "LedgerConflict",
    "LedgerDamaged",
    "PrivacyLedger",
    "Release",
    "anchor_path",
    "compact_history",
    "default_ledger_path",
    "epsilon_of_history",
    "reset_ledger",
]

SCHEMA_VERSION = 2
FORMAT_ID = "fedpriv-privacy-ledger"
LEDGER_FILENAME = "privacy_ledger.sqlite"
ANCHOR_SUFFIX = ".anchor"

History = list[tuple[float, float, int]]
"""Opacus-style accountant history: ``[(noise_multiplier, sample_rate, steps), ...]``."""


class LedgerConflict(FedprivError):
    """A different release is already recorded under the same ``(run_id, round)``."""


class LedgerDamaged(DataError):
    """The ledger is missing where one existed, empty, truncated, not a fedpriv ledger, or older than its anchor."""


@dataclass(frozen=True)
class Release:
    """One DP release: the update a region sent for one round of one job."""

    run_id: str
    round: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str = "rdp"
    created_at: str | None = None
    """ISO-8601 UTC time the row was written; filled in by :meth:`PrivacyLedger.record`."""
    attempt: str = ""
    """The Flower run (attempt) of the job that made the release, for the record."""
    digest: str = ""
    """sha256 of the released update the region stored for reuse on a retry ("" = not stored)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_id", str(self.run_id))
        if not self.run_id:
            raise ValueError("Release.run_id must be a non-empty string")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise ValueError(f"Release.round = {self.round!r}: expected an integer >= 0")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"Release.steps = {self.steps!r}: expected an integer >= 1")
        if not 0.0 < float(self.sample_rate) <= 1.0:
            raise ValueError(f"Release.sample_rate = {self.sample_rate!r}: expected a probability in (0, 1]")
        if not float(self.noise_multiplier) >= 0.0 or math.isinf(self.noise_multiplier):
            raise ValueError(
                f"Release.noise_multiplier = {self.noise_multiplier!r}: expected a finite number >= 0 "
                "(0 means a non-private release)"
            )
        if not float(self.max_grad_norm) > 0.0:
            raise ValueError(f"Release.max_grad_norm = {self.max_grad_norm!r}: expected a clipping norm > 0")
        if not 0.0 < float(self.delta) < 1.0:
            raise ValueError(f"Release.delta = {self.delta!r}: expected a probability in (0, 1)")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"Release.accountant = {self.accountant!r}: expected one of {', '.join(ACCOUNTANTS)}")
        for name in ("sample_rate", "noise_multiplier", "max_grad_norm", "delta"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "attempt", str(self.attempt or ""))
        object.__setattr__(self, "digest", str(self.digest or ""))

    @property
    def key(self) -> tuple[str, int]:
        return (self.run_id, self.round)

    @property
    def job(self) -> str:
        """The job this release belongs to (``run_id`` up to its first '/', for rows keyed ``job/attempt``)."""
        return job_of(self.run_id)

    @property
    def history_entry(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def same_cost(self, other: "Release") -> bool:
        """True when both describe the same mechanism (what a retry must match)."""
        return (
            self.steps == other.steps
            and self.sample_rate == other.sample_rate
            and self.noise_multiplier == other.noise_multiplier
            and self.max_grad_norm == other.max_grad_norm
            and self.delta == other.delta
        )


def job_of(run_id: str) -> str:
    """The job id of a ledger key: the key itself, or its part before '/' (``job/attempt`` rows of older fedpriv)."""
    return str(run_id).split("/", 1)[0]


@dataclass(frozen=True)
class BudgetDecision:
    """Whether a planned release fits the budget, and why.

    ``reason`` (one sentence) may leave the region: the rule, the job's own numbers and the caps. ``detail`` adds
    what the ledger knows about other releases (ε over the whole ledger, how many releases it holds): for the
    region's own log, or for the reply when its policy releases the lifetime ε.
    """

    allowed: bool
    epsilon_now: float
    epsilon_after: float
    reason: str
    max_epsilon: float = math.inf
    detail: str = ""
    rule: str = ""
    """The rule that refused (``max-lifetime-epsilon``, ``max-job-epsilon``, ``released-once``, ``conflict``); ""."""

    def __bool__(self) -> bool:
        return self.allowed


PlannedRelease = Union[Release, Sequence]
"""A :class:`Release`, or a ``(noise_multiplier, sample_rate, steps)`` triple."""


def default_ledger_path(region_data_dir: str | os.PathLike) -> Path:
    """Where a region's ledger lives: next to its data."""
    return Path(region_data_dir) / LEDGER_FILENAME


def anchor_path(ledger_path: str | os.PathLike) -> Path:
    """The ledger's second anchor: row count and chain head, rewritten after every committed write."""
    path = Path(ledger_path)
    return path.with_name(path.name + ANCHOR_SUFFIX)


def epsilon_of_history(history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` of an Opacus-style history, computed by the named accountant."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant = {accountant!r}: expected one of {', '.join(ACCOUNTANTS)}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta = {delta!r}: expected a probability in (0, 1)")
    return epsilon_of(history, delta, accountant)  # compacts the history; memoised, identical to Opacus' accountants


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id           TEXT    NOT NULL,
    round            INTEGER NOT NULL CHECK (round >= 0),
    steps            INTEGER NOT NULL CHECK (steps >= 1),
    sample_rate      REAL    NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    noise_multiplier REAL    NOT NULL CHECK (noise_multiplier >= 0),
    max_grad_norm    REAL    NOT NULL CHECK (max_grad_norm > 0),
    delta            REAL    NOT NULL CHECK (delta > 0 AND delta < 1),
    accountant       TEXT    NOT NULL,
    created_at       TEXT    NOT NULL,
    job_id           TEXT    NOT NULL DEFAULT '',
    attempt          TEXT    NOT NULL DEFAULT '',
    digest           TEXT    NOT NULL DEFAULT '',
    chain            TEXT    NOT NULL DEFAULT '',
    UNIQUE (run_id, round)
);
CREATE INDEX IF NOT EXISTS releases_job_round ON releases (job_id, round);
"""

_V2_COLUMNS = ("job_id", "attempt", "digest", "chain")
_COLUMNS = [f.name for f in fields(Release)]


def _restore_hint(path: Path) -> str:
    return (f"restore {path.name} from its newest backup (with nothing older: the anchor {anchor_path(path).name} "
            f"refuses a rolled-back copy), or start a new ledger on purpose with `fedpriv ledger reset --ledger {path}`")


def _genesis(ledger_id: str) -> str:
    return hashlib.sha256(f"{FORMAT_ID}/{ledger_id}".encode()).hexdigest()


def _link(previous: str, seq: int, release: Release) -> str:
    """The chain value of row ``seq``: sha256 over the previous value and every field of the row."""
    row = [int(seq)] + [getattr(release, c) for c in _COLUMNS]
    return hashlib.sha256((previous + json.dumps(row, ensure_ascii=True)).encode()).hexdigest()


def _locked(method):
    """Serialise use of the ledger's one connection between threads of this process."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            if self._conn is None:
                raise ValueError(f"{self!r} is closed")
            return method(self, *args, **kwargs)

    return wrapper


class PrivacyLedger:
    """A region's durable record of DP releases; ε is always computed over all of it.

    Use as a context manager or call :meth:`close`. Safe to open from several
    processes at once (SQLite locking) and to share between threads; writes are
    serialised. Opening checks the ledger (see the module docstring) and raises
    :class:`LedgerDamaged` for a damaged one; ``create=False`` refuses to make a new one.
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float = 30.0, create: bool = True):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._timeout = timeout
        self.ledger_id = ""
        if self.path.is_dir():
            raise DataError(f"privacy ledger {self.path}: is a directory, expected a ledger file path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._anchor_lock():
                self._open(create)
        except BaseException as exc:
            self.close()
            if not isinstance(exc, sqlite3.DatabaseError):
                raise
            raise LedgerDamaged(
                f"privacy ledger {self.path}: cannot open as a ledger ({exc}): expected a SQLite file written by "
                f"fedpriv; it trains nothing until you {_restore_hint(self.path)}"
            ) from None

    # -- lifecycle -----------------------------------------------------------------

    def _damaged(self, what: str) -> LedgerDamaged:
        return LedgerDamaged(f"privacy ledger {self.path}: {what}; the region trains nothing until you "
                             f"{_restore_hint(self.path)}")

    def _open(self, create: bool) -> None:
        anchor = self._read_anchor()
        if not self.path.exists():
            if anchor is not None:
                raise self._damaged(f"missing, but its anchor records a ledger of {anchor['rows']} release(s)")
            if not create:
                raise DataError(f"privacy ledger {self.path}: no such file: expected a region's ledger")
            self._create()
        elif self.path.stat().st_size == 0:
            raise self._damaged("empty (0 bytes): a truncated ledger, not a new one")
        self._conn = sqlite3.connect(str(self.path), timeout=self._timeout, isolation_level=None,
                                     check_same_thread=False)  # isolation_level=None: we issue BEGIN/COMMIT ourselves
        self._conn.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
        check = self._conn.execute("PRAGMA integrity_check").fetchall()
        if [tuple(r) for r in check] != [("ok",)]:
            raise self._damaged(f"fails SQLite's integrity check ({str(check[0][0])[:120]})")
        self._check_format()  # before anything is written to a file that may not be ours
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        rows, head = self._verify_chain()
        if anchor is not None:
            self._check_anchor(anchor, rows)
        if anchor is None or anchor["rows"] < len(rows):
            self._write_anchor(len(rows), head)

    def _create(self) -> None:
        """Build a complete, empty ledger in a temporary file and link it into place (never a half-made file)."""
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(8)}.creating")
        try:
            conn = sqlite3.connect(str(tmp), isolation_level=None)
            try:
                conn.executescript("BEGIN;" + _SCHEMA + "COMMIT;")
                ledger_id = secrets.token_hex(16)
                conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [
                    ("format", FORMAT_ID), ("schema_version", str(SCHEMA_VERSION)), ("ledger_id", ledger_id),
                    ("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))])
                conn.execute("PRAGMA journal_mode=WAL")
            finally:
                conn.close()
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            try:
                os.link(tmp, self.path)  # atomic; fails if another process created the ledger meanwhile: use theirs
            except FileExistsError:
                pass
            _fsync_dir(self.path.parent)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _meta(self) -> dict[str, str]:
        try:
            return dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError:
            return {}

    def _check_format(self) -> None:
        meta = self._meta()
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if meta.get("format") != FORMAT_ID:
            if meta.get("schema_version") == "1" and "releases" in tables:
                self._migrate_v1()
                meta = self._meta()
            else:
                raise self._damaged("not a fedpriv privacy ledger (no format id): another file, or a damaged one")
        version = int(meta.get("schema_version", "0") or 0)
        if version > SCHEMA_VERSION:
            raise DataError(f"privacy ledger {self.path}: schema version {version} is newer than this fedpriv "
                            f"understands ({SCHEMA_VERSION}); upgrade fedpriv")
        if version != SCHEMA_VERSION or not meta.get("ledger_id"):
            raise self._damaged(f"format {FORMAT_ID} with schema version {version} and ledger id "
                                f"{meta.get('ledger_id')!r}: expected version {SCHEMA_VERSION} and an id")
        self.ledger_id = meta["ledger_id"]

    def _migrate_v1(self) -> None:
        """Schema 1 → 2 in one write transaction: the new columns, the format id, a ledger id, the chain."""
        with self._write() as conn:
            present = {r[1] for r in conn.execute("PRAGMA table_info(releases)")}
            for column in _V2_COLUMNS:
                if column not in present:
                    conn.execute(f"ALTER TABLE releases ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
            conn.execute("CREATE INDEX IF NOT EXISTS releases_job_round ON releases (job_id, round)")
            ledger_id = secrets.token_hex(16)
            link = _genesis(ledger_id)
            for seq, release in self._seq_rows(conn):
                link = _link(link, seq, release)
                conn.execute("UPDATE releases SET job_id = ?, chain = ? WHERE seq = ?", (release.job, link, seq))
            conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", [
                ("format", FORMAT_ID), ("schema_version", str(SCHEMA_VERSION)), ("ledger_id", ledger_id),
                ("migrated_from", "1")])

    def _seq_rows(self, conn: sqlite3.Connection) -> list[tuple[int, Release]]:
        cur = conn.execute(f"SELECT seq, {', '.join(_COLUMNS)} FROM releases ORDER BY seq")
        return [(int(row[0]), Release(**dict(zip(_COLUMNS, row[1:])))) for row in cur.fetchall()]

    def _verify_chain(self) -> tuple[list[str], str]:
        """Every row's chain value, recomputed and compared with the stored one; returns them and the head."""
        link = _genesis(self.ledger_id)
        links = []
        cur = self._conn.execute(f"SELECT seq, chain, {', '.join(_COLUMNS)} FROM releases ORDER BY seq")
        for row in cur.fetchall():
            try:
                release = Release(**dict(zip(_COLUMNS, row[2:])))
            except (TypeError, ValueError):
                raise self._damaged(f"release #{row[0]} is not a valid release") from None
            link = _link(link, int(row[0]), release)
            if row[1] != link:
                raise self._damaged(f"release #{row[0]} does not match the ledger's hash chain (altered or reordered)")
            links.append(link)
        return links, link

    def _read_anchor(self) -> dict | None:
        path = anchor_path(self.path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT_ID or not isinstance(data.get("rows"), int) or data["rows"] < 0:
                raise ValueError
            return {"rows": int(data["rows"]), "head": str(data["head"]), "ledger_id": str(data["ledger_id"])}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise self._damaged(f"its anchor {path.name} is unreadable (expected the JSON fedpriv writes)") from None

    def _check_anchor(self, anchor: dict, links: list[str]) -> None:
        if anchor["ledger_id"] != self.ledger_id:
            raise self._damaged("is another ledger than its anchor records (replaced by a different or new file)")
        rows = anchor["rows"]
        if len(links) < rows:
            raise self._damaged(f"holds {len(links)} release(s) where its anchor recorded {rows}: truncated, or an "
                                "older copy put back")
        head = links[rows - 1] if rows else _genesis(self.ledger_id)
        if head != anchor["head"]:
            raise self._damaged(f"its first {rows} release(s) differ from what its anchor recorded")

    def _write_anchor(self, rows: int, head: str) -> None:
        atomic_write_text(anchor_path(self.path), json.dumps(
            {"format": FORMAT_ID, "ledger_id": self.ledger_id, "rows": rows, "head": head}) + "\n", file_mode=0o600)

    @contextlib.contextmanager
    def _anchor_lock(self) -> Iterator[None]:
        """Between processes: opening (read ledger, then anchor) and advancing the anchor never interleave."""
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _advance_anchor(self) -> None:
        """After a committed write: the anchor records the ledger's rows now (never fewer than it did)."""
        with self._anchor_lock():
            row = self._conn.execute("SELECT COUNT(*), (SELECT chain FROM releases ORDER BY seq DESC LIMIT 1) "
                                     "FROM releases").fetchone()
            rows, head = int(row[0]), row[1] or _genesis(self.ledger_id)
            try:
                anchor = self._read_anchor()
            except LedgerDamaged:
                anchor = None
            if anchor is None or anchor["rows"] < rows:
                self._write_anchor(rows, head)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "PrivacyLedger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r})"

    class _Txn:
        def __init__(self, conn: sqlite3.Connection):
            self.conn = conn

        def __enter__(self):
            # IMMEDIATE: take the write lock now, so check-then-insert is atomic
            # against other processes writing the same ledger.
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, exc, tb):
            if exc_type is None:
                self.conn.execute("COMMIT")
            else:
                self.conn.execute("ROLLBACK")
            return False

    def _write(self) -> "_Txn":
        if self._conn is None:
            raise ValueError(f"{self!r} is closed")
        return PrivacyLedger._Txn(self._conn)

    # -- reading -------------------------------------------------------------------

    def _rows(self, conn: sqlite3.Connection | None = None) -> list[Release]:
        conn = conn or self._conn
        if conn is None:
            raise ValueError(f"{self!r} is closed")
        cur = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM releases ORDER BY seq")
        return [Release(**dict(zip(_COLUMNS, row))) for row in cur.fetchall()]

    @_locked
    def releases(self) -> list[Release]:
        """All recorded releases, oldest first."""
        return self._rows()

    @_locked
    def get(self, run_id: str, round: int) -> Release | None:
        """The release recorded for ``(run_id, round)``, or None."""
        rows = self._rows_for(str(run_id), int(round))
        return rows[0] if rows else None

    @_locked
    def release_of(self, job_id: str, round: int) -> Release | None:
        """The (first) release of round ``round`` of job ``job_id``, whatever attempt made it, or None."""
        rows = self._job_rows(self._conn, str(job_id), int(round))
        return rows[0] if rows else None

    @_locked
    def job_releases(self, job_id: str, upto_round: int | None = None) -> list[Release]:
        """Job ``job_id``'s releases, oldest first (only rounds <= ``upto_round`` when given)."""
        return [r for r in self._job_rows(self._conn, str(job_id))
                if upto_round is None or r.round <= upto_round]

    @_locked
    def history_upto(self, release: Release) -> History:
        """The whole ledger's history as it stood when ``release`` was recorded (itself included)."""
        cur = self._conn.execute("SELECT seq FROM releases WHERE run_id = ? AND round = ?", (release.run_id, release.round))
        row = cur.fetchone()
        if row is None:
            return []
        return [r.history_entry for r in self._rows_where("seq <= ?", (int(row[0]),))]

    def _rows_where(self, where: str, args: tuple, conn: sqlite3.Connection | None = None) -> list[Release]:
        conn = conn or self._conn
        cur = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM releases WHERE {where} ORDER BY seq", args)
        return [Release(**dict(zip(_COLUMNS, row))) for row in cur.fetchall()]

    def _rows_for(self, run_id: str, round: int, conn: sqlite3.Connection | None = None) -> list[Release]:
        return self._rows_where("run_id = ? AND round = ?", (run_id, round), conn)

    def _job_rows(self, conn: sqlite3.Connection, job_id: str, round: int | None = None) -> list[Release]:
        if round is None:
            return self._rows_where("job_id = ?", (job_id,), conn)
        return self._rows_where("job_id = ? AND round = ?", (job_id, round), conn)

    @_locked
    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM releases").fetchone()[0])

    @_locked
    def history(self) -> History:
        """Opacus-style history ``[(noise_multiplier, sample_rate, steps)]``, one entry per release.

        Feed it to an Opacus accountant (``acc.history = ledger.history()``) to compose
        this ledger with further steps.
        """
        return [r.history_entry for r in self._rows()]

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """ε at ``delta`` spent on this region's data so far, over every recorded release."""
        return epsilon_of_history(self.history(), delta, accountant)

    def epsilon_if(
        self,
        extra_steps: int,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        accountant: str = "rdp",
    ) -> float:
        """ε at ``delta`` if a release of ``extra_steps`` DP-SGD steps were added to the ledger."""
        return epsilon_of_history(self.history() + [(noise_multiplier, sample_rate, int(extra_steps))], delta, accountant)

    # -- budget enforcement -------------------------------------------------------

    @_locked
    def check_budget(
        self,
        max_epsilon: float,
        planned_release: PlannedRelease,
        delta: float,
        accountant: str = "rdp",
        *,
        max_job_epsilon: float = math.inf,
    ) -> BudgetDecision:
        """Would ``planned_release`` keep this region's ε at ``delta`` within ``max_epsilon``?

        Allowed exactly when ε after the release is ≤ ``max_epsilon`` (and, for a planned
        :class:`Release`, its job's ε ≤ ``max_job_epsilon``). A planned :class:`Release` whose
        ``(run_id, round)`` is already recorded with the same parameters costs nothing more
        (it is a retry).
        """
        return self._decide(self._conn, max_epsilon, planned_release, delta, accountant, max_job_epsilon)

    @_locked
    def reserve(
        self,
        release: Release,
        max_epsilon: float,
        delta: float | None = None,
        accountant: str | None = None,
        *,
        new_only: bool = False,
        max_job_epsilon: float = math.inf,
    ) -> BudgetDecision:
        """Atomically check the budget and, if allowed, record ``release`` (call *before* sending).

        ``delta`` and ``accountant`` default to the release's own. The lifetime cap
        ``max_epsilon`` and the job's ceiling ``max_job_epsilon`` (over the rows of
        ``release.job``) are checked in one write transaction with the insert, so two
        processes — two rounds of one job handled at once included — cannot both squeeze
        into the last bit of budget. If the decision is refused nothing is written.

        ``new_only``: refuse when round ``release.round`` of ``release.job`` is already
        recorded (by any attempt), even with the same parameters. A region that has just
        trained passes it: a recorded round may already have left the region, and a fresh
        training of it (fresh noise, fresh sample) would be a second release of the round.
        """
        delta = release.delta if delta is None else delta
        accountant = release.accountant if accountant is None else accountant
        import opacus.accountants  # noqa: F401  (import torch before taking the write lock, not while holding it)

        with self._write() as conn:
            if new_only and self._job_rows(conn, release.job, release.round):
                return BudgetDecision(
                    False, math.nan, math.nan,
                    f"Refused (released-once): round {release.round} of job {release.job} was already released once; "
                    "releasing a second training of it would be a second, unaccounted release.",
                    max_epsilon, rule="released-once",
                )
            decision = self._decide(conn, max_epsilon, release, delta, accountant, max_job_epsilon)
            inserted = decision.allowed and self._insert(conn, release)
        if inserted:
            self._advance_anchor()
        return decision

    def _decide(
        self,
        conn: sqlite3.Connection,
        max_epsilon: float,
        planned: PlannedRelease,
        delta: float,
        accountant: str,
        max_job_epsilon: float = math.inf,
    ) -> BudgetDecision:
        if not (max_epsilon > 0):
            raise ValueError(f"max_epsilon = {max_epsilon!r}: expected a budget > 0")
        rows = self._rows(conn)
        history = [r.history_entry for r in rows]
        eps_now = epsilon_of_history(history, delta, accountant)
        label = accountant.upper()
        retry = False
        job_rows: list[Release] = []
        if isinstance(planned, Release):
            what = f"round {planned.round} of run {planned.run_id}"
            entry = planned.history_entry
            job_rows = [r for r in rows if r.job == planned.job]
            existing = next((r for r in rows if r.key == planned.key), None)
            if existing is not None:
                if not existing.same_cost(planned):
                    text = (f"Refused (conflict): {what} is already recorded with different parameters "
                            f"({_describe(existing.history_entry)}) than planned ({_describe(entry)}); "
                            "a second, different release needs its own run_id or round.")
                    return BudgetDecision(False, eps_now, math.inf, text, max_epsilon, text, "conflict")
                retry = True
        else:
            entry = (float(planned[0]), float(planned[1]), int(planned[2]))
            what = "the planned release"
        eps_after = eps_now if retry else epsilon_of_history(history + [entry], delta, accountant)
        where = f"(δ={delta:g}, {label} accountant, {len(rows)} earlier release(s) in the ledger)"
        cost = "" if retry else f" ({_describe(entry)})"
        if not retry and isinstance(planned, Release) and math.isfinite(max_job_epsilon):
            job_after = epsilon_of_history([r.history_entry for r in job_rows] + [entry], delta, accountant)
            if job_after > max_job_epsilon:  # the job's own ε is public: a function of the mechanism it asked for
                text = (f"Refused (max-job-epsilon): {what}{cost} would take this job's ε to {_fmt(job_after)} at "
                        f"δ={delta:g} ({label} accountant), above the region's ceiling on one job's ε = "
                        f"{_fmt(max_job_epsilon)}.")
                return BudgetDecision(False, eps_now, eps_after, text, max_epsilon, text, "max-job-epsilon")
        allowed = eps_after <= max_epsilon
        verdict = "Allowed" if allowed else "Refused (max-lifetime-epsilon)"
        side = "within" if allowed else "above"
        if retry:
            reason = (f"{verdict}: {what} is already recorded, so re-sending it adds no cost; the region's ε over its "
                      f"ledger stays {side} the budget ε ≤ {_fmt(max_epsilon)}.")
            detail = (f"{verdict}: {what} is already recorded, so re-sending it adds no cost; ε stays "
                      f"{_fmt(eps_now)} {where}, {side} the budget ε ≤ {_fmt(max_epsilon)}.")
        else:
            reason = (f"{verdict}: {what}{cost} {'keeps' if allowed else 'would take'} the region's ε over its whole "
                      f"ledger {side} the budget ε ≤ {_fmt(max_epsilon)} (δ={delta:g}, {label} accountant).")
            detail = (f"{verdict}: {what}{cost} {'raises' if allowed else 'would raise'} ε from {_fmt(eps_now)} to "
                      f"{_fmt(eps_after)} {where}, {side} the budget ε ≤ {_fmt(max_epsilon)}"
                      f"{'' if allowed else f' ({_fmt(max(0.0, max_epsilon - eps_now))} left)'}.")
        return BudgetDecision(allowed, eps_now, eps_after, reason, max_epsilon, detail,
                              "" if allowed else "max-lifetime-epsilon")

    # -- writing -------------------------------------------------------------------

    @_locked
    def record(self, release: Release) -> bool:
        """Durably record ``release``; returns False if this exact release was already recorded.

        Atomic and idempotent on ``(run_id, round)``. Raises :class:`LedgerConflict` if a
        release with different parameters is recorded under the same key.
        """
        with self._write() as conn:
            inserted = self._insert(conn, release)
        if inserted:
            self._advance_anchor()
        return inserted

    def _insert(self, conn: sqlite3.Connection, release: Release) -> bool:
        existing = self._rows_for(release.run_id, release.round, conn)
        if existing:
            if existing[0].same_cost(release):
                return False
            raise LedgerConflict(
                f"privacy ledger {self.path}: round {release.round} of run {release.run_id} is already "
                f"recorded as ({_describe(existing[0].history_entry)}), not ({_describe(release.history_entry)}); "
                "a different release needs its own run_id or round"
            )
        row = asdict(release)
        row["created_at"] = release.created_at or datetime.now(timezone.utc).isoformat(timespec="microseconds")
        last = conn.execute("SELECT seq, chain FROM releases ORDER BY seq DESC LIMIT 1").fetchone()
        seq_row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'releases'").fetchone()
        seq = max(int(seq_row[0]) if seq_row else 0, int(last[0]) if last else 0) + 1  # AUTOINCREMENT's next value
        link = _link(last[1] if last else _genesis(self.ledger_id), seq, Release(**row))
        names = [*_COLUMNS, "seq", "job_id", "chain"]
        conn.execute(f"INSERT INTO releases ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})",
                     [row[c] for c in _COLUMNS] + [seq, release.job, link])
        return True


def reset_ledger(path: str | os.PathLike) -> list[Path]:
    """Delete a ledger, its SQLite side files and its anchor (``fedpriv ledger reset``); returns what was removed.

    The region's next round starts a new, empty ledger: every release recorded so far is forgotten, so only an
    operator who knows the data's earlier spending (and lowers the policy's caps by it) should do this.
    """
    path = Path(path)
    removed = []
    for target in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"), anchor_path(path)):
        try:
            target.unlink()
            removed.append(target)
        except FileNotFoundError:
            continue
    _fsync_dir(path.parent)
    return removed


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fmt(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:.4g}"


def _describe(entry: tuple[float, float, int]) -> str:
    noise, rate, steps = entry
    return f"{steps} steps, noise multiplier {noise:.4g}, sample rate {rate:.4g}"
