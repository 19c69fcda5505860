"""The API client against what the world does: outages, throttling, refused keys, huge and odd
answers, and build runs with odd fields.

The client talks HTTP to the in-process simulator (fault rules) or to a small aiohttp server
started here for answers the simulator cannot give. The FakeClock drives every wait the client
makes, so a minute-long outage costs no real time; only aiohttp's own timeout (the "hang" case)
runs on the real clock, for 50 ms.
"""

from __future__ import annotations

import asyncio
import random
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SteppingClock, schema_problems
from xcloudd.api import (
    JSON,
    MAX_BODY_BYTES,
    ApiError,
    ApiUnavailable,
    AscClient,
    AuthFailed,
    BadResponse,
    NotFound,
    OutcomeUnknown,
    RetryPolicy,
)
from xcloudd.auth import TokenSigner
from xcloudd.clock import FakeClock
from xcloudd.config import SigningKey
from xcloudd.errors import ExitCode
from xcloudd.resources import RUN_FIELDS, BuildRun
from xcloudd.simulator import Fault, FaultAction, RunningSimulator, running_simulator
from xcloudd.simulator.faults import MalformedVariant

if TYPE_CHECKING:
    from xcloudd.events import Emitter

MiB = 1024 * 1024
CREATE = "/v1/ciBuildRuns"


class Recorder:
    """What the client reported: it only ever calls `emit(name, **fields)`."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, name: str, **fields: Any) -> None:
        self.events.append((name, fields))

    def of(self, name: str) -> list[dict[str, Any]]:
        return [fields for event, fields in self.events if event == name]


@asynccontextmanager
async def asc_client(
    url: str,
    clock: FakeClock,
    private_key: ec.EllipticCurvePrivateKey | None = None,
    key_id: str = "TESTKEY123",
    issuer_id: str | None = "69a6de70-0000-47e3-e053-5b8c7c11a4d1",
    **options: Any,
) -> AsyncIterator[tuple[AscClient, Recorder]]:
    key = SigningKey(
        key_id=key_id,
        issuer_id=issuer_id,
        private_key=private_key or ec.generate_private_key(ec.SECP256R1()),
        source="test",
    )
    events = Recorder()
    async with aiohttp.ClientSession() as session:
        client = AscClient(
            session,
            url,
            TokenSigner(key, clock),
            clock,
            cast("Emitter", events),
            rng=random.Random(7),
            **options,
        )
        yield client, events


@asynccontextmanager
async def sim_client(
    sim: RunningSimulator, clock: FakeClock, **options: Any
) -> AsyncIterator[tuple[AscClient, Recorder]]:
    key = sim.sim.primary_key
    private = serialization.load_pem_private_key(key.private_key_pem, password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    async with asc_client(sim.url, clock, private, key.key_id, key.issuer_id, **options) as pair:
        yield pair


def workflow_id(sim: RunningSimulator, name: str = "CI") -> str:
    return sim.sim.scenario.workflow_named(name).id


def create_body(workflow: str) -> dict[str, Any]:
    return {
        "data": {
            "type": "ciBuildRuns",
            "relationships": {"workflow": {"data": {"type": "ciWorkflows", "id": workflow}}},
        }
    }


def statuses(sim: RunningSimulator, method: str, path: str) -> list[int | None]:
    return [e.status for e in sim.sim.traffic.matching(method, path)]


# -- the circuit breaker ----------------------------------------------------------------------


class AlarmClock(FakeClock):
    """Virtual time that runs an action once it reaches a given instant."""

    def __init__(self) -> None:
        super().__init__()
        self._alarms: list[tuple[float, Callable[[], None]]] = []

    def at(self, instant: float, action: Callable[[], None]) -> None:
        self._alarms.append((instant, action))

    def advance(self, seconds: float) -> None:
        super().advance(seconds)
        due = [action for instant, action in self._alarms if instant <= self.time()]
        self._alarms = [(i, a) for i, a in self._alarms if i > self.time()]
        for action in due:
            action()


@asynccontextmanager
async def checked_simulator(clock: FakeClock) -> AsyncIterator[RunningSimulator]:
    """Like the `sim` fixture, on a clock of the test's choosing."""
    async with running_simulator(clock=clock) as running:
        yield running
        assert schema_problems(running.sim.traffic.entries) == []


