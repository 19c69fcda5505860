"""What the world does to the daemon, and what the daemon must still promise (issue: the outbox
and loops that heal themselves). Each test puts one fault in the simulator or the store, runs the
real daemon on virtual time (world.py), and checks against the simulator's ground truth.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conftest import SteppingClock
from world import T0, World, assert_each_run_once, at, job
from xcloudd.api import AuthFailed
from xcloudd.clock import FakeClock
from xcloudd.errors import ConfigError, ExitCode
from xcloudd.events import EventFactory
from xcloudd.simulator import Fault, FaultAction
from xcloudd.simulator.faults import MalformedVariant
from xcloudd.store import StartRequest, Store

LISTS = r"/v1/ciWorkflows/[^/]+/buildRuns"
# A poll: a product's list of runs, or one run's own GET.
POLL = r"/v1/ci(BuildRuns/[^/]+|Products/[^/]+/buildRuns)"
POST = "/v1/ciBuildRuns"


@pytest.fixture
def start_at() -> datetime:
    return T0


@pytest.fixture
def fake_clock(start_at: datetime) -> SteppingClock:
    return SteppingClock(start_at.timestamp())


def posts(world: World) -> list[int | None]:
    return [e.status for e in world.sim.sim.traffic.matching("POST", POST)]


def minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


def every_occurrence_once(world: World, job_name: str, every_s: float) -> None:
    """Between the job's first and last decided occurrence, every planned instant ended as
    exactly one of fired, skipped, or part of a missed count."""
    decided = Counter(
        at(e["scheduled_for"])
        for e in world.events("schedule.fired", "schedule.skipped")
        if e["job"] == job_name
    )
    assert all(n == 1 for n in decided.values()), decided
    missed = [e for e in world.events("schedule.missed") if e["job"] == job_name]
    first = min([*decided, *(at(e["oldest"]) for e in missed)])
    last = max(decided)
    planned = round((last - first).total_seconds() / every_s) + 1
    assert len(decided) + sum(e["count"] for e in missed) == planned


# --- 1, 5: a POST whose outcome is unknown --------------------------------------------------------


async def test_an_unknown_outcome_waits_for_a_successful_read_before_posting_again(
    world: World,
) -> None:
    """The POST created the run and answered 500, and the run lists are down: no second POST,
    across a restart too, until a list read succeeds and shows the run, which is adopted."""
    config = world.configure(job("hourly", every="1h"))
    world.sim.sim.faults.add(Fault(FaultAction.ERROR_AFTER_CREATE, method="POST", path=POST))
    world.sim.sim.faults.add(Fault(method="GET", path=LISTS, status=503, times=None))
    await world.run(config, minutes(63))
    assert posts(world) == [500]
    assert world.events("build.created") == []
    assert [i[2] for i in world.intents()] == ["unknown"]

    await world.run(config, minutes(66), world.sim.sim.faults.clear, minutes(70))
    assert posts(world) == [500]
    (run,) = world.runs("CI")
    (created,) = world.events("build.created")
    assert (created["build_run_id"], created["reconciled"]) == (run.id, True)
    assert [e["build_run_id"] for e in world.events("build.completed")] == [run.id]
    assert_each_run_once(world)


async def test_an_unreadable_201_is_an_unknown_outcome_and_its_run_is_adopted(
    world: World,
) -> None:
    config = world.configure(job("hourly", every="1h"))
    world.sim.sim.faults.add(
        Fault(FaultAction.MALFORMED, method="POST", path=POST, variant=MalformedVariant.NOT_OBJECT)
    )
    assert await world.run(config, minutes(62)) == ExitCode.OK
    assert posts(world) == [201]
    (run,) = world.runs("CI")
    assert [e["reason"] for e in world.events("build.start_unknown")]
    (created,) = world.events("build.created")
    assert (created["build_run_id"], created["reconciled"]) == (run.id, True)
    assert world.events("build.completed")[0]["build_run_id"] == run.id


# --- 2: the sweeper, the adoption window, stale intents -------------------------------------------


async def test_a_build_a_person_starts_later_is_not_adopted_and_is_reported_as_foreign(
    world: World,
) -> None:
    """Our POST failed before creating anything and the lists are down for minutes; a person
    starts a build meanwhile. It is not ours: it is reported as a watched build, and the sweeper,
    in the same process, starts ours once a list read shows nothing of ours."""
    ci = world.workflow_id("CI")
    config = world.configure(
        job("hourly", every="1h", catch_up="30m")
        + '[[watches]]\nproduct = "Acme Shop"\nworkflow = "CI"\n'
    )
    world.sim.sim.faults.add(Fault(method="POST", path=POST, status=500))
    person: list[str] = []

    def outage() -> None:
        world.sim.sim.faults.add(Fault(method="GET", path=LISTS, status=503, times=None))

    def someone_starts_a_build() -> None:
        main = world.sim.sim.scenario.reference_named(
            world.sim.sim.scenario.workflow_named("CI").repository_id, "main", "BRANCH"
        )
        person.append(world.sim.sim.start_run(ci, main.id, start_reason="MANUAL").id)

    await world.run(
        config,
        minutes(59),
        outage,
        minutes(64),
        someone_starts_a_build,
        minutes(67),
        world.sim.sim.faults.clear,
        minutes(75),
    )
    assert posts(world) == [500, 201]
    manual = {r.id for r in world.runs("CI")}
    (theirs,) = person
    ours = manual - {theirs}
    assert len(ours) == 1
    origins = {e["build_run_id"]: e["origin"] for e in world.events("build.created")}
    assert origins == {theirs: "watch", **dict.fromkeys(ours, "schedule")}
    assert_each_run_once(world)


async def test_stale_intents_after_a_restart_are_missed_not_posted(
    world: World, tmp_path: Path
) -> None:
    """60 starts decided two days ago by a process that died before sending them: the restart
    settles them as missed, with no burst of POSTs."""
    config = world.configure(job("minutely", every="1m", overlap="allow_all", catch_up="10m"))
    old = FakeClock((T0 - timedelta(days=2)).timestamp())
    store = Store.open(config.state.path, EventFactory(old))
    start = datetime.fromtimestamp(old.time(), tz=UTC)
    store.begin_job("minutely", start)
    for i in range(1, 61):
        planned = start + timedelta(minutes=i)
        store.decide(
            "minutely",
            newest=planned,
            missed=0,
            missed_oldest=None,
            candidate=planned,
            enabled=True,
            overlap="allow_all",
        )
    store.close()
    await world.run(config, T0 + timedelta(seconds=30))
    states = Counter(state for _, _, state, _ in world.intents())
    assert states["missed"] == 60
    assert states["new"] == states["sending"] == states["unknown"] == 0
    # At most the one occurrence due now went out; none of the stale ones.
    assert len(posts(world)) <= 1
    stale = [e for e in world.events("schedule.missed") if e.get("reason")]
    assert len(stale) == 60


# --- 3, 4: polls that fail ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(MalformedVariant))
async def test_a_malformed_poll_answer_neither_kills_the_watch_nor_blocks_the_job(
    world: World, variant: MalformedVariant
) -> None:
    config = world.configure(job("ci", every="10s", overlap="skip"))
    world.sim.sim.faults.add(
        Fault(FaultAction.MALFORMED, method="GET", path=POLL, variant=variant, times=3)
    )
    assert await world.run(config, T0 + timedelta(seconds=45)) == ExitCode.OK
    fired = world.events("schedule.fired")
    assert len(fired) >= 3, "overlap = skip kept skipping after a bad poll"
    completed = {e["build_run_id"] for e in world.events("build.completed")}
    # Every run that completed a few seconds (a look or two) before the end was reported.
    assert {
        r.id
        for r in world.runs("CI")
        if r.progress(world.clock.time() - 5).execution_progress == "COMPLETE"
    } <= completed
    assert_each_run_once(world)


async def test_a_run_the_api_no_longer_knows_ends_with_watch_ended(world: World) -> None:
    config = world.configure(job("ci", every="10s", overlap="skip"))

    def delete_first_run() -> None:
        (run,) = world.runs("CI")
        world.sim.sim.runs.delete(run.id)

    await world.run(
        config, T0 + timedelta(seconds=10.5), delete_first_run, T0 + timedelta(seconds=35)
    )
    (ended,) = world.events("build.watch_ended")
    assert ended["reason"] == "not_found"
    assert ended["level"] == "warning"
    assert all(r["build_run_id"] != ended["build_run_id"] for r in world.status()["in_flight"])
    # The job is not blocked by a run nobody follows any more.
    assert len(world.events("schedule.fired")) >= 3


# --- 6, 7: stalls and restarts --------------------------------------------------------------------


async def test_a_stall_accounts_for_every_occurrence(
    world: World, fake_clock: SteppingClock
) -> None:
    """12 s stopped (SIGSTOP, suspend, a blocked write): what came due meanwhile is decided on
    the next wake by the catch-up rule, nothing is lost."""
    config = world.configure(job("ci", every="2s", overlap="allow_all", catch_up="1h"))

    def stall() -> None:
        fake_clock.advance(12)  # time passes, and no sleeper is woken on time

    await world.run(config, T0 + timedelta(seconds=10), stall, T0 + timedelta(seconds=40))
    (missed,) = world.events("schedule.missed")
    assert missed["count"] == 5
    every_occurrence_once(world, "ci", 2)
    assert_each_run_once(world)


async def test_restarts_during_an_outage_count_missed_occurrences_once(
    world: World, fake_clock: SteppingClock
) -> None:
    config = world.configure(job("hourly", every="1h", catch_up="2h"))
    await world.run(config, minutes(90))
    # Down until 14:20: 10:00 to 14:00 passed unseen. Then three short lives while the API is
    # down, each one too short to resolve the job's names.
    fake_clock.advance(timedelta(hours=4, minutes=50).total_seconds())
    world.sim.sim.faults.add(Fault(method="GET", status=503, times=None))
    for _ in range(3):
        await world.run(config, fake_clock.time() + 20)
        fake_clock.advance(30)
    world.sim.sim.faults.clear()
    await world.run(config, fake_clock.time() + 60)
    (missed,) = world.events("schedule.missed")
    assert missed["count"] == 4
    fired = [at(e["scheduled_for"]) for e in world.events("schedule.fired")]
    assert fired == [T0 + timedelta(hours=1), T0 + timedelta(hours=6)]
    assert len(world.runs("CI")) == 2
    every_occurrence_once(world, "hourly", 3600)


# --- 10: the state store cannot be written --------------------------------------------------------


def disk_full(world: World) -> None:
    """Every write to the store fails from now on, as on a full disk (an authorizer refuses
    them, so the failure is certain, whatever free pages the file still has)."""
    assert world.rt is not None
    conn = world.rt.store.sync._conn
    writes = {sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE}

    def refuse(action: int, *_: object) -> int:
        return sqlite3.SQLITE_DENY if action in writes else sqlite3.SQLITE_OK

    world.rt.store.post(lambda: conn.set_authorizer(refuse))


def disk_has_room(world: World) -> None:
    assert world.rt is not None
    conn = world.rt.store.sync._conn
    world.rt.store.post(lambda: conn.set_authorizer(None))


async def test_a_full_state_store_refuses_new_starts_and_recovers(world: World) -> None:
    config = world.configure(job("ci", every="5s", overlap="allow_all", catch_up="1h"))

    full: list[float] = []

    def free() -> None:
        disk_has_room(world)
        full.append(world.clock.time())

    assert (
        await world.run(
            config,
            T0 + timedelta(seconds=12),
            lambda: disk_full(world),
            T0 + timedelta(seconds=40),
            free,
            T0 + timedelta(seconds=70),
        )
        == ExitCode.OK
    )
    created = [r.created_at for r in world.runs("CI")]
    # Never a build it could not remember: each run the simulator has is a recorded start.
    states = Counter(state for _, _, state, _ in world.intents())
    assert states["done"] == len(created)
    # Starts stopped while the store was full, and the occurrences due meanwhile started later.
    assert any(t > full[0] for t in created)
    errors = world.events("daemon.error")
    assert any("cannot be written" in e["error"] for e in errors)
    every_occurrence_once(world, "ci", 5)
    assert_each_run_once(world)
    # Every run started before the last few seconds was followed to its end.
    completed = {e["build_run_id"] for e in world.events("build.completed")}
    ended = T0.timestamp() + 64
    assert {r.id for r in world.runs("CI") if r.created_at < ended} <= completed


# --- 11, 12: credentials and start-up -------------------------------------------------------------


async def test_rejected_credentials_at_start_up_stop_the_daemon_with_77(world: World) -> None:
    config = world.configure(job("ci", every="10s"))
    world.sim.sim.faults.add(Fault(method="GET", status=401, times=None))
    with pytest.raises(AuthFailed) as caught:
        await world.run(config, T0 + timedelta(seconds=30))
    assert caught.value.exit_code == 77
    assert posts(world) == []


async def test_a_key_revoked_while_running_is_reported_and_work_resumes(world: World) -> None:
    config = world.configure(job("ci", every="30s", overlap="allow_all", catch_up="10m"))

    def revoke() -> None:
        world.sim.sim.faults.add(Fault(status=403, times=None))

    assert (
        await world.run(
            config,
            T0 + timedelta(seconds=35),
            revoke,
            T0 + timedelta(seconds=100),
            world.sim.sim.faults.clear,
            T0 + timedelta(seconds=200),
        )
        == ExitCode.OK
    )
    failed = world.events("api.auth_failed")
    assert failed
    assert {e["http_status"] for e in failed} == {403}
    # The run in flight was kept and finished; the occurrence due meanwhile started after all.
    completed = {e["build_run_id"] for e in world.events("build.completed")}
    assert {r.id for r in world.runs("CI")} <= completed
    # 30 s to 180 s: six occurrences, two of them due while the key was refused.
    assert len(world.runs("CI")) == 6
    assert_each_run_once(world)


async def test_an_outage_at_start_up_with_a_watch_is_waited_out(world: World) -> None:
    config = world.configure('[[watches]]\nproduct = "Acme Shop"\nworkflow = "CI"\n')
    world.sim.sim.faults.add(Fault(method="GET", status=503, times=None))
    pushed: list[str] = []

    def recover() -> None:
        world.sim.sim.faults.clear()

    def push() -> None:
        pushed.append(world.sim.sim.start_run(world.workflow_id("CI")).id)

    assert (
        await world.run(
            config,
            T0 + timedelta(seconds=60),
            recover,
            T0 + timedelta(seconds=200),
            push,
            T0 + timedelta(seconds=400),
        )
        == ExitCode.OK
    )
    assert [e["build_run_id"] for e in world.events("build.created")] == pushed


async def test_a_watch_on_a_missing_workflow_is_a_config_error(world: World) -> None:
    config = world.configure('[[watches]]\nproduct = "Acme Shop"\nworkflow = "No Such Flow"\n')
    with pytest.raises(ConfigError) as caught:
        await world.run(config, T0 + timedelta(seconds=5))
    assert caught.value.exit_code == 78
    assert "watches[0]" in str(caught.value)


# --- 13: an outage costs few requests -------------------------------------------------------------


async def test_an_outage_is_waited_out_with_few_requests(world: World) -> None:
    config = world.configure(
        job("ci", every="10s", overlap="allow_all", catch_up="10m")
        + job("nightly", workflow="Nightly", every="10s", overlap="allow_all", catch_up="10m")
    )

    def outage() -> None:
        world.sim.sim.faults.add(Fault(status=503, times=None))

    marks: list[int] = []

    def mark() -> None:
        marks.append(len(world.sim.sim.traffic.entries))

    await world.run(
        config,
        T0 + timedelta(seconds=25),
        outage,
        mark,
        T0 + timedelta(seconds=325),
        mark,
        world.sim.sim.faults.clear,
        T0 + timedelta(seconds=400),
    )
    during = marks[1] - marks[0]
    # 300 s of outage with two jobs and builds in flight: well under one request a second.
    assert during < 100, f"{during} requests during a 300 s outage"
    recent = [
        r for r in world.runs("CI") if r.created_at > (T0 + timedelta(seconds=325)).timestamp()
    ]
    assert recent, "starts did not resume promptly after the outage"
    assert_each_run_once(world)


# --- found by the chaos test ----------------------------------------------------------------------


def prepared_store(world: World, config_path: Path, at_time: float) -> Store:
    return Store.open(config_path, EventFactory(FakeClock(at_time)))


async def test_a_start_cut_off_before_its_post_does_not_take_another_starts_build(
    world: World,
) -> None:
    """Start a's POST created run #1 and its answer was lost; start b was being sent when the
    process died (its POST never arrived). After the restart, #1 is a's, and b sends again."""
    config = world.configure(
        job("a", every="6h", overlap="allow_all", catch_up="2h")
        + job("b", every="6h", overlap="allow_all", catch_up="2h")
    )
    planned = T0 - timedelta(minutes=1)
    t0 = T0.timestamp()
    ci = world.workflow_id("CI")
    main = world.sim.sim.scenario.reference_named(
        world.sim.sim.scenario.workflow_named("CI").repository_id, "main", "BRANCH"
    ).id
    request = StartRequest(ci, main)
    ids = {}
    for name, sent in (("a", t0 - 1), ("b", t0 + 0.5)):
        store = prepared_store(world, config.state.path, sent)
        store.begin_job(name, planned - timedelta(minutes=1))
        decision = store.decide(
            name,
            newest=planned,
            missed=0,
            missed_oldest=None,
            candidate=planned,
            enabled=True,
            overlap="allow_all",
        )
        assert decision.intent_id is not None
        ids[name] = decision.intent_id
        store.intent_sending(decision.intent_id, request)
        if name == "a":
            # a looks again only later: b, just restarted, reconciles first.
            store.intent_unknown(
                decision.intent_id, reason="reset", http_status=None, next_try=t0 + 20
            )
        store.close()
    first = world.sim.sim.start_run(ci, main, start_reason="MANUAL")  # a's POST, at t0
    await world.run(config, T0 + timedelta(seconds=30))
    runs = {job_name: run_id for job_name, _, state, run_id in world.intents() if state == "done"}
    assert runs["a"] == first.id
    assert runs["b"] not in (None, first.id)
    assert len(world.runs("CI")) == 2
    assert_each_run_once(world)


