"""A sink that goes away: its events wait in the outbox and all arrive once it is back, in order,
once per event_id, while the other sinks and the daemon's work go on unaffected."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from conftest import SteppingClock
from world import T0, World, job


class Receiver:
    """Any JSON endpoint: takes arrays of events, or answers 503 while `down`."""

    def __init__(self) -> None:
        self.down = False
        self.received: list[dict[str, Any]] = []
        self.refused = 0

    async def handle(self, request: web.Request) -> web.Response:
        if self.down:
            self.refused += 1
            return web.Response(status=503, text="maintenance")
        batch = orjson.loads(await request.read())
        assert isinstance(batch, list)
        self.received.extend(batch)
        return web.Response(status=204)


@pytest.fixture
def fake_clock() -> SteppingClock:
    return SteppingClock(start=T0.timestamp())


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/events", rec.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield rec, str(server.make_url("/events"))
    finally:
        await server.close()


def ts(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))


async def test_an_http_sink_down_for_a_while_gets_every_event_once_in_order(
    world: World, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    config = world.configure(
        f'[[sinks]]\ntype = "http"\nurl = "{url}"\nformat = "json"\n\n'
        + job("ci", every="10s", overlap="allow_all")
    )
    down_at, up_at = T0 + timedelta(minutes=2), T0 + timedelta(minutes=12)

    def down() -> None:
        rec.down = True

    def up() -> None:
        rec.down = False

    await world.run(config, down_at, down, up_at, up, T0 + timedelta(minutes=16))

    in_file = world.events()
    # The daemon went on while the sink was down: builds every 10 s, in the file sink at once.
    during = [e for e in in_file if down_at <= ts(e) < up_at and e["event"] == "build.completed"]
    assert len(during) >= 50
    assert rec.refused >= 2
    # Every event arrived at the receiver once, in the order of the outbox (the file's order),
    # except what the sink itself reports after the fact.
    got = [e["event_id"] for e in rec.received]
    assert len(got) == len(set(got)), "an event arrived twice"
    assert got == [e["event_id"] for e in in_file]
    assert [e for e in rec.received if e not in in_file] == []
    failed = [e for e in in_file if e["event"] == "sink.failed" and e["sink"].startswith("http:")]
    recovered = [
        e for e in in_file if e["event"] == "sink.recovered" and e["sink"].startswith("http:")
    ]
    assert len(failed) == 1
    assert len(recovered) == 1
    assert down_at <= ts(failed[0]) < up_at <= ts(recovered[0])
    assert failed[0]["pending"] > 0
    assert "503" in failed[0]["error"]
    # The sink's name shows where it delivers, and nothing secret.
    assert failed[0]["sink"] == "http:" + url.split("://", 1)[1]
    # Only the file sink's own health ever changed: never.
    assert [
        e for e in in_file if e["event"].startswith("sink.") and e["sink"].startswith("file:")
    ] == []
