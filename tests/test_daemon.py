"""The daemon's promises (DESIGN 3.2-3.3), observed the way a user would: the events in a file
sink, the simulator's ground truth, and `xcloudd status --json`.

Time is virtual. `SteppingClock` (a FakeClock) lets every sleeper wait for its own instant, and
`Pump` moves the clock to the earliest one only after the event loop has settled (requests to
the in-process simulator answered), so a day of schedule costs a few milliseconds and the
daemon sees instants in the order a real clock would give them.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import sqlite3
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest import SteppingClock
from xcloudd import commands
from xcloudd.config import Config, load_config
from xcloudd.daemon import Daemon
from xcloudd.errors import ExitCode
from xcloudd.runtime import build_sinks, open_runtime
from xcloudd.simulator import Fault, RunningSimulator
from xcloudd.simulator.runs import BuildRun
from xcloudd.store import AsyncStore

# An hour boundary: every="1s"/"2s"/"1h" instants fall on whole multiples after it.
T0 = datetime(2026, 9, 1, 8, 0, tzinfo=UTC)
SETTLE_PASSES = 50


async def settle(store: AsyncStore | None = None) -> None:
    """Let the event loop, and the store's thread, finish what they can do at this instant."""
    while True:
        for _ in range(SETTLE_PASSES):
            await asyncio.sleep(0)
        if store is None or store.inflight == 0:
            return
        await asyncio.sleep(0.001)


@pytest.fixture
def start_at() -> datetime:
    return T0


@pytest.fixture
def fake_clock(start_at: datetime) -> SteppingClock:
    return SteppingClock(start_at.timestamp())


class Pump:
    """Runs one Daemon on the stepping clock; `until(t)` lets virtual time reach t."""

    def __init__(self, clock: SteppingClock, daemon: Daemon, store: AsyncStore) -> None:
        self.clock = clock
        self.daemon = daemon
        self.store = store
        self.task = asyncio.create_task(daemon.run())

    async def _step(self, limit: float) -> None:
        await settle(self.store)
        wake = self.clock.next_wakeup()
        self.clock.advance_to(limit if wake is None else min(wake, limit))

    async def until(self, instant: datetime | float) -> None:
        end = instant.timestamp() if isinstance(instant, datetime) else instant
        while self.clock.time() < end and not self.task.done():
            await self._step(end)
        await settle(self.store)
        assert not self.task.done(), "the daemon ended on its own"

    async def stop(self) -> ExitCode:
        self.daemon.stop()
        for round_ in itertools.count():
            await settle(self.store)
            if self.task.done():
                break
            if round_ >= 20:
                # A start under way still gets its (virtual) retry and reconcile delays.
                await self._step(self.clock.time() + 3600)
        return await self.task


