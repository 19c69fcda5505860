"""The daemon's promises (DESIGN 3.2-3.3), observed the way a user would: the events in a file
sink, the simulator's ground truth, and `xcloudd status --json`, on virtual time (world.py)."""

from __future__ import annotations

import io
import itertools
import json
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from conftest import SteppingClock
from world import T0, World, assert_each_run_once, at, finished_at, job
from xcloudd import commands
from xcloudd.errors import ExitCode
from xcloudd.simulator import Fault
from xcloudd.simulator.runs import BuildRun


# Virtual time that moves only when the test's Pump moves it (see world.py).
@pytest.fixture
def start_at() -> datetime:
    return T0


@pytest.fixture
def fake_clock(start_at: datetime) -> SteppingClock:
    return SteppingClock(start_at.timestamp())


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


async def test_jobs_that_fire_together_share_their_lookups(world: World) -> None:
    config = world.configure(job("a", every="1h") + job("b", every="1h") + job("c", every="1h"))
    await world.run(config, T0 + timedelta(hours=1, seconds=30))
    assert len(world.runs("CI")) == 3

    def lookups(path: str) -> int:
        return sum(
            1
            for e in world.sim.sim.traffic.entries
            if e.method == "GET" and e.path == path and e.query.get("limit") != "1"
        )

    product = world.sim.sim.scenario.products[0].id
    workflow = world.workflow_id("CI")
    # One request each for what the three starts need, not one per start.
    assert lookups("/v1/ciProducts") == 1
    assert lookups(f"/v1/ciProducts/{product}/workflows") == 1
    assert lookups(f"/v1/ciWorkflows/{workflow}/repository") == 1
    # The repository's references: one listing (two pages of 200), shared by all three.
    refs = [e for e in world.sim.sim.traffic.entries if e.path.endswith("/gitReferences")]
    assert len(refs) == 2