async def test_a_run_list_that_cannot_be_read_fully_justifies_no_second_post(
    world: World,
) -> None:
    config = world.configure(job("hourly", every="1h", catch_up="1h"))
    world.sim.sim.faults.add(Fault(FaultAction.DROP_AFTER_CREATE, method="POST", path=POST))
    for variant in (MalformedVariant.MISSING_OPTIONAL, MalformedVariant.UNKNOWN_ENUM):
        world.sim.sim.faults.add(
            Fault(FaultAction.MALFORMED, method="GET", path=LISTS, variant=variant, times=4)
        )
    await world.run(config, minutes(70))
    assert len(posts(world)) == 1
    (run,) = world.runs("CI")
    assert [e["build_run_id"] for e in world.events("build.created")] == [run.id]


async def test_a_held_occurrence_of_a_job_that_was_removed_is_counted_missed(
    world: World,
) -> None:
    buffered = job("ci", every="1s", overlap="buffer_one")
    config = world.configure(buffered)
    await world.run(config, T0 + timedelta(seconds=2.5))
    held = [r for r in world.intents() if r[2] == "new"]
    assert held == []  # the one held occurrence waits in `occurrences`, not as an intent
    config = world.configure(job("other", every="1h"))
    await world.run(config, T0 + timedelta(seconds=10))
    fired = [at(e["scheduled_for"]) for e in world.events("schedule.fired")]
    (missed,) = [e for e in world.events("schedule.missed") if e["job"] == "ci"]
    assert fired == [T0 + timedelta(seconds=1)]
    assert (at(missed["oldest"]), missed["count"]) == (T0 + timedelta(seconds=2), 1)
    assert missed["reason"] == "the job was removed or no longer uses overlap = buffer_one"


