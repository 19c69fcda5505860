"""Xcode Cloud webhooks: a hint to look at one run now, never the truth (DESIGN 4, API-NOTES (h)).

Three levels, all on real local servers: the receiver behind the daemon's HTTP server; the
simulator sending Apple-shaped payloads (with delay and loss) to a receiver the test runs; and a
daemon on virtual time that hears them (world.py).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from conftest import MakeToken, SteppingClock
from world import T0, World, assert_each_run_once, finished_at, job
from xcloudd.config import Config
from xcloudd.metrics import Metrics
from xcloudd.server import Probes, Server
from xcloudd.simulator import RunningSimulator
from xcloudd.simulator.runs import BuildRun
from xcloudd.simulator.webhooks import WebhookSettings
from xcloudd.webhooks import Hint, WebhookReceiver, parse_payload

TOKEN = "s3cret-Token_0123456789abcdefABCDEF"
RUN_ID = "6e5f3a52-0b0e-4a3e-9a3c-2b6f0d3c1a11"
WORKFLOW_ID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
PRODUCT_ID = "11112222-3333-4444-5555-666677778888"


@pytest.fixture
def fake_clock() -> SteppingClock:
    return SteppingClock(start=T0.timestamp())


def apple_payload(
    run_id: Any = RUN_ID, event_type: Any = "BUILD_COMPLETED", **extra: Any
) -> dict[str, Any]:
    """Shaped like Apple's webhook payload reference (trimmed)."""
    return {
        "webhook": {"id": "12345678-abcd-1234-5678-a12345bc4567", "name": "Team Dashboard"},
        "metadata": {
            "type": "metadata",
            "attributes": {"createdDate": "2026-09-01T08:00:04.000Z", "eventType": event_type},
        },
        "app": {"id": "1234567890", "type": "apps"},
        "ciWorkflow": {
            "id": WORKFLOW_ID,
            "type": "ciWorkflows",
            "attributes": {"name": "CI", "isEnabled": True},
        },
        "ciProduct": {
            "id": PRODUCT_ID,
            "type": "ciProducts",
            "attributes": {"name": "Acme Shop", "productType": "APP"},
        },
        "ciBuildRun": {
            "id": run_id,
            "type": "ciBuildRuns",
            "attributes": {
                "number": 7,
                "executionProgress": "COMPLETE",
                "completionStatus": "SUCCEEDED",
            },
        },
        "ciBuildActions": [],
        "scmRepository": {"id": "r1", "type": "scmRepositories", "attributes": {}},
        **extra,
    }


# --- the receiver ----------------------------------------------------------------------------


@dataclass
class Receiving:
    base: str
    receiver: WebhookReceiver
    hints: list[Hint]
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"{self.base}/webhooks/xcode-cloud/{TOKEN}"

    async def send(
        self, body: bytes | dict[str, Any], *, url: str | None = None, method: str = "POST"
    ) -> tuple[int, str, bytes]:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        async with self.session.request(method, url or self.url, data=data) as resp:
            return resp.status, resp.content_type, await resp.read()


async def _probe_ok() -> dict[str, str]:
    return {}


async def _nothing() -> None:
    return None


@pytest.fixture
async def receiving() -> AsyncIterator[Receiving]:
    hints: list[Hint] = []
    receiver = WebhookReceiver(TOKEN, hints.append, max_body=4096)
    server = Server(
        "127.0.0.1", 0, Metrics(), Probes(_probe_ok, _probe_ok, _nothing), webhooks=receiver
    )
    address = await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Receiving(f"http://{address}", receiver, hints, session)
    finally:
        await server.stop()


async def test_a_good_payload_is_accepted_at_once_as_one_hint(receiving: Receiving) -> None:
    status, content_type, body = await receiving.send(apple_payload())
    assert status == 202
    assert content_type == "application/json"
    assert orjson.loads(body) == {"status": "accepted"}
    assert receiving.hints == [Hint(RUN_ID, WORKFLOW_ID, PRODUCT_ID, "BUILD_COMPLETED")]
    assert (receiving.receiver.received, receiving.receiver.refused) == (1, 0)
    # The rest of the server is as it was.
    async with receiving.session.get(receiving.base + "/livez") as resp:
        assert resp.status == 200


