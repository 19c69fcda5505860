"""Time as a dependency: the daemon, the client and the simulator all read it through a Clock.

Tests inject a FakeClock so that a 45-minute wait or a token expiry costs no real time.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the Unix epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for intervals and deadlines)."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    async def sleep_until(self, wall: float) -> None:
        """Until the wall clock reads `wall`, however the machine spends the time meanwhile."""
        ...


async def wait_first(seconds: float, *events: asyncio.Event) -> None:
    """Until one of `events` is set, or `seconds` of real time: a poll for what another
    process may have done, which no virtual clock can tell."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def sleep_or(clock: Clock, seconds: float, event: asyncio.Event) -> None:
    """`seconds` on `clock`, or less if `event` is set meanwhile."""
    sleeper = asyncio.ensure_future(clock.sleep(max(0.0, seconds)))
    waker = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sleeper.cancel()
        waker.cancel()


def utcnow(clock: Clock) -> datetime:
    return datetime.fromtimestamp(clock.time(), tz=UTC)


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def sleep_until(self, wall: float) -> None:
        # asyncio sleeps on the monotonic clock, which stops while the host is suspended and
        # knows nothing of NTP steps: look at the wall clock at least once a minute.
        while (left := wall - time.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(min(left, WALL_CHECK_S))


WALL_CHECK_S = 60.0


class FakeClock:
    """Virtual time: sleeping moves the clock forward instead of waiting.

    Every sleeper advances time to its own wake-up instant (never backwards), so a single
    watch sees exactly the time it asked for and concurrent sleepers stay ordered.
    """

    def __init__(self, start: float = 1_790_000_000.0) -> None:
        self._now = start
        self._mono = 1_000.0

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            self._now += seconds
            self._mono += seconds

    async def sleep(self, seconds: float) -> None:
        self.advance(seconds)
        # Yield so that other tasks (and a server in the same loop) get to run.
        await asyncio.sleep(0)

    async def sleep_until(self, wall: float) -> None:
        await self.sleep(wall - self.time())
