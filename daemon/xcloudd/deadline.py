"""A CLI command's overall deadline: how long it waits for App Store Connect without an answer.

Each request has its own timeout, but retries and backoff multiply it; the deadline bounds the
whole wait a person or a script sees.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import TextIO

from xcloudd.api import ApiUnavailable
from xcloudd.config import Config
from xcloudd.durations import format_duration
from xcloudd.runtime import Runtime

# A command gives up when App Store Connect has not answered for DEADLINE_TIMEOUTS x api.timeout
# + DEADLINE_SLACK_S (exit 69), and says what it waits for after NOTICE_AFTER_S.
DEADLINE_TIMEOUTS = 2
DEADLINE_SLACK_S = 5.0
NOTICE_AFTER_S = 3.0
_TICK_S = 0.2


class Deadline:
    """How long a command waits for App Store Connect without an answer.

    Each request has its own timeout (api.timeout), but retries and backoff multiply it: an
    endpoint that accepts connections and never answers held a command for minutes. Under
    `guard`, `limit` seconds without any answer (an error status counts as one) end the
    command with ApiUnavailable (exit 69), and after `notice_after` seconds one line on
    `notice` says what it is waiting for. Following a build is not guarded: it may take up to
    polling.give_up_after. Waits the command chooses itself go under `paused`.
    """

    def __init__(
        self,
        base_url: str,
        limit: float,
        *,
        notice: TextIO | None = None,
        notice_after: float = NOTICE_AFTER_S,
    ) -> None:
        self.base_url = base_url
        self.limit = limit
        self.notice_after = notice_after
        self._notice = notice
        # Said with the error when the deadline ends the command (e.g. a start's outcome).
        self.hint: str | None = None
        self._paused = 0

    @classmethod
    def of(cls, config: Config, notice: TextIO | None) -> Deadline:
        limit = DEADLINE_TIMEOUTS * config.api.timeout + DEADLINE_SLACK_S
        return cls(config.api.base_url, limit, notice=notice)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """A wait of the command's own choosing (not App Store Connect's silence)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _message(self) -> str:
        text = (
            f"App Store Connect ({self.base_url}) did not answer for"
            f" {format_duration(round(self.limit))}: check api.base_url, the network and any"
            " proxy, or raise api.timeout"
        )
        return f"{text}; {self.hint}" if self.hint else text

    @contextlib.asynccontextmanager
    async def guard(self, rt: Runtime) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as timer:
                watcher = asyncio.create_task(self._watch(rt, timer, loop))
                try:
                    yield
                finally:
                    # Not awaited: a cancellation of this task (a signal) must not be taken
                    # for the watcher's own.
                    watcher.cancel()
        except TimeoutError:
            if not timer.expired():
                raise
            raise ApiUnavailable(self._message()) from None

    async def _watch(
        self, rt: Runtime, timer: asyncio.Timeout, loop: asyncio.AbstractEventLoop
    ) -> None:
        seen, since, noticed = _answers(rt), loop.time(), False
        while True:
            await asyncio.sleep(_TICK_S)
            now, answers = loop.time(), _answers(rt)
            if answers != seen or self._paused:
                seen, since, noticed = answers, now, False
                continue
            if not noticed and now - since >= self.notice_after and self._notice is not None:
                noticed = True
                line = f"xcloudd: waiting for App Store Connect ({self.base_url}) ...\n"
                self._notice.write(line)
                self._notice.flush()
            if now - since >= self.limit:
                timer.reschedule(now)
                return


def _answers(rt: Runtime) -> int:
    """How many answers (of any status) the client has had."""
    return sum(n for (_, status), n in rt.client.outcomes.items() if status != "error")


@contextlib.asynccontextmanager
async def guarded(rt: Runtime, deadline: Deadline | None) -> AsyncIterator[None]:
    if deadline is None:
        yield
        return
    async with deadline.guard(rt):
        yield


def paused(deadline: Deadline | None) -> contextlib.AbstractContextManager[None]:
    return deadline.paused() if deadline is not None else contextlib.nullcontext()
