"""`xcloudd run`: fires each job on its schedule and follows every run, across any crash.

The promises and how they are kept:
- An occurrence (job, planned instant) ends exactly once: its decision ("fired", "skipped")
  is written together with the start intent, in one transaction, before the POST.
- A POST whose outcome a crash made unknown is finished on start-up by reconciling (the
  starter's rules), never by POSTing blindly.
- Build events carry stable ids and are marked in the store once they reached the sinks; a
  crash between the two makes the next process emit the same event, with the same id, which
  file sinks write only once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

from xcloudd import __version__
from xcloudd.api import ApiError, ApiUnavailable, AuthFailed, BadResponse
from xcloudd.clock import Clock
from xcloudd.config import Config, JobConfig, WatchConfig
from xcloudd.errors import ExitCode, XcloudError
from xcloudd.events import BuildRef, Origin, stable_event_id
from xcloudd.resolve import ResolveError
from xcloudd.resources import RUN_FIELDS, BuildRun
from xcloudd.runtime import Runtime, build_sinks, open_runtime
from xcloudd.schedule import Schedule, build_schedule, missed_between
from xcloudd.starter import Starter, StartRequest, Target, resolve_target
from xcloudd.store import Intent, Mark, Store, parse_iso
from xcloudd.watcher import Outcome, Watcher

STOP_GRACE_S = 5.0
# How many of a watched workflow's newest runs one discovery poll reads.
DISCOVERY_PAGE = 20


def notify_systemd(message: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, if systemd gave one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(message.encode())


class StoreLedger:
    """The watcher's progress, made durable; writes only when something changed."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._progress: dict[str, str] = {}

    def emitted(self, run_id: str, mark: Mark) -> None:
        self._store.mark(run_id, mark)

    def observed(self, run_id: str, run: BuildRun | None, finished: bool) -> None:
        progress = run.progress if run else "UNKNOWN"
        if finished:
            self._progress.pop(run_id, None)
        elif self._progress.get(run_id) == progress:
            return
        else:
            self._progress[run_id] = progress
        self._store.update_run(
            run_id,
            number=run.number if run else None,
            progress=progress,
            completion_status=run.completion_status if run else None,
            finished=finished,
        )


@dataclass
class _JobState:
    job: JobConfig
    schedule: Schedule | None
    request: StartRequest | None = None
    buffered: datetime | None = None
    running: set[str] = field(default_factory=set)


