"""The intent sweeper: every open start intent in the store is moved on until it settles.

New intents are sent, intents whose outcome is unknown are reconciled with backoff, and a
start left behind by a process that died is picked up, in the running daemon and after a
restart alike. Starts go out a few at a time, so a backlog never becomes a burst of POSTs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from xcloudd.asyncstore import AsyncStore
from xcloudd.clock import Clock, sleep_or, wait_first
from xcloudd.config import JobConfig
from xcloudd.starter import ORPHAN_S, Starter
from xcloudd.store import Intent

MAX_CONCURRENT_STARTS = 2
IDLE_S = 5.0


class IntentSweeper:
    def __init__(
        self,
        store: AsyncStore,
        starter: Starter,
        clock: Clock,
        jobs: Mapping[str, JobConfig],
        *,
        owner: str,
        report: Callable[[str, BaseException], None],
    ) -> None:
        self._store = store
        self._starter = starter
        self._clock = clock
        self.jobs = dict(jobs)
        self._owner = owner
        self._report = report
        # Intents whose last step failed unexpectedly (e.g. the disk is full): not before then.
        self._hold: dict[str, float] = {}
        self._busy: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_STARTS)
        self.accepting = True

    def _mine(self, intent: Intent) -> bool:
        """Starts asked for by hand belong to their CLI process until it has gone quiet."""
        if intent.origin == "schedule" or intent.owner == self._owner:
            return True
        return self._clock.time() - intent.updated > ORPHAN_S

    async def run(self) -> None:
        while True:
            token = self._store.changed()
            intents = await self._store.call(self._store.sync.open_intents)
            now = self._clock.time()
            wake: float | None = None
            for intent in intents:
                if intent.id in self._busy or not self._mine(intent):
                    continue
                not_before = max(intent.next_try, self._hold.get(intent.id, 0.0))
                if not_before > now:
                    wake = not_before if wake is None else min(wake, not_before)
                    continue
                if intent.state == "new" and not self.accepting:
                    continue
                task = asyncio.create_task(self._one(intent))
                self._busy[intent.id] = task
            if wake is None:
                # Nothing waits on time: new intents come with a change of the store, or
                # from another process (seen within IDLE_S).
                await wait_first(IDLE_S, token)
            else:
                await sleep_or(self._clock, wake - now, token)

    async def _one(self, intent: Intent) -> None:
        try:
            async with self._slots:
                job = self.jobs.get(intent.job or "")
                await self._starter.step(intent, job)
            self._hold.pop(intent.id, None)
        except Exception as exc:
            # The intent is still open in the store: report, and look at it again later.
            self._report("intents", exc)
            self._hold[intent.id] = self._clock.time() + 5.0
        finally:
            self._busy.pop(intent.id, None)
            self._store.notify()

    async def stop(self, grace: float) -> None:
        """No new POSTs; one under way gets `grace` seconds (cutting it off only makes its
        outcome unknown), then everything is cancelled."""
        self.accepting = False
        tasks = list(self._busy.values())
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
