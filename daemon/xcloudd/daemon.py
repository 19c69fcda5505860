"""`xcloudd run`: the daemon's lifecycle. Each job is the job of another module:

    scheduler (occurrences -> intents, in the store)
      -> intents (the sweeper sends and settles every open intent)
      -> follower (polls every unfinished run in the store)   discovery (watched workflows)
      -> outbox -> delivery -> sinks
    with the store, the API client and the supervisor beside them.

This module checks what must hold before anything runs (the key works, watched workflows
exist, no other daemon uses the store), starts those loops under supervision, applies a new
config on SIGHUP, and stops them in order. `health.py` tells systemd, probes and `status` how
it goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xcloudd import __version__, notify
from xcloudd.api import ApiError, ApiUnavailable, AuthFailed, BadResponse
from xcloudd.clock import Clock
from xcloudd.config import Config, JobConfig, WatchConfig, load_config
from xcloudd.discovery import Discovery
from xcloudd.errors import ConfigError, ExitCode, XcloudError
from xcloudd.follower import Follower
from xcloudd.health import Health
from xcloudd.intents import IntentSweeper
from xcloudd.reload import Changes, compare, watch_key
from xcloudd.resolve import ResolveError, Workflow
from xcloudd.runtime import (
    Runtime,
    build_sinks,
    open_runtime,
    replace_sinks,
    sink_key,
)
from xcloudd.scheduler import JobScheduler, job_schedule
from xcloudd.starter import Starter
from xcloudd.store import StoreUnwritable
from xcloudd.supervisor import describe
from xcloudd.webhooks import Hint, WebhookReceiver

STOP_GRACE_S = 5.0
PRUNE_EVERY_S = 300.0
WATCH_RETRY_MAX_S = 300.0
# READY=1 waits this long at most for the follower to take up the runs in the store.
RESUME_WAIT_S = 30.0


def load_checked(path: Path) -> Config:
    """The config as `xcloudd run` accepts it (also what a reload reads)."""
    return load_config(path)


@dataclass
class _Watch:
    index: int
    config: WatchConfig
    workflow: Workflow | None = None

    @property
    def key(self) -> str:
        return watch_key(self.config.workflow, self.config.product)


class Daemon:
    def __init__(self, rt: Runtime, *, load: Callable[[], Config] | None = None) -> None:
        """`load` reads the config again on SIGHUP (default: the same file)."""
        self._rt = rt
        self._stop = asyncio.Event()
        config = rt.config
        self._load = load or functools.partial(load_checked, config.path)
        self.health = Health.create(rt)
        self._jobs = {job.name: job for job in config.jobs}
        starter = Starter(rt.store, rt.client, rt.resolver, rt.clock, owner=rt.owner)
        self._sweeper = IntentSweeper(
            rt.store,
            starter,
            rt.clock,
            self._jobs,
            owner=rt.owner,
            report=rt.supervisor.report,
        )
        self.follower = Follower(
            rt.store,
            rt.client,
            rt.events,
            rt.clock,
            config.polling,
            report=rt.supervisor.report,
            heartbeats=self.health.heartbeats,
            discovery=Discovery(rt.store, rt.clock),
        )
        self._watches = {w.key: w for w in (_Watch(i, c) for i, c in enumerate(config.watches))}
        self._rng = random.Random()
        self._reload_wanted = asyncio.Event()

    def stop(self) -> None:
        """Ask the daemon to shut down (what SIGTERM does)."""
        self._stop.set()

    def reload(self) -> None:
        """Read the config again and apply it (what SIGHUP does)."""
        self._reload_wanted.set()

    async def run(self) -> ExitCode:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        health = self.health
        health.started = self._rt.clock.time()
        health.jobs = len(self._jobs)
        server = self._rt.config.server
        receiver = None
        if server is not None and server.webhook_token:
            receiver = WebhookReceiver(server.webhook_token, self._hint)
        try:
            listen = await health.serve(receiver)
            await self._preflight()
            self._start_loops()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RESUME_WAIT_S):
                    await self.follower.resumed.wait()
            health.ready = True
            self._rt.emitter.emit(
                "daemon.started",
                version=__version__,
                jobs=len(self._jobs),
                **({"listen": listen} if listen else {}),
            )
            notify.notify("READY=1")
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            health.ready = False
        try:
            await self._shutdown()
        finally:
            await health.stop_serving()
        return ExitCode.OK

    async def _preflight(self) -> None:
        """Credentials once (rejected: exit 77 at once), and every watched workflow exists
        (missing: exit 78). An API outage only postpones these to the loops."""
        rt = self._rt
        await self.health.claim_store()
        try:
            await rt.client.get("/v1/ciProducts", {"limit": "1", "fields[ciProducts]": "name"})
        except AuthFailed:
            raise
        except (ApiUnavailable, ApiError, BadResponse):
            pass  # unreachable or odd now: the loops retry, and report what they see
        for watch in self._watches.values():
            await self._resolve_watch(watch, at_start=True)
        await self._settle_holds()

    async def _settle_holds(self) -> None:
        """Held occurrences of jobs that no longer buffer are counted missed."""
        rt = self._rt
        buffering = [job.name for job in self._jobs.values() if job.overlap == "buffer_one"]
        try:
            await rt.store.call(rt.store.sync.settle_orphaned_holds, buffering)
        except StoreUnwritable as exc:
            # A full disk must not stop the daemon: the next start-up settles them.
            rt.supervisor.report("start-up", exc)

    async def _resolve_watch(self, watch: _Watch, *, at_start: bool) -> None:
        """The watched workflow's id. One that does not exist is a config error; an outage (or
        a refused key, after start-up) leaves it to the watch loop to try again."""
        rt = self._rt
        try:
            watch.workflow = await rt.resolver.workflow(watch.config.workflow, watch.config.product)
            if rt.metrics is not None:
                rt.metrics.name_workflow(watch.workflow.id, watch.workflow.name)
        except AuthFailed:
            if at_start:
                raise
        except (ResolveError, ApiError) as exc:
            raise ConfigError.at(str(rt.config.path), f"watches[{watch.index}]", str(exc)) from None
        except (ApiUnavailable, BadResponse):
            if not at_start:
                raise

    def _start_loops(self) -> None:
        sup = self._rt.supervisor
        for job in self._jobs.values():
            self._start_job(job)
        sup.spawn("intents", self._sweeper.run)
        sup.spawn("follower", self.follower.run)
        for watch in self._watches.values():
            self._start_watch(watch)
        sup.spawn("prune", self._prune_loop)
        sup.spawn("reload", self._reload_loop)
        sup.spawn("status", lambda: self.health.status_loop(notify.StatusLine()))
        if notify.watchdog_interval() is not None:
            sup.spawn("watchdog", self.health.watchdog)

    def _start_job(self, job: JobConfig) -> None:
        if job_schedule(job) is not None or job.overlap == "buffer_one":
            rt = self._rt
            fire = JobScheduler(rt.store, rt.clock, job, self.health.heartbeats)
            rt.supervisor.spawn(f"schedule {job.name}", fire.run)

    def _start_watch(self, watch: _Watch) -> None:
        self._rt.supervisor.spawn(f"watch {watch.key}", functools.partial(self._watch_loop, watch))

    async def _watch_loop(self, watch: _Watch) -> None:
        """Resolve the watched workflow (an outage only delays it), then have the follower
        discover its runs in its product's looks for as long as the watch is configured."""
        rt = self._rt
        failures = 0
        while True:
            with contextlib.suppress(ApiUnavailable, ApiError, BadResponse):
                # The client has reported what went wrong (a refused key included).
                await self._resolve_watch(watch, at_start=False)
            workflow = watch.workflow
            if workflow is not None and workflow.product_id is not None:
                break
            # Not resolved (an outage, a refused key, no product named): again, more slowly.
            watch.workflow = None
            failures += 1
            delay = rt.config.polling.interval
            cap = min(WATCH_RETRY_MAX_S, delay * 2 ** min(failures, 8))
            await rt.clock.sleep(self._rng.uniform(delay, max(delay, cap)))
        workflow_id = workflow.id
        self.follower.watch(workflow_id, workflow.product_id)
        try:
            await asyncio.Event().wait()
        finally:
            self.follower.unwatch(workflow_id)

    async def _prune_loop(self) -> None:
        rt = self._rt
        while True:
            await rt.store.call(
                rt.store.sync.prune,
                [s.name for s in rt.sinks],
                max_events=rt.config.state.outbox_max_events,
                max_age=rt.config.state.outbox_max_age,
                now=rt.clock.time(),
            )
            # Housekeeping on real time: virtual-time tests need not step through it.
            await asyncio.sleep(PRUNE_EVERY_S)

    # --- webhooks ---------------------------------------------------------------------------

    def _hint(self, hint: Hint) -> None:
        """A webhook says a run changed: look at it now. The payload proves nothing: a run
        already followed is polled at once (one GET), and one not followed yet is looked for
        only in a watched workflow, through the API; anything else changes nothing."""
        self.follower.hint(hint.run_id, hint.workflow_id, hint.event_type)

    # --- reload ---------------------------------------------------------------------------

    async def _reload_loop(self) -> None:
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            await self._reload()

    async def _reload(self) -> None:
        """SIGHUP: the new config's jobs, watches, polling and sinks take effect; runs in flight
        keep being followed; an invalid config changes nothing (`daemon.reload_failed`)."""
        rt = self._rt
        notify.reloading()
        self.health.ready = False
        # logrotate sends SIGHUP too: files are reopened whether or not the new config loads.
        for sink in rt.sinks:
            sink.reopen()
        try:
            try:
                new = await asyncio.to_thread(self._load)
                changes = compare(rt.config, new, sink_key)
                watches = {
                    w.key: w for w in (_Watch(i, c) for i, c in enumerate(changes.config.watches))
                }
                for key in changes.watches.new:
                    await self._resolve_watch(watches[key], at_start=False)
            except (XcloudError, ApiUnavailable, BadResponse) as exc:
                rt.emitter.emit("daemon.reload_failed", error=describe(exc))
                return
            await self._apply(changes, watches)
            rt.emitter.emit(
                "daemon.reloaded", version=__version__, jobs=len(self._jobs), **changes.fields()
            )
        finally:
            self.health.ready = True
            self.health.jobs = len(self._jobs)
            notify.notify("READY=1")

    async def _apply(self, changes: Changes, watches: dict[str, _Watch]) -> None:
        rt = self._rt
        sup = rt.supervisor
        new = changes.config
        await sup.stop(*(f"schedule {name}" for name in changes.jobs.gone))
        for name in changes.jobs.removed:
            del self._jobs[name]
        for job in new.jobs:
            if job.name in changes.jobs.new:
                self._jobs[job.name] = job
                self._start_job(job)
        if changes.jobs:
            self._sweeper.jobs = dict(self._jobs)
            await self._settle_holds()
        await sup.stop(*(f"watch {key}" for key in changes.watches.gone))
        for key in changes.watches.gone:
            del self._watches[key]
        for key in changes.watches.new:
            self._watches[key] = watches[key]
            self._start_watch(watches[key])
        if changes.polling:
            self.follower.configure(new.polling)
        rt.config = new
        await replace_sinks(rt, new.sinks, changes.sinks)

    async def _shutdown(self) -> None:
        rt = self._rt
        notify.notify("STOPPING=1")
        rt.emitter.emit("daemon.stopping", version=__version__, jobs=len(self._jobs))
        await rt.supervisor.stop("reload", "watchdog", "status")
        await rt.supervisor.stop(*(f"schedule {name}" for name in self._jobs))
        await rt.supervisor.stop(*(f"watch {key}" for key in self._watches))
        await self._sweeper.stop(STOP_GRACE_S)
        await rt.supervisor.stop("intents", "follower", "prune")
        with contextlib.suppress(Exception):
            await self.health.beat(stopped=True)
        rt.emitter.emit("daemon.stopped", version=__version__, jobs=len(self._jobs))


async def run_daemon(config: Config, *, clock: Clock | None = None) -> ExitCode:
    """Run until SIGTERM/SIGINT. Fatal start-up problems raise XcloudError (one line, its
    exit code): rejected credentials (77), a watched workflow that does not exist or another
    daemon on the same state store (78)."""
    sinks = functools.partial(build_sinks, config.sinks)
    async with open_runtime(config, sinks=lambda s: sinks(session=s), clock=clock) as rt:
        return await Daemon(rt).run()