class World:
    """A config for the simulator, a store, and the events of every process run on them."""

    def __init__(self, sim: RunningSimulator, clock: SteppingClock, tmp: Path) -> None:
        self.sim = sim
        self.clock = clock
        self.tmp = tmp
        self.events_path = tmp / "events.jsonl"
        self.config_path = sim.write_client_files(tmp)

    def configure(
        self, extra: str, *, polling: str = 'interval = "1s"\nmin_interval = "1s"'
    ) -> Config:
        base = self.config_path.read_text(encoding="utf-8").split("[state]")[0]
        self.config_path.write_text(
            base
            + f'[state]\npath = "{self.tmp / "state.db"}"\n\n[polling]\n{polling}\n\n'
            + f'[[sinks]]\ntype = "file"\npath = "{self.events_path}"\n\n'
            + extra,
            encoding="utf-8",
        )
        return load_config(self.config_path)

    async def run(self, config: Config, *steps: Any) -> ExitCode:
        """Run one daemon process: each step is an instant to reach, or a callable to call."""
        async with open_runtime(config, sinks=build_sinks(config.sinks), clock=self.clock) as rt:
            pump = Pump(self.clock, Daemon(rt), rt.store)
            for step in steps:
                if callable(step):
                    step()
                else:
                    await pump.until(step)
            code = await pump.stop()
        self.outbox_checked()
        return code

    def outbox_checked(self) -> None:
        """Whatever waits in the outbox has one body per id and reached the file sink."""
        conn = sqlite3.connect(self.tmp / "state.db")
        try:
            left = conn.execute("SELECT event_id FROM outbox").fetchall()
            cursor = conn.execute("SELECT seq FROM sink_cursors").fetchall()
            end = conn.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0]
        finally:
            conn.close()
        delivered = {e["event_id"] for e in self.events()}
        assert {r[0] for r in left} <= delivered
        assert all(c[0] == end for c in cursor), "a sink was left behind at shutdown"

    def events(self, *names: str) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        out = [json.loads(line) for line in self.events_path.read_text().splitlines()]
        return [e for e in out if not names or e["event"] in names]

    def workflow_id(self, name: str) -> str:
        return next(w.id for w in self.sim.sim.scenario.workflows() if w.name == name)

    def runs(self, workflow: str, start_reason: str | None = "MANUAL") -> list[BuildRun]:
        runs = self.sim.sim.runs.of_workflow(self.workflow_id(workflow))
        return [r for r in runs if start_reason is None or r.start_reason == start_reason]

    def intents(self) -> list[tuple[str, str, str, str | None]]:
        """(job, planned, state, run_id) of every start intent in the store."""
        conn = sqlite3.connect(self.tmp / "state.db")
        try:
            rows = conn.execute("SELECT job, planned, state, run_id FROM intents").fetchall()
        finally:
            conn.close()
        return [tuple(r) for r in rows]

    def status(self) -> dict[str, Any]:
        out = io.StringIO()
        assert commands.status(load_config(self.config_path), out, as_json=True) == ExitCode.OK
        doc: dict[str, Any] = json.loads(out.getvalue())
        return doc


@pytest.fixture
def world(sim: RunningSimulator, fake_clock: SteppingClock, tmp_path: Path) -> World:
    return World(sim, fake_clock, tmp_path)


def job(name: str, workflow: str = "CI", **keys: str) -> str:
    lines = [
        "[[jobs]]",
        f'name = "{name}"',
        'product = "Acme Shop"',
        f'workflow = "{workflow}"',
        'branch = "main"',
    ]
    lines += [f'{key} = "{value}"' for key, value in keys.items()]
    return "\n".join(lines) + "\n\n"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def assert_each_run_once(world: World) -> None:
    """Each build run: exactly one build.created, at most one build.completed, and each
    event id written once with one body."""
    source = world.events()
    ids = Counter(e["event_id"] for e in source)
    assert all(n == 1 for n in ids.values()), ids
    created = Counter(e["build_run_id"] for e in source if e["event"] == "build.created")
    completed = Counter(e["build_run_id"] for e in source if e["event"] == "build.completed")
    assert all(n == 1 for n in created.values()), created
    assert all(n == 1 for n in completed.values()), completed
    assert set(completed) <= set(created)


def finished_at(run: BuildRun) -> float:
    return run.created_at + run.pending_s + run.running_s


# --- DST -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start_at", "nights"),
    [
        pytest.param(
            datetime(2027, 3, 27, 0, 0, tzinfo=UTC),
            # CET 02:30 = 01:30Z; the skipped 02:30 runs at 03:00 CEST = 01:00Z; then CEST.
            ["2027-03-27T01:30:00Z", "2027-03-28T01:00:00Z", "2027-03-29T00:30:00Z"],
            id="spring-2027-03-28",
        ),
        pytest.param(
            datetime(2026, 10, 24, 0, 0, tzinfo=UTC),
            # CEST 02:30 = 00:30Z; the repeated 02:30 runs once, the first time (00:30Z); CET.
            ["2026-10-24T00:30:00Z", "2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"],
            id="autumn-2026-10-25",
        ),
    ],
)
async def test_cron_in_berlin_fires_once_per_night_across_dst(
    world: World, fake_clock: SteppingClock, nights: list[str]
) -> None:
    config = world.configure(job("nightly", cron="30 2 * * *", timezone="Europe/Berlin"))
    last = at(nights[-1])
    assert await world.run(config, last + timedelta(hours=1)) == ExitCode.OK

    fired = world.events("schedule.fired")
    assert [at(e["scheduled_for"]) for e in fired] == [at(n) for n in nights]
    # The event goes out at the planned instant, not an hour early or late.
    assert [at(e["timestamp"]) for e in fired] == [at(n) for n in nights]
    assert world.events("schedule.skipped", "schedule.missed") == []

    runs = world.runs("CI")
    assert sorted(r.created_at for r in runs) == [at(n).timestamp() for n in nights]
    intents = world.intents()
    assert sorted(at(p) for _, p, _, _ in intents) == [at(n) for n in nights]
    assert {run_id for *_, run_id in intents} == {r.id for r in runs}
    assert len(world.events("build.completed")) == len(nights)
    assert_each_run_once(world)