async def test_only_the_hint_is_taken_and_its_types_are_checked(receiving: Receiving) -> None:
    odd = apple_payload(event_type=["BUILD_STARTED"])
    odd["ciWorkflow"] = {"id": 42}
    odd["ciProduct"] = "Acme Shop"
    del odd["metadata"]["attributes"]["createdDate"]
    assert (await receiving.send(odd))[0] == 202
    assert (await receiving.send(apple_payload(event_type="BUILD_STARTED")))[0] == 202
    no_metadata = apple_payload()
    del no_metadata["metadata"]
    assert (await receiving.send(no_metadata))[0] == 202
    assert receiving.hints == [
        Hint(RUN_ID, None, None, "UNRECOGNIZED"),
        Hint(RUN_ID, WORKFLOW_ID, PRODUCT_ID, "BUILD_STARTED"),
        Hint(RUN_ID, WORKFLOW_ID, PRODUCT_ID, "UNRECOGNIZED"),
    ]


async def test_a_wrong_token_is_answered_like_a_path_that_does_not_exist(
    receiving: Receiving,
) -> None:
    unknown = await receiving.send(apple_payload(), url=receiving.base + "/no/such/path")
    assert unknown[0] == 404
    wrong_tokens = [
        TOKEN[:-1],  # a prefix
        TOKEN + "x",  # longer
        TOKEN[:-1] + "0",  # the last character differs
        TOKEN.upper(),
        "x",
        "%C3%A9" * 12,  # not ASCII
    ]
    for wrong in wrong_tokens:
        for method in ("POST", "GET", "PUT", "DELETE"):
            url = f"{receiving.base}/webhooks/xcode-cloud/{wrong}"
            answer = await receiving.send(apple_payload(), url=url, method=method)
            assert answer == unknown, (wrong, method)
    for url in (
        f"{receiving.base}/webhooks/xcode-cloud/",
        f"{receiving.base}/webhooks/xcode-cloud",
        f"{receiving.base}/webhooks/xcode-cloud/{TOKEN}/extra",
        f"{receiving.base}/webhooks/{TOKEN}",
    ):
        assert await receiving.send(apple_payload(), url=url) == unknown, url
    assert receiving.hints == []
    # The right token with another method: the path exists, POST only.
    assert (await receiving.send(b"", method="GET"))[0] == 405
    assert receiving.hints == []
    assert receiving.receiver.received == 0


async def test_an_oversized_body_is_refused_without_being_read(receiving: Receiving) -> None:
    big = apple_payload(padding="x" * 5000)
    status, _, body = await receiving.send(big)
    assert status == 413
    assert orjson.loads(body) == {"error": "body too large"}

    # Chunked, so no Content-Length to go by: the cap applies as it is read.
    async def chunks() -> AsyncIterator[bytes]:
        data = orjson.dumps(big)
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    async with receiving.session.post(receiving.url, data=chunks()) as resp:
        assert resp.status == 413

    # A client announcing 100 MB gets its answer after sending a few bytes: nothing waits
    # for (or buffers) the rest.
    host, port = receiving.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST /webhooks/xcode-cloud/{TOKEN} HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{".encode()
        )
        await writer.drain()
        async with asyncio.timeout(5):
            status_line = await reader.readline()
    finally:
        writer.close()
    assert status_line.split()[1] == b"413"
    assert receiving.hints == []
    assert receiving.receiver.refused == 3


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b"[1, 2]", id="array"),
        pytest.param(b'"ciBuildRun"', id="string"),
        pytest.param(orjson.dumps({"metadata": {}}), id="no-run"),
        pytest.param(orjson.dumps(apple_payload(run_id=None)), id="null-id"),
        pytest.param(orjson.dumps(apple_payload(run_id=12345)), id="number-id"),
        pytest.param(orjson.dumps(apple_payload(run_id="")), id="empty-id"),
        pytest.param(orjson.dumps(apple_payload(run_id="../../v1/apps")), id="slashes"),
        pytest.param(orjson.dumps(apple_payload(run_id="..")), id="dots"),
        pytest.param(orjson.dumps(apple_payload(run_id="a" * 101)), id="too-long"),
        pytest.param(orjson.dumps(apple_payload(run_id="id?x=1")), id="query"),
        pytest.param(orjson.dumps({"ciBuildRun": [RUN_ID]}), id="run-not-object"),
    ],
)
async def test_a_body_without_a_usable_run_id_is_a_400(receiving: Receiving, body: bytes) -> None:
    status, content_type, answer = await receiving.send(body)
    assert status == 400
    assert content_type == "application/json"
    error = orjson.loads(answer)
    assert set(error) == {"error"}
    assert len(error["error"]) < 40
    assert TOKEN not in answer.decode()
    assert receiving.hints == []
    assert (receiving.receiver.received, receiving.receiver.refused) == (0, 1)


