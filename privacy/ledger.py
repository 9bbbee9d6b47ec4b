"""Durable per-region privacy ledger: every DP release of a region's data, across all runs.

A region's privacy budget is about its *data*, not about one run: two runs that each
spend ε = 4 on the same records have spent (roughly) ε = 8 on them. The ledger is
therefore a file kept next to the region's data (see :func:`default_ledger_path`),
holding one row per DP release — one round's model update that left the region —
and ε is always recomputed from the whole ledger with Opacus' accountant.

Storage
    SQLite in WAL mode with ``synchronous=FULL``: a row is written in one transaction,
    and once :meth:`PrivacyLedger.record` returns, the row survives a kill -9 of the
    process (and, as far as the filesystem honours fsync, a power loss). A crash in
    the middle of a write leaves either the whole row or nothing.

Idempotence
    Rows are unique on ``(run_id, round)``. Recording the same release again (a
    retried round, a restarted client) is a no-op, so a retry is never counted twice.
    Recording a *different* release under an existing ``(run_id, round)`` raises
    :class:`LedgerConflict` rather than silently under-counting.

When to record — the enforcement protocol
    The DP cost is incurred when an update *leaves the region*, not when training
    finishes. A client must therefore:

    1. train locally (nothing has left the region yet);
    2. call :meth:`PrivacyLedger.reserve` (atomic check-and-record in one write
       transaction) — or :meth:`check_budget` followed by :meth:`record` — *before*
       sending the update; if the decision is ``allowed=False``, do not send;
    3. only then send the update.

    A kill -9 between 2 and 3 leaves a recorded release that never left the region:
    ε is over-counted, which is safe. A kill -9 before 2 loses nothing that was
    released. The opposite order (send, then record) would under-count on a crash,
    which is the failure a privacy ledger must never have.

    Caveat on retries: idempotence is only sound if a retry of ``(run_id, round)``
    re-sends the *same* update, or if the first attempt provably never left the
    region. If a recorded update may have been delivered and the client then
    re-trains (fresh noise, fresh Poisson sample) and sends again, that is a second
    release and must be recorded under a new key (e.g. a new ``run_id``).

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

import math
import os
import functools
import sqlite3
import threading
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence, Union

from fedpriv.core.errors import DataError, FedprivError
from fedpriv.privacy.accountant import ACCOUNTANTS, epsilon_of
from fedpriv.privacy.accountant import compact as compact_history  # the one merge rule, under its ledger name

__all__ = [
    "ACCOUNTANTS",
    "LEDGER_FILENAME",
    "BudgetDecision",
    "LedgerConflict",
    "PrivacyLedger",
    "Release",
    "compact_history",
    "default_ledger_path",
    "epsilon_of_history",
]

SCHEMA_VERSION = 1
LEDGER_FILENAME = "privacy_ledger.sqlite"

History = list[tuple[float, float, int]]
"""Opacus-style accountant history: ``[(noise_multiplier, sample_rate, steps), ...]``."""


class LedgerConflict(FedprivError):
    """A different release is already recorded under the same ``(run_id, round)``."""


@dataclass(frozen=True)
class Release:
    """One DP release: the update a region sent for one round of one run."""

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

    @property
    def key(self) -> tuple[str, int]:
        return (self.run_id, self.round)

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


@dataclass(frozen=True)
class BudgetDecision:
    """Whether a planned release fits the budget, and why (``reason`` is one sentence)."""

    allowed: bool
    epsilon_now: float
    epsilon_after: float
    reason: str
    max_epsilon: float = math.inf

    def __bool__(self) -> bool:
        return self.allowed


PlannedRelease = Union[Release, Sequence]
"""A :class:`Release`, or a ``(noise_multiplier, sample_rate, steps)`` triple."""


def default_ledger_path(region_data_dir: str | os.PathLike) -> Path:
    """Where a region's ledger lives: next to its data."""
    return Path(region_data_dir) / LEDGER_FILENAME


