"""The state store: what xcloudd promised, what it did, and the events that report it.

SQLite in WAL mode with `synchronous=FULL`. Every fact is written together with its event,
in one transaction: an occurrence decided and its `schedule.*` event, an intent sent and its
`build.requested`, a run recorded and its `build.created`, a run finished and its
`build.completed`. Events wait in the `outbox` table until each sink's cursor passes them, so
nothing is "emitted" from memory and `kill -9` at any instant loses and doubles nothing.

One process writes through one connection, from one thread (`asyncstore.AsyncStore`): fsyncs
never run on the event loop. `xcloudd status` reads concurrently. The schema is versioned with
`PRAGMA user_version`; each migration runs once, in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from xcloudd.errors import XcloudError
from xcloudd.events import RESULTS, BuildRef, Event, EventFactory, occurrence_key, origin_of

OccurrenceState = Literal["firing", "fired", "skipped", "missed", "held"]
# new: decided, not sent yet; sending: the POST may have left; unknown: its outcome is
# unknown until a successful read of the workflow's runs settles it; the rest are final.
IntentState = Literal["new", "sending", "unknown", "done", "failed", "missed"]
OPEN_INTENTS = ("new", "sending", "unknown")

_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE occurrences (
        job TEXT NOT NULL,
        planned TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT,
        decided_at TEXT NOT NULL,
        emitted INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (job, planned)
    );
    CREATE TABLE jobs (
        job TEXT PRIMARY KEY,
        last_planned TEXT NOT NULL
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
        state TEXT NOT NULL,
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
    # 2: the outbox, sink cursors, and intents that live through resolving, sending and
    # reconciling (a schedule intent is now recorded before its target is resolved).
    """
    ALTER TABLE intents RENAME TO intents_v1;
    CREATE TABLE intents (
        id TEXT PRIMARY KEY,
        job TEXT,
        planned TEXT,
        origin TEXT NOT NULL,
        workflow_id TEXT,
        git_reference_id TEXT,
        pull_request_id TEXT,
        rebuild_of TEXT,
        clean INTEGER,
        created_at TEXT NOT NULL,
        sent_at TEXT,
        unknown_at TEXT,
        posts INTEGER NOT NULL DEFAULT 0,
        next_try REAL NOT NULL DEFAULT 0,
        state TEXT NOT NULL,
        run_id TEXT,
        owner TEXT,
        updated REAL NOT NULL DEFAULT 0
    );
    INSERT INTO intents (id, job, planned, origin, workflow_id, git_reference_id,
        pull_request_id, rebuild_of, clean, created_at, sent_at, unknown_at, posts, state, run_id)
        SELECT id, job, planned, origin, workflow_id, git_reference_id, pull_request_id,
        rebuild_of, clean, sent_at, sent_at, sent_at, 1,
        CASE state WHEN 'pending' THEN 'unknown' ELSE state END, run_id FROM intents_v1;
    DROP TABLE intents_v1;
    CREATE INDEX intents_open ON intents (state);
    ALTER TABLE runs ADD COLUMN end_reason TEXT;
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        body BLOB NOT NULL,
        created REAL NOT NULL
    );
    CREATE TABLE sink_cursors (
        sink TEXT PRIMARY KEY,
        seq INTEGER NOT NULL
    );
    """,
    # 3: when a run finished, so "last successful build per job" outlives a restart; the
    # daemon's heartbeat, so `status` can tell whether its information is current.
    """
    ALTER TABLE runs ADD COLUMN finished_at REAL;
    CREATE TABLE daemon (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        pid INTEGER NOT NULL,
        host TEXT NOT NULL,
        version TEXT NOT NULL,
        started REAL NOT NULL,
        beat REAL NOT NULL,
        stopped REAL
    );
    """,
    # 4: a run's product (polls go per product) and the API's own start and end times (what
    # the cadence learns each workflow's queue and run durations from).
    """
    ALTER TABLE runs ADD COLUMN product_id TEXT;
    ALTER TABLE runs ADD COLUMN started_at TEXT;
    ALTER TABLE runs ADD COLUMN ended_at TEXT;
    CREATE INDEX runs_history ON runs (workflow_id, finished);
    """,
)


@dataclass(frozen=True)
class DaemonBeat:
    """The last heartbeat of the daemon that used this store."""

    pid: int
    host: str
    version: str
    started: float
    beat: float
    stopped: float | None  # set when it stopped cleanly


@dataclass(frozen=True)
class StoreStats:
    runs_in_flight: int
    outbox: int
    pending: dict[str, int]
    last_success: dict[str, float]  # job -> when its last successful build finished


class StoreError(XcloudError):
    pass


class StoreUnwritable(StoreError):
    """A write failed (disk full, I/O error, read-only file system): nothing was recorded."""


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Intent:
    id: str
    job: str | None
    planned: datetime | None
    origin: str
    workflow_id: str | None
    git_reference_id: str | None
    pull_request_id: str | None
    rebuild_of: str | None
    clean: bool | None
    created_at: datetime
    sent_at: datetime | None
    unknown_at: datetime | None
    posts: int
    next_try: float
    state: IntentState
    run_id: str | None
    owner: str | None
    updated: float

    @classmethod
    def from_row(cls, r: sqlite3.Row) -> Intent:
        def when(key: str) -> datetime | None:
            return parse_iso(r[key]) if r[key] else None

        return cls(
            id=r["id"],
            job=r["job"],
            planned=when("planned"),
            origin=r["origin"],
            workflow_id=r["workflow_id"],
            git_reference_id=r["git_reference_id"],
            pull_request_id=r["pull_request_id"],
            rebuild_of=r["rebuild_of"],
            clean=None if r["clean"] is None else bool(r["clean"]),
            created_at=parse_iso(r["created_at"]),
            sent_at=when("sent_at"),
            unknown_at=when("unknown_at"),
            posts=int(r["posts"]),
            next_try=float(r["next_try"]),
            state=r["state"],
            run_id=r["run_id"],
            owner=r["owner"],
            updated=float(r["updated"]),
        )


@dataclass(frozen=True)
class StartRequest:
    """The resolved ids a start request sends."""

    workflow_id: str
    git_reference_id: str | None = None
    pull_request_id: str | None = None
    rebuild_of: str | None = None
    clean: bool | None = None
    # For people (events and metrics), not sent and not stored.
    workflow_name: str | None = field(default=None, compare=False)

    def columns(self) -> tuple[str, str | None, str | None, str | None, int | None]:
        """workflow_id, git_reference_id, pull_request_id, rebuild_of, clean, as stored."""
        clean = None if self.clean is None else int(self.clean)
        return (
            self.workflow_id,
            self.git_reference_id,
            self.pull_request_id,
            self.rebuild_of,
            clean,
        )


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
    end_reason: str | None
    finished_at: float | None = None
    product_id: str | None = None
    started_at: str | None = None
    ended_at: str | None = None

    @property
    def ref(self) -> BuildRef:
        origin = origin_of(self.origin)
        return BuildRef(self.run_id, self.number, self.workflow_id, self.job, origin)


@dataclass(frozen=True)
class NewRun:
    """A run as first seen: from the POST's answer, a reconcile list, or discovery."""

    run_id: str
    number: int | None
    workflow_id: str
    job: str | None
    origin: str
    created_at: datetime | None
    start_reason: str | None = None
    progress: str | None = None
    product_id: str | None = None


