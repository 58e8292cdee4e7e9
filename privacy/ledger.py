"""The persistent privacy ledger: one SQLite file, write-ahead records of every differentially private release.

Rules (design §3):

* A release is inserted as ``pending`` in a committed transaction *before* its data leaves the process, and
  marked ``released`` afterwards. A pending row counts as spent, so a crash can only over-charge.
* Each row names the run, the round, who is charged (a client/user id, or ``all`` for a central mechanism that
  protects every member of the unit), the privacy unit (``example``, ``label`` or ``user``) and the mechanism as
  a serialized dp-accounting ``DpEvent``.
* A participant's ε composes all its rows *and* the ``all`` rows of the same unit (central releases protect
  everyone, so everyone pays for them), across every run in scope.

Several runs, processes and threads may share one file (WAL journal, busy timeout, short transactions).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dp_accounting as dpa

from privacy.accounting import epsilon, event_from_json, event_to_json

SCHEMA_VERSION = 1
UNITS = ("example", "label", "user")
EVERYONE = "all"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, experiment TEXT NOT NULL, created_at TEXT NOT NULL, config_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    participant TEXT NOT NULL,
    unit TEXT NOT NULL CHECK (unit IN ('example', 'label', 'user')),
    mechanism TEXT NOT NULL,
    event_json TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'released')),
    created_at TEXT NOT NULL,
    released_at TEXT,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS releases_participant ON releases (participant, unit);
CREATE INDEX IF NOT EXISTS releases_run ON releases (run_id, round);
"""


class LedgerError(Exception):
    """The ledger file is missing, unreadable or not a fedpriv ledger; the message names the path."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Release:
    """One ledger row."""

    id: int
    run_id: str
    round: int
    participant: str
    unit: str
    mechanism: str
    event: dpa.DpEvent
    status: str
    created_at: str
    released_at: str | None
    note: str


@dataclass(frozen=True)
class ReleaseHandle:
    """The pending rows of one release; :meth:`Ledger.mark_released` flips them."""

    ids: tuple[int, ...]


class Ledger:
    """A privacy ledger file. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists() and not create:
            raise LedgerError(f"no ledger at {self.path}")
        if self.path.is_dir():
            raise LedgerError(f"{self.path} is a directory, not a ledger file")
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 30000")
            self._db.execute("PRAGMA foreign_keys = ON")
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and "meta" not in tables:
                raise LedgerError(f"{self.path} is an SQLite file but not a fedpriv ledger (no meta table)")
            if not tables and not create:
                raise LedgerError(f"{self.path} is empty, not a fedpriv ledger")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            if not tables:
                with self._transaction() as cur:
                    for stmt in _SCHEMA.strip().split(";"):
                        if stmt.strip():
                            cur.execute(stmt)
                    cur.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path} is not a readable fedpriv ledger ({exc})") from exc
        if row is None or not row[0].isdigit():
            raise LedgerError(f"{self.path} has no schema version; not a fedpriv ledger")
        if int(row[0]) != SCHEMA_VERSION:
            raise LedgerError(f"{self.path} has ledger schema version {row[0]}; this fedpriv reads version "
                              f"{SCHEMA_VERSION}")

    # -- plumbing ------------------------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------------------
    def register_run(self, run_id: str, experiment: str, config: dict[str, Any]) -> None:
        """Record a run (idempotent: registering an existing run keeps its first record)."""
        with self._transaction() as cur:
            cur.execute("INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?)",
                        (run_id, experiment, _now(), json.dumps(config, sort_keys=True, default=str)))

    def begin_release(
        self,
        run_id: str,
        round: int,
        participants: Sequence[str],
        unit: str,
        event: dpa.DpEvent,
        mechanism: str,
        note: str = "",
    ) -> ReleaseHandle:
        """Insert one ``pending`` row per participant, committed durably before returning."""
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
        if not participants:
            raise ValueError("a release needs at least one participant")
        blob, now = event_to_json(event), _now()
        with self._transaction() as cur:
            if cur.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
                raise ValueError(f"run {run_id!r} is not registered in {self.path}; call register_run first")
            ids = []
            for p in participants:
                cur.execute(
                    "INSERT INTO releases (run_id, round, participant, unit, mechanism, event_json, status,"
                    " created_at, note) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                    (run_id, int(round), str(p), unit, mechanism, blob, now, note),
                )
                ids.append(int(cur.lastrowid))
        return ReleaseHandle(tuple(ids))

    def mark_released(self, handle: ReleaseHandle) -> None:
        """Flip the handle's rows to ``released`` (they were already counted as spent)."""
        with self._transaction() as cur:
            cur.executemany("UPDATE releases SET status = 'released', released_at = ? WHERE id = ?",
                            [(_now(), i) for i in handle.ids])

    @contextmanager
    def release(
        self, run_id: str, round: int, participants: Sequence[str], unit: str, event: dpa.DpEvent, mechanism: str,
        note: str = "",
    ) -> Iterator[ReleaseHandle]:
        """``with ledger.release(...):`` pending before the body, released after it; left pending if it raises."""
        handle = self.begin_release(run_id, round, participants, unit, event, mechanism, note)
        yield handle
        self.mark_released(handle)

    # -- reading -------------------------------------------------------------------------------------------
    def runs(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT run_id, experiment, created_at, config_json FROM runs ORDER BY created_at")
            return [{"run_id": r, "experiment": e, "created_at": c, "config": json.loads(j)} for r, e, c, j in rows]

    def releases(
        self, run_id: str | None = None, participant: str | None = None, unit: str | None = None,
        status: str | None = None,
    ) -> list[Release]:
        """Rows matching every given filter, in insertion order."""
        clauses, args = [], []
        for col, val in (("run_id", run_id), ("participant", participant), ("unit", unit), ("status", status)):
            if val is not None:
                clauses.append(f"{col} = ?")
                args.append(val)
        sql = "SELECT id, run_id, round, participant, unit, mechanism, event_json, status, created_at, released_at," \
              " note FROM releases" + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY id"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [Release(i, r, rnd, p, u, m, event_from_json(ev), s, c, ra, n)
                for i, r, rnd, p, u, m, ev, s, c, ra, n in rows]

    def participants(self, run_id: str | None = None, unit: str | None = None) -> list[tuple[str, str]]:
        """Distinct (participant, unit) pairs charged, sorted."""
        return sorted({(r.participant, r.unit) for r in self.releases(run_id=run_id, unit=unit)})

    def charged_rows(self, participant: str, unit: str, run_id: str | None = None) -> list[Release]:
        """The rows that count for ``participant``: its own and the ``all`` rows of the unit (pending included)."""
        rows = self.releases(run_id=run_id, unit=unit)
        return [r for r in rows if r.participant in (participant, EVERYONE)]

    def spent_epsilon(
        self, participant: str, unit: str, delta: float, accountant: str = "rdp", run_id: str | None = None
    ) -> float:
        """ε at ``delta`` for everything charged to ``participant`` (all runs unless ``run_id`` is given)."""
        rows = self.charged_rows(participant, unit, run_id)
        return epsilon([r.event for r in rows], delta, accountant) if rows else 0.0

    def epsilon_by_round(
        self, participant: str, unit: str, delta: float, run_id: str, accountant: str = "rdp"
    ) -> list[tuple[int, float]]:
        """Cumulative ε of ``participant`` after each round of ``run_id`` that charged it."""
        rows = self.charged_rows(participant, unit, run_id)
        out = []
        for rnd in sorted({r.round for r in rows}):
            events = [r.event for r in rows if r.round <= rnd]
            out.append((rnd, epsilon(events, delta, accountant)))
        return out
