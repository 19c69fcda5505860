"""The state store: what xcloudd promised and what it did, durable across `kill -9`.

SQLite in WAL mode with `synchronous=FULL`: a write that a promise depends on is on disk
before the action it guards (an occurrence before its build is requested, an intent before
the POST, an event's "emitted" mark right after the event reached the sinks). One process
writes; `xcloudd status` reads concurrently.

The schema is versioned with `PRAGMA user_version`; each migration runs once, in order.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from xcloudd.errors import XcloudError

OccurrenceState = Literal["fired", "skipped", "missed", "held"]
IntentState = Literal["pending", "done", "failed"]
Mark = Literal["created", "started", "completed"]

_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE occurrences (
        job TEXT NOT NULL,
        planned TEXT NOT NULL,          -- UTC ISO 8601, jitter included
        state TEXT NOT NULL,            -- fired | skipped | held (overlap = buffer_one)
        reason TEXT,
        decided_at TEXT NOT NULL,
        emitted INTEGER NOT NULL DEFAULT 0,  -- its schedule.* event reached the sinks
        PRIMARY KEY (job, planned)
    );
    CREATE TABLE jobs (
        job TEXT PRIMARY KEY,
        last_planned TEXT NOT NULL      -- newest occurrence decided, for catch-up after downtime
    );
    CREATE TABLE intents (
        id TEXT PRIMARY KEY,
        job TEXT,
        planned TEXT,
        origin TEXT NOT NULL,
        workflow_id TEXT NOT NULL,
        git_reference_id TEXT,
        pull_request_id TEXT,
        rebuild_of TEXT,
        clean INTEGER,
        sent_at TEXT NOT NULL,
        state TEXT NOT NULL,            -- pending | done | failed
        run_id TEXT
    );
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        number INTEGER,
        workflow_id TEXT NOT NULL,
        job TEXT,
        origin TEXT NOT NULL,
        progress TEXT,
        completion_status TEXT,
        created_at TEXT,
        first_seen TEXT NOT NULL,
        finished INTEGER NOT NULL DEFAULT 0,
        created_emitted INTEGER NOT NULL DEFAULT 0,
        started_emitted INTEGER NOT NULL DEFAULT 0,
        completed_emitted INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX runs_in_flight ON runs (finished);
    CREATE TABLE cursors (
        workflow_id TEXT PRIMARY KEY,
        highest_number INTEGER NOT NULL
    );
    """,
)


class StoreError(XcloudError):
    pass


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Intent:
    id: str
    job: str | None
    planned: str | None
    origin: str
    workflow_id: str
    git_reference_id: str | None
    pull_request_id: str | None
    rebuild_of: str | None
    clean: bool | None
    sent_at: str
    state: str
    run_id: str | None


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    number: int | None
    workflow_id: str
    job: str | None
    origin: str
    progress: str | None
    completion_status: str | None
    created_at: str | None
    first_seen: str
    finished: bool
    created_emitted: bool
    started_emitted: bool
    completed_emitted: bool