def epsilon_of_history(history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` of an Opacus-style history, computed by Opacus' accountant."""
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
    UNIQUE (run_id, round)
);
"""

_COLUMNS = [f.name for f in fields(Release)]


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
    serialised.
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float = 30.0):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        if self.path.is_dir():
            raise DataError(f"privacy ledger {self.path}: is a directory, expected a ledger file path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            self._conn = sqlite3.connect(
                str(self.path), timeout=timeout, isolation_level=None, check_same_thread=False
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            self._init_schema()
        except BaseException as exc:
            self.close()
            if not isinstance(exc, sqlite3.DatabaseError):
                raise
            raise DataError(
                f"privacy ledger {self.path}: cannot open as a ledger ({exc}); "
                "expected a SQLite file written by fedpriv — do not delete it, restore it from backup"
            ) from None

    # -- lifecycle -----------------------------------------------------------------

    def _init_schema(self) -> None:
        with self._write():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise DataError(
                    f"privacy ledger {self.path}: schema version {row[0]} is newer than this fedpriv "
                    f"understands ({SCHEMA_VERSION}); upgrade fedpriv"
                )

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

    def _rows_for(self, run_id: str, round: int, conn: sqlite3.Connection | None = None) -> list[Release]:
        conn = conn or self._conn
        cur = conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM releases WHERE run_id = ? AND round = ?", (run_id, round)
        )
        return [Release(**dict(zip(_COLUMNS, row))) for row in cur.fetchall()]

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
    ) -> BudgetDecision:
        """Would ``planned_release`` keep this region's ε at ``delta`` within ``max_epsilon``?

        Allowed exactly when ε after the release is ≤ ``max_epsilon``. A planned
        :class:`Release` whose ``(run_id, round)`` is already recorded with the same
        parameters costs nothing more (it is a retry).
        """
        return self._decide(self._conn, max_epsilon, planned_release, delta, accountant)

    @_locked
    def reserve(
        self,
        release: Release,
        max_epsilon: float,
        delta: float | None = None,
        accountant: str | None = None,
        *,
        new_only: bool = False,
    ) -> BudgetDecision:
        """Atomically check the budget and, if allowed, record ``release`` (call *before* sending).

        ``delta`` and ``accountant`` default to the release's own. Check and insert run
        in one write transaction, so two processes cannot both squeeze into the last
        bit of budget. If the decision is refused nothing is written.

        ``new_only``: refuse when ``(run_id, round)`` is already recorded, even with the same
        parameters. A region that has just trained passes it: a recorded round may already
        have left the region, and a fresh training of it (fresh noise, fresh sample) would be
        a second release under the same key. The check runs inside the same write
        transaction as the insert, so two processes training the same round cannot both
        pass it.
        """
        delta = release.delta if delta is None else delta
        accountant = release.accountant if accountant is None else accountant
        import opacus.accountants  # noqa: F401  (import torch before taking the write lock, not while holding it)

        with self._write() as conn:
            if new_only and self._rows_for(release.run_id, release.round, conn):
                eps_now = epsilon_of_history([r.history_entry for r in self._rows(conn)], delta, accountant)
                return BudgetDecision(
                    False, eps_now, eps_now,
                    f"Refused: round {release.round} of run {release.run_id} was already released once; "
                    "releasing a second training of it would be a second, unaccounted release.",
                    max_epsilon,
                )
            decision = self._decide(conn, max_epsilon, release, delta, accountant)
            if decision.allowed:
                self._insert(conn, release)
        return decision

    def _decide(
        self,
        conn: sqlite3.Connection,
        max_epsilon: float,
        planned: PlannedRelease,
        delta: float,
        accountant: str,
    ) -> BudgetDecision:
        if not (max_epsilon > 0):
            raise ValueError(f"max_epsilon = {max_epsilon!r}: expected a budget > 0")
        rows = self._rows(conn)
        history = [r.history_entry for r in rows]
        eps_now = epsilon_of_history(history, delta, accountant)
        label = accountant.upper()
        retry = False
        if isinstance(planned, Release):
            what = f"round {planned.round} of run {planned.run_id}"
            entry = planned.history_entry
            existing = next((r for r in rows if r.key == planned.key), None)
            if existing is not None:
                if not existing.same_cost(planned):
                    return BudgetDecision(
                        False,
                        eps_now,
                        math.inf,
                        f"Refused: {what} is already recorded with different parameters "
                        f"({_describe(existing.history_entry)}) than planned ({_describe(entry)}); "
                        "a second, different release needs its own run_id or round.",
                        max_epsilon,
                    )
                retry = True
        else:
            entry = (float(planned[0]), float(planned[1]), int(planned[2]))
            what = "the planned release"
        eps_after = eps_now if retry else epsilon_of_history(history + [entry], delta, accountant)
        allowed = eps_after <= max_epsilon
        where = f"(δ={delta:g}, {label} accountant, {len(rows)} earlier release(s) in the ledger)"
        if retry:
            reason = (
                f"{'Allowed' if allowed else 'Refused'}: {what} is already recorded, so re-sending it adds no cost; "
                f"ε stays {_fmt(eps_now)} {where}, {'within' if allowed else 'above'} the budget ε ≤ {_fmt(max_epsilon)}."
            )
        elif allowed:
            reason = (
                f"Allowed: {what} ({_describe(entry)}) raises ε from {_fmt(eps_now)} to {_fmt(eps_after)} "
                f"{where}, within the budget ε ≤ {_fmt(max_epsilon)}."
            )
        else:
            left = max(0.0, max_epsilon - eps_now)
            reason = (
                f"Refused: {what} ({_describe(entry)}) would raise ε from {_fmt(eps_now)} to {_fmt(eps_after)} "
                f"{where}, above the budget ε ≤ {_fmt(max_epsilon)} ({_fmt(left)} left)."
            )
        return BudgetDecision(allowed, eps_now, eps_after, reason, max_epsilon)

    # -- writing -------------------------------------------------------------------

    @_locked
    def record(self, release: Release) -> bool:
        """Durably record ``release``; returns False if this exact release was already recorded.

        Atomic and idempotent on ``(run_id, round)``. Raises :class:`LedgerConflict` if a
        release with different parameters is recorded under the same key.
        """
        with self._write() as conn:
            return self._insert(conn, release)

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
        conn.execute(
            f"INSERT INTO releases ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})",
            [row[c] for c in _COLUMNS],
        )
        return True


def _fmt(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:.4g}"


def _describe(entry: tuple[float, float, int]) -> str:
    noise, rate, steps = entry
    return f"{steps} steps, noise multiplier {noise:.4g}, sample rate {rate:.4g}"