@pytest.mark.parametrize("dow", ["0", "7", "sun", "SUN"])
def test_check_json_sunday_is_0_and_7(world: World, dow: str) -> None:
    config = world.configure(job("weekly", cron=f"0 12 * * {dow}", timezone="Europe/Berlin"))
    out = io.StringIO()
    after = datetime(2026, 12, 1, tzinfo=UTC)  # a Tuesday
    assert commands.check_offline(config, out, after=after, count=4, as_json=True) == 0
    (entry,) = json.loads(out.getvalue())["jobs"]
    assert entry["next"] == [
        "2026-12-06T12:00:00+01:00",
        "2026-12-13T12:00:00+01:00",
        "2026-12-20T12:00:00+01:00",
        "2026-12-27T12:00:00+01:00",
    ]


async def test_daemon_fires_sunday_cron_on_sundays_only(world: World) -> None:
    config = world.configure(
        job("sun0", cron="0 12 * * 0") + job("sun7", workflow="Nightly", cron="0 12 * * 7")
    )
    # T0 is Tuesday 2026-09-01: the next two Sundays are the 6th and the 13th.
    assert await world.run(config, datetime(2026, 9, 14, tzinfo=UTC)) == ExitCode.OK
    by_job: dict[str, list[datetime]] = {}
    for e in world.events("schedule.fired"):
        by_job.setdefault(e["job"], []).append(at(e["scheduled_for"]))
    expected = [datetime(2026, 9, 6, 12, tzinfo=UTC), datetime(2026, 9, 13, 12, tzinfo=UTC)]
    assert by_job == {"sun0": expected, "sun7": expected}
    assert all(t.isoweekday() == 7 for t in expected)
    assert len(world.runs("CI")) == 2
    assert len(world.runs("Nightly")) == 2


# --- overlap -------------------------------------------------------------------------------


def decided(world: World, job_name: str) -> Counter[datetime]:
    return Counter(
        at(e["scheduled_for"])
        for e in world.events("schedule.fired", "schedule.skipped")
        if e["job"] == job_name
    )


def overlapping(runs: list[BuildRun]) -> list[tuple[int, int]]:
    runs = sorted(runs, key=lambda r: r.created_at)
    return [
        (a.number, b.number) for a, b in itertools.pairwise(runs) if b.created_at < finished_at(a)
    ]


async def test_overlap_skip(world: World) -> None:
    # CI builds take 4 s (1 s pending, 3 s running); the job fires every second.
    config = world.configure(job("ci", every="1s", overlap="skip"))
    assert await world.run(config, T0 + timedelta(seconds=20)) == ExitCode.OK

    skipped = world.events("schedule.skipped")
    fired = world.events("schedule.fired")
    assert skipped
    assert {e["reason"] for e in skipped} == {"overlap"}
    assert all(n == 1 for n in decided(world, "ci").values())
    runs = world.runs("CI")
    assert len(runs) == len(fired) >= 3
    assert overlapping(runs) == []
    # A skipped occurrence started no build: every build belongs to a fired occurrence.
    fired_at = {at(e["scheduled_for"]) for e in fired}
    assert {at(p) for _, p, _, _ in world.intents()} == fired_at
    assert_each_run_once(world)


