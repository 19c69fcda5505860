"""Starting and following builds end to end: client, starter, watcher and events.

Every test talks HTTP to the in-process simulator; the FakeClock drives the client, the watcher
and the simulator, so a 45-minute build costs no real time. The `sim` fixture (and `long_sim`)
check all traffic against Apple's OpenAPI description when the test ends.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from conftest import SteppingClock, schema_problems
from world import settle
from xcloudd import commands
from xcloudd.api import ApiError, RateLimit
from xcloudd.clock import FakeClock
from xcloudd.config import load_config
from xcloudd.errors import ExitCode
from xcloudd.follower import Follower
from xcloudd.resolve import ResolveError
from xcloudd.resources import RUN_FIELDS, BuildRun
from xcloudd.runtime import Runtime, open_runtime
from xcloudd.simulator import Fault, FaultAction, RunningSimulator, running_simulator
from xcloudd.simulator.scenario import DEFAULT_SCENARIO, scenario_from_dict
from xcloudd.sinks import Record
from xcloudd.starter import Target, resolve_target
from xcloudd.store import NewRun

BUILD_FIELDS = ("build_run_id", "build_number", "workflow_id", "job", "origin")
COMMON_FIELDS = ("timestamp", "level", "event", "event_id", "service")
# A poll: the run's product's list, or the run's own GET.
RUN_PATH = r"/v1/ci(BuildRuns/[^/]+|Products/[^/]+/buildRuns)"
LONG_RUN_S = 45 * 60


class CollectingSink:
    """Keeps every event record delivered from the outbox, in order."""

    name = "collect"

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def accepts(self, record: Record) -> bool:
        return True

    async def write(self, records: Sequence[Record]) -> None:
        self.records.extend(dict(r.fields) for r in records)

    def reopen(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def names(self, prefix: str = "") -> list[str]:
        return [r["event"] for r in self.records if r["event"].startswith(prefix)]

    def of(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["event"] == name]

    def one(self, name: str) -> dict[str, Any]:
        found = self.of(name)
        assert len(found) == 1, f"expected one {name}, got {self.names()}"
        return found[0]


@asynccontextmanager
async def runtime(
    running: RunningSimulator, directory: Path, clock: FakeClock, extra: str = ""
) -> AsyncIterator[tuple[Runtime, CollectingSink]]:
    """A Runtime for the simulator's key, with `extra` TOML appended to the written config."""
    path = running.write_client_files(directory / "client")
    if extra:
        path.write_text(path.read_text(encoding="utf-8") + "\n" + extra, encoding="utf-8")
    sink = CollectingSink()
    async with open_runtime(
        load_config(path, env={}), sinks=[sink], clock=clock, store_path=None
    ) as rt:
        yield rt, sink


@asynccontextmanager
async def checked_simulator(clock: FakeClock, **options: Any) -> AsyncIterator[RunningSimulator]:
    """Like the `sim` fixture, with options (scenario, rate_limit) the fixture cannot take."""
    async with running_simulator(clock=clock, **options) as running:
        yield running
        problems = schema_problems(running.sim.traffic.entries)
    assert not problems, "simulator traffic does not match Apple's schema:\n" + "\n".join(problems)


@pytest.fixture
async def long_sim(fake_clock: FakeClock) -> AsyncIterator[RunningSimulator]:
    """The default world, except that a CI build runs for 45 minutes."""
    data = copy.deepcopy(DEFAULT_SCENARIO)
    for workflow in data["products"][0]["workflows"]:
        if workflow["name"] == "CI":
            workflow["running_seconds"] = LONG_RUN_S
    async with checked_simulator(fake_clock, scenario=scenario_from_dict(data, "long")) as running:
        yield running


def wf_id(sim: RunningSimulator, name: str) -> str:
    return sim.sim.scenario.workflow_named(name).id


def ref_id(sim: RunningSimulator, workflow: str, name: str, kind: str = "BRANCH") -> str:
    wf = sim.sim.scenario.workflow_named(workflow)
    return sim.sim.scenario.reference_named(wf.repository_id, name, kind).id


