"""Following runs per product: one read of a product's newest runs answers for all of them,
paged only as far as is worth it, with a GET of its own for a run the list does not reach; and
a cadence that looks sparsely while nothing is likely to change and densely around the
transition history says is next. Checked against the simulator's traffic and ground truth."""

from __future__ import annotations

import asyncio
import copy
import itertools
import random
import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from conftest import SteppingClock
from test_core import CollectingSink, checked_simulator, runtime, until
from world import settle
from xcloudd.clock import FakeClock
from xcloudd.events import BuildRef
from xcloudd.follower import Follower
from xcloudd.runtime import Runtime
from xcloudd.simulator import RunningSimulator
from xcloudd.simulator.runs import BuildRun
from xcloudd.simulator.scenario import DEFAULT_SCENARIO, scenario_from_dict
from xcloudd.store import Ended, NewRun

LIST = re.compile(r"/v1/ciProducts/([^/]+)/buildRuns")
ONE = re.compile(r"/v1/ciBuildRuns/([^/]+)")


def scenario(pending_s: float, running_s: float) -> dict[str, object]:
    data = copy.deepcopy(DEFAULT_SCENARIO)
    data["pending_seconds"] = pending_s
    data["running_seconds"] = running_s
    for product in data["products"]:
        for workflow in product["workflows"]:
            workflow.pop("pending_seconds", None)
            workflow.pop("running_seconds", None)
    return data


@asynccontextmanager
async def following(
    tmp_path: Path,
    pending_s: float,
    running_s: float,
    polling: str,
    *,
    seed: int = 1,
    rate_limit: int | None = None,
) -> AsyncIterator[tuple[SteppingClock, RunningSimulator, Runtime, CollectingSink, Follower]]:
    clock = SteppingClock(FakeClock().time())
    world = scenario_from_dict(scenario(pending_s, running_s), "products")
    async with (
        checked_simulator(clock, scenario=world, rate_limit=rate_limit) as sim,
        runtime(sim, tmp_path, clock, f"[polling]\n{polling}\n") as (rt, sink),
    ):
        follower = Follower(
            rt.store,
            rt.client,
            rt.events,
            rt.clock,
            rt.config.polling,
            report=rt.supervisor.report,
            rng=random.Random(seed),
        )
        yield clock, sim, rt, sink, follower


async def follow(rt: Runtime, runs: list[BuildRun]) -> None:
    """Runs in the store, as the starter or discovery records them (product known)."""
    for run in runs:
        new = NewRun(
            run_id=run.id,
            number=run.number,
            workflow_id=run.workflow_id,
            job=None,
            origin="watch",
            created_at=datetime.fromtimestamp(run.created_at, tz=UTC),
            progress="PENDING",
            product_id=run.product_id,
        )
        await rt.store.call(rt.store.sync.record_run, new, intent_id=None, reconciled=False)


async def step_through(
    clock: SteppingClock, rt: Runtime, follower: Follower, seconds: float, step: float = 1.0
) -> None:
    loop = asyncio.create_task(follower.run())
    start = clock.time()
    try:
        await until(follower.resumed.is_set)
        t = 0.0
        while t < seconds:
            t += step
            clock.advance_to(start + t)
            await settle(rt)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


def gets(sim: RunningSimulator, pattern: re.Pattern[str]) -> list[tuple[float, str]]:
    out = []
    for e in sim.sim.traffic.entries:
        match = pattern.fullmatch(e.path)
        if e.method == "GET" and match:
            out.append((e.time, match.group(1)))
    return out


async def test_many_runs_of_two_products_cost_one_request_per_product_per_look(
    tmp_path: Path,
) -> None:
    async with following(tmp_path, 1, 3600, 'interval = "30s"') as (clock, sim, rt, sink, f):
        shop, kit = sim.sim.scenario.products
        runs = [sim.sim.start_run(w.id) for w in sim.sim.scenario.workflows() if w.is_enabled]
        runs += [sim.sim.start_run(runs[0].workflow_id) for _ in range(30)]
        await follow(rt, runs)
        await step_through(clock, rt, f, 300)
    assert {r.product_id for r in runs} == {shop.id, kit.id}
    assert gets(sim, ONE) == [], "a run was fetched on its own although its product's list had it"
    looks = Counter(product for _, product in gets(sim, LIST))
    # 300 s at a 30 s cadence: about ten looks per product, whatever its number of runs.
    assert set(looks) == {shop.id, kit.id}
    assert all(8 <= n <= 13 for n in looks.values()), looks
    started = {e["build_run_id"] for e in sink.records if e["event"] == "build.started"}
    assert started == {r.id for r in runs if r.ground_truth(clock.time())["started_at"]}


