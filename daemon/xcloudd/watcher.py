"""Following build runs: one poll loop for every run, until `executionProgress` is COMPLETE.

Each run has a due time; the loop polls whichever run is due next, so many runs share the
client's request budget fairly. A streak of transient failures only delays a run's next
poll; a watch ends at COMPLETE, at `give_up_after`, or when the API refuses outright.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from xcloudd.api import ApiError, ApiUnavailable, AscClient, BadResponse
from xcloudd.clock import Clock
from xcloudd.config import PollingConfig
from xcloudd.errors import ExitCode
from xcloudd.events import RESULTS, BuildRef, Emitter, stable_event_id
from xcloudd.resources import RUN_FIELDS, BuildRun

ACTION_FIELDS = "name,actionType,executionProgress,completionStatus,isRequiredToPass,issueCounts"
MAX_CONCURRENT_POLLS = 8


Mark = Literal["created", "started", "completed"]


class Ledger(Protocol):
    """Where the watcher's progress is made durable (the state store, in the daemon)."""

    def emitted(self, run_id: str, mark: Mark) -> None:
        """The event for `mark` reached the sinks: never emit it again."""

    def observed(self, run_id: str, run: BuildRun | None, finished: bool) -> None:
        """The run's latest state (if known), and whether the watch on it has ended."""


class _NoLedger:
    def emitted(self, run_id: str, mark: Mark) -> None:
        return None

    def observed(self, run_id: str, run: BuildRun | None, finished: bool) -> None:
        return None


@dataclass(frozen=True)
class Outcome:
    ref: BuildRef
    run: BuildRun | None
    expired: bool = False

    @property
    def exit_code(self) -> ExitCode:
        if self.expired or self.run is None:
            return ExitCode.GAVE_UP
        status = self.run.completion_status
        if status == "SUCCEEDED":
            return ExitCode.OK
        if status in ("CANCELED", "SKIPPED"):
            return ExitCode.CANCELED
        return ExitCode.FAILED


@dataclass
class _Tracked:
    ref: BuildRef
    deadline: float  # wall clock
    done: asyncio.Future[Outcome]
    last: BuildRun | None = None
    created_emitted: bool = False
    started_emitted: bool = False
    failures: int = 0
    polling: bool = field(default=False)
    # The one heap entry that counts; older entries (e.g. before a poke) are skipped when popped.
    next_due: float = 0.0
    # A poke came while a poll was under way: that poll may predate the news, so look again.
    repoll: bool = False


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    return round((b - a).total_seconds(), 3) if a and b else None


