"""Shared fixtures: a fake clock, a running simulator checked against Apple's schema, tokens."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import asc_schema
from xcloudd.clock import FakeClock
from xcloudd.simulator import ApiKey, RunningSimulator, mint_token, running_simulator

if TYPE_CHECKING:
    from world import World

MakeToken = Callable[..., str]


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


def schema_problems(sim_traffic: Any) -> list[str]:
    """Every request the simulator accepted and every JSON answer, checked against the spec."""
    problems: list[str] = []
    for entry in sim_traffic:
        if entry.path.startswith("/_sim/") or entry.status is None:
            continue
        where = f"#{entry.seq} {entry.method} {entry.path} -> {entry.status}"
        # A body the simulator accepted must be one Apple documents; rejected ones are the
        # test's deliberate mistakes.
        if entry.request_json is not None and 200 <= entry.status < 300:
            try:
                asc_schema.validate_request(entry.method, entry.path, entry.request_json)
            except AssertionError as exc:
                problems.append(f"{where}: request {exc}")
        if entry.response_json is None or entry.status >= 500:
            continue  # fault bodies and plain-text answers: Apple documents no 5xx
        if entry.fault in ("malformed", "oversize"):
            continue  # deliberately off-schema answers
        try:
            asc_schema.validate_response(
                entry.method, entry.path, entry.status, entry.response_json
            )
        except asc_schema.UndocumentedResponse:
            if entry.status >= 400:
                try:
                    asc_schema.validate_error(entry.response_json)
                except AssertionError as exc:
                    problems.append(f"{where}: error body {exc}")
        except AssertionError as exc:
            problems.append(f"{where}: response {exc}")
    return problems


@pytest.fixture
async def sim(fake_clock: FakeClock) -> AsyncIterator[RunningSimulator]:
    """A simulator on 127.0.0.1 (free port) on the fake clock; its traffic must match the spec."""
    async with running_simulator(clock=fake_clock) as running:
        yield running
        problems = schema_problems(running.sim.traffic.entries)
    if problems:
        pytest.fail("simulator traffic does not match Apple's schema:\n" + "\n".join(problems))


@pytest.fixture
def world(sim: RunningSimulator, fake_clock: FakeClock, tmp_path: Path) -> World:
    """A daemon on virtual time against the simulator (world.py). The test module provides a
    `fake_clock` fixture that is a SteppingClock."""
    from world import World

    assert isinstance(fake_clock, SteppingClock), "override fake_clock with a SteppingClock"
    return World(sim, fake_clock, tmp_path)


@pytest.fixture
def make_token(sim: RunningSimulator, fake_clock: FakeClock) -> MakeToken:
    """make_token(key=None, **mint_token options) -> a token valid at the fake clock's time."""

    def make(key: ApiKey | None = None, **options: Any) -> str:
        return mint_token(key or sim.sim.primary_key, fake_clock.time(), **options)

    return make


@pytest.fixture
def auth_headers(make_token: MakeToken) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token()}"}


class SteppingClock(FakeClock):
    """Virtual time that moves only when the test's pump moves it: sleep() waits for its instant."""

    def __init__(self, start: float) -> None:
        super().__init__(start)
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        await fut

    def next_wakeup(self) -> float | None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] if self._sleepers else None

    def advance_to(self, instant: float) -> None:
        self.advance(instant - self._now)
        while self._sleepers and self._sleepers[0][0] <= self._now:
            fut = heapq.heappop(self._sleepers)[2]
            if not fut.done():
                fut.set_result(None)
