"""The state store: versioned schema, once-only decisions and marks, durable across reopening."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from xcloudd.store import Store, StoreError

PLANNED = datetime(2027, 3, 28, 1, 0, tzinfo=UTC)
WORKFLOW = "9badb4d6-5c53-5999-aa53-4699ec802d11"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "state" / "state.db")
    yield s
    s.close()


def intent(store: Store, planned: datetime = PLANNED, *, decide: bool = True) -> str | None:
    return store.record_intent(
        job="nightly",
        planned=planned,
        decide=decide,
        origin="schedule",
        workflow_id=WORKFLOW,
        git_reference_id="ref-main",
        pull_request_id=None,
        rebuild_of=None,
        clean=False,
        sent_at=planned,
    )


def test_migrations_set_user_version(store: Store) -> None:
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()
    assert {"occurrences", "jobs", "intents", "runs", "cursors"} <= tables


def test_a_store_from_a_newer_xcloudd_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(StoreError, match="newer xcloudd"):
        Store.open(path)


def test_decide_is_once_only(store: Store) -> None:
    assert store.decide("nightly", PLANNED, "fired") is True
    assert store.decide("nightly", PLANNED, "skipped", "overlap") is False
    assert store.occurrence("nightly", PLANNED) == "fired"
    assert store.last_planned("nightly") == PLANNED
    # Another job, or another instant, is another occurrence.
    assert store.decide("other", PLANNED, "skipped", "overlap") is True
    assert store.decide("nightly", PLANNED + timedelta(days=1), "skipped", "overlap") is True


def test_record_intent_refuses_a_decided_occurrence(store: Store) -> None:
    first = intent(store)
    assert first is not None
    assert intent(store) is None
    assert store.decide("nightly", PLANNED, "skipped", "overlap") is False
    assert [i.id for i in store.pending_intents()] == [first]
    store.decide("nightly", PLANNED + timedelta(hours=1), "skipped", "overlap")
    assert intent(store, PLANNED + timedelta(hours=1)) is None
    assert len(store.pending_intents()) == 1


def test_a_held_occurrence_survives_reopening_and_is_decided_once(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = Store.open(path)
    assert first.decide("nightly", PLANNED, "held") is True
    first.close()
    store = Store.open(path)
    try:
        # buffer_one's waiting occurrence is still there for the next process, and undecided.
        assert store.held() == [("nightly", PLANNED)]
        assert store.unannounced() == []
        assert intent(store) is not None
        assert store.occurrence("nightly", PLANNED) == "fired"
        assert store.held() == []
        assert intent(store) is None
        assert store.decide("nightly", PLANNED, "skipped", "overlap") is False
    finally:
        store.close()


def test_an_intent_is_done_when_its_run_is_recorded(store: Store) -> None:
    intent_id = intent(store)
    assert intent_id is not None
    assert store.has_pending_intents(WORKFLOW)
    assert store.add_run(
        run_id="run-1",
        number=7,
        workflow_id=WORKFLOW,
        job="nightly",
        origin="schedule",
        created_at=PLANNED,
        intent_id=intent_id,
        created_emitted=True,
    )
    assert store.pending_intents() == []
    assert not store.has_pending_intents(WORKFLOW)
    assert store.knows_run("run-1")
    assert [r.run_id for r in store.runs_in_flight()] == ["run-1"]
    # The same run again (found twice by reconciling, say) is not a second run.
    assert not store.add_run(
        run_id="run-1",
        number=7,
        workflow_id=WORKFLOW,
        job="nightly",
        origin="schedule",
        created_at=PLANNED,
    )


def test_marks_are_once_only(store: Store) -> None:
    store.add_run(
        run_id="run-1",
        number=1,
        workflow_id=WORKFLOW,
        job=None,
        origin="watch",
        created_at=None,
    )
    for what in ("created", "started", "completed"):
        assert store.mark("run-1", what) is True
        assert store.mark("run-1", what) is False
    record = store.run("run-1")
    assert record is not None
    assert (record.created_emitted, record.started_emitted, record.completed_emitted) == (
        True,
        True,
        True,
    )


def test_reopening_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    s = Store.open(path)
    intent_id = intent(s)
    s.decide("nightly", PLANNED + timedelta(days=1), "skipped", "overlap")
    s.add_run(
        run_id="run-1",
        number=3,
        workflow_id=WORKFLOW,
        job=None,
        origin="watch",
        created_at=PLANNED,
    )
    s.update_run("run-1", number=3, progress="COMPLETE", completion_status="FAILED", finished=True)
    s.set_cursor(WORKFLOW, 3)
    s.close()

    s = Store.open(path)
    try:
        assert [i.id for i in s.pending_intents()] == [intent_id]
        assert s.occurrence("nightly", PLANNED) == "fired"
        assert s.last_planned("nightly") == PLANNED + timedelta(days=1)
        assert len(s.unannounced()) == 2
        assert s.runs_in_flight() == []
        (recent,) = s.recent_runs()
        assert (recent.run_id, recent.completion_status, recent.finished) == (
            "run-1",
            "FAILED",
            True,
        )
        assert s.cursor(WORKFLOW) == 3
        s.set_cursor(WORKFLOW, 2)  # never backwards
        assert s.cursor(WORKFLOW) == 3
    finally:
        s.close()
    # A reader (`xcloudd status`) sees the same, without writing.
    ro = Store.open(path, readonly=True)
    try:
        assert [r.run_id for r in ro.recent_runs()] == ["run-1"]
    finally:
        ro.close()


def test_readonly_open_of_a_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "state.db"
    with pytest.raises(StoreError, match=r"no state store at .*state\.db: has the daemon run yet"):
        Store.open(path, readonly=True)
    assert not path.parent.exists()