async def test_runs_past_the_first_page_are_read_from_the_next_pages(tmp_path: Path) -> None:
    async with following(tmp_path, 1, 3600, 'interval = "30s"') as (clock, sim, rt, sink, f):
        workflow = sim.sim.scenario.workflow_named("CI").id
        runs = [sim.sim.start_run(workflow) for _ in range(450)]
        await follow(rt, runs)
        await step_through(clock, rt, f, 100, step=2.0)
    assert gets(sim, ONE) == []
    by_look = Counter(t for t, _ in gets(sim, LIST))
    # Each look reads 200 + 200 + 50: three pages.
    assert set(by_look.values()) == {3}, by_look
    started = {e["build_run_id"] for e in sink.records if e["event"] == "build.started"}
    assert started == {r.id for r in runs}


async def test_a_run_the_list_does_not_reach_gets_a_get_of_its_own(tmp_path: Path) -> None:
    async with following(tmp_path, 1, 3600, 'interval = "30s"') as (clock, sim, rt, sink, f):
        workflow = sim.sim.scenario.workflow_named("CI").id
        old = sim.sim.start_run(workflow)
        for _ in range(1000):
            sim.sim.start_run(workflow)  # newer runs nobody follows: five pages of them
        await follow(rt, [old])
        await step_through(clock, rt, f, 100, step=2.0)
    lists = gets(sim, LIST)
    ones = gets(sim, ONE)
    # Paging five pages deep for one run costs more than one GET of it.
    assert len(Counter(t for t, _ in lists)) == len(lists), "the list was paged for one run"
    assert ones
    assert {run for _, run in ones} == {old.id}
    assert len(ones) <= len(lists) + 1
    (started,) = [e for e in sink.records if e["event"] == "build.started"]
    assert started["build_run_id"] == old.id


async def test_looks_cluster_around_the_transitions_history_expects(tmp_path: Path) -> None:
    """A workflow whose runs queue about 60 s and run about 600 s: a new run is looked at a few
    times while nothing is likely to change and every min_interval around the expected start
    and end, so both are seen within seconds for fewer looks than a 30 s poller's."""
    queue_s, run_s = 60.0, 600.0
    polling = 'interval = "30s"\nmin_interval = "5s"\nmax_interval = "5m"'
    async with following(tmp_path, queue_s, run_s, polling) as (clock, sim, rt, sink, f):
        workflow = sim.sim.scenario.workflow_named("CI").id
        product = sim.sim.scenario.products[0].id
        await remember(rt, workflow, product, clock.time(), queue_s=queue_s, run_s=run_s)
        run = sim.sim.start_run(workflow)
        await follow(rt, [run])
        await step_through(clock, rt, f, 800)
    truth = run.ground_truth(clock.time())
    looks = [t - run.created_at for t, _ in gets(sim, LIST)]
    started, completed = (
        next(e for e in sink.records if e["event"] == name)
        for name in ("build.started", "build.completed")
    )
    seen_start = stamp(started) - truth["started_at"]
    seen_end = stamp(completed) - truth["finished_at"]
    assert 0 <= seen_start <= 6, (seen_start, looks)
    assert 0 <= seen_end <= 6, (seen_end, looks)
    near = [t for t in looks if abs(t - queue_s) <= 15 or abs(t - queue_s - run_s) <= 75]
    assert len(near) >= 0.7 * len(looks), looks
    # No more looks than a 30 s poller's, which would see each transition 15 s late on average.
    assert len(looks) <= (queue_s + run_s) / 30, looks


async def remember(
    rt: Runtime, workflow: str, product: str, now: float, *, queue_s: float, run_s: float
) -> None:
    """Twenty finished runs of the workflow in the store: its history."""
    db = rt.store.sync
    for i, wobble in enumerate([-2.0, -1.0, 0.0, 1.0, 2.0] * 4):
        created = datetime.fromtimestamp(now - 86400 + i * 3600, tz=UTC)
        started = created + timedelta(seconds=queue_s + wobble)
        ended = started + timedelta(seconds=run_s + 5 * wobble)
        run_id = f"00000000-0000-4000-8000-{i:012d}"
        new = NewRun(run_id, i + 1, workflow, None, "watch", created, product_id=product)
        event = rt.events.make(
            "build.watch_ended",
            subject=run_id,
            build=BuildRef(run_id, i + 1, workflow, None, "watch"),
            reason="test history",
        )
        end = Ended(run_id, "completed", [event], started_at=started, ended_at=ended)
        await rt.store.call(db.write_round, new=[new], ended=[end])