async def test_a_minute_outage_costs_a_few_requests_and_then_every_caller_is_answered() -> None:
    clock = AlarmClock()
    async with checked_simulator(clock) as sim, sim_client(sim, clock) as (client, events):
        run = sim.sim.start_run(workflow_id(sim))
        path = f"/v1/ciBuildRuns/{run.id}"
        sim.sim.faults.add(Fault(method="GET", path=path, status=503, times=None))
        began = clock.time()
        assert client.last_success is None
        assert not client.breaker_open
        open_during_outage: list[bool] = []

        def end_outage() -> None:
            open_during_outage.append(client.breaker_open)
            sim.sim.faults.clear()

        clock.at(began + 60, end_outage)
        answers = await asyncio.gather(*(client.get(path) for _ in range(10)))

        assert [a["data"]["id"] for a in answers] == [run.id] * 10
        traffic = sim.sim.traffic.matching("GET", path)
        failed = [e for e in traffic if e.status == 503]
        succeeded = [e for e in traffic if e.status == 200]
        # The ten first tries were on the wire before any failure was known. After that, one
        # probe at a time: a handful in a minute, where ten callers retrying on their own would
        # have spent their sixty tries and given up.
        probes = failed[10:]
        assert 1 <= len(probes) <= 10, [e.time - began for e in failed]
        assert len({e.time for e in probes}) == len(probes), "probes overlapped"
        assert open_during_outage == [True]
        # Once a probe gets through, everyone goes at once.
        assert len(succeeded) == 10
        assert len({e.time for e in succeeded}) == 1
        assert succeeded[0].time >= began + 60
        assert not client.breaker_open
        assert client.last_success == succeeded[0].time

    names = [name for name, _ in events.events]
    assert names.count("api.unavailable") == 1, "api.unavailable went out per waiting request"
    opened = events.of("api.unavailable")[0]
    assert opened["http_status"] == 503
    assert opened["attempt"] == 3
    assert 0 <= opened["delay_s"] <= 2
    assert opened["reason"] == "HTTP 503"
    # Before it opened, the first two failures were retried by their callers; after, each
    # failed probe reports when the next one goes, within the doubled and capped open time.
    at = names.index("api.unavailable")
    assert names[:at] == ["api.retrying", "api.retrying"]
    reopened = [fields for name, fields in events.events[at + 1 :] if name == "api.retrying"]
    assert len(reopened) == len(probes)
    for n, event in enumerate(reopened, start=2):
        assert 0 <= event["delay_s"] <= min(60, 2 * 2 ** (n - 1))
    assert events.of("api.throttled") == []


async def test_an_open_breaker_holds_a_post_until_its_probe_time(
    sim: RunningSimulator, fake_clock: FakeClock
) -> None:
    sim.sim.faults.add(Fault(method="GET", status=503, times=3))
    async with sim_client(sim, fake_clock, retry=RetryPolicy(attempts=3)) as (client, events):
        with pytest.raises(ApiUnavailable):
            await client.get(f"/v1/ciWorkflows/{workflow_id(sim)}")
        assert client.breaker_open
        [opened] = events.of("api.unavailable")
        last_failure = sim.sim.traffic.entries[-1].time

        created = await client.post(CREATE, create_body(workflow_id(sim)))

        assert not client.breaker_open
    post = sim.sim.traffic.matching("POST", CREATE)
    assert [p.status for p in post] == [201]
    assert post[0].time >= last_failure + opened["delay_s"] - 0.001
    assert created["data"]["id"] == sim.sim.runs.all()[0].id
    assert len(sim.sim.runs) == 1


