"""Following build runs: every run in the store that is not finished is polled until
`executionProgress` is COMPLETE, the API says it is gone, or `give_up_after` passes.

The follower learns of runs from the store (the starter and discovery record them; a CLI
start on the same store too), and records what it sees there: a transition and its event in
one transaction. A poll that fails for any reason, transient or not understood (a malformed
answer, a key that stopped working, a full disk), is counted, reported once per streak, and
tried again with backoff; it never ends the watch nor the loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections.abc import Callable, Container
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from xcloudd import failpoints
from xcloudd.api import ApiError, ApiUnavailable, AscClient, AuthFailed, BadResponse, NotFound
from xcloudd.asyncstore import AsyncStore
from xcloudd.clock import Clock, sleep_or, wait_first
from xcloudd.config import PollingConfig
from xcloudd.events import RESULTS, BuildRef, Event, EventFactory, EventName
from xcloudd.notify import Heartbeats
from xcloudd.resources import RUN_CONTEXT, RUN_FIELDS, BuildRun, run_context
from xcloudd.store import RunRecord, parse_iso

ACTION_FIELDS = "name,actionType,executionProgress,completionStatus,isRequiredToPass,issueCounts"
MAX_CONCURRENT_POLLS = 8
# Runs started elsewhere on this store (a CLI start) are noticed within this long.
RESCAN_S = 30.0
# A poll due within this long is due now (sleeping a few nanoseconds is only rounding noise).
POLL_SLACK_S = 0.001


@dataclass
class _Tracked:
    ref: BuildRef
    deadline: float  # wall clock
    created: datetime | None
    progress: str | None
    started_recorded: bool
    failures: int = 0
    polling: bool = False
    # The one heap entry that counts; older entries (e.g. before a poke) are skipped when popped.
    next_due: float = 0.0
    repoll: bool = False
    poked: float = float("-inf")  # when a hint last brought its poll forward


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    return round((b - a).total_seconds(), 3) if a and b else None


class Follower:
    def __init__(
        self,
        store: AsyncStore,
        client: AscClient,
        events: EventFactory,
        clock: Clock,
        polling: PollingConfig,
        *,
        report: Callable[[str, BaseException], None],
        only: Container[str] | None = None,
        rng: random.Random | None = None,
        heartbeats: Heartbeats | None = None,
    ) -> None:
        self._store = store
        self._db = store.sync
        self._client = client
        self._ev = events
        self._clock = clock
        self._polling = polling
        self._report = report
        self._only = only
        self._rng = rng or random.Random()
        self._runs: dict[str, _Tracked] = {}
        self._due: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_POLLS)
        self._tasks: set[asyncio.Task[None]] = set()
        self._rescan = 0.0
        self._new_runs = asyncio.Event()
        self._heartbeats = heartbeats or Heartbeats(clock)
        self._with_context = True
        # Set once the store's unfinished runs are taken up (start-up: "runs resumed").
        self.resumed = asyncio.Event()
        store.on_written(self._on_written)

    def _on_written(self, rows: list[tuple[str, str]]) -> None:
        if any(name == "build.created" for _, name in rows):
            self._new_runs.set()
            self._wake.set()

    def poke(self, build_run_id: str) -> bool:
        """Look at this run now (a webhook hint); False if it is not being followed. Hints are
        not trusted and a flood of them must not spend the key's request budget: a hint within
        `min_interval` of the last one it brought forward moves the poll to the end of that
        time, not sooner (so a build's COMPLETED right after its STARTED is still seen soon)."""
        tracked = self._runs.get(build_run_id)
        if tracked is None:
            return False
        now = self._clock.monotonic()
        if tracked.poked >= now:
            return True  # a look brought forward by an earlier hint is still to come
        at = max(now, tracked.poked + self._polling.min_interval)
        if tracked.polling or at < tracked.next_due:
            tracked.poked = at
            self._schedule(build_run_id, at - now)
        return True

    def _schedule(self, run_id: str, delay: float, *, since: float | None = None) -> None:
        """Poll `delay` seconds after `since` (default: now): cadence counts from a poll's
        start, so the time a poll takes does not stretch the interval."""
        due = (self._clock.monotonic() if since is None else since) + delay
        self._runs[run_id].next_due = due
        heapq.heappush(self._due, (due, next(self._seq), run_id))
        self._wake.set()

    def _interval(self, tracked: _Tracked) -> float:
        base = self._interval_base()
        if tracked.failures:
            return float(min(self._polling.max_interval, base * 2 ** min(tracked.failures, 10)))
        return base

    async def _scan(self) -> None:
        """Take up the store's unfinished runs that are not followed yet."""
        self._rescan = self._clock.monotonic() + RESCAN_S
        with self._heartbeats.busy("follower"):
            await failpoints.reach("follower.scan")
            records = await self._store.call(self._db.runs_in_flight)
        for rec in records:
            wanted = self._only is None or rec.run_id in self._only
            if rec.run_id in self._runs or not wanted:
                continue
            self._track(rec)
        self.resumed.set()

    def configure(self, polling: PollingConfig) -> None:
        """New polling settings (a reload): they apply from each run's next poll."""
        self._polling = polling

    def _track(self, rec: RunRecord) -> None:
        born = parse_iso(rec.created_at or rec.first_seen)
        tracked = _Tracked(
            ref=rec.ref,
            deadline=born.timestamp() + self._polling.give_up_after,
            created=parse_iso(rec.created_at) if rec.created_at else None,
            progress=rec.progress,
            started_recorded=rec.started_emitted,
        )
        self._runs[rec.run_id] = tracked
        # A run just read from an answer needs no poll at once; one of unknown state does.
        known = rec.progress in ("PENDING", "RUNNING")
        self._schedule(rec.run_id, self._spread() if known else 0.0)

    def _spread(self) -> float:
        return self._interval_base() * self._rng.uniform(0.8, 1.0)

    def _interval_base(self) -> float:
        p = self._polling
        return max(p.min_interval, min(p.interval, p.max_interval))

    async def run(self) -> None:
        """The poll loop; runs until cancelled."""
        try:
            while True:
                # Cleared before the scan: news that arrives during it wakes the next wait.
                self._wake.clear()
                if self._new_runs.is_set() or self._clock.monotonic() >= self._rescan:
                    self._new_runs.clear()
                    await self._scan()
                if not self._due:
                    await wait_first(RESCAN_S, self._wake)
                    continue
                due, _, run_id = self._due[0]
                delay = due - self._clock.monotonic()
                if delay > POLL_SLACK_S:
                    await sleep_or(self._clock, delay, self._wake)
                    continue
                heapq.heappop(self._due)
                tracked = self._runs.get(run_id)
                if tracked is None or tracked.next_due != due:
                    continue
                if tracked.polling:
                    tracked.repoll = True
                    continue
                tracked.polling = True
                await self._slots.acquire()
                task = asyncio.create_task(self._poll(tracked))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _poll(self, tracked: _Tracked) -> None:
        run_id = tracked.ref.build_run_id
        began = self._clock.monotonic()
        try:
            try:
                ended = await self._attempt(tracked)
                if not ended and self._clock.time() >= tracked.deadline:
                    ended = await self._expire(tracked)
            except Exception as exc:
                # Whatever went wrong (a store that cannot be written included), the run stays
                # followed: it is polled again, later.
                self._failed(tracked, exc, report=True)
                ended = False
            if ended:
                self._runs.pop(run_id, None)
                return
            now = self._clock.monotonic()
            if tracked.repoll:
                self._schedule(run_id, 0.0)
            elif tracked.poked > now:
                # A hint came during this poll: the look it planned stays (already queued).
                tracked.next_due = tracked.poked
            else:
                self._schedule(run_id, self._interval(tracked), since=began)
            tracked.repoll = False
        finally:
            tracked.polling = False
            self._slots.release()

    async def _attempt(self, tracked: _Tracked) -> bool:
        """One poll; True when the watch on the run has ended (on record)."""
        try:
            return await self._poll_once(tracked)
        except NotFound:
            pass
        except AuthFailed as exc:
            self._failed(tracked, exc, report=False)  # the client reported api.auth_failed
            return False
        except ApiError as exc:
            if exc.status in (408, 409, 429) or exc.status >= 500:
                self._failed(tracked, exc, report=False)
                return False
            return await self._end(tracked, f"http_{exc.status}")
        except (ApiUnavailable, BadResponse) as exc:
            # Transient trouble only delays this run; give_up_after still bounds the watch.
            self._failed(tracked, exc, report=isinstance(exc, BadResponse))
            return False
        return await self._end(tracked, "not_found")

    def _failed(self, tracked: _Tracked, exc: BaseException, *, report: bool) -> None:
        tracked.failures += 1
        if report and tracked.failures == 1:
            self._report(f"follow {tracked.ref.build_run_id}", exc)

    async def _poll_once(self, tracked: _Tracked) -> bool:
        run_id = tracked.ref.build_run_id
        path = f"/v1/ciBuildRuns/{run_id}"
        if self._with_context:
            try:
                doc = await self._client.get(
                    path, {"fields[ciBuildRuns]": RUN_FIELDS, **RUN_CONTEXT}
                )
            except ApiError as exc:
                if exc.status != 400:
                    raise
                # The names are a nicety: an API that refuses `include` still gets followed.
                self._with_context = False
                doc = await self._client.get(path, {"fields[ciBuildRuns]": RUN_FIELDS})
        else:
            doc = await self._client.get(path, {"fields[ciBuildRuns]": RUN_FIELDS})
        data = doc.get("data")
        if not isinstance(data, dict):
            raise BadResponse(f"App Store Connect sent no build run for {run_id}")
        run = BuildRun.parse(data)
        if run.id != run_id:
            raise BadResponse(f"App Store Connect answered for {run.id} when asked for {run_id}")
        ended = await self._observe(tracked, run, run_context(doc, data))
        tracked.failures = 0
        return ended

    def _ref(self, tracked: _Tracked, run: BuildRun) -> BuildRef:
        ref = tracked.ref
        if ref.build_number is None and run.number is not None:
            ref = tracked.ref = BuildRef(
                ref.build_run_id, run.number, ref.workflow_id, ref.job, ref.origin
            )
        return ref

    def _started(self, ref: BuildRef, run: BuildRun, created: datetime | None) -> Event:
        return self._ev.make(
            "build.started",
            subject=ref.build_run_id,
            build=ref,
            queued_s=_seconds(created, run.started),
        )

    async def _observe(self, tracked: _Tracked, run: BuildRun, context: dict[str, str]) -> bool:
        ref = self._ref(tracked, run)
        created = run.created or tracked.created
        if run.progress == "COMPLETE":
            actions = await self._actions(run.id)
            events = []
            if run.started is not None:
                events.append(self._started(ref, run, created))
            status = run.completion_status
            commit = run.source_commit or {}
            events.append(
                self._ev.make(
                    "build.completed",
                    subject=run.id,
                    build=ref,
                    completion_status=status,
                    result=RESULTS.get(status or "", "error"),
                    cancel_reason=run.cancel_reason,
                    issue_counts=run.issue_counts,
                    source_commit=commit.get("commitSha"),
                    commit_url=commit.get("webUrl"),
                    queued_s=_seconds(created, run.started),
                    duration_s=_seconds(run.started, run.finished),
                    actions=actions,
                    context=context,
                )
            )
            await self._store.call(
                self._db.finish_run,
                run.id,
                number=run.number,
                progress="COMPLETE",
                completion_status=status,
                reason="completed",
                events=events,
            )
            return True
        started = None
        if run.started is not None and not tracked.started_recorded:
            started = self._started(ref, run, created)
        if started is not None or run.progress != tracked.progress:
            await self._store.call(
                self._db.observe_run,
                run.id,
                number=run.number,
                progress=run.progress,
                started=started,
            )
            tracked.progress = run.progress
            tracked.started_recorded = tracked.started_recorded or started is not None
        return False

    async def _actions(self, run_id: str) -> list[dict[str, Any]] | None:
        """The run's actions for build.completed; the event goes out without them if this fails."""
        try:
            doc = await self._client.get(
                f"/v1/ciBuildRuns/{run_id}/actions",
                {"fields[ciBuildActions]": ACTION_FIELDS, "limit": "200"},
            )
        except (ApiError, ApiUnavailable, BadResponse):
            return None
        out: list[dict[str, Any]] = []
        data = doc.get("data")
        for item in data if isinstance(data, list) else []:
            if not isinstance(item, dict):
                continue
            a = item.get("attributes")
            if not isinstance(a, dict):
                continue
            out.append(
                {
                    "name": a.get("name"),
                    "action_type": a.get("actionType"),
                    "completion_status": a.get("completionStatus"),
                    "is_required_to_pass": a.get("isRequiredToPass"),
                    "issue_counts": a.get("issueCounts"),
                }
            )
        return out

    async def _end(self, tracked: _Tracked, reason: str) -> bool:
        """The API says the run is gone (or refuses to show it): the watch ends, on record."""
        return await self._give_up(
            tracked, reason, "build.watch_ended", reason=reason, last_progress=tracked.progress
        )

    async def _expire(self, tracked: _Tracked) -> bool:
        return await self._give_up(
            tracked,
            "expired",
            "build.watch_expired",
            last_progress=tracked.progress,
            result="timeout",
            give_up_after_s=self._polling.give_up_after,
        )

    async def _give_up(self, tracked: _Tracked, end: str, name: EventName, **fields: Any) -> bool:
        run_id = tracked.ref.build_run_id
        event = self._ev.make(name, subject=run_id, build=tracked.ref, **fields)
        await self._store.call(
            self._db.finish_run,
            run_id,
            number=None,
            progress=None,
            completion_status=None,
            reason=end,
            events=[event],
        )
        return True