class Store:
    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False) -> Store:
        try:
            if readonly:
                if not path.exists():
                    raise StoreError(f"no state store at {path}: has the daemon run yet?")
                conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(path, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.row_factory = sqlite3.Row
            store = cls(conn, path)
            if not readonly:
                store._migrate()
            return store
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state store {path}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"cannot open the state store {path}: {exc.strerror}") from None

    def close(self) -> None:
        self._conn.close()

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(_MIGRATIONS):
            raise StoreError(
                f"the state store {self.path} was written by a newer xcloudd (schema {version})"
            )
        for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            with self._tx():
                for statement in script.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version={number}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # --- occurrences -----------------------------------------------------------------------

    def decide(
        self, job: str, planned: datetime, state: OccurrenceState, reason: str | None = None
    ) -> bool:
        """Record how occurrence (job, planned) ends; False if it was decided before."""
        now = iso(datetime.now(UTC))
        with self._tx() as c:
            # A held occurrence (buffer_one) is still undecided: its decision replaces the hold.
            cur = c.execute(
                "INSERT INTO occurrences VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(job, planned)"
                " DO UPDATE SET state = excluded.state, reason = excluded.reason,"
                " decided_at = excluded.decided_at, emitted = excluded.emitted"
                " WHERE occurrences.state = 'held'",
                (job, iso(planned), state, reason, now, int(state == "held")),
            )
            self._advance(c, job, planned)
            return cur.rowcount == 1

    def held(self) -> list[tuple[str, datetime]]:
        """Occurrences waiting (buffer_one) for the job's running build, oldest first."""
        rows = self._conn.execute(
            "SELECT job, planned FROM occurrences WHERE state = 'held' ORDER BY planned"
        ).fetchall()
        return [(r[0], parse_iso(r[1])) for r in rows]

    def occurrence_emitted(self, job: str, planned: datetime) -> None:
        with self._tx() as c:
            c.execute(
                "UPDATE occurrences SET emitted = 1 WHERE job = ? AND planned = ?",
                (job, iso(planned)),
            )

    def unannounced(self) -> list[tuple[str, datetime, str, str | None]]:
        """Occurrences decided by a process that died before emitting their event."""
        rows = self._conn.execute(
            "SELECT job, planned, state, reason FROM occurrences WHERE emitted = 0"
        ).fetchall()
        return [(r[0], parse_iso(r[1]), r[2], r[3]) for r in rows]

    def decide_missed(self, job: str, newest: datetime) -> None:
        """Missed occurrences are counted, not stored one by one: only the job's mark moves."""
        with self._tx() as c:
            self._advance(c, job, newest)

    @staticmethod
    def _advance(c: sqlite3.Connection, job: str, planned: datetime) -> None:
        c.execute(
            "INSERT INTO jobs VALUES (?, ?) ON CONFLICT(job) DO UPDATE SET"
            " last_planned = max(last_planned, excluded.last_planned)",
            (job, iso(planned)),
        )

    def occurrence(self, job: str, planned: datetime) -> str | None:
        row = self._conn.execute(
            "SELECT state FROM occurrences WHERE job = ? AND planned = ?", (job, iso(planned))
        ).fetchone()
        return None if row is None else str(row[0])

    def last_planned(self, job: str) -> datetime | None:
        row = self._conn.execute("SELECT last_planned FROM jobs WHERE job = ?", (job,)).fetchone()
        return None if row is None else parse_iso(row[0])

    # --- intents ---------------------------------------------------------------------------

    def record_intent(
        self,
        *,
        job: str | None,
        planned: datetime | None,
        decide: bool = False,
        origin: str,
        workflow_id: str,
        git_reference_id: str | None,
        pull_request_id: str | None,
        rebuild_of: str | None,
        clean: bool | None,
        sent_at: datetime,
    ) -> str | None:
        """The start intent, before the POST; with `decide`, atomically with its occurrence
        being marked "fired" (None if that occurrence was already decided)."""
        intent_id = str(uuid.uuid4())
        with self._tx() as c:
            if decide:
                assert job is not None
                assert planned is not None
                cur = c.execute(
                    "INSERT INTO occurrences VALUES (?, ?, 'fired', NULL, ?, 0)"
                    " ON CONFLICT(job, planned) DO UPDATE SET state = 'fired',"
                    " decided_at = excluded.decided_at WHERE occurrences.state = 'held'",
                    (job, iso(planned), iso(sent_at)),
                )
                if cur.rowcount != 1:
                    return None
                self._advance(c, job, planned)
            c.execute(
                "INSERT INTO intents VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', NULL)",
                (
                    intent_id,
                    job,
                    iso(planned) if planned else None,
                    origin,
                    workflow_id,
                    git_reference_id,
                    pull_request_id,
                    rebuild_of,
                    None if clean is None else int(clean),
                    iso(sent_at),
                ),
            )
        return intent_id

    def finish_intent(self, intent_id: str, state: IntentState, run_id: str | None = None) -> None:
        with self._tx() as c:
            c.execute(
                "UPDATE intents SET state = ?, run_id = ? WHERE id = ?", (state, run_id, intent_id)
            )

    def pending_intents(self) -> list[Intent]:
        rows = self._conn.execute(
            "SELECT * FROM intents WHERE state = 'pending' ORDER BY sent_at"
        ).fetchall()
        return [
            Intent(**{**dict(r), "clean": None if r["clean"] is None else bool(r["clean"])})
            for r in rows
        ]

    # --- runs ------------------------------------------------------------------------------

    def add_run(
        self,
        *,
        run_id: str,
        number: int | None,
        workflow_id: str,
        job: str | None,
        origin: str,
        created_at: datetime | None,
        intent_id: str | None = None,
        created_emitted: bool = False,
    ) -> bool:
        """Remember a run to follow (and finish its intent, atomically); False if known."""
        with self._tx() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO runs (run_id, number, workflow_id, job, origin, created_at,"
                " first_seen, created_emitted) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    number,
                    workflow_id,
                    job,
                    origin,
                    iso(created_at) if created_at else None,
                    iso(datetime.now(UTC)),
                    int(created_emitted),
                ),
            )
            if intent_id is not None:
                c.execute(
                    "UPDATE intents SET state = 'done', run_id = ? WHERE id = ?",
                    (run_id, intent_id),
                )
            return cur.rowcount == 1

    def has_pending_intents(self, workflow_id: str) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM intents WHERE workflow_id = ? AND state = 'pending' LIMIT 1",
            (workflow_id,),
        ).fetchone()
        return row is not None

    def knows_run(self, run_id: str) -> bool:
        row = self._conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return row is not None

    def mark(self, run_id: str, what: Mark) -> bool:
        """Note that an event went out; False if it had gone out before (never emit twice)."""
        column = f"{what}_emitted"
        with self._tx() as c:
            cur = c.execute(
                f"UPDATE runs SET {column} = 1 WHERE run_id = ? AND {column} = 0", (run_id,)
            )
            return cur.rowcount == 1

    def update_run(
        self,
        run_id: str,
        *,
        number: int | None,
        progress: str,
        completion_status: str | None,
        finished: bool,
    ) -> None:
        with self._tx() as c:
            c.execute(
                "UPDATE runs SET number = coalesce(?, number), progress = ?,"
                " completion_status = ?, finished = ? WHERE run_id = ?",
                (number, progress, completion_status, int(finished), run_id),
            )

    def run(self, run_id: str) -> RunRecord | None:
        row = self._conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else _run(row)

    def runs_in_flight(self) -> list[RunRecord]:
        rows = self._conn.execute(
            "SELECT * FROM runs WHERE finished = 0 ORDER BY first_seen"
        ).fetchall()
        return [_run(r) for r in rows]

    def recent_runs(self, limit: int = 20) -> list[RunRecord]:
        rows = self._conn.execute(
            "SELECT * FROM runs WHERE finished = 1 ORDER BY first_seen DESC LIMIT ?", (limit,)
        ).fetchall()
        return [_run(r) for r in rows]

    def job_in_flight(self, job: str) -> int:
        row = self._conn.execute(
            "SELECT count(*) FROM runs WHERE job = ? AND finished = 0", (job,)
        ).fetchone()
        return int(row[0])

    # --- watched workflows -----------------------------------------------------------------

    def cursor(self, workflow_id: str) -> int | None:
        row = self._conn.execute(
            "SELECT highest_number FROM cursors WHERE workflow_id = ?", (workflow_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    def set_cursor(self, workflow_id: str, highest_number: int) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO cursors VALUES (?, ?) ON CONFLICT(workflow_id) DO UPDATE SET"
                " highest_number = max(highest_number, excluded.highest_number)",
                (workflow_id, highest_number),
            )


def _run(row: sqlite3.Row) -> RunRecord:
    d = dict(row)
    for key in ("finished", "created_emitted", "started_emitted", "completed_emitted"):
        d[key] = bool(d[key])
    return RunRecord(**d)