async def test_when_nothing_answers_callers_still_give_up_and_the_outage_is_reported_once(
    fake_clock: FakeClock,
) -> None:
    """Connections refused: the breaker opens on transport failures as on 5xx. Waiting in line
    costs no tries but probing does, so each caller still ends (exit 69) instead of waiting
    forever, and a start that never reached the server is unavailable, not of unknown outcome."""
    port = await _unused_port()
    async with asc_client(f"http://127.0.0.1:{port}", fake_clock) as (client, events):
        results = await asyncio.gather(
            *(client.get("/v1/ciProducts") for _ in range(4)),
            client.post(CREATE, create_body("wf")),
            return_exceptions=True,
        )
        assert [type(r) for r in results] == [ApiUnavailable] * 5, results
        assert "cannot connect" in str(results[0])
        assert client.breaker_open
        assert client.last_success is None
        # Each caller's own six tries, and not one request more.
        assert client.requests == 5 * 6
    [opened] = events.of("api.unavailable")
    assert opened["http_status"] is None
    assert opened["reason"].startswith("cannot connect")


async def test_a_caller_that_stops_waiting_hands_the_probe_to_the_next() -> None:
    clock = SteppingClock(FakeClock().time())
    async with (
        checked_simulator(clock) as sim,
        sim_client(sim, clock, retry=RetryPolicy(attempts=1)) as (client, _events),
    ):
        sim.sim.faults.add(Fault(method="GET", status=503, times=3))
        for _ in range(3):
            with pytest.raises(ApiUnavailable):
                await client.get("/v1/ciProducts")
        assert client.breaker_open
        first = asyncio.create_task(client.get("/v1/ciProducts"))
        second = asyncio.create_task(client.get("/v1/ciProducts"))
        await until(lambda: clock.next_wakeup() is not None)  # first in line, timing the probe
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await until(lambda: clock.next_wakeup() is not None)  # the second took over
        wakeup = clock.next_wakeup()
        assert wakeup is not None
        clock.advance_to(wakeup)
        # A real-time bound only so that a lost hand-over fails instead of hanging.
        answer = await asyncio.wait_for(second, timeout=10)
        assert answer["data"]
        assert not client.breaker_open
        assert statuses(sim, "GET", "/v1/ciProducts") == [503, 503, 503, 200]


async def until(condition: Callable[[], bool], rounds: int = 10_000) -> None:
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def _unused_port() -> int:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()
    return port


# -- throttling -------------------------------------------------------------------------------


async def test_api_throttled_goes_out_once_per_streak_with_the_delay_really_waited(
    sim: RunningSimulator, fake_clock: FakeClock
) -> None:
    run = sim.sim.start_run(workflow_id(sim))
    path = f"/v1/ciBuildRuns/{run.id}"
    async with sim_client(sim, fake_clock) as (client, events):
        sim.sim.faults.add(Fault(method="GET", path=path, status=429, times=3))
        await client.get(path)
        # A while later (a 429 spent the tokens saved up), not throttled: the streak is over.
        fake_clock.advance(5)
        await client.get(path)
        sim.sim.faults.add(Fault(method="GET", path=path, status=429, retry_after=5, times=2))
        await client.get(path)

    polls = sim.sim.traffic.matching("GET", path)
    assert [p.status for p in polls] == [429, 429, 429, 200, 200, 429, 429, 200]
    throttled = events.of("api.throttled")
    assert len(throttled) == 2, throttled
    first, second = throttled
    # No Retry-After: the delay is the backoff slept before the next try.
    assert first["delay_s"] > 0
    assert first["delay_s"] == pytest.approx(polls[1].time - polls[0].time, abs=1e-3)
    assert second["delay_s"] == 5
    assert polls[6].time - polls[5].time == 5
    limit = sim.sim.rate_limiter.limit
    assert first["limit"] == second["limit"] == limit
    assert first["remaining"] == limit - 1
    assert second["remaining"] == limit - 6
    # 429 is Apple saying "slower", not an outage.
    assert events.of("api.unavailable") == []
    assert not client.breaker_open


# -- refused keys ---------------------------------------------------------------------------


Refuse = Callable[[str, str], Fault]