def record_tokens(sim: RunningSimulator, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Authorization header the simulator checked, in order."""
    seen: list[str] = []
    verify = sim.sim.verifier.verify

    def recording(authorization: str | None, *args: Any, **kwargs: Any) -> Any:
        seen.append(authorization or "")
        return verify(authorization, *args, **kwargs)

    monkeypatch.setattr(sim.sim.verifier, "verify", recording)
    return seen


# -- a build from start to finish -----------------------------------------------------------------


async def test_build_on_a_branch_past_the_first_page_succeeds_with_ordered_events(
    sim: RunningSimulator, tmp_path: Path, fake_clock: FakeClock
) -> None:
    target = Target(workflow="CI", product="Acme Shop", branch="release/2026.12", job="release")
    async with runtime(sim, tmp_path, fake_clock) as (rt, events):
        code = await commands.start(rt, target, wait=True)

    assert code == ExitCode.OK
    assert events.names("build.") == [
        "build.requested",
        "build.created",
        "build.started",
        "build.completed",
    ]
    builds = [r for r in events.records if r["event"].startswith("build.")]
    for record in builds:
        assert list(record)[:5] == list(COMMON_FIELDS)
        assert record["service"] == "xcloudd"
        assert record["level"] == "info"
        assert record["timestamp"].endswith("Z")
        assert record["job"] == "release"
        assert record["origin"] == "manual"
        assert record["workflow_id"] == wf_id(sim, "CI")
    assert len({r["event_id"] for r in builds}) == 4
    timestamps = [r["timestamp"] for r in builds]
    assert timestamps == sorted(timestamps)

    truth = sim.sim.runs.all()
    branch = ref_id(sim, "CI", "release/2026.12")
    assert [r.source_ref_id for r in truth] == [branch]
    run = truth[0]
    for record in builds[1:]:
        for name in BUILD_FIELDS:
            assert name in record, f"{record['event']} lacks {name}"
        assert record["build_run_id"] == run.id
        assert record["build_number"] == run.number
    completed = events.one("build.completed")
    assert completed["result"] == "success"
    assert completed["completion_status"] == "SUCCEEDED"
    assert completed["duration_s"] == 3.0
    assert completed["source_commit"] == run.commit_sha
    assert [a["action_type"] for a in completed["actions"]] == ["BUILD", "TEST"]
    assert events.one("build.requested")["git_reference_id"] == branch


@pytest.mark.parametrize(
    ("workflow", "expected"),
    [
        ("CI", ("SUCCEEDED", ExitCode.OK, "success")),
        ("Nightly", ("SUCCEEDED", ExitCode.OK, "success")),
        ("UI Tests", ("FAILED", ExitCode.FAILED, "failure")),
        ("Archive", ("ERRORED", ExitCode.FAILED, "error")),
        ("Superseded", ("CANCELED", ExitCode.CANCELED, "cancellation")),
        ("Docs Only", ("SKIPPED", ExitCode.CANCELED, "skip")),
    ],
)
async def test_each_completion_status_has_its_exit_code_and_result(
    sim: RunningSimulator,
    tmp_path: Path,
    fake_clock: FakeClock,
    workflow: str,
    expected: tuple[str, ExitCode, str],
) -> None:
    status, exit_code, result = expected
    async with runtime(sim, tmp_path, fake_clock) as (rt, events):
        code = await commands.start(rt, Target(workflow=wf_id(sim, workflow)), wait=True)

    assert code == exit_code
    completed = events.one("build.completed")
    assert (completed["completion_status"], completed["result"]) == (status, result)
    assert completed["level"] == ("info" if status == "SUCCEEDED" else "warning")
    # A skipped build never starts: no build.started, no duration.
    assert len(events.of("build.started")) == (0 if status == "SKIPPED" else 1)
    assert len(sim.sim.runs) == 1


async def test_nightly_alternates_success_and_failure(
    sim: RunningSimulator, tmp_path: Path, fake_clock: FakeClock
) -> None:
    target = Target(workflow="Nightly", product="Acme Shop", branch="main")
    async with runtime(sim, tmp_path, fake_clock) as (rt, events):
        codes = [await commands.start(rt, target, wait=True) for _ in range(3)]
    assert codes == [ExitCode.OK, ExitCode.FAILED, ExitCode.OK]
    assert [r["build_number"] for r in events.of("build.completed")] == [1, 2, 3]


async def test_start_without_wait_returns_once_the_run_exists(
    sim: RunningSimulator, tmp_path: Path, fake_clock: FakeClock
) -> None:
    async with runtime(sim, tmp_path, fake_clock) as (rt, events):
        code = await commands.start(rt, Target(workflow=wf_id(sim, "UI Tests")), wait=False)
    assert code == ExitCode.OK
    assert events.names("build.") == ["build.requested", "build.created"]
    assert len(sim.sim.runs) == 1


# -- refusals ---------------------------------------------------------------------------------


async def test_disabled_workflow_is_refused_with_apples_words_and_no_run(
    sim: RunningSimulator, tmp_path: Path, fake_clock: FakeClock
) -> None:
    legacy = wf_id(sim, "Legacy")
    async with runtime(sim, tmp_path, fake_clock) as (rt, events):
        with pytest.raises(ApiError) as caught:
            await commands.start(rt, Target(workflow=legacy, branch="main"), wait=True)

    error = caught.value
    assert error.status == 409
    assert error.exit_code == ExitCode.FAILED
    first = error.first
    assert first is not None
    assert first.code == "ENTITY_ERROR.RELATIONSHIP.INVALID"
    assert "disabled" in first.detail
    assert first.pointer == "/data/relationships/workflow"
    message = str(error)
    assert "\n" not in message
    assert "ENTITY_ERROR.RELATIONSHIP.INVALID" in message
    assert first.detail in message
    assert "/data/relationships/workflow" in message

    failed = events.one("build.start_failed")
    assert failed["level"] == "error"
    assert failed["http_status"] == 409
    assert failed["error_code"] == "ENTITY_ERROR.RELATIONSHIP.INVALID"
    assert failed["detail"] == first.detail
    assert failed["pointer"] == "/data/relationships/workflow"
    assert failed["workflow_id"] == legacy
    assert events.names("build.") == ["build.requested", "build.start_failed"]
    assert len(sim.sim.runs) == 0
    # A refusal is final: the POST was not repeated.
    assert len(sim.sim.traffic.matching("POST", "/v1/ciBuildRuns")) == 1


@pytest.mark.parametrize("branch", ["feature/old-login", "no-such-branch"])
async def test_missing_or_deleted_branch_is_a_resolve_error_naming_it(
    sim: RunningSimulator, tmp_path: Path, fake_clock: FakeClock, branch: str
) -> None:
    async with runtime(sim, tmp_path, fake_clock) as (rt, events):
        with pytest.raises(ResolveError, match=f"no branch '{re.escape(branch)}'"):
            await commands.start(rt, Target(workflow=wf_id(sim, "CI"), branch=branch), wait=True)
    assert len(sim.sim.runs) == 0
    assert events.names("build.") == []
    assert not sim.sim.traffic.matching("POST", "/v1/ciBuildRuns")


async def test_tag_resolves_and_builds_that_tag(
    sim: RunningSimulator, tmp_path: Path, fake_clock: FakeClock
) -> None:
    async with runtime(sim, tmp_path, fake_clock) as (rt, _events):
        req = await resolve_target(rt.resolver, Target(workflow=wf_id(sim, "CI"), tag="v1.2.0"))
        assert req.git_reference_id == ref_id(sim, "CI", "v1.2.0", "TAG")
        with pytest.raises(ResolveError, match=r"no tag 'v9\.9\.9'"):
            await resolve_target(rt.resolver, Target(workflow=wf_id(sim, "CI"), tag="v9.9.9"))
        code = await commands.start(rt, Target(workflow=wf_id(sim, "CI"), tag="v1.2.0"), wait=True)
    assert code == ExitCode.OK
    assert [r.source_ref_id for r in sim.sim.runs.all()] == [req.git_reference_id]


async def test_lookups_are_kept_for_a_while_and_a_miss_is_checked_again(
    sim: RunningSimulator, tmp_path: Path, fake_clock: FakeClock
) -> None:
    """A daemon runs for months: names are not resolved once for ever, and a tag pushed after
    a failed lookup is found half a minute later, without a request per attempt meanwhile."""

    def listings() -> int:
        return len([e for e in sim.sim.traffic.entries if e.path.endswith("/gitReferences")])

    target = Target(workflow=wf_id(sim, "CI"), branch="main")
    async with runtime(sim, tmp_path, fake_clock) as (rt, _events):
        await resolve_target(rt.resolver, target)
        pages = listings()
        await resolve_target(rt.resolver, target)
        assert listings() == pages, "kept: no second listing"
        missing = Target(workflow=wf_id(sim, "CI"), tag="v9.9.9")
        for _ in range(3):
            with pytest.raises(ResolveError):
                await resolve_target(rt.resolver, missing)
        assert listings() == pages, "a miss right after a listing asks nothing more"
        fake_clock.advance(31)
        with pytest.raises(ResolveError):
            await resolve_target(rt.resolver, missing)
        assert listings() == 2 * pages, "a miss on an older listing looks again"
        fake_clock.advance(601)
        await resolve_target(rt.resolver, target)
        assert listings() == 3 * pages, "after ten minutes, a hit looks again too"


# -- a POST whose outcome is unknown --------------------------------------------------------------


async def test_dropped_connection_after_create_adopts_the_run_instead_of_starting_another(
    sim: RunningSimulator, tmp_path: Path, fake_clock: FakeClock
) -> None:
    sim.sim.faults.add(Fault(FaultAction.DROP_AFTER_CREATE, method="POST", path="/v1/ciBuildRuns"))
    async with runtime(sim, tmp_path, fake_clock) as (rt, events):
        code = await commands.start(rt, Target(workflow=wf_id(sim, "CI"), branch="main"), wait=True)

    assert code == ExitCode.OK
    assert len(sim.sim.runs) == 1
    assert len(sim.sim.traffic.matching("POST", "/v1/ciBuildRuns")) == 1
    assert events.names("build.") == [
        "build.requested",
        "build.start_unknown",
        "build.created",
        "build.started",
        "build.completed",
    ]
    unknown = events.one("build.start_unknown")
    assert unknown["level"] == "warning"
    assert unknown["reason"] == "connection reset"
    created = events.one("build.created")
    assert created["reconciled"] is True
    assert created["build_run_id"] == sim.sim.runs.all()[0].id
    assert events.one("build.completed")["result"] == "success"


async def test_server_error_after_create_still_gives_one_run(
    sim: RunningSimulator, tmp_path: Path, fake_clock: FakeClock
) -> None:
    sim.sim.faults.add(Fault(FaultAction.ERROR_AFTER_CREATE, method="POST", path="/v1/ciBuildRuns"))
    async with runtime(sim, tmp_path, fake_clock) as (rt, events):
        code = await commands.start(rt, Target(workflow=wf_id(sim, "CI")), wait=True)

    assert code == ExitCode.OK
    assert len(sim.sim.runs) == 1
    assert len(sim.sim.traffic.matching("POST", "/v1/ciBuildRuns")) == 1
    assert events.one("build.start_unknown")["http_status"] == 500
    assert events.one("build.created")["reconciled"] is True


async def test_server_error_before_create_is_posted_again_once(
    sim: RunningSimulator, tmp_path: Path, fake_clock: FakeClock
) -> None:
    sim.sim.faults.add(Fault(method="POST", path="/v1/ciBuildRuns", status=500))
    async with runtime(sim, tmp_path, fake_clock) as (rt, events):
        code = await commands.start(rt, Target(workflow=wf_id(sim, "CI")), wait=True)

    assert code == ExitCode.OK
    assert len(sim.sim.runs) == 1
    posts = sim.sim.traffic.matching("POST", "/v1/ciBuildRuns")
    assert [p.status for p in posts] == [500, 201]
    assert events.one("build.start_unknown")["http_status"] == 500
    assert events.one("build.created")["reconciled"] is False
    # Before posting again the starter looked for a run and found none.
    listed = sim.sim.traffic.matching("GET", f"/v1/ciWorkflows/{wf_id(sim, 'CI')}/buildRuns")
    assert listed
    assert all(e.seq < posts[1].seq for e in listed)


async def test_another_tools_build_is_not_adopted_after_an_unknown_outcome(
    sim: RunningSimulator, tmp_path: Path, fake_clock: FakeClock
) -> None:
    """A push-triggered build that appears meanwhile is not ours: post again."""
    ci = wf_id(sim, "CI")
    sim.sim.faults.add(Fault(method="POST", path="/v1/ciBuildRuns", status=503))
    async with runtime(sim, tmp_path, fake_clock) as (rt, events):
        sim.sim.start_run(ci, ref_id(sim, "CI", "develop"))
        code = await commands.start(rt, Target(workflow=ci, branch="main"), wait=True)
    assert code == ExitCode.OK
    reasons = sorted(r.start_reason for r in sim.sim.runs.all())
    assert reasons == ["GIT_REF_CHANGE", "MANUAL"]
    manual = next(r for r in sim.sim.runs.all() if r.start_reason == "MANUAL")
    assert events.one("build.completed")["build_run_id"] == manual.id


# -- long, bumpy watches ----------------------------------------------------------------------


async def test_long_watch_survives_503_burst_and_token_expiry(
    long_sim: RunningSimulator,
    tmp_path: Path,
    fake_clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokens = record_tokens(long_sim, monkeypatch)
    long_sim.sim.faults.add(Fault(method="GET", path=RUN_PATH, status=503, times=8))
    began = fake_clock.time()
    polling = '[polling]\ninterval = "30s"\n'
    async with runtime(long_sim, tmp_path, fake_clock, polling) as (rt, events):
        code = await commands.start(rt, Target(workflow=wf_id(long_sim, "CI")), wait=True)

    assert code == ExitCode.OK
    assert events.one("build.completed")["duration_s"] == LONG_RUN_S
    assert fake_clock.time() - began >= LONG_RUN_S
    traffic = long_sim.sim.traffic.entries
    assert sum(1 for e in traffic if e.status == 503) == 8
    retrying = events.of("api.retrying")
    assert len(retrying) >= 7
    assert all(r["http_status"] == 503 and r["level"] == "warning" for r in retrying)
    # The token was re-signed before it ran out: several tokens, none ever rejected.
    assert len(set(tokens)) > 1
    assert not [e for e in traffic if e.status == 401]
    assert events.of("api.auth_failed") == []


async def test_one_expired_token_mid_watch_is_survived_by_signing_again(
    sim: RunningSimulator,
    tmp_path: Path,
    fake_clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokens = record_tokens(sim, monkeypatch)
    sim.sim.faults.add(Fault(FaultAction.EXPIRE_TOKEN, method="GET", path=RUN_PATH))
    async with runtime(sim, tmp_path, fake_clock) as (rt, events):
        code = await commands.start(rt, Target(workflow=wf_id(sim, "CI")), wait=True)

    assert code == ExitCode.OK
    polls = [
        e for e in sim.sim.traffic.entries if e.method == "GET" and re.fullmatch(RUN_PATH, e.path)
    ]
    assert [p.status for p in polls[:2]] == [401, 200]
    assert polls[0].fault == "expire_token"
    assert len(set(tokens)) == 2
    assert events.of("api.auth_failed") == []
    assert events.of("api.retrying") == []


async def test_give_up_after_ends_the_watch_with_timeout(
    long_sim: RunningSimulator, tmp_path: Path, fake_clock: FakeClock
) -> None:
    polling = '[polling]\ninterval = "1m"\ngive_up_after = "10m"\n'
    async with runtime(long_sim, tmp_path, fake_clock, polling) as (rt, events):
        code = await commands.start(rt, Target(workflow=wf_id(long_sim, "CI")), wait=True)

    assert code == ExitCode.GAVE_UP
    expired = events.one("build.watch_expired")
    assert expired["result"] == "timeout"
    assert expired["level"] == "warning"
    assert expired["last_progress"] == "RUNNING"
    assert expired["give_up_after_s"] == 600
    assert expired["build_run_id"] == long_sim.sim.runs.all()[0].id
    assert events.of("build.completed") == []
    # The build itself goes on in Xcode Cloud; xcloudd only stopped looking.
    truth = long_sim.sim.runs.all()[0].progress(fake_clock.time())
    assert truth.execution_progress == "RUNNING"


async def test_watch_follows_a_run_started_elsewhere(
    sim: RunningSimulator, tmp_path: Path, fake_clock: FakeClock
) -> None:
    run = sim.sim.start_run(wf_id(sim, "UI Tests"), ref_id(sim, "UI Tests", "develop"))
    async with runtime(sim, tmp_path, fake_clock) as (rt, events):
        code = await commands.watch(rt, run.id)
    assert code == ExitCode.FAILED
    completed = events.one("build.completed")
    assert (completed["origin"], completed["build_number"]) == ("watch", run.number)
    assert completed["result"] == "failure"


# -- the request budget -----------------------------------------------------------------------


async def test_budget_adopts_the_limit_apple_reports(tmp_path: Path, fake_clock: FakeClock) -> None:
    async with (
        checked_simulator(fake_clock, rate_limit=1000) as running,
        runtime(running, tmp_path, fake_clock) as (rt, _events),
    ):
        assert rt.client.budget.rate_limit.limit == 3600  # nothing heard yet
        await commands.start(rt, Target(workflow=wf_id(running, "CI")), wait=False)
        key_id = running.sim.primary_key.key_id
        assert rt.client.budget.rate_limit == RateLimit(
            1000, running.sim.rate_limiter.remaining(key_id)
        )
        assert rt.client.budget.rate_limit.remaining == 1000 - rt.client.requests


async def test_429_with_retry_after_on_a_get_waits_that_long(
    sim: RunningSimulator, tmp_path: Path, fake_clock: FakeClock
) -> None:
    sim.sim.faults.add(Fault(method="GET", path=RUN_PATH, status=429, retry_after=7))
    async with runtime(sim, tmp_path, fake_clock) as (rt, events):
        code = await commands.start(rt, Target(workflow=wf_id(sim, "CI")), wait=True)

    assert code == ExitCode.OK
    polls = [
        e for e in sim.sim.traffic.entries if e.method == "GET" and re.fullmatch(RUN_PATH, e.path)
    ]
    assert [p.status for p in polls[:2]] == [429, 200]
    assert polls[1].time - polls[0].time >= 7
    throttled = events.one("api.throttled")
    assert throttled["delay_s"] == 7
    retrying = events.one("api.retrying")
    assert (retrying["http_status"], retrying["delay_s"]) == (429, 7)


async def test_requests_sent_validate_against_apples_schema(
    sim: RunningSimulator, tmp_path: Path, fake_clock: FakeClock
) -> None:
    target = Target(workflow="Nightly", product="Acme Shop", branch="develop", clean=False)
    async with runtime(sim, tmp_path, fake_clock) as (rt, _events):
        await commands.start(rt, target, wait=True)
        await commands.start(rt, Target(workflow=wf_id(sim, "CI"), tag="v1.1.0"), wait=False)
    posts = [e for e in sim.sim.traffic.entries if e.method == "POST"]
    assert [p.status for p in posts] == [201, 201]
    assert posts[0].request_json["data"]["attributes"] == {"clean": False}
    assert schema_problems(sim.sim.traffic.entries) == []


async def test_a_poke_confirms_now_without_doubling_the_cadence(tmp_path: Path) -> None:
    """A webhook hint makes the watcher confirm the run at once with one GET; the product's
    regular looks keep their cadence, and a flood of hints costs one more GET, not twenty."""
    clock = SteppingClock(FakeClock().time())
    data = copy.deepcopy(DEFAULT_SCENARIO)
    data["running_seconds"] = LONG_RUN_S
    async with (
        checked_simulator(clock, scenario=scenario_from_dict(data, "long")) as sim,
        runtime(sim, tmp_path, clock, '[polling]\ninterval = "30s"\n') as (rt, _),
    ):
        run = sim.sim.start_run(wf_id(sim, "CI"))
        follower = follower_of(rt)
        loop = asyncio.create_task(follower.run())
        start = clock.time()
        try:
            await record(rt, run.id, wf_id(sim, "CI"), None)
            await until(lambda: len(poll_times(sim, run.id)) == 1)  # learns the product
            await until(lambda: clock.next_wakeup() is not None)
            clock.advance_to(start + 10)
            assert follower.poke(run.id)
            await until(lambda: len(confirm_times(sim, run.id)) == 1)
            # A flood of hints (forged or replayed) brings one more look forward, to the end
            # of min_interval (5 s) after the last: not twenty.
            clock.advance_to(start + 12)
            for _ in range(20):
                assert follower.poke(run.id)
            await settle(rt)
            for second in range(13, 200):
                clock.advance_to(start + second)
                await settle(rt)
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
    confirms = [t - start for t in confirm_times(sim, run.id)]
    assert confirms == [10, 15], "the poke did not confirm at once, or the flood cost more"
    looks = [t - start for t in list_times(sim)]
    # The product's looks: about every 30 s (give or take jitter), not more often.
    assert 5 <= len(looks) <= 7, looks
    assert all(26 <= b - a <= 31 for a, b in itertools.pairwise(looks)), looks


def confirm_times(sim: RunningSimulator, run_id: str) -> list[float]:
    path = f"/v1/ciBuildRuns/{run_id}/actions"
    return [e.time for e in sim.sim.traffic.entries if e.method == "GET" and e.path == path]


def list_times(sim: RunningSimulator) -> list[float]:
    return [
        e.time
        for e in sim.sim.traffic.entries
        if e.method == "GET" and re.fullmatch(r"/v1/ciProducts/[^/]+/buildRuns", e.path)
    ]


def follower_of(rt: Runtime) -> Follower:
    return Follower(
        rt.store, rt.client, rt.events, rt.clock, rt.config.polling, report=rt.supervisor.report
    )


async def record(rt: Runtime, run_id: str, workflow: str, known: BuildRun | None) -> None:
    """A watched run, as discovery records it (from a list entry when `known`)."""
    new = NewRun(
        run_id=run_id,
        number=known.number if known else None,
        workflow_id=workflow,
        job=None,
        origin="watch",
        created_at=known.created if known else None,
        progress=known.progress if known else None,
    )
    await rt.store.call(rt.store.sync.record_run, new, intent_id=None, reconciled=False)


def poll_times(sim: RunningSimulator, run_id: str) -> list[float]:
    path = f"/v1/ciBuildRuns/{run_id}"
    return [e.time for e in sim.sim.traffic.entries if e.method == "GET" and e.path == path]


async def until(condition: Callable[[], bool], rounds: int = 100_000) -> None:
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


@pytest.mark.parametrize("seconds_before", [0, 10], ids=["pending", "complete"])
async def test_following_a_run_already_read_from_a_list_costs_no_extra_poll(
    sim: RunningSimulator, fake_clock: FakeClock, tmp_path: Path, seconds_before: float
) -> None:
    """A watched run found in the workflow's list is not fetched again at once; a complete one
    gets the one poll that reads its actions for build.completed."""
    workflow = wf_id(sim, "CI")
    async with runtime(sim, tmp_path, fake_clock) as (rt, sink):
        run = sim.sim.start_run(workflow)
        fake_clock.advance(seconds_before)
        listing = await rt.client.get(
            f"/v1/ciWorkflows/{workflow}/buildRuns",
            {"sort": "-number", "limit": "1", "fields[ciBuildRuns]": RUN_FIELDS},
        )
        known = BuildRun.parse(listing["data"][0])
        await record(rt, run.id, workflow, known)
        code = await commands.follow(rt, run.id)
    assert code == ExitCode.OK
    assert len(poll_times(sim, run.id)) == 1
    assert sink.names("build.") == ["build.created", "build.started", "build.completed"]
    assert sink.one("build.completed")["actions"], "build.completed lacks the run's actions"


@pytest.mark.parametrize("variant", ["bad_relationship", "naive_date", "not_object"])
async def test_start_wait_gets_through_malformed_polls(
    sim: RunningSimulator, tmp_path: Path, fake_clock: FakeClock, variant: str
) -> None:
    """A poll answer of an odd shape is retried; `start --wait` ends with the build's outcome."""
    sim.sim.faults.add(
        Fault(FaultAction.MALFORMED, method="GET", path=RUN_PATH, variant=variant, times=2)
    )
    async with runtime(sim, tmp_path, fake_clock) as (rt, events):
        code = await commands.start(rt, Target(workflow=wf_id(sim, "CI")), wait=True)
    assert code == ExitCode.OK
    assert events.one("build.completed")["result"] == "success"
