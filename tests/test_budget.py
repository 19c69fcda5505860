"""The shared request budget, as App Store Connect sees it: what reaches the simulator, and when.

Every test talks HTTP to the in-process simulator on a SteppingClock: virtual time moves only
when every request on the wire has been answered and the budget's waiters have settled, so the
simulator's traffic log records the order and the instant at which the budget let each request
go. The last test runs the whole daemon (world.py).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import SteppingClock, schema_problems
from world import T0, World, at, job
from xcloudd.api import AscClient, Lane, TooLate
from xcloudd.auth import TokenSigner
from xcloudd.config import SigningKey
from xcloudd.simulator import Fault, RunningSimulator, running_simulator
from xcloudd.simulator.traffic import TrafficEntry

if TYPE_CHECKING:
    from xcloudd.events import Emitter

CREATE = "/v1/ciBuildRuns"
# A budget of 36 requests an hour on Apple's usual 3,600: one request every 100 s, and no more
# than one saved up, so every request after the first has to wait its turn.
SCARCE = 0.01
SCARCE_GAP_S = 100.0


@pytest.fixture
def fake_clock() -> SteppingClock:
    return SteppingClock(T0.timestamp())


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, name: str, **fields: Any) -> None:
        self.events.append((name, fields))

    def of(self, name: str) -> list[dict[str, Any]]:
        return [fields for event, fields in self.events if event == name]


@asynccontextmanager
async def sim_client(
    sim: RunningSimulator, clock: SteppingClock, budget: float
) -> AsyncIterator[tuple[AscClient, Recorder]]:
    key = sim.sim.primary_key
    private = serialization.load_pem_private_key(key.private_key_pem, password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    signing = SigningKey(
        key_id=key.key_id, issuer_id=key.issuer_id, private_key=private, source="test"
    )
    events = Recorder()
    async with aiohttp.ClientSession() as session:
        client = AscClient(
            session,
            sim.url,
            TokenSigner(signing, clock),
            clock,
            cast("Emitter", events),
            budget=budget,
            rng=random.Random(7),
        )
        yield client, events


async def settle(client: AscClient) -> None:
    """Until the requests on the wire are answered and whoever they woke has settled."""
    quiet = 0
    while quiet < 2:
        for _ in range(50):
            await asyncio.sleep(0)
        quiet = quiet + 1 if client.exchanging == 0 else 0
        # Real time, briefly: the simulator's side of the socket runs in this loop too.
        await asyncio.sleep(0.0005)


async def pump(clock: SteppingClock, client: AscClient, until: float) -> None:
    """Let virtual time reach `until`, one wake-up at a time."""
    while True:
        await settle(client)
        wake = clock.next_wakeup()
        if wake is None or wake > until:
            break
        clock.advance_to(wake)
    clock.advance_to(until)
    await settle(client)


async def spawn(client: AscClient, *requests: Awaitable[Any]) -> list[asyncio.Task[Any]]:
    """Start the requests in this order, each queued before the next is made."""
    tasks = []
    for request in requests:
        tasks.append(asyncio.ensure_future(request))
        await settle(client)
    return tasks


async def finish(tasks: Sequence[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def run_path(sim: RunningSimulator) -> str:
    run = sim.sim.start_run(sim.sim.scenario.workflow_named("CI").id)
    return f"/v1/ciBuildRuns/{run.id}"


def create_body(sim: RunningSimulator) -> dict[str, Any]:
    workflow = sim.sim.scenario.workflow_named("CI").id
    return {
        "data": {
            "type": "ciBuildRuns",
            "relationships": {"workflow": {"data": {"type": "ciWorkflows", "id": workflow}}},
        }
    }


def sent_since(sim: RunningSimulator, seq: int) -> list[TrafficEntry]:
    return [e for e in sim.sim.traffic.since(seq) if not e.path.startswith("/_sim/")]


async def spend_the_saved_token(client: AscClient, sim: RunningSimulator) -> int:
    """One request, so that the budget has nothing saved up; returns where traffic goes on."""
    await client.get(run_path(sim))
    return sim.sim.traffic.next_seq()


# -- never over budget --------------------------------------------------------------------------


async def test_many_callers_together_never_exceed_the_budget_in_any_minute_or_hour(
    fake_clock: SteppingClock,
) -> None:
    """Twelve pollers of three products and a start lane, flat out for two virtual hours on a
    key of 360 requests an hour at budget 0.8: in every minute and every hour, at most
    share*limit per hour plus the one minute's worth the budget may save up; and Apple never
    has to say 429."""
    limit, share = 360, 0.8
    rate = share * limit / 3600.0
    capacity = rate * 60.0
    async with running_simulator(clock=fake_clock, rate_limit=limit) as sim:
        async with sim_client(sim, fake_clock, share) as (client, _events):
            # Until Apple has said how large the key's hour is, the budget assumes 3,600.
            seq = await spend_the_saved_token(client, sim)
            paths = [run_path(sim) for _ in range(3)]

            async def poller(path: str, product: str, lane: Lane = "poll") -> None:
                for _ in range(50):
                    await client.get(path, lane=lane, share=product)

            workers = [poller(paths[i % 3], f"product-{i % 3}") for i in range(12)]
            workers.append(poller(paths[0], "product-0", lane="start"))
            tasks = await spawn(client, *workers)
            end = fake_clock.time() + 2 * 3600
            await pump(fake_clock, client, end)
            await finish(tasks)
        problems = schema_problems(sim.sim.traffic.entries)
        sent = sent_since(sim, seq)
    assert problems == []

    times = [e.time for e in sent]
    assert [e.status for e in sent] == [200] * len(sent), "Apple had to refuse requests"
    for window in (60.0, 3600.0):
        allowed = math.floor(capacity + rate * window + 1e-6)
        busiest = max(
            sum(1 for t in times[i:] if t <= start + window) for i, start in enumerate(times)
        )
        assert busiest <= allowed, f"{busiest} requests in {window:g}s, budget {allowed}"
    # ... and it is used, not wasted (going near the key's limit slows it to one a minute for a
    # while: see Budget).
    assert len(times) >= 0.95 * rate * 2 * 3600


# -- fair shares --------------------------------------------------------------------------------


async def test_a_product_with_many_waiting_polls_does_not_starve_one_with_few(
    sim: RunningSimulator, fake_clock: SteppingClock
) -> None:
    big, small, other = run_path(sim), run_path(sim), run_path(sim)
    async with sim_client(sim, fake_clock, SCARCE) as (client, _events):
        seq = await spend_the_saved_token(client, sim)
        tasks = await spawn(
            client,
            *(client.get(big, share="big") for _ in range(20)),
            *(client.get(small, share="small") for _ in range(2)),
            client.get(other),  # no share: one of its own
        )
        await pump(fake_clock, client, fake_clock.time() + 30 * SCARCE_GAP_S)
        assert all(t.done() for t in tasks)
        await finish(tasks)
    sent = sent_since(sim, seq)

    name = {big: "B", small: "S", other: "O"}
    assert "".join(name[e.path] for e in sent) == "BSOBS" + "B" * 18
    gaps = {round(b.time - a.time, 6) for a, b in itertools.pairwise(sent)}
    assert gaps == {SCARCE_GAP_S}


# -- starts first -------------------------------------------------------------------------------


async def test_a_start_queued_behind_many_polls_goes_next(
    sim: RunningSimulator, fake_clock: SteppingClock
) -> None:
    poll = run_path(sim)
    runs_of_workflow = f"/v1/ciWorkflows/{sim.sim.scenario.workflow_named('CI').id}/buildRuns"
    async with sim_client(sim, fake_clock, SCARCE) as (client, _events):
        seq = await spend_the_saved_token(client, sim)
        queued = fake_clock.time()
        tasks = await spawn(
            client,
            *(client.get(poll, share=f"product-{i % 2}") for i in range(6)),
            client.post(CREATE, create_body(sim)),
            client.get(runs_of_workflow, share="product-0", lane="start"),
        )
        await pump(fake_clock, client, fake_clock.time() + 10 * SCARCE_GAP_S)
        assert all(t.done() for t in tasks)
        await finish(tasks)
    sent = sent_since(sim, seq)

    assert [(e.method, e.path) for e in sent] == [
        ("POST", CREATE),
        ("GET", runs_of_workflow),
        *[("GET", poll)] * 6,
    ]
    assert sent[0].time == queued + SCARCE_GAP_S
    assert [e.status for e in sent[:2]] == [201, 200]


# -- a 429 slows everything ---------------------------------------------------------------------


async def test_a_429_holds_every_lane_for_its_retry_after_then_traffic_resumes_at_the_steady_pace(
    sim: RunningSimulator, fake_clock: SteppingClock
) -> None:
    refused, other = run_path(sim), run_path(sim)
    sim.sim.faults.add(Fault(method="GET", path=refused, status=429, retry_after=30))
    async with sim_client(sim, fake_clock, 0.8) as (client, events):
        seq = sim.sim.traffic.next_seq()
        # Plenty saved up (48 requests' worth): only the 429 can hold anything back.
        tasks = await spawn(client, client.get(refused, share="a"))
        (throttled_at,) = [e.time for e in sent_since(sim, seq)]
        tasks += await spawn(
            client, client.get(other, share="b"), client.post(CREATE, create_body(sim))
        )
        await pump(fake_clock, client, throttled_at + 29.9)
        assert len(sent_since(sim, seq)) == 1, "a request went out during the 429's hold"
        await pump(fake_clock, client, throttled_at + 60)
        assert all(t.done() for t in tasks)
        await finish(tasks)
    sent = sent_since(sim, seq)

    assert [(e.method, e.path, e.status) for e in sent] == [
        ("GET", refused, 429),
        ("POST", CREATE, 201),
        ("GET", refused, 200),
        ("GET", other, 200),
    ]
    # The hold spent what was saved up: one request when it ends, then 0.8 requests a second.
    assert [round(e.time - throttled_at, 6) for e in sent[1:]] == [30.0, 31.25, 32.5]
    (throttled,) = events.of("api.throttled")
    assert throttled["delay_s"] == 30


# -- waiting can be given up --------------------------------------------------------------------


async def test_cancelled_waiters_leave_the_queue_moving_and_the_budget_unspent(
    sim: RunningSimulator, fake_clock: SteppingClock
) -> None:
    """A start next in line, a poll behind it and a poll far back all give up waiting: the
    polls still waiting are served at the very instants they would have been without them."""
    gone, stays, later = run_path(sim), run_path(sim), run_path(sim)
    async with sim_client(sim, fake_clock, SCARCE) as (client, _events):
        seq = await spend_the_saved_token(client, sim)
        queued = fake_clock.time()
        start, head, stay, back, last = await spawn(
            client,
            client.post(CREATE, create_body(sim)),
            client.get(gone, share="a"),
            client.get(stays, share="b"),
            client.get(gone, share="a"),
            client.get(later, share="c"),
        )
        for task in (start, head, back):
            task.cancel()
        await pump(fake_clock, client, queued + 10 * SCARCE_GAP_S)
        assert stay.done(), "the queue is stuck behind a cancelled waiter"
        assert last.done()
        await finish([start, head, stay, back, last])
    sent = sent_since(sim, seq)

    assert [(e.path, e.time - queued) for e in sent] == [
        (stays, SCARCE_GAP_S),
        (later, 2 * SCARCE_GAP_S),
    ]


async def test_a_post_whose_turn_would_come_too_late_is_not_sent(
    sim: RunningSimulator, fake_clock: SteppingClock
) -> None:
    poll = run_path(sim)
    async with sim_client(sim, fake_clock, SCARCE) as (client, _events):
        seq = await spend_the_saved_token(client, sim)
        now = fake_clock.time()
        post, get = await spawn(
            client,
            client.post(CREATE, create_body(sim), not_after=now + SCARCE_GAP_S - 1),
            client.get(poll),
        )
        await pump(fake_clock, client, now + 3 * SCARCE_GAP_S)
        assert isinstance(post.exception(), TooLate)
        assert get.done()
    sent = sent_since(sim, seq)
    # The POST gave its turn back at once: the poll behind it went when the POST would have.
    assert [(e.method, e.time - now) for e in sent] == [("GET", SCARCE_GAP_S)]


# -- a start the budget cannot send in time -----------------------------------------------------


async def test_a_scheduled_start_the_budget_cannot_send_within_catch_up_is_counted_missed(
    world: World,
) -> None:
    """18 requests an hour: by the time the job's names are looked up (products, workflows,
    repository, branches, one turn each), its minute of grace is long gone. The occurrence is
    missed, and Apple never sees the POST."""
    config = world.configure(
        job("hourly", every="1h"),
        polling='interval = "1s"\nmin_interval = "1s"\nbudget = 0.005',
    )
    planned = T0 + timedelta(hours=1)
    await world.run(config, planned + timedelta(minutes=20))

    assert world.sim.sim.traffic.matching("POST", CREATE) == ()
    assert world.runs("CI", start_reason=None) == []
    assert [(name, at(when), state) for name, when, state, _ in world.intents()] == [
        ("hourly", planned, "missed")
    ]
    (missed,) = world.events("schedule.missed")
    assert (missed["job"], missed["count"], at(missed["oldest"])) == ("hourly", 1, planned)
    assert "request budget" in missed["reason"]
    assert world.events("schedule.fired", "build.requested", "build.start_failed") == []