class Watcher:
    def __init__(
        self,
        client: AscClient,
        emitter: Emitter,
        clock: Clock,
        polling: PollingConfig,
        ledger: Ledger | None = None,
    ) -> None:
        self._client = client
        self._ledger = ledger or _NoLedger()
        self._emitter = emitter
        self._clock = clock
        self._polling = polling
        self._runs: dict[str, _Tracked] = {}
        self._due: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_POLLS)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._runs)

    def follow(
        self,
        ref: BuildRef,
        *,
        known: BuildRun | None = None,
        created_emitted: bool = False,
        started_emitted: bool = False,
        born: float | None = None,
    ) -> asyncio.Future[Outcome]:
        """Follow a run until it completes; the future resolves with its outcome."""
        if ref.build_run_id in self._runs:
            return self._runs[ref.build_run_id].done
        now = self._clock.time()
        # The deadline counts from the run's creation, so it means the same after a restart.
        if born is None:
            born = known.created.timestamp() if known and known.created else now
        tracked = _Tracked(
            ref=ref,
            deadline=born + self._polling.give_up_after,
            done=asyncio.get_running_loop().create_future(),
            created_emitted=created_emitted,
            started_emitted=started_emitted,
        )
        self._runs[ref.build_run_id] = tracked
        if known is not None and known.progress != "COMPLETE":
            self._observe(tracked, known)
            self._schedule(ref.build_run_id, self._interval(tracked))
        else:
            # Unknown, or already complete: one poll now reads the final state and its actions.
            self._schedule(ref.build_run_id, 0.0)
        return tracked.done

    def poke(self, build_run_id: str) -> bool:
        """Look at this run now (a webhook hint); False if it is not being followed."""
        if build_run_id not in self._runs:
            return False
        self._schedule(build_run_id, 0.0)
        return True

    def _schedule(self, run_id: str, delay: float) -> None:
        due = self._clock.monotonic() + delay
        self._runs[run_id].next_due = due
        heapq.heappush(self._due, (due, next(self._seq), run_id))
        self._wake.set()

    def _interval(self, tracked: _Tracked) -> float:
        p = self._polling
        if tracked.failures:
            return float(min(p.max_interval, p.interval * 2 ** min(tracked.failures, 10)))
        return max(p.min_interval, min(p.interval, p.max_interval))

    async def run(self) -> None:
        """The poll loop; runs until cancelled."""
        try:
            while True:
                self._wake.clear()
                if not self._due:
                    await self._wake.wait()
                    continue
                due, _, run_id = self._due[0]
                delay = due - self._clock.monotonic()
                if delay > 0:
                    await self._sleep_or_wake(delay)
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

    async def _sleep_or_wake(self, delay: float) -> None:
        sleeper = asyncio.create_task(self._clock.sleep(delay))
        waker = asyncio.create_task(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    async def _poll(self, tracked: _Tracked) -> None:
        run_id = tracked.ref.build_run_id
        try:
            try:
                doc = await self._client.get(
                    f"/v1/ciBuildRuns/{run_id}", {"fields[ciBuildRuns]": RUN_FIELDS}
                )
                data = doc.get("data")
                if not isinstance(data, dict):
                    raise BadResponse(f"App Store Connect sent no data for build run {run_id}")
                run = BuildRun.parse(data)
            except (ApiUnavailable, BadResponse):
                # Transient trouble only delays this run; give_up_after still bounds the watch.
                tracked.failures += 1
            except ApiError as exc:
                self._finish(tracked, error=exc)
                return
            else:
                tracked.failures = 0
                await self._observe_complete(tracked, run)
            if tracked.done.done():
                return
            if self._clock.time() >= tracked.deadline:
                self._expire(tracked)
                return
            self._schedule(run_id, 0.0 if tracked.repoll else self._interval(tracked))
            tracked.repoll = False
        finally:
            tracked.polling = False
            self._slots.release()

    async def _observe_complete(self, tracked: _Tracked, run: BuildRun) -> None:
        actions = await self._actions(run.id) if run.progress == "COMPLETE" else None
        self._observe(tracked, run, actions)

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
        for item in doc.get("data") or []:
            if not isinstance(item, dict):
                continue
            a = item.get("attributes") or {}
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

    def _observe(
        self, tracked: _Tracked, run: BuildRun, actions: list[dict[str, Any]] | None = None
    ) -> None:
        ref = tracked.ref
        if ref.build_number is None and run.number is not None:
            ref = tracked.ref = BuildRef(
                ref.build_run_id, run.number, ref.workflow_id, ref.job, ref.origin
            )
        tracked.last = run
        run_id = ref.build_run_id
        if not tracked.created_emitted:
            tracked.created_emitted = True
            self._emitter.emit(
                "build.created",
                build=ref,
                event_id=stable_event_id(run_id, "build.created"),
                reconciled=False,
                start_reason=run.start_reason,
            )
            self._ledger.emitted(run_id, "created")
        if run.started is not None and not tracked.started_emitted:
            tracked.started_emitted = True
            self._emitter.emit(
                "build.started",
                build=ref,
                event_id=stable_event_id(run_id, "build.started"),
                queued_s=_seconds(run.created, run.started),
            )
            self._ledger.emitted(run_id, "started")
        if run.progress == "COMPLETE":
            status = run.completion_status
            commit = run.source_commit or {}
            self._emitter.emit(
                "build.completed",
                build=ref,
                event_id=stable_event_id(run_id, "build.completed"),
                completion_status=status,
                result=RESULTS.get(status or "", "error"),
                cancel_reason=run.cancel_reason,
                issue_counts=run.issue_counts,
                source_commit=commit.get("commitSha"),
                queued_s=_seconds(run.created, run.started),
                duration_s=_seconds(run.started, run.finished),
                actions=actions,
            )
            self._ledger.emitted(run_id, "completed")
            self._ledger.observed(run_id, run, True)
            self._finish(tracked, outcome=Outcome(ref, run))
        else:
            self._ledger.observed(run_id, run, False)

    def _expire(self, tracked: _Tracked) -> None:
        last = tracked.last
        self._emitter.emit(
            "build.watch_expired",
            build=tracked.ref,
            event_id=stable_event_id(tracked.ref.build_run_id, "build.watch_expired"),
            last_progress=last.progress if last else None,
            result="timeout",
            give_up_after_s=self._polling.give_up_after,
        )
        self._ledger.observed(tracked.ref.build_run_id, last, True)
        self._finish(tracked, outcome=Outcome(tracked.ref, last, expired=True))

    def _finish(
        self, tracked: _Tracked, *, outcome: Outcome | None = None, error: Exception | None = None
    ) -> None:
        self._runs.pop(tracked.ref.build_run_id, None)
        if tracked.done.done():
            return
        if error is not None:
            tracked.done.set_exception(error)
        elif outcome is not None:
            tracked.done.set_result(outcome)