async def test_overlap_skip_holds_while_the_first_start_resolves(world: World) -> None:
    """The first fire resolves names first (several GETs); one of them fails once and is retried
    3 s later (Retry-After). Occurrences due meanwhile must see the start under way and skip."""
    world.sim.sim.faults.add(
        Fault(method="GET", path=r"/v1/scmRepositories/.*", status=503, retry_after=3)
    )
    config = world.configure(job("ci", every="1s", overlap="skip"))
    assert await world.run(config, T0 + timedelta(seconds=20)) == ExitCode.OK
    runs = world.runs("CI")
    assert runs
    assert overlapping(runs) == []
    assert len(runs) == len(world.events("schedule.fired"))
    assert_each_run_once(world)


async def test_overlap_buffer_one(world: World) -> None:
    config = world.configure(job("ci", every="1s", overlap="buffer_one"))
    assert await world.run(config, T0 + timedelta(seconds=20)) == ExitCode.OK

    runs = world.runs("CI")
    assert overlapping(runs) == []
    fired = world.events("schedule.fired")
    assert len(runs) == len(fired) >= 3
    # The held occurrence fires when the running build has completed: later than planned.
    first = min(r.created_at for r in runs)
    late = [
        e
        for e in fired
        if at(e["timestamp"]) > at(e["scheduled_for"])
        and at(e["scheduled_for"]).timestamp() >= first
    ]
    assert late
    # Only one is held: the others that came up meanwhile were skipped.
    skipped = world.events("schedule.skipped")
    assert skipped
    assert {e["reason"] for e in skipped} == {"overlap"}
    for e in late:
        planned = at(e["scheduled_for"]).timestamp()
        previous = max((r for r in runs if r.created_at <= planned), key=lambda r: r.created_at)
        fire = at(e["timestamp"]).timestamp()
        assert finished_at(previous) <= fire
        # Every other occurrence while that build ran was skipped, none was started.
        held_window = {
            at(s["scheduled_for"])
            for s in skipped
            if planned < at(s["scheduled_for"]).timestamp() < finished_at(previous)
        }
        assert len(held_window) >= 1
    assert all(n == 1 for n in decided(world, "ci").values())
    assert_each_run_once(world)


async def test_overlap_allow_all(world: World) -> None:
    config = world.configure(job("ci", every="2s", overlap="allow_all"))
    assert await world.run(config, T0 + timedelta(seconds=20)) == ExitCode.OK
    assert world.events("schedule.skipped") == []
    fired = world.events("schedule.fired")
    runs = world.runs("CI")
    assert [at(e["scheduled_for"]) for e in fired] == [
        T0 + timedelta(seconds=s) for s in range(2, 21, 2)
    ]
    assert len(runs) == len(fired)
    assert overlapping(runs)
    assert_each_run_once(world)


# --- catch-up ------------------------------------------------------------------------------


@pytest.mark.parametrize(("catch_up", "builds"), [("2h", 1), ("0s", 0)])
async def test_catch_up_after_downtime(
    world: World, fake_clock: SteppingClock, catch_up: str, builds: int
) -> None:
    config = world.configure(job("hourly", every="1h", catch_up=catch_up))
    # First process: fires at 09:00, stops at 09:30.
    await world.run(config, T0 + timedelta(hours=1, minutes=30))
    assert [at(e["scheduled_for"]) for e in world.events("schedule.fired")] == [
        T0 + timedelta(hours=1)
    ]
    # Down until 14:20: 10:00, 11:00, 12:00, 13:00 and 14:00 passed unseen.
    fake_clock.advance(timedelta(hours=4, minutes=50).total_seconds())
    restart = fake_clock.time()
    before = len(world.events())
    await world.run(config, restart + 60)

    after = world.events()[before:]
    fired = [e for e in after if e["event"] == "schedule.fired"]
    missed = [e for e in after if e["event"] == "schedule.missed"]
    (m,) = missed
    assert m["job"] == "hourly"
    assert at(m["oldest"]) == T0 + timedelta(hours=2)
    if builds:
        assert m["count"] == 4
        assert [at(e["scheduled_for"]) for e in fired] == [T0 + timedelta(hours=6)]
    else:
        assert m["count"] == 5
        assert fired == []
    assert len(world.runs("CI")) == 1 + builds
    assert world.events("schedule.skipped") == []
    # The next process has nothing left to count.
    fake_clock.advance(10)
    before = len(world.events())
    await world.run(config, fake_clock.time() + 10)
    assert [e for e in world.events()[before:] if e["event"].startswith("schedule.")] == []
    assert_each_run_once(world)


