"""`kill -9` at random instants loses nothing and duplicates nothing (DESIGN 3.3 and 5).

Real processes on real time (the one place where the tests wait on the wall clock): the
simulator as `xcloudd simulator`, the daemon as `xcloudd run`, killed with SIGKILL at seeded
random moments and started again on the same state store and event file.
"""

from __future__ import annotations

import http.server
import json
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from procs import (
    add_fault,
    free_port,
    in_flight,
    read_events,
    sim_runs,
    simulator_process,
    start_daemon,
)

SEED = 20261130
KILLS = 9
DEADLINE_S = 45.0


def daemon_config(client_config: Path, state_path: Path, events_path: Path) -> str:
    """The simulator's client config with a state store, fast polling and a file sink."""
    return client_config.read_text(encoding="utf-8") + (
        f'\n[state]\npath = "{state_path}"\n\n[polling]\ninterval = "1s"\n'
        f'min_interval = "1s"\n\n[[sinks]]\ntype = "file"\npath = "{events_path}"\n'
    )


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(URL, client config path) of an `xcloudd simulator` process."""
    with simulator_process(tmp_path / "sim") as running:
        yield running


def test_kill_9_loses_and_duplicates_nothing(simulator: tuple[str, Path], tmp_path: Path) -> None:
    url, client_config = simulator
    events_path = tmp_path / "events.jsonl"
    state_path = tmp_path / "state.db"
    config = tmp_path / "config.toml"
    config.write_text(
        daemon_config(client_config, state_path, events_path)
        + """
[[jobs]]
name = "ci"
product = "Acme Shop"
workflow = "CI"
branch = "main"
every = "2s"
overlap = "allow_all"
catch_up = "1h"

[[jobs]]
name = "nightly"
product = "Acme Shop"
workflow = "Nightly"
branch = "develop"
every = "3s"
overlap = "skip"
catch_up = "1h"
""",
        encoding="utf-8",
    )
    log = tmp_path / "daemon.stderr"
    # Some starts end without an answer although the run was created: a kill then often lands
    # while the daemon reconciles, the hardest moment to crash in.
    add_fault(url, action="drop_after_create", method="POST", path="/v1/ciBuildRuns", times=3)
    add_fault(url, action="error_after_create", method="POST", path="/v1/ciBuildRuns", times=2)
    rng = random.Random(SEED)
    began = time.monotonic()

    daemon = start_daemon(config, log)
    for _ in range(KILLS):
        time.sleep(rng.uniform(0.2, 3.0))
        assert daemon.poll() is None, log.read_text()
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        daemon = start_daemon(config, log)

    # SIGTERM, as systemd stops it: a clean exit.
    time.sleep(rng.uniform(0.2, 3.0))
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=20) == 0, log.read_text()
    # Quiescence: a last process without jobs follows what is in flight to the end.
    config.write_text(config.read_text(encoding="utf-8").split("[[jobs]]")[0], "utf-8")
    final = start_daemon(config, log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if not in_flight(state_path):
            break
    final.send_signal(signal.SIGTERM)
    assert final.wait(timeout=20) == 0, log.read_text()
    assert not in_flight(state_path)
    assert time.monotonic() - began < DEADLINE_S + 30

    events = read_events(events_path)
    truth = {r["id"]: r for r in sim_runs(url)}
    ours = {i: r for i, r in truth.items() if r["start_reason"] == "MANUAL"}
    assert ours, "no build was started at all"

    created = Counter(e["build_run_id"] for e in events if e["event"] == "build.created")
    completed = Counter(e["build_run_id"] for e in events if e["event"] == "build.completed")
    # Each build run: exactly one build.created, at most one build.completed.
    assert {i: n for i, n in created.items() if n != 1} == {}
    assert {i: n for i, n in completed.items() if n != 1} == {}
    assert set(completed) <= set(created)
    # Every run xcloudd started is known, and every one that finished was reported finished.
    assert set(created) == set(ours)
    finished = {i for i, r in ours.items() if r["execution_progress"] == "COMPLETE"}
    missing = finished - set(completed)
    assert missing == set(), f"completed runs without build.completed: {missing}"

    # Each occurrence ends once: one schedule.fired or schedule.skipped, never both or twice.
    decisions = Counter(
        (e["job"], e["scheduled_for"])
        for e in events
        if e["event"] in ("schedule.fired", "schedule.skipped")
    )
    assert {k: n for k, n in decisions.items() if n != 1} == {}

    # And none is lost: between a job's first and last decided occurrence, every planned instant
    # was fired, skipped or counted in a schedule.missed.
    for job, every in (("ci", 2), ("nightly", 3)):
        planned = sorted(datetime.fromisoformat(k[1]).timestamp() for k in decisions if k[0] == job)
        counted = sum(
            e["count"] for e in events if e["event"] == "schedule.missed" and e["job"] == job
        )
        assert len(planned) + counted == round((planned[-1] - planned[0]) / every) + 1, job

    # No occurrence started two builds: one run per fired occurrence, none without one.
    conn = sqlite3.connect(state_path)
    try:
        per_occurrence = conn.execute(
            "SELECT job, planned, count(run_id) FROM intents WHERE planned IS NOT NULL"
            " GROUP BY job, planned"
        ).fetchall()
        intent_runs = [r[0] for r in conn.execute("SELECT run_id FROM intents")]
    finally:
        conn.close()
    assert [row for row in per_occurrence if row[2] != 1] == []
    assert sorted(r for r in intent_runs if r) == sorted(ours)
    schedule_runs = {
        e["build_run_id"]
        for e in events
        if e["event"] == "build.created" and e["origin"] == "schedule"
    }
    assert schedule_runs == set(ours)
    fired = sum(1 for e in events if e["event"] == "schedule.fired")
    assert fired == len(ours)


class _Receiver(http.server.ThreadingHTTPServer):
    """An HTTP endpoint for the json sink, in a thread: what it was sent, in order."""

    def __init__(self, port: int) -> None:
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    receiver.received.extend(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", port), Handler)


def test_events_pending_for_a_down_sink_survive_kill_9(
    simulator: tuple[str, Path], tmp_path: Path
) -> None:
    _url, client_config = simulator
    events_path = tmp_path / "events.jsonl"
    state_path = tmp_path / "state.db"
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        daemon_config(client_config, state_path, events_path)
        + f"""