async def test_a_hint_that_raises_is_counted_never_a_500() -> None:
    def broken(_hint: Hint) -> None:
        raise RuntimeError("the follower is gone")

    receiver = WebhookReceiver(TOKEN, broken)
    server = Server(
        "127.0.0.1", 0, Metrics(), Probes(_probe_ok, _probe_ok, _nothing), webhooks=receiver
    )
    address = await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://{address}/webhooks/xcode-cloud/{TOKEN}"
            for _ in range(2):
                async with session.post(url, data=orjson.dumps(apple_payload())) as resp:
                    assert resp.status == 202
    finally:
        await server.stop()
    assert (receiver.received, receiver.hint_errors, receiver.refused) == (2, 2, 0)


def test_an_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        WebhookReceiver("", lambda _hint: None)


# --- the simulator sends ---------------------------------------------------------------------


@dataclass
class Recorder:
    """A webhook endpoint of the test's own: what arrived, by path."""

    url: str = ""
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, orjson.loads(await request.read())))
        return web.Response(status=202)

    def of(self, run_id: str) -> list[dict[str, Any]]:
        return [body for _, body in self.seen if body["ciBuildRun"]["id"] == run_id]


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    r = Recorder()
    app = web.Application()
    app.router.add_post("/{tail:.*}", r.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    r.url = f"http://127.0.0.1:{server.port}"
    yield r
    await server.close()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)
    await asyncio.sleep(0.001)


async def advance(clock: SteppingClock, to: float) -> None:
    """Virtual time to `to`, stopping at each instant someone sleeps until (the sender's)."""
    while True:
        await settle()
        wake = clock.next_wakeup()
        if wake is None or wake > to:
            clock.advance_to(to)
            await settle()
            return
        clock.advance_to(wake)


async def delivered(sim: RunningSimulator, count: int) -> None:
    """Until the sender has dealt with `count` events (sent or lost)."""
    hooks = sim.sim.webhooks
    async with asyncio.timeout(5):
        # A tiny real-time poll: the POSTs travel through real sockets.
        while len(hooks.sent) + len(hooks.lost) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.001)


@pytest.fixture
async def admin(sim: RunningSimulator, make_token: MakeToken) -> AsyncIterator[Admin]:
    async with aiohttp.ClientSession() as session:
        yield Admin(session, sim.url, make_token)


@dataclass
class Admin:
    session: aiohttp.ClientSession
    url: str
    make_token: MakeToken

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, self.url + path, json=body) as resp:
            return resp.status, await resp.json(content_type=None)

    async def start_build(self, workflow_id: str) -> str:
        body = {
            "data": {
                "type": "ciBuildRuns",
                "relationships": {"workflow": {"data": {"type": "ciWorkflows", "id": workflow_id}}},
            }
        }
        headers = {"Authorization": f"Bearer {self.make_token()}"}
        async with self.session.post(
            self.url + "/v1/ciBuildRuns", json=body, headers=headers
        ) as resp:
            assert resp.status == 201
            run_id: str = (await resp.json())["data"]["id"]
            return run_id