class Daemon:
    def __init__(self, rt: Runtime, store: Store) -> None:
        self._rt = rt
        self._store = store
        self._emit = rt.emitter.emit
        self._watcher = Watcher(
            rt.client, rt.emitter, rt.clock, rt.config.polling, ledger=StoreLedger(store)
        )
        self._starter = Starter(rt.client, rt.emitter, rt.clock, is_known=store.knows_run)
        self._jobs: dict[str, _JobState] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._starts: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._fatal: XcloudError | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the daemon to shut down (what SIGTERM does)."""
        self._stop.set()

    async def run(self) -> ExitCode:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            for job in self._rt.config.jobs:
                schedule = build_schedule(
                    job_name=job.name,
                    cron=job.cron,
                    every=job.every,
                    at=job.at,
                    timezone=job.timezone,
                    jitter=job.jitter,
                )
                self._jobs[job.name] = _JobState(job, schedule)
            self._spawn(self._watcher.run())
            self._emit("daemon.started", version=__version__, jobs=len(self._jobs))
            notify_systemd("READY=1\nSTATUS=following builds")
            await self._recover()
            for state in self._jobs.values():
                if state.schedule is not None:
                    self._spawn(self._fire_loop(state))
            for index, watch in enumerate(self._rt.config.watches):
                self._spawn(self._discover_loop(index, watch))
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self._shutdown()
        return self._fatal.exit_code if self._fatal else ExitCode.OK

    def _spawn(self, coro: object, *, start: bool = False) -> None:
        assert asyncio.iscoroutine(coro)
        task: asyncio.Task[None] = asyncio.create_task(coro)
        bucket = self._starts if start else self._tasks
        bucket.add(task)
        task.add_done_callback(bucket.discard)
        task.add_done_callback(self._check_task)

    def _check_task(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, AuthFailed):
            # Every request will fail the same way: stop, and let the exit code say why.
            self._fatal = exc
            self._stop.set()
        elif exc is not None:
            self._fatal = XcloudError(f"internal error: {type(exc).__name__}: {exc}")
            self._stop.set()

    async def _shutdown(self) -> None:
        notify_systemd("STOPPING=1")
        self._emit("daemon.stopping", version=__version__, jobs=len(self._jobs))
        for task in list(self._tasks):
            task.cancel()
        # A POST under way gets a few seconds: cutting it off would only make its outcome unknown.
        if self._starts:
            await asyncio.wait(list(self._starts), timeout=STOP_GRACE_S)
            for task in list(self._starts):
                task.cancel()
        await asyncio.gather(*self._tasks, *self._starts, return_exceptions=True)
        self._emit("daemon.stopped", version=__version__, jobs=len(self._jobs))

    # --- recovery ----------------------------------------------------------------------------

    async def _recover(self) -> None:
        for job, planned, outcome, reason in self._store.unannounced():
            self._announce(job, planned, outcome, reason)
        for rec in self._store.runs_in_flight():
            ref = BuildRef(rec.run_id, rec.number, rec.workflow_id, rec.job, _origin(rec.origin))
            self._follow(
                ref,
                created_emitted=rec.created_emitted,
                started_emitted=rec.started_emitted,
                born=parse_iso(rec.created_at or rec.first_seen).timestamp(),
            )
        for intent in self._store.pending_intents():
            self._spawn(self._finish_intent(intent), start=True)
        for job, planned in self._store.held():
            held = self._jobs.get(job)
            if held is None or held.buffered is not None:
                continue
            if held.running:
                held.buffered = planned  # fired when the job's running build ends
            else:
                self._spawn(self._fire(held, planned), start=True)
        now = self._now()
        for state in self._jobs.values():
            self._catch_up(state, now)

    async def _finish_intent(self, intent: Intent) -> None:
        """A start whose outcome died with the previous process: find its run, or POST."""
        req = StartRequest(
            workflow_id=intent.workflow_id,
            git_reference_id=intent.git_reference_id,
            pull_request_id=intent.pull_request_id,
            rebuild_of=intent.rebuild_of,
            clean=intent.clean,
            job=intent.job,
            origin=_origin(intent.origin),
        )
        state = self._jobs.get(intent.job or "")
        if state is not None:
            state.running.add(intent.id)
        try:
            run = await self._starter.reconcile(req, parse_iso(intent.sent_at))
            if run is not None:
                self._adopt(req, run, intent.id, reconciled=True, emitted=False)
            else:
                # Nothing was created: the POST never left, or was refused. Send it now.
                await self._post(req, intent.id)
        finally:
            if state is not None:
                state.running.discard(intent.id)

    def _catch_up(self, state: _JobState, now: datetime) -> None:
        """Occurrences missed while down: at most one build (if young enough), the rest counted."""
        job, schedule = state.job, state.schedule
        if schedule is None:
            return
        last = self._store.last_planned(job.name)
        if last is None:
            # First start of this job: nothing was promised before now.
            self._store.decide_missed(job.name, now)
            return
        missed = missed_between(schedule, last, now)
        if missed.count == 0 or missed.newest is None:
            return
        newest = missed.newest
        fire_newest = job.enabled and now - newest <= timedelta(seconds=job.catch_up)
        count = missed.count - (1 if fire_newest else 0)
        if count > 0:
            self._emit(
                "schedule.missed",
                job=job.name,
                count=count,
                oldest=missed.oldest.isoformat() if missed.oldest else None,
                capped=missed.capped,
                event_id=stable_event_id(f"{job.name}@{newest.isoformat()}", "schedule.missed"),
            )
        if fire_newest:
            # Its decision moves the job's mark past everything counted above.
            self._spawn(self._fire(state, newest), start=True)
        else:
            self._store.decide_missed(job.name, newest)

    # --- firing ------------------------------------------------------------------------------

    async def _fire_loop(self, state: _JobState) -> None:
        assert state.schedule is not None
        previous: datetime | None = None
        while True:
            after = max(
                t
                for t in (self._store.last_planned(state.job.name), previous, self._now())
                if t is not None
            )
            planned = state.schedule.next_after(after)
            if planned is None:
                return
            await self._rt.clock.sleep((planned - self._now()).total_seconds())
            previous = planned
            self._spawn(self._fire(state, planned), start=True)

    async def _fire(self, state: _JobState, planned: datetime) -> None:
        job = state.job
        if self._store.occurrence(job.name, planned) not in (None, "held"):
            return
        if not job.enabled:
            self._decide(job.name, planned, "skipped", "disabled")
            return
        if self._held_by_overlap(state, planned):
            return
        try:
            req = await self._request(state)
        except (ResolveError, ApiError, ApiUnavailable, BadResponse) as exc:
            # The occurrence fires, but cannot start a build: say why, once.
            if self._decide(job.name, planned, "fired", str(exc)[:500]):
                self._emit(
                    "build.start_failed",
                    job=job.name,
                    workflow_id=None,
                    origin="schedule",
                    http_status=getattr(exc, "status", None),
                    error_code=None,
                    detail=str(exc),
                    pointer=None,
                )
            return
        # Resolving names awaited the API: a start of this job may have begun meanwhile.
        if self._held_by_overlap(state, planned):
            return
        intent_id = self._store.record_intent(
            job=job.name,
            planned=planned,
            decide=True,
            origin="schedule",
            workflow_id=req.workflow_id,
            git_reference_id=req.git_reference_id,
            pull_request_id=req.pull_request_id,
            rebuild_of=req.rebuild_of,
            clean=req.clean,
            sent_at=self._now(),
        )
        if intent_id is None:
            return
        self._announce(job.name, planned, "fired", None)
        state.running.add(intent_id)
        try:
            await self._post(req, intent_id)
        finally:
            state.running.discard(intent_id)

    def _held_by_overlap(self, state: _JobState, planned: datetime) -> bool:
        """True when a build of this job runs and `overlap` says not to start another now."""
        job = state.job
        if not state.running or job.overlap == "allow_all":
            return False
        if job.overlap == "buffer_one" and state.buffered in (None, planned):
            # Held in the store, so a crash cannot lose it: the next process fires it.
            state.buffered = planned
            self._store.decide(job.name, planned, "held")
            return True
        self._decide(job.name, planned, "skipped", "overlap")
        return True

    def _decide(
        self, job: str, planned: datetime, outcome: Literal["fired", "skipped"], reason: str | None
    ) -> bool:
        if not self._store.decide(job, planned, outcome, reason):
            return False
        self._announce(job, planned, outcome, reason)
        return True

    def _announce(self, job: str, planned: datetime, outcome: str, reason: str | None) -> None:
        """The occurrence's one schedule event (stable id), then its mark in the store."""
        key = f"{job}@{planned.astimezone(UTC).isoformat()}"
        if outcome == "skipped":
            self._emit(
                "schedule.skipped",
                job=job,
                scheduled_for=planned.isoformat(),
                reason=reason,
                event_id=stable_event_id(key, "schedule.skipped"),
            )
        else:
            self._emit(
                "schedule.fired",
                job=job,
                scheduled_for=planned.isoformat(),
                event_id=stable_event_id(key, "schedule.fired"),
            )
        self._store.occurrence_emitted(job, planned)

    async def _request(self, state: _JobState) -> StartRequest:
        if state.request is None:
            req = await resolve_target(self._rt.resolver, Target.of_job(state.job))
            state.request = replace(req, origin="schedule")
        return state.request

    async def _post(self, req: StartRequest, intent_id: str) -> None:
        try:
            started = await self._starter.start(req)
        except ApiError:
            # Apple refused: nothing was created. The starter has emitted build.start_failed.
            self._store.finish_intent(intent_id, "failed")
            return
        except ApiUnavailable:
            # Left pending on purpose: the next start-up reconciles it.
            return
        self._adopt(req, started.run, intent_id, reconciled=started.reconciled, emitted=True)

    def _adopt(
        self,
        req: StartRequest,
        run: BuildRun,
        intent_id: str,
        *,
        reconciled: bool,
        emitted: bool,
    ) -> None:
        ref = BuildRef(run.id, run.number, req.workflow_id, req.job, req.origin)
        if not emitted:
            self._emit(
                "build.created",
                build=ref,
                event_id=stable_event_id(run.id, "build.created"),
                reconciled=reconciled,
                start_reason=run.start_reason,
            )
        self._store.add_run(
            run_id=run.id,
            number=run.number,
            workflow_id=req.workflow_id,
            job=req.job,
            origin=req.origin,
            created_at=run.created,
            intent_id=intent_id,
            created_emitted=True,
        )
        self._follow(ref, created_emitted=True, known=run)

    def _follow(
        self,
        ref: BuildRef,
        *,
        created_emitted: bool,
        started_emitted: bool = False,
        known: BuildRun | None = None,
        born: float | None = None,
    ) -> None:
        done = self._watcher.follow(
            ref,
            known=known,
            created_emitted=created_emitted,
            started_emitted=started_emitted,
            born=born,
        )
        state = self._jobs.get(ref.job or "")
        if state is not None:
            state.running.add(ref.build_run_id)
        done.add_done_callback(lambda fut: self._done(ref, fut))

    def _done(self, ref: BuildRef, fut: asyncio.Future[Outcome]) -> None:
        error = None if fut.cancelled() else fut.exception()
        if isinstance(error, AuthFailed):
            self._fatal = error
            self._stop.set()
        state = self._jobs.get(ref.job or "")
        if state is None:
            return
        state.running.discard(ref.build_run_id)
        if state.buffered is not None and not state.running:
            planned, state.buffered = state.buffered, None
            self._spawn(self._fire(state, planned), start=True)

    # --- watched workflows -------------------------------------------------------------------

    async def _discover_loop(self, index: int, watch: WatchConfig) -> None:
        try:
            flow = await self._rt.resolver.workflow(watch.workflow, watch.product)
        except (ResolveError, ApiError) as exc:
            raise XcloudError(f"{self._rt.config.path}: watches[{index}]: {exc}") from None
        while True:
            with contextlib.suppress(ApiUnavailable, BadResponse):
                await self._discover(flow.id)
            await self._rt.clock.sleep(self._rt.config.polling.interval)

    async def _discover(self, workflow_id: str) -> None:
        page = await self._rt.client.get(
            f"/v1/ciWorkflows/{workflow_id}/buildRuns",
            {"sort": "-number", "limit": str(DISCOVERY_PAGE), "fields[ciBuildRuns]": RUN_FIELDS},
        )
        runs = [BuildRun.parse(r) for r in page.get("data") or [] if isinstance(r, dict)]
        highest = self._store.cursor(workflow_id)
        if highest is None:
            # First look at this workflow: what ran before xcloudd watched it is history.
            top = max((r.number or 0 for r in runs), default=0)
            self._store.set_cursor(workflow_id, top)
            return
        if self._store.has_pending_intents(workflow_id):
            # One of ours may be in this list, not yet recorded: look again next round.
            return
        for run in sorted(runs, key=lambda r: r.number or 0):
            if (run.number or 0) <= highest or self._store.knows_run(run.id):
                continue
            if self._store.add_run(
                run_id=run.id,
                number=run.number,
                workflow_id=workflow_id,
                job=None,
                origin="watch",
                created_at=run.created,
            ):
                ref = BuildRef(run.id, run.number, workflow_id, None, "watch")
                self._follow(ref, created_emitted=False, known=run)
        top = max((r.number or 0 for r in runs), default=highest)
        if top > highest:
            self._store.set_cursor(workflow_id, top)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._rt.clock.time(), tz=UTC)


def _origin(value: str) -> Origin:
    return "schedule" if value == "schedule" else "watch" if value == "watch" else "manual"


async def run_daemon(config: Config, *, clock: Clock | None = None) -> ExitCode:
    """Open the store and the runtime, and run until SIGTERM/SIGINT (or a fatal error)."""
    store = Store.open(config.state.path)
    try:
        async with open_runtime(config, sinks=build_sinks(config.sinks), clock=clock) as rt:
            return await Daemon(rt, store).run()
    finally:
        store.close()