def stamp(event: dict[str, object]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


async def test_looks_are_never_more_often_than_the_budget_pays_for(tmp_path: Path) -> None:
    """450 runs of one product (three pages a look) on a key allowed 360 requests an hour: at
    80% of it, and 80% of that for polls, a look every 47 s, however eager the cadence."""
    polling = 'interval = "5s"\nmin_interval = "5s"\nmax_interval = "5m"'
    async with following(tmp_path, 1, 3600, polling, rate_limit=360) as (clock, sim, rt, sink, f):
        workflow = sim.sim.scenario.workflow_named("CI").id
        runs = [sim.sim.start_run(workflow) for _ in range(450)]
        await follow(rt, runs)
        await step_through(clock, rt, f, 600, step=1.0)
    looks = sorted({t for t, _ in gets(sim, LIST)})
    assert len(looks) >= 5
    gaps = [b - a for a, b in itertools.pairwise(looks[1:])]
    assert min(gaps) >= 0.9 * 3 / (0.8 * 0.8 * 360 / 3600), gaps
    assert not [e for e in sink.records if e["event"] == "api.throttled"]
    assert all(e.status == 200 for e in sim.sim.traffic.entries)


async def test_a_watched_run_behind_many_runs_of_a_busy_sibling_is_discovered(
    tmp_path: Path,
) -> None:
    """Discovery reads the product's list down to where it last looked, however many runs of
    other workflows came in between (here ten pages of them)."""
    polling = 'interval = "30s"\nmin_interval = "5s"\nmax_interval = "5m"'
    async with following(tmp_path, 30000, 30000, polling) as (clock, sim, rt, sink, f):
        scenario = sim.sim.scenario
        watched = scenario.workflow_named("Nightly").id
        busy = scenario.workflow_named("CI").id
        # It looked before any run.
        await rt.store.call(rt.store.sync.write_round, cursors=[(watched, 0)])
        mine = sim.sim.start_run(watched)
        for _ in range(2100):
            sim.sim.start_run(busy)
        f.watch(watched, scenario.products[0].id)
        await step_through(clock, rt, f, 60, step=2.0)
        cursor = (await rt.store.call(rt.store.sync.cursors, [watched]))[watched]
    created = [e["build_run_id"] for e in sink.records if e["event"] == "build.created"]
    assert created == [mine.id]
    assert cursor == 2101
    first, *later = sorted(Counter(t for t, _ in gets(sim, LIST)).items())
    assert first[1] == 11, "the first look did not read the list down to the cursor"
    assert all(pages == 1 for _, pages in later), "later looks paged down again"


async def test_a_webhook_during_a_look_gets_a_look_of_its_own(tmp_path: Path) -> None:
    """A new run's BUILD_CREATED arrives while a look at its product is under way, after the
    list was read: another look follows at once, not a whole gap (5 minutes while webhooks
    arrive) later."""
    polling = 'interval = "30s"\nmin_interval = "5s"\nmax_interval = "5m"'
    async with following(tmp_path, 3000, 3000, polling) as (clock, sim, rt, sink, f):
        workflow = sim.sim.scenario.workflow_named("CI").id
        f.watch(workflow, sim.sim.scenario.products[0].id)
        f.cadence.webhook(clock.monotonic())
        read = f._read
        hinted: dict[str, float | str] = {}

        async def read_then_hint(*args: Any, **kwargs: Any) -> Any:
            listing = await read(*args, **kwargs)
            if not hinted and clock.time() > 0:
                run = sim.sim.start_run(workflow)  # created just after the list was read
                hinted.update(id=run.id, at=clock.time())
                assert f.hint(run.id, workflow, "BUILD_CREATED")
            return listing

        f._read = read_then_hint  # type: ignore[method-assign]
        await step_through(clock, rt, f, 400)
    (created,) = [e for e in sink.records if e["event"] == "build.created"]
    assert created["build_run_id"] == hinted["id"]
    assert stamp(created) - float(hinted["at"]) <= 5


async def test_a_started_webhook_during_the_runs_own_get_is_not_lost(tmp_path: Path) -> None:
    """A run the list does not reach is read by a GET of its own; its BUILD_STARTED arriving
    while that GET is under way brings the next look forward all the same."""
    polling = 'interval = "30s"\nmin_interval = "5s"\nmax_interval = "5m"'
    async with following(tmp_path, 30000, 30000, polling) as (clock, sim, rt, sink, f):
        workflow = sim.sim.scenario.workflow_named("CI").id
        old = sim.sim.start_run(workflow)
        for _ in range(1000):
            sim.sim.start_run(workflow)  # five pages of newer runs: `old` gets its own GETs
        await follow(rt, [old])
        get_run = f._get_run
        hinted: dict[str, float] = {}

        async def get_then_start(run_id: str, share: str | None) -> dict[str, Any]:
            doc = await get_run(run_id, share)
            if not hinted and clock.time() > old.created_at + 20:
                # The build starts just after this answer; its webhook arrives now.
                object.__setattr__(old, "pending_s", clock.time() - old.created_at)
                hinted["at"] = clock.time()
                assert f.hint(old.id, workflow, "BUILD_STARTED")
            return doc

        f._get_run = get_then_start  # type: ignore[method-assign]
        await step_through(clock, rt, f, 400)
    (started,) = [e for e in sink.records if e["event"] == "build.started"]
    assert stamp(started) - hinted["at"] <= 10