async def _poll(client: AscClient, sim: RunningSimulator, refuse: Refuse) -> None:
    run = sim.sim.start_run(workflow_id(sim))
    path = f"/v1/ciBuildRuns/{run.id}"
    sim.sim.faults.add(refuse("GET", path))
    await client.get(path)


async def _list(client: AscClient, sim: RunningSimulator, refuse: Refuse) -> None:
    repo = sim.sim.scenario.workflow_named("CI").repository_id
    path = f"/v1/scmRepositories/{repo}/gitReferences"
    async for _ref in client.paginate(path, {"limit": "5"}):
        # The refusal comes with the second page, after the first was read fine.
        if not sim.sim.faults.active():
            sim.sim.faults.add(refuse("GET", path))


async def _start(client: AscClient, sim: RunningSimulator, refuse: Refuse) -> None:
    sim.sim.faults.add(refuse("POST", CREATE))
    await client.post(CREATE, create_body(workflow_id(sim)))


def _forbidden(method: str, path: str) -> Fault:
    return Fault(method=method, path=path, status=403, code="FORBIDDEN_ERROR")


def _expired_twice(method: str, path: str) -> Fault:
    return Fault(FaultAction.EXPIRE_TOKEN, method=method, path=path, times=2)


@pytest.mark.parametrize(
    "refusal",
    [(_forbidden, 403, 1), (_expired_twice, 401, 2)],
    ids=["403", "401-twice"],
)
@pytest.mark.parametrize("ask", [_poll, _list, _start], ids=["poll", "list", "post"])
async def test_a_refused_key_raises_auth_failed_and_reports_it_for_a_poll_a_list_and_a_post(
    sim: RunningSimulator,
    fake_clock: FakeClock,
    refusal: tuple[Refuse, int, int],
    ask: Callable[[AscClient, RunningSimulator, Refuse], Awaitable[None]],
) -> None:
    refuse, status, requests = refusal
    async with sim_client(sim, fake_clock) as (client, events):
        with pytest.raises(AuthFailed) as caught:
            await ask(client, sim, refuse)

    error = caught.value
    assert isinstance(error, ApiError)
    assert error.exit_code == ExitCode.CREDENTIALS
    assert int(error.exit_code) == 77
    assert error.status == status
    # 403: no second try; 401: one more with a freshly signed token, then no more.
    assert sum(1 for e in sim.sim.traffic.entries if e.status == status) == requests
    reported = events.of("api.auth_failed")
    assert len(reported) == 1
    assert (reported[0]["http_status"], reported[0]["attempt"]) == (status, requests)
    assert reported[0]["delay_s"] == 0
    if ask is _start:
        assert len(sim.sim.runs) == 0
    assert not client.breaker_open


async def test_one_expired_token_on_a_post_is_signed_again_and_creates_one_run(
    sim: RunningSimulator, fake_clock: FakeClock
) -> None:
    sim.sim.faults.add(Fault(FaultAction.EXPIRE_TOKEN, method="POST", path=CREATE))
    async with sim_client(sim, fake_clock) as (client, events):
        created = await client.post(CREATE, create_body(workflow_id(sim)))
    assert statuses(sim, "POST", CREATE) == [401, 201]
    assert [r.id for r in sim.sim.runs.all()] == [created["data"]["id"]]
    assert events.of("api.auth_failed") == []


# -- a small server for answers the simulator does not give ------------------------------------


