"""The scheduler: decides each job's occurrences, and records each decision with its intent.

Every wake compares with the wall clock. Whatever came due since the job's mark, whether
the daemon was down, suspended, stopped with SIGSTOP, or the clock was stepped, is handled
by one rule, the same at start-up and on any late wake: the newest due occurrence starts a
build if it is no older than the job's `catch_up` (or a minute, for a wake that is just
late), and all others are counted in one `schedule.missed`. The decision, the mark and the
start intent are one transaction, written before anything goes over the network.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from xcloudd import failpoints
from xcloudd.asyncstore import AsyncStore
from xcloudd.clock import Clock
from xcloudd.config import JobConfig
from xcloudd.notify import Heartbeats
from xcloudd.schedule import Schedule, build_schedule, missed_between
from xcloudd.starter import ON_TIME_S


def job_schedule(job: JobConfig) -> Schedule | None:
    return build_schedule(
        job_name=job.name,
        cron=job.cron,
        every=job.every,
        at=job.at,
        timezone=job.timezone,
        jitter=job.jitter,
    )


class JobScheduler:
    """One job's fire loop."""

    def __init__(
        self,
        store: AsyncStore,
        clock: Clock,
        job: JobConfig,
        heartbeats: Heartbeats | None = None,
    ) -> None:
        self._heartbeats = heartbeats or Heartbeats(clock)
        self._store = store
        self._db = store.sync
        self._clock = clock
        self.job = job
        self._schedule = job_schedule(job)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.time(), tz=UTC)

    async def run(self) -> None:
        job = self.job
        mark = await self._store.call(self._db.begin_job, job.name, self._now())
        while True:
            token = self._store.changed()
            with self._heartbeats.busy(f"schedule {job.name}"):
                await failpoints.reach("schedule")
                if self._schedule is not None:
                    mark = await self.look(mark, self._now())
                if job.overlap == "buffer_one" and await self._store.call(
                    self._db.has_held, job.name
                ):
                    released = await self._store.call(self._db.release_held, job.name)
                    if released is not None:
                        self._store.notify()
            await self._sleep(mark, token)

    async def look(self, mark: datetime, now: datetime) -> datetime:
        """Decide everything due in (mark, now]; the new mark."""
        assert self._schedule is not None
        due = missed_between(self._schedule, mark, now)
        if due.count == 0 or due.newest is None:
            return mark
        job = self.job
        window = max(job.catch_up, ON_TIME_S)
        fires = (now - due.newest).total_seconds() <= window
        candidate = due.newest if fires else None
        missed = due.count - (1 if fires else 0)
        decision = await self._store.call(
            self._db.decide,
            job.name,
            newest=due.newest,
            missed=missed,
            missed_oldest=due.oldest if missed else None,
            capped=due.capped,
            candidate=candidate,
            enabled=job.enabled,
            overlap=job.overlap,
        )
        if decision.intent_id is not None:
            self._store.notify()
        return max(mark, due.newest)

    async def _sleep(self, mark: datetime, token: asyncio.Event) -> None:
        waiters: set[asyncio.Task[object]] = set()
        upcoming = self._schedule.next_after(mark) if self._schedule is not None else None
        if upcoming is not None:
            # Wakes on the wall clock (see Clock.sleep_until); `look` then takes whatever came
            # due meanwhile, however long the host was away.
            waiters.add(asyncio.create_task(self._clock.sleep_until(upcoming.timestamp())))
        if self.job.overlap == "buffer_one":
            # A held occurrence starts when the job's build ends: the store says when.
            waiters.add(asyncio.create_task(token.wait()))
        if not waiters:
            await asyncio.Event().wait()  # nothing will ever come due
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waiters:
                task.cancel()
