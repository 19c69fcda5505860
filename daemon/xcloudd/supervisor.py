"""Supervision: no background task dies unobserved.

Every long-lived loop runs under `Supervisor.spawn`: when it raises, the failure is counted,
reported (`daemon.error`, on the first failure of a kind and then at 10, 100, ... so a failing
loop cannot flood the sinks), and the loop starts again after a backoff. Its state lives in the
store, so starting it again is always safe. A loop exception handler turns anything that still
escapes (a callback, a stray task) into the same report.

Diagnostics that cannot wait for the outbox (the store itself cannot be written) go to stderr
as one JSON line each, through structlog, configured once here.
"""

from __future__ import annotations

import asyncio
import functools
import random
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog

from xcloudd.clock import Clock
from xcloudd.errors import XcloudError
from xcloudd.events import Emitter

BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0


@functools.cache
def configure_logging() -> None:
    """structlog for diagnostics on stderr; exceptions render without local variables,
    because a local may hold the private key or a token."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        logger_factory=structlog.BytesLoggerFactory(sys.stderr.buffer),
        cache_logger_on_first_use=True,
    )


def diagnostic(message: str, **fields: Any) -> None:
    configure_logging()
    structlog.get_logger("xcloudd").error(message, service="xcloudd", **fields)


def describe(exc: BaseException) -> str:
    """One line about an exception, without its traceback or locals."""
    if isinstance(exc, XcloudError):
        return str(exc)
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _worth_reporting(count: int) -> bool:
    return count == 1 or (count >= 10 and str(count).rstrip("0") == "1")


class Supervisor:
    def __init__(self, emitter: Emitter, clock: Clock, *, rng: random.Random | None = None) -> None:
        self._emitter = emitter
        self._clock = clock
        self._rng = rng or random.Random()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.failures: Counter[str] = Counter()
        self.last_error: str | None = None  # for systemd's STATUS= line

    def report(self, where: str, exc: BaseException) -> None:
        """Count a failure; report the first of its kind (and then every power of ten)."""
        key = f"{where.split(' ', maxsplit=1)[0]}:{type(exc).__name__}"
        self.failures[key] += 1
        count = self.failures[key]
        self.last_error = f"{where}: {describe(exc)}"
        if not _worth_reporting(count):
            return
        try:
            self._emitter.emit("daemon.error", where=where, error=describe(exc), count=count)
        except Exception as inner:  # the report itself must never take the daemon down
            diagnostic("cannot report a failure", where=where, error=describe(inner))

    def spawn(self, name: str, loop: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        task = asyncio.create_task(self._keep(name, loop), name=name)
        self._tasks[name] = task
        return task

    async def _keep(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        streak = 0
        while True:
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                streak += 1
                self.report(name, exc)
                cap = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** min(streak, 10))
                await self._clock.sleep(self._rng.uniform(cap / 2, cap))

    def ended(self) -> list[str]:
        """Loops that are no longer running although nobody stopped them."""
        return sorted(name for name, task in self._tasks.items() if task.done())

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Anything that escapes a task or callback becomes a report, never a lost traceback."""

        def handle(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if not isinstance(exc, BaseException):
                exc = RuntimeError(str(context.get("message", "unknown failure")))
            self.report("event loop", exc)

        loop.set_exception_handler(handle)

    async def join(self, names: list[str], seconds: float) -> None:
        """Wait for the named loops to end by themselves; cancel what is left after `seconds`."""
        chosen = [t for n, t in self._tasks.items() if n in names]
        if chosen:
            await asyncio.wait(chosen, timeout=seconds)
        await self.stop(*names)

    async def stop(self, *names: str) -> None:
        """Cancel the named loops and wait for them to end (none named: none stopped)."""
        await self._cancel([t for n, t in self._tasks.items() if n in names])

    async def stop_all(self) -> None:
        await self._cancel(list(self._tasks.values()))

    async def _cancel(self, chosen: list[asyncio.Task[None]]) -> None:
        # Never the task that asks: it would wait for itself.
        chosen = [t for t in chosen if t is not asyncio.current_task()]
        for task in chosen:
            task.cancel()
        await asyncio.gather(*chosen, return_exceptions=True)
        for name in [n for n, t in self._tasks.items() if t in chosen]:
            del self._tasks[name]