class OddServer:
    """Answers /v1/<case> the way the case says; `sent` is how many bytes of each huge body
    went out before the client hung up."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.seen: dict[str, int] = {}
        self.url = ""
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        case = request.match_info["case"]
        self.seen[case] = self.seen.get(case, 0) + 1
        first = self.seen[case] == 1
        if case in ("huge-chunked", "huge-declared"):
            return await self._huge(request, declared=case == "huge-declared")
        simple = _SIMPLE.get(case)
        if simple is not None:
            status, body, headers = simple
            return web.Response(status=status, body=body, headers=headers)
        if case == "throttled-once":
            if first:
                return web.Response(
                    status=429, headers={"Retry-After": "Thu, 99 Foo 2026 25:61:00 GMT"}
                )
            return web.json_response({"data": {"type": "ciProducts", "id": "p"}})
        if case in ("truncated", "not-http", "drop"):
            return await self._broken(request, case)
        if case == "hang":
            await self.release.wait()
            return web.Response(status=204)
        if case in ("next-elsewhere", "next-loop", "next-not-url"):
            nxt = {
                "next-elsewhere": "https://elsewhere.example/v1/next-elsewhere?cursor=x",
                "next-loop": f"{self.url}/v1/next-loop?cursor=again",
                "next-not-url": "http://[::1",
            }[case]
            return web.json_response({"data": [{"type": "x", "id": "1"}], "links": {"next": nxt}})
        raise web.HTTPNotFound()

    async def _huge(self, request: web.Request, *, declared: bool) -> web.StreamResponse:
        total = 100 * 1000 * 1000
        chunk = b" " * (256 * 1024)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if declared:
            resp.content_length = total
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent = 0
        try:
            while sent < total:
                await resp.write(chunk)
                sent += len(chunk)
        except ConnectionError:
            pass  # the client hung up: what matters is how much went out before
        finally:
            self.sent.append(sent)
        return resp

    async def _broken(self, request: web.Request, case: str) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        if case == "truncated":
            transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"data": {'
            )
        elif case == "not-http":
            transport.write(b"SSH-2.0-OpenSSH_9.2\r\n\xff\xfe garbage\r\n\r\n")
        if case == "drop":
            transport.abort()
        else:
            transport.close()
        return web.Response(status=500)  # never sent: the connection is gone


_JSON = {"Content-Type": "application/json"}
_SIMPLE: dict[str, tuple[int, bytes, dict[str, str]]] = {
    "json-array": (200, b"[1, 2]", _JSON),
    "json-null": (200, b"null", _JSON),
    "empty": (200, b"", _JSON),
    "html": (200, b"<html>Service Unavailable</html>", {"Content-Type": "text/html"}),
    "bad-utf8": (200, b'{"data": "\xff\xfe"}', _JSON),
    "bad-gzip": (200, b"this is not gzip", {**_JSON, "Content-Encoding": "gzip"}),
    "odd-rate-limit": (
        200,
        b'{"data": {"type": "ciProducts", "id": "p"}}',
        {**_JSON, "X-Rate-Limit": "user-hour-lim:lots;user-hour-rem:" + "9" * 5000},
    ),
    "error-not-json": (404, b"Not Found", {"Content-Type": "text/plain"}),
    "error-odd-json": (
        409,
        orjson.dumps({"errors": [1, None, {"code": 5, "source": [], "detail": "x" * 100_000}]}),
        _JSON,
    ),
    "nan-retry-after": (429, b"", {"Retry-After": "nan"}),
}


@asynccontextmanager
async def odd_server() -> AsyncIterator[OddServer]:
    server = OddServer()
    app = web.Application()
    app.router.add_route("*", "/v1/{case}", server.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}"
    try:
        yield server
    finally:
        server.release.set()
        await runner.cleanup()


# -- answers too big to read -------------------------------------------------------------------


@pytest.mark.parametrize("case", ["huge-chunked", "huge-declared"])
async def test_a_100_mb_answer_is_refused_without_reading_it(
    fake_clock: FakeClock, case: str
) -> None:
    async with odd_server() as server, asc_client(server.url, fake_clock) as (client, _events):
        tracemalloc.start()
        try:
            with pytest.raises(BadResponse, match="larger than 8 MiB") as caught:
                await client.get(f"/v1/{case}")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert type(caught.value) is BadResponse

        with pytest.raises(OutcomeUnknown, match="larger than 8 MiB"):
            await client.post(f"/v1/{case}", {"data": {"type": "ciBuildRuns"}})
    # What went out before the client hung up: the cap plus what socket buffers hold, never
    # the 100 MB; and the client's memory stayed far below the body's size.
    assert server.sent, "the server never saw the client hang up"
    assert max(server.sent) < MAX_BODY_BYTES + 24 * MiB, server.sent
    assert peak < 16 * MiB, f"peak {peak / MiB:.0f} MiB"
    assert server.seen[case] == len(server.sent) <= 7  # six tries for the GET, one POST


async def test_a_100_mb_poll_answer_from_the_simulator_is_skipped_and_the_next_try_reads_the_run(
    sim: RunningSimulator, fake_clock: FakeClock
) -> None:
    run = sim.sim.start_run(workflow_id(sim))
    path = f"/v1/ciBuildRuns/{run.id}"
    sim.sim.faults.add(Fault(FaultAction.OVERSIZE, method="GET", path=path))
    async with sim_client(sim, fake_clock) as (client, events):
        answer = await client.get(path)
    assert answer["data"]["id"] == run.id
    assert [e.fault for e in sim.sim.traffic.matching("GET", path)] == ["oversize", None]
    [retrying] = events.of("api.retrying")
    assert "larger than 8 MiB" in retrying["reason"]


async def test_a_100_mb_answer_to_a_start_is_an_unknown_outcome(
    sim: RunningSimulator, fake_clock: FakeClock
) -> None:
    sim.sim.faults.add(Fault(FaultAction.OVERSIZE, method="POST", path=CREATE))
    async with sim_client(sim, fake_clock) as (client, _events):
        with pytest.raises(OutcomeUnknown, match="larger than 8 MiB"):
            await client.post(CREATE, create_body(workflow_id(sim)))
    # Never sent twice: only a look at the list can tell whether it started a build.
    assert len(sim.sim.traffic.matching("POST", CREATE)) == 1


# -- whatever the server does, only the client's own errors come out ------------------------------

ODD_CASES: list[tuple[str, type[Exception] | None, type[Exception] | None]] = [
    # case, what GET raises (None: answers), what POST raises
    ("json-array", BadResponse, OutcomeUnknown),
    ("json-null", BadResponse, OutcomeUnknown),
    ("empty", BadResponse, OutcomeUnknown),
    ("html", BadResponse, OutcomeUnknown),
    ("bad-utf8", BadResponse, OutcomeUnknown),
    ("bad-gzip", ApiUnavailable, OutcomeUnknown),
    ("truncated", ApiUnavailable, OutcomeUnknown),
    ("not-http", ApiUnavailable, OutcomeUnknown),
    ("drop", ApiUnavailable, OutcomeUnknown),
    ("hang", ApiUnavailable, OutcomeUnknown),
    ("odd-rate-limit", None, None),
    ("throttled-once", None, None),
    ("nan-retry-after", ApiUnavailable, ApiError),
    ("error-not-json", NotFound, NotFound),
    ("error-odd-json", ApiError, ApiError),
]


@pytest.mark.parametrize(("case", "on_get", "on_post"), ODD_CASES, ids=[c[0] for c in ODD_CASES])
async def test_odd_answers_become_the_clients_own_errors(
    fake_clock: FakeClock,
    case: str,
    on_get: type[Exception] | None,
    on_post: type[Exception] | None,
) -> None:
    options: dict[str, Any] = {"retry": RetryPolicy(attempts=2)}
    if case == "hang":
        options["timeout"] = 0.05  # aiohttp's timeout runs on the real clock
    async with odd_server() as server, asc_client(server.url, fake_clock, **options) as pair:
        client, _events = pair

        async def ask(method: str) -> JSON:
            if method == "GET":
                return await client.get(f"/v1/{case}")
            return await client.post(f"/v1/{case}", {"data": {"type": "ciBuildRuns"}})

        for method, expected in (("GET", on_get), ("POST", on_post)):
            server.seen.clear()
            if expected is None:
                answer = await ask(method)
                assert answer["data"]["id"] == "p"
                continue
            with pytest.raises(Exception) as caught:  # noqa: PT011 - the exact type is checked
                await ask(method)
            assert type(caught.value) is expected, f"{method} raised {caught.value!r}"
            # One readable line for the user, even from a 100 KB error detail.
            assert "\n" not in str(caught.value)
            assert len(str(caught.value)) < 5000
        if case == "odd-rate-limit":
            assert client.budget.rate_limit.limit == 3600  # unreadable: ignored


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("next-elsewhere", "another host"),
        ("next-loop", "loop"),
        ("next-not-url", "not a usable URL"),
    ],
)
async def test_odd_next_links_end_a_list_with_bad_response(
    fake_clock: FakeClock, case: str, message: str
) -> None:
    async with odd_server() as server, asc_client(server.url, fake_clock) as (client, _events):
        seen: list[str] = []

        async def read_all() -> None:
            async for item in client.paginate(f"/v1/{case}"):
                seen.append(item["id"])

        with pytest.raises(BadResponse, match=message):
            await read_all()
    assert seen[0] == "1"
    assert len(seen) <= 2


# -- build runs with odd fields ----------------------------------------------------------------


def run_resource(**attributes: Any) -> dict[str, Any]:
    return {
        "type": "ciBuildRuns",
        "id": "run-1",
        "attributes": {"number": 7, "executionProgress": "RUNNING", **attributes},
        "relationships": {"workflow": {"data": {"type": "ciWorkflows", "id": "wf-1"}}},
    }


def test_a_date_without_offset_is_utc_and_an_unreadable_one_is_absent() -> None:
    run = BuildRun.parse(
        run_resource(
            createdDate="2026-12-01T10:00:00.000",
            startedDate="2026-12-01T10:00:05.250Z",
            finishedDate="yesterday, roughly",
        )
    )
    assert run.created == datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    assert run.started == datetime(2026, 12, 1, 10, 0, 5, 250_000, tzinfo=UTC)
    assert run.finished is None
    assert (run.id, run.number, run.progress, run.workflow_id) == ("run-1", 7, "RUNNING", "wf-1")


def test_unknown_values_are_kept_and_never_end_a_watch() -> None:
    run = BuildRun.parse(
        run_resource(executionProgress="ARCHIVING", completionStatus="TIMED_OUT", number=True)
    )
    assert run.progress in ("PENDING", "RUNNING")
    assert run.completion_status == "TIMED_OUT"
    assert run.number is None


@pytest.mark.parametrize(
    "variant",
    [
        MalformedVariant.UNKNOWN_ENUM,
        MalformedVariant.NAIVE_DATE,
        MalformedVariant.BAD_RELATIONSHIP,
        MalformedVariant.MISSING_OPTIONAL,
    ],
)
async def test_every_run_of_a_list_with_odd_fields_is_still_read(
    sim: RunningSimulator, fake_clock: FakeClock, variant: MalformedVariant
) -> None:
    workflow = workflow_id(sim)
    runs = []
    for _ in range(3):
        runs.append(sim.sim.start_run(workflow))
        fake_clock.advance(5)
    path = f"/v1/ciWorkflows/{workflow}/buildRuns"
    sim.sim.faults.add(Fault(FaultAction.MALFORMED, method="GET", path=path, variant=variant))
    async with sim_client(sim, fake_clock) as (client, _events):
        page = await client.get(path, {"sort": "-number", "fields[ciBuildRuns]": RUN_FIELDS})
    assert sim.sim.traffic.matching("GET", path)[0].fault == "malformed"

    parsed = [BuildRun.parse(item) for item in page["data"]]
    newest_first = runs[::-1]
    assert [r.id for r in parsed] == [r.id for r in newest_first]
    if variant is MalformedVariant.NAIVE_DATE:
        created = [datetime.fromtimestamp(r.created_at, tz=UTC) for r in newest_first]
        assert [r.created for r in parsed] == created
    if variant is MalformedVariant.UNKNOWN_ENUM:
        # Kept as given, and a progress Apple never listed keeps the run watched.
        assert {r.completion_status for r in parsed} == {"PARTIALLY_SUCCEEDED"}
        assert {r.start_reason for r in parsed} == {"EXTERNAL_TRIGGER"}
        assert {r.progress for r in parsed} <= {"PENDING", "RUNNING"}
    if variant is MalformedVariant.BAD_RELATIONSHIP:
        assert [r.workflow_id for r in parsed] == [None] * 3
        assert [r.number for r in parsed] == [r.number for r in newest_first]
    if variant is MalformedVariant.MISSING_OPTIONAL:
        assert [(r.number, r.created) for r in parsed] == [(None, None)] * 3


async def test_a_poll_whose_data_is_not_a_run_is_one_bad_response(
    sim: RunningSimulator, fake_clock: FakeClock
) -> None:
    run = sim.sim.start_run(workflow_id(sim))
    path = f"/v1/ciBuildRuns/{run.id}"
    sim.sim.faults.add(
        Fault(FaultAction.MALFORMED, method="GET", path=path, variant=MalformedVariant.NOT_OBJECT)
    )
    sim.sim.faults.add(
        Fault(FaultAction.MALFORMED, method="GET", path=path, variant=MalformedVariant.BAD_JSON)
    )
    async with sim_client(sim, fake_clock) as (client, _events):
        first = await client.get(path)
        with pytest.raises(BadResponse, match="malformed ciBuildRuns"):
            BuildRun.parse(first["data"])
        # An HTML page labelled JSON is retried like any transient trouble.
        second = await client.get(path)
    assert BuildRun.parse(second["data"]).id == run.id
    assert [e.fault for e in sim.sim.traffic.matching("GET", path)] == [
        "malformed",
        "malformed",
        None,
    ]


@pytest.mark.parametrize(
    "relationships",
    [
        [],
        "workflow",
        {"workflow": []},
        {"workflow": {"data": "wf-1"}},
        {"workflow": {"data": {"id": 5}}},
    ],
)
def test_odd_relationships_leave_only_that_id_unknown(relationships: object) -> None:
    resource = run_resource(completionStatus="SUCCEEDED", executionProgress="COMPLETE")
    resource["relationships"] = relationships
    run = BuildRun.parse(resource)
    assert run.workflow_id is None
    assert (run.progress, run.completion_status) == ("COMPLETE", "SUCCEEDED")


@pytest.mark.parametrize(
    "resource",
    [
        None,
        [],
        "run-1",
        {"type": "ciBuildRuns"},
        {"type": "ciBuildRuns", "id": 1},
        {"type": "ciWorkflows", "id": "run-1"},
    ],
)
def test_only_a_run_that_cannot_be_identified_is_a_bad_response(resource: object) -> None:
    with pytest.raises(BadResponse):
        BuildRun.parse(resource)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
_FIELDS = (
    "number",
    "createdDate",
    "startedDate",
    "finishedDate",
    "executionProgress",
    "completionStatus",
    "cancelReason",
    "startReason",
    "issueCounts",
    "sourceCommit",
)
dates = st.datetimes().map(lambda d: d.isoformat()) | st.text(
    alphabet="0123456789-:T.Z+ ", max_size=30
)
attribute_values = json_values | dates | st.sampled_from(["PENDING", "RUNNING", "COMPLETE"])
run_like = st.fixed_dictionaries(
    {
        "type": st.just("ciBuildRuns") | json_values,
        "id": st.text(max_size=8) | json_values,
    },
    optional={
        "attributes": st.dictionaries(st.sampled_from(_FIELDS), attribute_values) | json_values,
        "relationships": st.dictionaries(
            st.sampled_from(["workflow", "sourceBranchOrTag"]),
            st.fixed_dictionaries({"data": st.fixed_dictionaries({"id": json_values})})
            | json_values,
        )
        | json_values,
    },
)


@settings(max_examples=400, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values | run_like)
def test_parsing_any_json_value_gives_a_run_or_bad_response(value: object) -> None:
    try:
        run = BuildRun.parse(value)
    except BadResponse:
        return
    assert isinstance(run.id, str)
    assert run.progress in ("PENDING", "RUNNING", "COMPLETE")
    assert run.number is None or type(run.number) is int
    for moment in (run.created, run.started, run.finished):
        assert moment is None or moment.utcoffset() is not None
    assert run.workflow_id is None or isinstance(run.workflow_id, str)
