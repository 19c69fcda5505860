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


def utcnow(clock: Clock) -> datetime:
    return datetime.fromtimestamp(clock.time(), tz=UTC)


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


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