# --- watches -------------------------------------------------------------------------------


async def test_watched_workflow_reports_foreign_builds_once(world: World) -> None:
    world.sim.sim.start_run(world.workflow_id("CI"))  # history: before the first look
    config = world.configure(
        job("ci", every="10s") + '[[watches]]\nproduct = "Acme Shop"\nworkflow = "CI"\n'
    )
    foreign: list[BuildRun] = []

    def push() -> None:
        foreign.append(world.sim.sim.start_run(world.workflow_id("CI")))

    assert (
        await world.run(
            config,
            T0 + timedelta(seconds=3),
            push,
            T0 + timedelta(seconds=12),
            push,
            T0 + timedelta(seconds=30),
        )
        == ExitCode.OK
    )
    created = world.events("build.created")
    completed = world.events("build.completed")
    watched = {e["build_run_id"] for e in created if e["origin"] == "watch"}
    assert watched == {r.id for r in foreign}
    for e in created + completed:
        if e["origin"] == "watch":
            assert e["job"] is None
            assert e["workflow_id"] == world.workflow_id("CI")
    assert {e["build_run_id"] for e in completed if e["origin"] == "watch"} == watched
    history = world.runs("CI", "GIT_REF_CHANGE")[0]
    assert history.id not in {e["build_run_id"] for e in created}
    ours = {e["build_run_id"] for e in created if e["origin"] == "schedule"}
    assert ours == {r.id for r in world.runs("CI")}
    assert len(ours) >= 2
    assert_each_run_once(world)


# --- lifecycle, status, restart ------------------------------------------------------------


async def test_stop_emits_stopping_and_stopped(world: World) -> None:
    config = world.configure(job("ci", every="1h"))
    assert await world.run(config, T0 + timedelta(seconds=5)) == ExitCode.OK
    names = [e["event"] for e in world.events()]
    assert names == ["daemon.started", "daemon.stopping", "daemon.stopped"]
    for e in world.events():
        assert e["service"] == "xcloudd"
        assert e["jobs"] == 1


async def test_status_and_restart_with_a_run_in_flight(
    world: World, fake_clock: SteppingClock
) -> None:
    config = world.configure(job("hourly", every="1h"))
    # The 09:00 build takes 4 s: stop the daemon 2 s into it.
    await world.run(config, T0 + timedelta(hours=1, seconds=2))
    (run,) = world.runs("CI")
    status = world.status()
    assert [r["build_run_id"] for r in status["in_flight"]] == [run.id]
    (row,) = status["in_flight"]
    assert row["job"] == "hourly"
    assert row["origin"] == "schedule"
    assert row["build_number"] == run.number
    assert row["progress"] in ("PENDING", "RUNNING")
    assert status["recent"] == []
    assert world.events("build.completed") == []

    await world.run(config, T0 + timedelta(hours=1, seconds=30))
    assert [e["build_run_id"] for e in world.events("build.created")] == [run.id]
    (done,) = world.events("build.completed")
    assert done["build_run_id"] == run.id
    assert done["completion_status"] == "SUCCEEDED"
    assert done["job"] == "hourly"
    assert len(world.runs("CI")) == 1
    status = world.status()
    assert status["in_flight"] == []
    assert [(r["build_run_id"], r["completion_status"]) for r in status["recent"]] == [
        (run.id, "SUCCEEDED")
    ]
    assert_each_run_once(world)