@dataclass(frozen=True)
class Seen:
    """A poll's news about a run still going; `started` (its event) is written once."""

    run_id: str
    number: int | None
    progress: str
    started: Event | None = None
    product_id: str | None = None
    started_at: datetime | None = None


@dataclass(frozen=True)
class Ended:
    """The watch on a run ends (completed, expired, gone), with its events."""

    run_id: str
    reason: str
    events: Sequence[Event]
    number: int | None = None
    progress: str | None = None
    completion_status: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None


@dataclass(frozen=True)
class Span:
    """How long one finished run of a workflow queued and ran (from the API's dates)."""

    queued_s: float | None
    ran_s: float | None


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    event_id: str
    name: str
    body: bytes


@dataclass(frozen=True)
class Decision:
    """How the scheduler's look at one job ended (what the transaction did)."""

    state: OccurrenceState | None  # None: the candidate was decided before
    intent_id: str | None = None


class Store:
    """Synchronous; call it from one thread only (AsyncStore's, in the daemon)."""

    def __init__(self, conn: sqlite3.Connection, path: Path, events: EventFactory) -> None:
        self._conn = conn
        self.path = path
        self.ev = events
        # The ids of the events the last transaction put in the outbox (or found there).
        self.written: list[tuple[str, str]] = []

    @classmethod
    def open(
        cls,
        path: Path | None,
        events: EventFactory,
        *,
        readonly: bool = False,
    ) -> Store:
        """The store at `path`; None: an in-memory store (a CLI command without a daemon)."""
        where = path if path is not None else Path(":memory:")
        try:
            if path is None:
                conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            elif readonly:
                if not path.exists():
                    raise StoreError(f"no state store at {path}: has the daemon run yet?")
                conn = sqlite3.connect(
                    f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
                )
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.row_factory = sqlite3.Row
            store = cls(conn, where, events)
            if not readonly:
                store._migrate()
            elif conn.execute("PRAGMA user_version").fetchone()[0] != len(_MIGRATIONS):
                conn.close()
                raise StoreError(
                    f"the state store {where} has another schema than this xcloudd's:"
                    " run the daemon of this version once to upgrade it"
                )
            return store
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state store {where}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"cannot open the state store {where}: {exc.strerror}") from None

    def close(self) -> None:
        self._conn.close()

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(_MIGRATIONS):
            raise StoreError(
                f"the state store {self.path} was written by a newer xcloudd (schema {version})"
            )
        for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            with self._tx() as c:
                for statement in script.split(";"):
                    if statement.strip():
                        c.execute(statement)
                c.execute(f"PRAGMA user_version={number}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        mark = len(self.written)
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreUnwritable(f"the state store {self.path} cannot be written: {exc}") from None
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException as exc:
            del self.written[mark:]
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError):
                raise StoreUnwritable(
                    f"the state store {self.path} cannot be written: {exc}"
                ) from None
            raise

    def _append(self, c: sqlite3.Connection, events: Sequence[Event]) -> None:
        # Ids already present keep their first body: one id, one event, everywhere.
        for event in events:
            c.execute(
                "INSERT OR IGNORE INTO outbox (event_id, name, body, created) VALUES (?, ?, ?, ?)",
                (event.event_id, event.name, event.body(), event.timestamp.timestamp()),
            )
            self.written.append((event.event_id, event.name))

    def _now(self) -> datetime:
        return self.ev.now()

    # --- plain events ----------------------------------------------------------------------

    def append(self, events: Sequence[Event]) -> None:
        """Events that report no recorded fact (api.*, daemon.*, sink.*)."""
        with self._tx() as c:
            self._append(c, events)

    # --- occurrences -----------------------------------------------------------------------

    def last_planned(self, job: str) -> datetime | None:
        row = self._conn.execute("SELECT last_planned FROM jobs WHERE job = ?", (job,)).fetchone()
        return None if row is None else parse_iso(row[0])

    def occurrence(self, job: str, planned: datetime) -> str | None:
        row = self._conn.execute(
            "SELECT state FROM occurrences WHERE job = ? AND planned = ?", (job, iso(planned))
        ).fetchone()
        return None if row is None else str(row[0])

    def begin_job(self, job: str, now: datetime) -> datetime:
        """The job's mark: nothing before it is owed. First look: now."""
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO jobs VALUES (?, ?)", (job, iso(now)))
        mark = self.last_planned(job)
        assert mark is not None
        return mark

    @staticmethod
    def _advance(c: sqlite3.Connection, job: str, planned: datetime) -> None:
        c.execute(
            "INSERT INTO jobs VALUES (?, ?) ON CONFLICT(job) DO UPDATE SET"
            " last_planned = max(last_planned, excluded.last_planned)",
            (job, iso(planned)),
        )

    @staticmethod
    def _busy(c: sqlite3.Connection, job: str) -> bool:
        row = c.execute(
            "SELECT 1 FROM intents WHERE job = ? AND state IN ('new', 'sending', 'unknown')"
            " UNION ALL SELECT 1 FROM runs WHERE job = ? AND finished = 0 LIMIT 1",
            (job, job),
        ).fetchone()
        return row is not None

    def decide(
        self,
        job: str,
        *,
        newest: datetime,
        missed: int,
        missed_oldest: datetime | None,
        capped: bool = False,
        candidate: datetime | None,
        enabled: bool,
        overlap: str,
    ) -> Decision:
        """One scheduler look at a job, in one transaction: the job's mark moves to `newest`,
        `missed` occurrences that will never start a build are counted (`schedule.missed`),
        and `candidate` is fired, skipped or held."""
        with self._tx() as c:
            events: list[Event] = []
            if missed:
                events.append(
                    self.ev.make(
                        "schedule.missed",
                        subject=occurrence_key(job, newest),
                        job=job,
                        count=missed,
                        oldest=missed_oldest.isoformat() if missed_oldest else None,
                        capped=capped,
                    )
                )
            decision = Decision(None)
            if candidate is not None and self._undecided(c, job, candidate):
                decision = self._decide_one(
                    c, job=job, planned=candidate, enabled=enabled, overlap=overlap, events=events
                )
            self._advance(c, job, newest)
            self._append(c, events)
            return decision

    @staticmethod
    def _undecided(c: sqlite3.Connection, job: str, planned: datetime) -> bool:
        row = c.execute(
            "SELECT state FROM occurrences WHERE job = ? AND planned = ?", (job, iso(planned))
        ).fetchone()
        return row is None

    def _decide_one(
        self,
        c: sqlite3.Connection,
        *,
        job: str,
        planned: datetime,
        enabled: bool,
        overlap: str,
        events: list[Event],
    ) -> Decision:
        state: OccurrenceState
        reason: str | None = None
        if not enabled:
            state, reason = "skipped", "disabled"
        elif overlap != "allow_all" and self._busy(c, job):
            held = c.execute(
                "SELECT 1 FROM occurrences WHERE job = ? AND state = 'held'", (job,)
            ).fetchone()
            if overlap == "buffer_one" and held is None:
                state = "held"
            else:
                state, reason = "skipped", "overlap"
        else:
            state = "firing"
        c.execute(
            "INSERT INTO occurrences VALUES (?, ?, ?, ?, ?, 1)",
            (job, iso(planned), state, reason, iso(self._now())),
        )
        if state == "skipped":
            events.append(self._skipped(job, planned, reason or ""))
        intent_id = self._new_intent(c, job, planned) if state == "firing" else None
        return Decision(state, intent_id)

    def _skipped(self, job: str, planned: datetime, reason: str) -> Event:
        return self.ev.make(
            "schedule.skipped",
            subject=occurrence_key(job, planned),
            job=job,
            scheduled_for=planned.isoformat(),
            reason=reason,
        )

    def _new_intent(self, c: sqlite3.Connection, job: str, planned: datetime) -> str:
        intent_id = str(uuid.uuid4())
        now = self._now()
        c.execute(
            "INSERT INTO intents (id, job, planned, origin, created_at, state, updated)"
            " VALUES (?, ?, ?, 'schedule', ?, 'new', ?)",
            (intent_id, job, iso(planned), iso(now), now.timestamp()),
        )
        return intent_id

    def release_held(self, job: str) -> str | None:
        """A held occurrence (buffer_one) fires once the job is idle: its intent id, or None."""
        with self._tx() as c:
            row = c.execute(
                "SELECT planned FROM occurrences WHERE job = ? AND state = 'held'", (job,)
            ).fetchone()
            if row is None or self._busy(c, job):
                return None
            c.execute(
                "UPDATE occurrences SET state = 'firing' WHERE job = ? AND planned = ?",
                (job, row[0]),
            )
            return self._new_intent(c, job, parse_iso(row[0]))

    def has_held(self, job: str) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM occurrences WHERE job = ? AND state = 'held'", (job,)
        ).fetchone()
        return row is not None

    # --- intents ---------------------------------------------------------------------------

    def new_manual_intent(self, target: StartRequest, *, owner: str, job: str | None = None) -> str:
        """A start asked for by hand (`xcloudd start`), owned by the process that sends it."""
        intent_id = str(uuid.uuid4())
        now = self._now()
        with self._tx() as c:
            c.execute(
                "INSERT INTO intents (id, job, origin, workflow_id, git_reference_id,"
                " pull_request_id, rebuild_of, clean, created_at, state, owner, updated)"
                " VALUES (?, ?, 'manual', ?, ?, ?, ?, ?, ?, 'new', ?, ?)",
                (intent_id, job, *target.columns(), iso(now), owner, now.timestamp()),
            )
        return intent_id

    def intent(self, intent_id: str) -> Intent | None:
        row = self._conn.execute("SELECT * FROM intents WHERE id = ?", (intent_id,)).fetchone()
        return None if row is None else Intent.from_row(row)

    def open_intents(self) -> list[Intent]:
        rows = self._conn.execute(
            "SELECT * FROM intents WHERE state IN ('new', 'sending', 'unknown') ORDER BY created_at"
        ).fetchall()
        return [Intent.from_row(r) for r in rows]

    def _intent_row(self, c: sqlite3.Connection, intent_id: str) -> Intent:
        row = c.execute("SELECT * FROM intents WHERE id = ?", (intent_id,)).fetchone()
        if row is None:
            raise StoreError(f"no start intent {intent_id}")
        return Intent.from_row(row)

    def _fired(self, c: sqlite3.Connection, intent: Intent, events: list[Event]) -> None:
        """A schedule intent's occurrence fires when its start is first sent (or refused)."""
        if intent.job is None or intent.planned is None:
            return
        cur = c.execute(
            "UPDATE occurrences SET state = 'fired' WHERE job = ? AND planned = ?"
            " AND state = 'firing'",
            (intent.job, iso(intent.planned)),
        )
        if cur.rowcount:
            events.append(
                self.ev.make(
                    "schedule.fired",
                    subject=occurrence_key(intent.job, intent.planned),
                    job=intent.job,
                    scheduled_for=intent.planned.isoformat(),
                )
            )

    def intent_sending(self, intent_id: str, target: StartRequest) -> Intent | None:
        """Just before the POST: the intent is sent (its outcome now needs settling), its
        occurrence fired, `build.requested` written. None if the intent is no longer new."""
        now = self._now()
        with self._tx() as c:
            intent = self._intent_row(c, intent_id)
            if intent.state != "new":
                return None
            events: list[Event] = []
            self._fired(c, intent, events)
            c.execute(
                "UPDATE intents SET state = 'sending', workflow_id = ?, git_reference_id = ?,"
                " pull_request_id = ?, rebuild_of = ?, clean = ?, sent_at = ?,"
                " posts = posts + 1, updated = ? WHERE id = ?",
                (*target.columns(), iso(now), now.timestamp(), intent_id),
            )
            events.append(
                self.ev.make(
                    "build.requested",
                    subject=f"{intent_id}#{intent.posts + 1}",
                    **requested_fields(intent, target),
                )
            )
            self._append(c, events)
            return self._intent_row(c, intent_id)

    def intent_unknown(
        self, intent_id: str, *, reason: str, http_status: int | None, next_try: float
    ) -> None:
        """The POST's outcome is unknown: only a successful read of the runs may settle it."""
        now = self._now()
        with self._tx() as c:
            intent = self._intent_row(c, intent_id)
            if intent.state not in ("sending", "unknown"):
                return
            c.execute(
                "UPDATE intents SET state = 'unknown', unknown_at = coalesce(unknown_at, ?),"
                " next_try = ?, updated = ? WHERE id = ?",
                (iso(now), next_try, now.timestamp(), intent_id),
            )
            if intent.state == "sending":
                self._append(
                    c,
                    [
                        self.ev.make(
                            "build.start_unknown",
                            subject=f"{intent_id}#{intent.posts}",
                            job=intent.job,
                            workflow_id=intent.workflow_id,
                            origin=origin_of(intent.origin),
                            reason=reason,
                            http_status=http_status,
                        )
                    ],
                )

    def intent_retry(
        self, intent_id: str, *, next_try: float, resend: bool = False, refused: bool = False
    ) -> None:
        """Look again later; with `resend`, nothing was created (a successful read proved it,
        or the request was `refused` before it could create anything), so the start may be
        sent again: it goes back to "new". A refused attempt does not count as a POST."""
        now = self._now()
        with self._tx() as c:
            if resend:
                c.execute(
                    "UPDATE intents SET state = 'new', unknown_at = NULL, next_try = ?,"
                    " posts = posts - ?, updated = ? WHERE id = ?"
                    " AND state IN ('sending', 'unknown')",
                    (next_try, int(refused), now.timestamp(), intent_id),
                )
            else:
                c.execute(
                    "UPDATE intents SET next_try = ?, updated = ? WHERE id = ?",
                    (next_try, now.timestamp(), intent_id),
                )

    def intent_failed(
        self,
        intent_id: str,
        *,
        http_status: int | None,
        error_code: str | None,
        detail: str,
        pointer: str | None = None,
    ) -> None:
        """The start cannot happen (Apple refused it, or a name does not resolve)."""
        with self._tx() as c:
            intent = self._intent_row(c, intent_id)
            if intent.state in OPEN_INTENTS:
                self._fail(
                    c,
                    intent,
                    http_status=http_status,
                    error_code=error_code,
                    detail=detail,
                    pointer=pointer,
                )

    def _fail(
        self,
        c: sqlite3.Connection,
        intent: Intent,
        *,
        http_status: int | None,
        error_code: str | None,
        detail: str,
        pointer: str | None = None,
    ) -> None:
        events: list[Event] = []
        self._fired(c, intent, events)
        c.execute(
            "UPDATE intents SET state = 'failed', updated = ? WHERE id = ?",
            (self._now().timestamp(), intent.id),
        )
        events.append(
            self.ev.make(
                "build.start_failed",
                subject=intent.id,
                job=intent.job,
                workflow_id=intent.workflow_id,
                origin=origin_of(intent.origin),
                http_status=http_status,
                error_code=error_code,
                detail=detail,
                pointer=pointer,
            )
        )
        self._append(c, events)

    def intent_missed(self, intent_id: str, reason: str) -> None:
        """A start that was never sent and no longer should be (too old, job disabled or gone):
        its occurrence is counted missed. One whose occurrence already fired (it was sent
        before, and proven to have created nothing) ends as a failed start instead."""
        with self._tx() as c:
            intent = self._intent_row(c, intent_id)
            if intent.state != "new":
                return
            missed = 0
            if intent.job is not None and intent.planned is not None:
                missed = c.execute(
                    "UPDATE occurrences SET state = 'missed', reason = ? WHERE job = ?"
                    " AND planned = ? AND state = 'firing'",
                    (reason, intent.job, iso(intent.planned)),
                ).rowcount
            if not missed:
                self._fail(c, intent, http_status=None, error_code=None, detail=reason)
                return
            assert intent.job is not None
            assert intent.planned is not None
            c.execute(
                "UPDATE intents SET state = 'missed', updated = ? WHERE id = ?",
                (self._now().timestamp(), intent_id),
            )
            self._append(
                c,
                [
                    self.ev.make(
                        "schedule.missed",
                        subject=occurrence_key(intent.job, intent.planned),
                        job=intent.job,
                        count=1,
                        oldest=intent.planned.isoformat(),
                        capped=False,
                        reason=reason,
                    )
                ],
            )

    def pending_windows(self, workflow_id: str) -> list[tuple[str, datetime, datetime | None]]:
        """(intent id, sent_at, unknown_at) of this workflow's starts whose outcome is not
        settled: a run created in one of these windows may be ours, not a foreign build."""
        rows = self._conn.execute(
            "SELECT id, sent_at, unknown_at FROM intents WHERE workflow_id = ?"
            " AND state IN ('sending', 'unknown') AND sent_at IS NOT NULL",
            (workflow_id,),
        ).fetchall()
        return [(r[0], parse_iso(r[1]), parse_iso(r[2]) if r[2] else None) for r in rows]

    def settle_orphaned_holds(self, buffering_jobs: Sequence[str]) -> int:
        """Held occurrences (buffer_one) of jobs that no longer hold any (removed from the
        config, or no longer buffer_one) will never start: each is counted missed."""
        with self._tx() as c:
            rows = c.execute("SELECT job, planned FROM occurrences WHERE state = 'held'").fetchall()
            orphans = [(r[0], parse_iso(r[1])) for r in rows if r[0] not in buffering_jobs]
            for job, planned in orphans:
                c.execute(
                    "UPDATE occurrences SET state = 'missed', reason = ? WHERE job = ?"
                    " AND planned = ?",
                    ("the job no longer holds occurrences", job, iso(planned)),
                )
                self._append(
                    c,
                    [
                        self.ev.make(
                            "schedule.missed",
                            subject=occurrence_key(job, planned),
                            job=job,
                            count=1,
                            oldest=planned.isoformat(),
                            capped=False,
                            reason="the job was removed or no longer uses overlap = buffer_one",
                        )
                    ],
                )
            return len(orphans)

    # --- runs ------------------------------------------------------------------------------

    def record_run(self, run: NewRun, *, intent_id: str | None, reconciled: bool) -> bool:
        """A run exists: the one writer of its `build.created` (and of its intent's end).
        False if the run was known before."""
        with self._tx() as c:
            return self._record(c, run, intent_id=intent_id, reconciled=reconciled)

    def _record(
        self, c: sqlite3.Connection, run: NewRun, *, intent_id: str | None, reconciled: bool
    ) -> bool:
        cur = c.execute(
            "INSERT OR IGNORE INTO runs (run_id, number, workflow_id, job, origin, progress,"
            " created_at, first_seen, created_emitted, product_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
            (
                run.run_id,
                run.number,
                run.workflow_id,
                run.job,
                run.origin,
                run.progress,
                iso(run.created_at) if run.created_at else None,
                iso(self._now()),
                run.product_id,
            ),
        )
        new = cur.rowcount == 1
        # A reconciled candidate someone else recorded first is not ours to claim; the
        # POST's own answer always is.
        if intent_id is not None and (new or not reconciled):
            c.execute(
                "UPDATE intents SET state = 'done', run_id = ?, updated = ? WHERE id = ?",
                (run.run_id, self._now().timestamp(), intent_id),
            )
        if new:
            ref = BuildRef(run.run_id, run.number, run.workflow_id, run.job, origin_of(run.origin))
            self._append(
                c,
                [
                    self.ev.make(
                        "build.created",
                        subject=run.run_id,
                        build=ref,
                        reconciled=reconciled,
                        start_reason=run.start_reason,
                    )
                ],
            )
        return new

    def known_runs(self, run_ids: Sequence[str]) -> set[str]:
        if not run_ids:
            return set()
        marks = ",".join("?" * len(run_ids))
        rows = self._conn.execute(
            f"SELECT run_id FROM runs WHERE run_id IN ({marks})", tuple(run_ids)
        ).fetchall()
        return {r[0] for r in rows}

    def write_round(
        self,
        *,
        seen: Sequence[Seen] = (),
        ended: Sequence[Ended] = (),
        new: Sequence[NewRun] = (),
        cursors: Sequence[tuple[str, int]] = (),
    ) -> set[str]:
        """What one poll round learned, in one transaction (one commit, one fsync, however
        many runs a product's list showed). Returns the ids of the runs whose watch ended
        here (an end already on record is not written twice); new runs have no intent. A
        round that learned nothing writes nothing."""
        if not (seen or ended or new or cursors):
            return set()
        with self._tx() as c:
            for run in new:
                self._record(c, run, intent_id=None, reconciled=False)
            for s in seen:
                self._observe(c, s)
            done = {e.run_id for e in ended if self._finish(c, e)}
            for workflow_id, highest in cursors:
                self._cursor(c, workflow_id, highest)
            return done

    def _observe(self, c: sqlite3.Connection, s: Seen) -> None:
        c.execute(
            "UPDATE runs SET number = coalesce(?, number), progress = ?,"
            " product_id = coalesce(?, product_id), started_at = coalesce(?, started_at)"
            " WHERE run_id = ? AND finished = 0",
            (
                s.number,
                s.progress,
                s.product_id,
                iso(s.started_at) if s.started_at else None,
                s.run_id,
            ),
        )
        if s.started is not None:
            # Not for a run whose watch ended meanwhile (an older answer than its end's).
            cur = c.execute(
                "UPDATE runs SET started_emitted = 1 WHERE run_id = ? AND started_emitted = 0"
                " AND finished = 0",
                (s.run_id,),
            )
            if cur.rowcount:
                self._append(c, [s.started])

    def _finish(self, c: sqlite3.Connection, e: Ended) -> bool:
        cur = c.execute(
            "UPDATE runs SET number = coalesce(?, number), progress = coalesce(?, progress),"
            " completion_status = ?, finished = 1, end_reason = ?, finished_at = ?,"
            " completed_emitted = ?, started_at = coalesce(?, started_at), ended_at = ?"
            " WHERE run_id = ? AND finished = 0",
            (
                e.number,
                e.progress,
                e.completion_status,
                e.reason,
                self._now().timestamp(),
                int(e.reason == "completed"),
                iso(e.started_at) if e.started_at else None,
                iso(e.ended_at) if e.ended_at else None,
                e.run_id,
            ),
        )
        if not cur.rowcount:
            return False
        for given in e.events:
            event = given
            if event.name == "build.completed":
                event = self._with_previous(c, e.run_id, event)
            if event.name == "build.started":
                started = c.execute(
                    "UPDATE runs SET started_emitted = 1 WHERE run_id = ? AND started_emitted = 0",
                    (e.run_id,),
                )
                if not started.rowcount:
                    continue
            self._append(c, [event])
        return True

    def _with_previous(self, c: sqlite3.Connection, run_id: str, event: Event) -> Event:
        """`previous_result`: how the build before this one of the same job (of the same
        workflow, for builds of no job) ended, so a sink can say "broke" or "fixed"."""
        row = c.execute(
            "SELECT number, workflow_id, job FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        if row is None:
            return event
        number, workflow_id, job = row
        same = "job = ?" if job is not None else "job IS NULL AND workflow_id = ?"
        before = "AND number < ?" if number is not None else ""
        args = [run_id, job if job is not None else workflow_id]
        if number is not None:
            args.append(number)
        prev = c.execute(
            "SELECT completion_status FROM runs WHERE run_id != ? AND finished = 1"
            f" AND end_reason = 'completed' AND {same} {before}"
            " ORDER BY number DESC, first_seen DESC LIMIT 1",
            args,
        ).fetchone()
        status = prev[0] if prev else None
        previous = None if status is None else RESULTS.get(status, "error")
        return dataclasses.replace(event, fields={**event.fields, "previous_result": previous})

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

    # --- watched workflows -----------------------------------------------------------------

    def _cursor(self, c: sqlite3.Connection, workflow_id: str, highest_number: int) -> None:
        c.execute(
            "INSERT INTO cursors VALUES (?, ?) ON CONFLICT(workflow_id) DO UPDATE SET"
            " highest_number = max(highest_number, excluded.highest_number)",
            (workflow_id, highest_number),
        )

    def cursors(self, workflow_ids: Sequence[str]) -> dict[str, int]:
        if not workflow_ids:
            return {}
        marks = ",".join("?" * len(workflow_ids))
        rows = self._conn.execute(
            f"SELECT workflow_id, highest_number FROM cursors WHERE workflow_id IN ({marks})",
            tuple(workflow_ids),
        ).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    # --- history -----------------------------------------------------------------------------

    def spans(self, per_workflow: int = 50) -> dict[str, list[Span]]:
        """The newest completed runs of each workflow: how long each queued and ran."""
        rows = self._conn.execute(
            "SELECT workflow_id, created_at, started_at, ended_at FROM ("
            " SELECT workflow_id, created_at, started_at, ended_at, row_number() OVER"
            " (PARTITION BY workflow_id ORDER BY finished_at DESC) AS n FROM runs"
            " WHERE finished = 1 AND end_reason = 'completed' AND ended_at IS NOT NULL)"
            " WHERE n <= ?",
            (per_workflow,),
        ).fetchall()
        out: dict[str, list[Span]] = {}
        for workflow_id, created, started, ended in rows:
            out.setdefault(workflow_id, []).append(_span(created, started, ended))
        return out

    def workflow_products(self) -> dict[str, str]:
        """Which product each workflow seen so far belongs to."""
        rows = self._conn.execute(
            "SELECT DISTINCT workflow_id, product_id FROM runs WHERE product_id IS NOT NULL"
        ).fetchall()
        return {r[0]: r[1] for r in rows}

    # --- outbox ----------------------------------------------------------------------------

    def outbox_after(self, seq: int, limit: int) -> list[OutboxRow]:
        rows = self._conn.execute(
            "SELECT seq, event_id, name, body FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        ).fetchall()
        return [OutboxRow(r[0], r[1], r[2], bytes(r[3])) for r in rows]

    def outbox_by_ids(self, event_ids: Sequence[str]) -> list[OutboxRow]:
        if not event_ids:
            return []
        marks = ",".join("?" * len(event_ids))
        rows = self._conn.execute(
            f"SELECT seq, event_id, name, body FROM outbox WHERE event_id IN ({marks})"
            " ORDER BY seq",
            tuple(event_ids),
        ).fetchall()
        return [OutboxRow(r[0], r[1], r[2], bytes(r[3])) for r in rows]

    def outbox_end(self) -> int:
        row = self._conn.execute("SELECT max(seq) FROM outbox").fetchone()
        return int(row[0] or 0)

    def sink_cursor(self, sink: str) -> int:
        """Where a sink resumes; a sink seen for the first time starts at the oldest row kept."""
        row = self._conn.execute("SELECT seq FROM sink_cursors WHERE sink = ?", (sink,)).fetchone()
        if row is not None:
            return int(row[0])
        first = self._conn.execute("SELECT min(seq) FROM outbox").fetchone()[0]
        start = int(first) - 1 if first is not None else self.outbox_end()
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO sink_cursors VALUES (?, ?)", (sink, start))
        return start

    def advance_sink(self, sink: str, seq: int) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO sink_cursors VALUES (?, ?) ON CONFLICT(sink) DO UPDATE SET"
                " seq = max(seq, excluded.seq)",
                (sink, seq),
            )

    def pending_count(self, sink: str) -> int:
        row = self._conn.execute(
            "SELECT count(*) FROM outbox WHERE seq > coalesce("
            "(SELECT seq FROM sink_cursors WHERE sink = ?), 0)",
            (sink,),
        ).fetchone()
        return int(row[0])

    def in_flight_count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM runs WHERE finished = 0").fetchone()[0])

    def stats(self, sinks: Sequence[str]) -> StoreStats:
        """What /metrics shows from the store, read in one go."""
        c = self._conn
        in_flight = self.in_flight_count()
        last = c.execute(
            "SELECT job, max(finished_at) FROM runs WHERE completion_status = 'SUCCEEDED'"
            " AND job IS NOT NULL AND finished_at IS NOT NULL GROUP BY job"
        ).fetchall()
        return StoreStats(
            runs_in_flight=in_flight,
            outbox=self.outbox_size(),
            pending={s: self.pending_count(s) for s in sinks},
            last_success={str(job): float(at) for job, at in last},
        )

    def heartbeat(
        self, *, pid: int, host: str, version: str, started: float, stopped: bool = False
    ) -> None:
        """The daemon says it is alive (or, with `stopped`, that it stopped cleanly)."""
        now = self._now().timestamp()
        with self._tx() as c:
            c.execute(
                "INSERT INTO daemon VALUES (1, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET"
                " pid = excluded.pid, host = excluded.host, version = excluded.version,"
                " started = excluded.started, beat = excluded.beat, stopped = excluded.stopped",
                (pid, host, version, started, now, now if stopped else None),
            )

    def daemon_beat(self) -> DaemonBeat | None:
        row = self._conn.execute(
            "SELECT pid, host, version, started, beat, stopped FROM daemon WHERE id = 1"
        ).fetchone()
        return None if row is None else DaemonBeat(*row)

    def outbox_size(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def prune(
        self, sinks: Sequence[str], *, max_events: int, max_age: float, now: float
    ) -> dict[str, int]:
        """Delete rows every sink has passed; past the bounds, drop the oldest rows even if a
        sink has not: each such sink's count is reported in a `sink.dropped` event."""
        with self._tx() as c:
            cursors = {
                s: int(r[0])
                for s in sinks
                if (r := c.execute("SELECT seq FROM sink_cursors WHERE sink = ?", (s,)).fetchone())
            }
            if not sinks:
                c.execute("DELETE FROM outbox")  # nobody will ever read them
                return {}
            floor = min(cursors.values(), default=None)
            if floor is not None:
                c.execute("DELETE FROM outbox WHERE seq <= ?", (floor,))
            end = int(c.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0])
            by_count = end - max_events
            old = c.execute(
                "SELECT max(seq) FROM outbox WHERE created < ?", (now - max_age,)
            ).fetchone()[0]
            cut = max(by_count, int(old or 0))
            dropped: dict[str, int] = {}
            if cut <= 0:
                return dropped
            for sink, seq in cursors.items():
                if seq < cut:
                    count = c.execute(
                        "SELECT count(*) FROM outbox WHERE seq > ? AND seq <= ?", (seq, cut)
                    ).fetchone()[0]
                    if count:
                        dropped[sink] = int(count)
                    c.execute("UPDATE sink_cursors SET seq = ? WHERE sink = ?", (cut, sink))
            c.execute("DELETE FROM outbox WHERE seq <= ?", (cut,))
            self._append(
                c,
                [self.ev.make("sink.dropped", sink=s, count=n) for s, n in dropped.items()],
            )
            return dropped


def requested_fields(intent: Intent, target: StartRequest) -> dict[str, Any]:
    """`build.requested`'s own fields; the workflow's name only when the start resolved it."""
    fields: dict[str, Any] = {"job": intent.job, "workflow_id": target.workflow_id}
    if target.workflow_name:
        fields["workflow_name"] = target.workflow_name
    return fields | {
        "git_reference_id": target.git_reference_id,
        "pull_request_id": target.pull_request_id,
        "rebuild_of": target.rebuild_of,
        "clean": target.clean,
        "origin": origin_of(intent.origin),
    }


def _span(created: str | None, started: str | None, ended: str | None) -> Span:
    c, s, e = (parse_iso(x) if x else None for x in (created, started, ended))
    queued = (s - c).total_seconds() if c and s else None
    ran = (e - s).total_seconds() if s and e else None
    return Span(queued, ran)


def _run(row: sqlite3.Row) -> RunRecord:
    d = dict(row)
    for key in ("finished", "created_emitted", "started_emitted", "completed_emitted"):
        d[key] = bool(d[key])
    return RunRecord(**d)
