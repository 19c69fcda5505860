"""The state store: every fact and its event in one transaction, once; the outbox and its
cursors; the versioned schema. Checked through what a sink would read from the outbox."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from xcloudd.clock import FakeClock
from xcloudd.events import EventFactory
from xcloudd.store import (
    _MIGRATIONS,
    Ended,
    NewRun,
    StartRequest,
    Store,
    StoreError,
    StoreUnwritable,
)

PLANNED = datetime(2027, 3, 28, 1, 0, tzinfo=UTC)
WORKFLOW = "9badb4d6-5c53-5999-aa53-4699ec802d11"
REQUEST = StartRequest(WORKFLOW, "ref-main", clean=False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(PLANNED.timestamp())


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    s = Store.open(tmp_path / "state" / "state.db", EventFactory(clock))
    yield s
    s.close()


def outbox(store: Store) -> list[dict[str, Any]]:
    return [orjson.loads(r.body) for r in store.outbox_after(0, 10_000)]


def names(store: Store) -> list[str]:
    return [e["event"] for e in outbox(store)]


def fire(store: Store, planned: datetime = PLANNED, overlap: str = "skip") -> str | None:
    decision = store.decide(
        "nightly",
        newest=planned,
        missed=0,
        missed_oldest=None,
        candidate=planned,
        enabled=True,
        overlap=overlap,
    )
    return decision.intent_id


def run_of(intent_id: str | None, run_id: str = "run-1") -> NewRun:
    return NewRun(run_id, 7, WORKFLOW, "nightly", "schedule", PLANNED, "MANUAL", "PENDING")


def test_migrations_reach_the_outbox_schema(store: Store) -> None:
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(_MIGRATIONS)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()
    assert {"occurrences", "jobs", "intents", "runs", "outbox", "sink_cursors"} <= tables


def test_a_pending_start_from_the_first_schema_is_reconciled_not_resent(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.executescript(_MIGRATIONS[0] + "PRAGMA user_version=1;")
    conn.execute(
        "INSERT INTO intents VALUES ('i1', 'nightly', '2027-03-28T01:00:00.000Z', 'schedule',"
        " ?, NULL, NULL, NULL, NULL, '2027-03-28T01:00:01.000Z', 'pending', NULL)",
        (WORKFLOW,),
    )
    conn.commit()
    conn.close()
    store = Store.open(path, EventFactory(clock))
    try:
        (intent,) = store.open_intents()
    finally:
        store.close()
    assert intent.state == "unknown"
    assert intent.sent_at == intent.unknown_at == datetime(2027, 3, 28, 1, 0, 1, tzinfo=UTC)


def test_a_store_from_a_newer_xcloudd_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "state.db"
    Store.open(path, EventFactory(clock)).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(StoreError, match="newer xcloudd"):
        Store.open(path, EventFactory(clock))


def test_an_occurrence_is_decided_once(store: Store) -> None:
    assert fire(store) is not None
    assert fire(store) is None
    assert store.occurrence("nightly", PLANNED) == "firing"
    assert store.last_planned("nightly") == PLANNED


def test_missed_occurrences_are_one_event_with_the_decision(store: Store) -> None:
    store.decide(
        "nightly",
        newest=PLANNED,
        missed=4,
        missed_oldest=PLANNED - timedelta(hours=4),
        candidate=PLANNED,
        enabled=True,
        overlap="skip",
    )
    (missed,) = outbox(store)
    assert (missed["event"], missed["count"]) == ("schedule.missed", 4)
    assert missed["oldest"] == (PLANNED - timedelta(hours=4)).isoformat()


def test_overlap_skip_and_buffer_one_see_starts_and_runs_in_flight(store: Store) -> None:
    first = fire(store, overlap="buffer_one")
    assert first is not None
    later = [PLANNED + timedelta(minutes=m) for m in (1, 2)]
    assert fire(store, later[0], "buffer_one") is None
    assert store.occurrence("nightly", later[0]) == "held"
    assert fire(store, later[1], "buffer_one") is None
    assert store.occurrence("nightly", later[1]) == "skipped"
    assert store.release_held("nightly") is None  # the first start is still open
    store.intent_sending(first, REQUEST)
    store.record_run(run_of(first), intent_id=first, reconciled=False)
    store.write_round(ended=[Ended("run-1", "completed", [], 7, "COMPLETE", "SUCCEEDED")])
    assert store.release_held("nightly") is not None
    assert store.occurrence("nightly", later[0]) == "firing"


def test_each_fact_writes_its_event_once(store: Store) -> None:
    intent_id = fire(store)
    assert intent_id is not None
    assert names(store) == []  # firing: nothing has gone out yet
    assert store.intent_sending(intent_id, REQUEST) is not None
    assert store.intent_sending(intent_id, REQUEST) is None
    assert names(store) == ["schedule.fired", "build.requested"]
    store.intent_unknown(intent_id, reason="connection reset", http_status=None, next_try=0)
    store.intent_unknown(intent_id, reason="connection reset", http_status=None, next_try=0)
    assert store.record_run(run_of(intent_id), intent_id=intent_id, reconciled=True)
    assert not store.record_run(run_of(intent_id), intent_id=intent_id, reconciled=True)
    ev = store.ev
    done = [ev.make("build.completed", subject="run-1", completion_status="SUCCEEDED")]
    for _ in range(2):  # a second process finishing it again writes nothing
        store.write_round(ended=[Ended("run-1", "completed", done, 7, "COMPLETE", "SUCCEEDED")])
    assert names(store) == [
        "schedule.fired",
        "build.requested",
        "build.start_unknown",
        "build.created",
        "build.completed",
    ]
    assert store.intent(intent_id).state == "done"  # type: ignore[union-attr]
    assert store.runs_in_flight() == []


def test_one_event_id_keeps_its_first_body(store: Store, clock: FakeClock) -> None:
    first = store.ev.make("build.created", subject="run-1", origin="schedule")
    clock.advance(5)
    second = store.ev.make("build.created", subject="run-1", origin="watch")
    assert first.event_id == second.event_id
    store.append([first])
    store.append([second])
    (row,) = outbox(store)
    assert row["origin"] == "schedule"


def test_a_start_never_sent_and_too_late_is_counted_missed(store: Store) -> None:
    intent_id = fire(store)
    assert intent_id is not None
    store.intent_missed(intent_id, "older than the job's catch_up")
    (missed,) = outbox(store)
    assert (missed["event"], missed["count"]) == ("schedule.missed", 1)
    assert store.occurrence("nightly", PLANNED) == "missed"
    assert store.open_intents() == []


def test_sinks_resume_at_their_cursor_and_far_behind_ones_are_told_what_was_dropped(
    store: Store, clock: FakeClock
) -> None:
    store.append([store.ev.make("daemon.started") for _ in range(3)])
    start = store.sink_cursor("file:a")
    assert start == 0  # a new sink starts at the oldest row kept
    store.advance_sink("file:a", 2)
    assert store.sink_cursor("file:a") == 2
    assert store.pending_count("file:a") == 1
    store.sink_cursor("stdout")
    store.append([store.ev.make("daemon.started") for _ in range(5)])
    dropped = store.prune(["file:a", "stdout"], max_events=4, max_age=3600, now=clock.time())
    assert dropped == {"file:a": 2, "stdout": 4}
    reports = {e["sink"]: e["count"] for e in outbox(store) if e["event"] == "sink.dropped"}
    assert reports == dropped
    assert store.sink_cursor("file:a") == store.sink_cursor("stdout") == 4


def test_delivered_rows_are_pruned(store: Store, clock: FakeClock) -> None:
    store.sink_cursor("stdout")
    store.append([store.ev.make("daemon.started") for _ in range(3)])
    store.advance_sink("stdout", store.outbox_end())
    assert store.prune(["stdout"], max_events=100, max_age=3600, now=clock.time()) == {}
    assert store.outbox_size() == 0


def test_a_full_disk_is_a_clear_error_that_records_nothing(store: Store) -> None:
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StoreUnwritable, match="full"):
        store.append([store.ev.make("daemon.started", note="x" * 20_000)])
    assert store.outbox_size() == 0


def test_status_on_a_store_of_the_previous_schema_says_what_to_do(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.executescript(_MIGRATIONS[0] + "PRAGMA user_version=1;")
    conn.close()
    with pytest.raises(StoreError, match="run the daemon of this version once"):
        Store.open(path, EventFactory(clock), readonly=True)