async def test_the_simulator_posts_created_started_completed_for_a_build(
    sim: RunningSimulator, fake_clock: SteppingClock, recorder: Recorder, admin: Admin
) -> None:
    status, answer = await admin.call(
        "POST",
        "/_sim/webhooks",
        {"url": recorder.url + "/hooks/secret-path", "delay_s": 0.5, "loss": 0.0, "seed": 1},
    )
    assert status == 201
    assert answer["webhooks"]["active"] is True
    assert answer["webhooks"]["target"] == recorder.url  # the origin only: the path is secret
    workflow = sim.sim.scenario.workflow_named("CI")
    run_id = await admin.start_build(workflow.id)
    run = sim.sim.runs.get(run_id)
    assert run is not None
    await advance(fake_clock, finished_at(run) + 1)
    await delivered(sim, 3)

    bodies = recorder.of(run_id)
    assert [b["metadata"]["attributes"]["eventType"] for b in bodies] == [
        "BUILD_CREATED",
        "BUILD_STARTED",
        "BUILD_COMPLETED",
    ]
    assert {path for path, _ in recorder.seen} == {"/hooks/secret-path"}
    progress = [
        (
            b["ciBuildRun"]["attributes"]["executionProgress"],
            b["ciBuildRun"]["attributes"]["completionStatus"],
        )
        for b in bodies
    ]
    assert progress == [("PENDING", None), ("RUNNING", None), ("COMPLETE", run.outcome)]
    for body in bodies:
        assert body["metadata"]["type"] == "metadata"
        assert body["ciBuildRun"]["type"] == "ciBuildRuns"
        assert body["ciBuildRun"]["attributes"]["number"] == run.number
        assert body["ciWorkflow"]["id"] == workflow.id
        assert body["ciWorkflow"]["attributes"]["name"] == "CI"
        assert body["ciProduct"]["id"] == run.product_id
        assert body["ciProduct"]["type"] == "ciProducts"
        assert body["app"]["type"] == "apps"
        assert len(body["ciBuildActions"]) == len(run.actions)
        assert body["scmGitReference"]["attributes"]["name"] == "main"
        assert "links" not in body["ciBuildRun"]
        # What the daemon's receiver makes of it.
        hint = parse_payload(orjson.dumps(body))
        assert (hint.run_id, hint.workflow_id, hint.product_id) == (
            run_id,
            workflow.id,
            run.product_id,
        )

    status, report = await admin.call("GET", "/_sim/webhooks")
    assert status == 200
    sent = report["webhooks"]["sent"]
    assert [(s["event_type"], s["run_id"], s["status"]) for s in sent] == [
        ("BUILD_CREATED", run_id, 202),
        ("BUILD_STARTED", run_id, 202),
        ("BUILD_COMPLETED", run_id, 202),
    ]
    instants = [run.created_at, run.created_at + run.pending_s, finished_at(run)]
    for record, instant in zip(sent, instants, strict=True):
        assert record["at"] == instant
        assert record["due"] == instant + 0.5
        assert instant + 0.5 <= record["time"] < instant + 1.0
        assert (record["workflow_id"], record["product_id"]) == (workflow.id, run.product_id)
    assert report["webhooks"]["lost"] == []
    assert report["webhooks"]["failed"] == 0

    status, stopped = await admin.call("DELETE", "/_sim/webhooks")
    assert status == 200
    assert stopped["webhooks"]["active"] is False
    assert len(stopped["webhooks"]["sent"]) == 3  # the records stay until the next POST
    later_run = sim.sim.start_run(workflow.id)
    await advance(fake_clock, finished_at(later_run) + 1)
    assert recorder.of(later_run.id) == []


async def test_with_all_webhooks_lost_none_arrive_and_all_are_listed(
    sim: RunningSimulator, fake_clock: SteppingClock, recorder: Recorder, admin: Admin
) -> None:
    status, _ = await admin.call(
        "POST", "/_sim/webhooks", {"url": recorder.url + "/hook", "loss": 1.0}
    )
    assert status == 201
    skipped = sim.sim.start_run(sim.sim.scenario.workflow_named("Docs Only").id)
    failed = sim.sim.start_run(sim.sim.scenario.workflow_named("UI Tests").id)
    await advance(fake_clock, max(finished_at(skipped), finished_at(failed)) + 1)
    await delivered(sim, 5)
    assert recorder.seen == []
    _, report = await admin.call("GET", "/_sim/webhooks")
    lost = {(r["run_id"], r["event_type"]) for r in report["webhooks"]["lost"]}
    assert lost == {
        (skipped.id, "BUILD_CREATED"),
        (skipped.id, "BUILD_COMPLETED"),  # a skipped build never starts
        (failed.id, "BUILD_CREATED"),
        (failed.id, "BUILD_STARTED"),
        (failed.id, "BUILD_COMPLETED"),
    }
    assert report["webhooks"]["sent"] == []