async def test_a_start_throttled_past_the_clients_patience_is_sent_later_not_failed(
    world: World,
) -> None:
    config = world.configure(job("hourly", every="1h", catch_up="1h"))
    world.sim.sim.faults.add(Fault(method="POST", path=POST, status=429, retry_after=1, times=10))
    await world.run(config, minutes(70))
    assert world.events("build.start_failed") == []
    assert posts(world).count(201) == 1
    (run,) = world.runs("CI")
    assert [e["build_run_id"] for e in world.events("build.created")] == [run.id]


async def test_runs_that_never_read_clearly_end_the_start_as_failed_not_stuck(
    world: World,
) -> None:
    """An outcome that stays unknown (a run in the window that cannot be read) must not hold
    an overlap = "skip" job back for ever: after an hour the start ends as failed."""
    config = world.configure(job("ci", every="30m", overlap="skip", catch_up="10m"))
    world.sim.sim.faults.add(Fault(FaultAction.DROP_AFTER_CREATE, method="POST", path=POST))
    world.sim.sim.faults.add(
        Fault(
            FaultAction.MALFORMED,
            method="GET",
            path=LISTS,
            variant=MalformedVariant.MISSING_OPTIONAL,
            times=None,
        )
    )
    await world.run(config, minutes(125))
    (failed,) = world.events("build.start_failed")
    assert "stayed unknown" in failed["detail"]
    assert len(posts(world)) >= 2, "the job stayed blocked by the unsettled start"
    skipped = [e for e in world.events("schedule.skipped") if e["reason"] == "overlap"]
    assert 1 <= len(skipped) <= 2