[[sinks]]
type = "http"
url = "http://127.0.0.1:{port}/ingest"

[[jobs]]
name = "ci"
product = "Acme Shop"
workflow = "CI"
branch = "main"
every = "2s"
overlap = "allow_all"
""",
        encoding="utf-8",
    )
    log = tmp_path / "daemon.stderr"
    daemon = start_daemon(config, log)
    # Nothing listens on the sink's port: its events wait in the outbox while builds go on.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.3)
        if (
            events_path.exists()
            and sum(e["event"] == "build.completed" for e in read_events(events_path)) >= 3
        ):
            break
    assert daemon.poll() is None, log.read_text()
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()
    before = read_events(events_path)
    assert sum(e["event"] == "build.completed" for e in before) >= 3
    assert [e for e in before if e["event"] == "sink.failed"], "the sink was never reported down"

    receiver = _Receiver(port)
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        config.write_text(config.read_text(encoding="utf-8").split("[[jobs]]")[0], "utf-8")
        daemon = start_daemon(config, log)
        deadline = time.monotonic() + 30
        wanted = {e["event_id"] for e in before}
        while time.monotonic() < deadline:
            time.sleep(0.3)
            with receiver.lock:
                got = {e["event_id"] for e in receiver.received}
            if wanted <= got:
                break
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0, log.read_text()
    finally:
        receiver.shutdown()
        receiver.server_close()

    after = read_events(events_path)
    ids = [e["event_id"] for e in receiver.received]
    # Everything the file sink had before the kill reached the HTTP sink after the restart,
    # once each, in the same order; and so did what the second process wrote.
    assert len(ids) == len(set(ids))
    assert ids == [e["event_id"] for e in after]
    assert ids[: len(before)] == [e["event_id"] for e in before]