async def test_losses_follow_the_seed(
    sim: RunningSimulator, fake_clock: SteppingClock, recorder: Recorder
) -> None:
    hooks = sim.sim.webhooks
    workflow = sim.sim.scenario.workflow_named("CI").id
    patterns = []
    for _ in range(2):
        recorder.seen.clear()
        await hooks.configure(WebhookSettings(recorder.url + "/hook", loss=0.5, seed=7))
        runs = [sim.sim.start_run(workflow) for _ in range(6)]
        await advance(fake_clock, max(finished_at(r) for r in runs) + 1)
        await delivered(sim, 18)
        index = {r.id: i for i, r in enumerate(runs)}
        patterns.append(sorted((index[e["run_id"]], e["event_type"]) for e in hooks.lost))
        arrived = {
            (b["ciBuildRun"]["id"], b["metadata"]["attributes"]["eventType"])
            for _, b in recorder.seen
        }
        assert arrived == {(e["run_id"], e["event_type"]) for e in hooks.sent}
        assert hooks.failed == 0
    assert patterns[0] == patterns[1]
    assert 0 < len(patterns[0]) < 18
    await hooks.stop()


async def test_deliveries_that_fail_are_counted_and_ignored(
    sim: RunningSimulator, fake_clock: SteppingClock, admin: Admin
) -> None:
    # A port nobody listens on: connection refused.
    refused = web.Application()
    server = TestServer(refused, host="127.0.0.1")
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}/hook"
    await server.close()
    status, _ = await admin.call("POST", "/_sim/webhooks", {"url": url})
    assert status == 201
    run = sim.sim.start_run(sim.sim.scenario.workflow_named("CI").id)
    await advance(fake_clock, finished_at(run) + 1)
    await delivered(sim, 3)
    _, report = await admin.call("GET", "/_sim/webhooks")
    assert report["webhooks"]["failed"] == 3
    assert [r["status"] for r in report["webhooks"]["sent"]] == [None, None, None]
    assert all(r["error"] for r in report["webhooks"]["sent"])
    # The simulator itself is unaffected.
    status, runs = await admin.call("GET", "/_sim/runs")
    assert status == 200
    assert len(runs["runs"]) == 1


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({}, "url is required"),
        ({"url": "ftp://example.com/x"}, "http"),
        ({"url": "http://127.0.0.1:9/x", "loss": 1.5}, "loss"),
        ({"url": "http://127.0.0.1:9/x", "delay_s": -1}, "delay_s"),
        ({"url": "http://127.0.0.1:9/x", "seed": "one"}, "seed"),
        ({"url": "http://127.0.0.1:9/x", "rate": 2}, "unknown keys: rate"),
    ],
)
async def test_bad_webhook_settings_are_a_400(
    sim: RunningSimulator, admin: Admin, body: dict[str, Any], problem: str
) -> None:
    status, answer = await admin.call("POST", "/_sim/webhooks", body)
    assert status == 400
    assert problem in answer["error"]
    assert sim.sim.webhooks.active is False


# --- the daemon ------------------------------------------------------------------------------

SLOW_POLLING = 'interval = "5m"\nmin_interval = "5s"\nmax_interval = "10m"'
WATCH_CI = '[[watches]]\nproduct = "Acme Shop"\nworkflow = "CI"\n\n'


def with_webhooks(world: World, extra: str) -> Config:
    server = f'[server]\nlisten = "127.0.0.1:0"\nwebhook_token = "{TOKEN}"\n\n'
    return world.configure(server + extra, polling=SLOW_POLLING)


def hook_url(world: World) -> str:
    (started,) = world.events("daemon.started")[-1:]
    return f"http://{started['listen']}/webhooks/xcode-cloud/{TOKEN}"


def send_webhooks(world: World, **settings: Any) -> Callable[[], Awaitable[None]]:
    """A step: the simulator starts posting webhooks to the daemon (through its admin API)."""

    async def step() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                world.sim.url + "/_sim/webhooks", json={"url": hook_url(world), **settings}
            ) as resp,
        ):
            assert resp.status == 201

    return step