async def test_a_run_gone_while_the_store_is_full_is_ended_once_space_returns(
    world: World,
) -> None:
    """The API says the run is gone (404) while its end cannot be recorded: the run stays
    followed, and its one build.watch_ended is written once the store can be written again."""
    config = world.configure(job("ci", every="1h"))
    gone: list[str] = []

    def run_gone_and_disk_full() -> None:
        (run,) = world.runs("CI")
        gone.append(run.id)
        world.sim.sim.runs.delete(run.id)
        disk_full(world)

    await world.run(
        config,
        minutes(60) + timedelta(seconds=1.5),
        run_gone_and_disk_full,
        minutes(61),
        lambda: disk_has_room(world),
        minutes(63),
    )
    (ended,) = world.events("build.watch_ended")
    assert (ended["build_run_id"], ended["reason"]) == (gone[0], "not_found")
    assert world.status()["in_flight"] == []


async def test_a_watch_whose_lookup_is_refused_retries_slowly(world: World) -> None:
    """App Store Connect down at start-up leaves a watch unresolved; when it comes back and
    refuses the workflow's lookup (a key whose role cannot see that app), the watch asks again
    with backoff, not back to back in the budget's start lane."""
    wf = world.workflow_id("CI")
    path = f"/v1/ciWorkflows/{wf}"
    world.sim.sim.faults.add(Fault(method="GET", path=path, status=503, times=8))
    world.sim.sim.faults.add(Fault(method="GET", path=path, status=401, times=None))
    config = world.configure(
        f'[[watches]]\nworkflow = "{wf}"\n\n', polling='interval = "30s"\nmin_interval = "5s"'
    )
    await world.run(config, T0 + timedelta(minutes=10))
    refused = [e for e in world.sim.sim.traffic.entries if e.path == path and e.status == 401]
    # Waiting 30 s to 5 minutes between tries (full jitter above 30 s): a handful in the
    # 9 minutes after the outage, each one two requests (a fresh token after the first 401).
    assert 2 <= len(refused) <= 2 * 18, len(refused)