def run_gets(world: World, run_id: str, start: float, end: float) -> int:
    """GETs of the run itself (or of its actions, which include it) answered in [start, end]
    of virtual time."""
    paths = (f"/v1/ciBuildRuns/{run_id}", f"/v1/ciBuildRuns/{run_id}/actions")
    return sum(
        1
        for e in world.sim.sim.traffic.entries
        if e.method == "GET" and e.path in paths and start <= e.time <= end
    )


def product_looks(world: World) -> list[float]:
    """When the product's list of runs was read."""
    product = world.sim.sim.scenario.products[0].id
    path = f"/v1/ciProducts/{product}/buildRuns"
    return [e.time for e in world.sim.sim.traffic.entries if e.method == "GET" and e.path == path]


def gets_in(world: World, start: float, end: float) -> list[str]:
    return [
        e.path
        for e in world.sim.sim.traffic.entries
        if e.method == "GET" and start <= e.time <= end
    ]


def later(**delta: float) -> float:
    return (T0 + timedelta(**delta)).timestamp()


async def test_a_webhook_makes_the_daemon_look_at_a_followed_run_now(world: World) -> None:
    config = with_webhooks(world, job("hourly", every="1h"))
    # The 09:00 build: PENDING 1 s, RUNNING 3 s. Webhooks from 09:00:02, so the only one
    # is BUILD_COMPLETED, 0.5 s after 09:00:04; the next regular poll is minutes away.
    await world.run(
        config,
        later(hours=1, seconds=2),
        send_webhooks(world, delay_s=0.5),
        later(hours=1, seconds=7),
    )
    (run,) = world.runs("CI")
    end = finished_at(run)
    assert [(s["event_type"], s["status"]) for s in world.sim.sim.webhooks.sent] == [
        ("BUILD_COMPLETED", 202)
    ]
    assert run_gets(world, run.id, run.created_at, end + 0.5 - 0.001) == 0
    assert run_gets(world, run.id, end + 0.5, end + 1.5) == 1
    (done,) = world.events("build.completed")
    assert done["build_run_id"] == run.id
    assert done["completion_status"] == "SUCCEEDED"
    assert_each_run_once(world)


async def test_forged_webhooks_change_nothing(world: World) -> None:
    config = with_webhooks(world, WATCH_CI)
    nightly = world.sim.sim.start_run(world.workflow_id("Nightly"))  # a real run, not watched
    forged: list[tuple[str, float, int]] = []  # (what, when, answer)

    def forge(name: str, payload: dict[str, Any]) -> Callable[[], Awaitable[None]]:
        async def step() -> None:
            async with (
                aiohttp.ClientSession() as session,
                session.post(hook_url(world), data=orjson.dumps(payload)) as resp,
            ):
                forged.append((name, world.clock.time(), resp.status))

        return step

    unknown = "9a9a9a9a-0000-4000-8000-000000000000"
    ci = world.workflow_id("CI")
    product = world.sim.sim.scenario.products[0].id
    steps = [
        forge("no such run", apple_payload(unknown, ciWorkflow={"id": "nope"})),
        forge("no such run, watched workflow", apple_payload(unknown, ciWorkflow={"id": ci})),
        forge("unwatched run", apple_payload(nightly.id, ciWorkflow={"id": nightly.workflow_id})),
        forge(
            "unwatched run named as watched",
            apple_payload(nightly.id, ciWorkflow={"id": ci}, ciProduct={"id": product}),
        ),
    ]
    timeline: list[Any] = []
    for i, step in enumerate(steps):
        timeline += [later(minutes=1 + i), step]
    await world.run(config, *timeline, later(minutes=1 + len(steps)))

    # Accepted like any webhook (a stranger learns nothing), then checked against the API.
    assert [(name, status) for name, _, status in forged] == [
        ("no such run", 202),
        ("no such run, watched workflow", 202),
        ("unwatched run", 202),
        ("unwatched run named as watched", 202),
    ]
    looks = {name: gets_in(world, when, when + 30) for name, when, _ in forged}
    # A workflow that is not watched: not one request. A watched one: one look at its
    # product's runs, which finds nothing new.
    assert looks == {
        "no such run": [],
        "no such run, watched workflow": [f"/v1/ciProducts/{product}/buildRuns"],
        "unwatched run": [],
        "unwatched run named as watched": [f"/v1/ciProducts/{product}/buildRuns"],
    }
    assert [e["event"] for e in world.events()] == [
        "daemon.started",
        "daemon.stopping",
        "daemon.stopped",
    ]


async def test_a_webhook_for_a_new_run_of_a_watched_workflow_is_followed_at_once(
    world: World,
) -> None:
    config = with_webhooks(world, WATCH_CI)
    pushed: list[BuildRun] = []

    def push() -> None:
        pushed.append(world.sim.sim.start_run(world.workflow_id("CI")))

    # The first look (09:00) is history; the next regular one is at 09:05.
    await world.run(
        config,
        later(minutes=1),
        send_webhooks(world, delay_s=0.5),
        later(minutes=1, seconds=10),
        push,
        later(minutes=1, seconds=12),
    )
    (run,) = pushed
    (created,) = world.events("build.created")
    assert created["build_run_id"] == run.id
    assert created["origin"] == "watch"
    assert created["workflow_id"] == run.workflow_id
    # Found through the API after the BUILD_CREATED hint, well before the next regular look.
    looks = product_looks(world)
    assert any(run.created_at + 0.5 <= t <= run.created_at + 1.5 for t in looks), looks
    assert world.sim.sim.webhooks.sent[0]["event_type"] == "BUILD_CREATED"
    assert_each_run_once(world)


async def test_with_every_webhook_lost_polling_still_reports_the_build(world: World) -> None:
    config = with_webhooks(world, job("hourly", every="1h"))
    await world.run(
        config,
        later(minutes=30),
        send_webhooks(world, delay_s=0.5, loss=1.0, seed=3),
        later(hours=1, minutes=10),
    )
    (run,) = world.runs("CI")
    hooks = world.sim.sim.webhooks
    assert hooks.sent == deque()
    assert sorted(e["event_type"] for e in hooks.lost) == [
        "BUILD_COMPLETED",
        "BUILD_CREATED",
        "BUILD_STARTED",
    ]
    (done,) = world.events("build.completed")
    assert done["build_run_id"] == run.id
    assert done["completion_status"] == "SUCCEEDED"
    # Seen by a regular look at its product, minutes later: nothing brought it forward.
    first = min(t for t in product_looks(world) if t >= run.created_at)
    assert first - run.created_at >= 0.8 * 5 * 60 - 1
    assert run_gets(world, run.id, run.created_at, first - 0.001) == 0
    assert_each_run_once(world)


async def test_a_build_seen_through_its_webhooks_costs_two_gets(world: World) -> None:
    """Our own start (created: no news), BUILD_STARTED (one read of the product's runs, which
    counts as the product's regular look) and BUILD_COMPLETED (one read of the run's actions
    with the run included): two GETs after the POST. The second comes min_interval (5 s) after
    the first, not at once: hints bring at most one look per run per min_interval forward."""
    config = with_webhooks(world, job("hourly", every="1h"))
    await world.run(
        config,
        later(minutes=59),
        send_webhooks(world, delay_s=0.5),
        later(hours=1, seconds=10),
    )
    (run,) = world.runs("CI")
    assert [s["event_type"] for s in world.sim.sim.webhooks.sent] == [
        "BUILD_CREATED",
        "BUILD_STARTED",
        "BUILD_COMPLETED",
    ]
    traffic = list(world.sim.sim.traffic.entries)
    post = next(i for i, e in enumerate(traffic) if e.method == "POST")
    after = [
        (round(e.time - run.created_at, 3), e.path)
        for e in traffic[post + 1 :]
        if e.method == "GET"
    ]
    product = world.sim.sim.scenario.products[0].id
    assert after == [
        (1.5, f"/v1/ciProducts/{product}/buildRuns"),
        (6.5, f"/v1/ciBuildRuns/{run.id}/actions"),
    ]
    assert [e["event"] for e in world.events("build.started", "build.completed")] == [
        "build.started",
        "build.completed",
    ]
    assert world.events("build.completed")[0]["actions"]
    assert_each_run_once(world)
