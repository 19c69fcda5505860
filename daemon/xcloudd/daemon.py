"""`xcloudd run`: the daemon's lifecycle. Each job is the job of another module:

    scheduler (occurrences -> intents, in the store)
      -> intents (the sweeper sends and settles every open intent)
      -> follower (polls every unfinished run in the store)   discovery (watched workflows)
      -> outbox -> delivery -> sinks
    with the store, the API client and the supervisor beside them.

This module checks what must hold before anything runs (the key works, watched workflows
exist), starts those loops under supervision, and stops them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import signal
import socket
from dataclasses import dataclass

from xcloudd import __version__
from xcloudd.api import ApiError, ApiUnavailable, AuthFailed, BadResponse
from xcloudd.clock import Clock
from xcloudd.config import Config, WatchConfig
from xcloudd.discovery import Discovery
from xcloudd.errors import ConfigError, ExitCode
from xcloudd.follower import Follower
from xcloudd.intents import IntentSweeper
from xcloudd.resolve import ResolveError, Workflow
from xcloudd.runtime import Runtime, build_sinks, open_runtime
from xcloudd.scheduler import JobScheduler, job_schedule
from xcloudd.server import CHECK_TIMEOUT_S, Probes, Server
from xcloudd.starter import Starter
from xcloudd.store import StoreUnwritable
from xcloudd.supervisor import describe

STOP_GRACE_S = 5.0
PRUNE_EVERY_S = 300.0
WATCH_RETRY_MAX_S = 300.0


def notify_systemd(message: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, if systemd gave one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.connect(address)
        s.sendall(message.encode())


@dataclass
class _Watch:
    index: int
    config: WatchConfig
    workflow: Workflow | None = None


class Daemon:
    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._stop = asyncio.Event()
        config = rt.config
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
        )
        self._discovery = Discovery(rt.store, rt.client, rt.clock)
        self._watches = [_Watch(i, w) for i, w in enumerate(config.watches)]
        self._rng = random.Random()
        self._ready = False
        self._server: Server | None = None

    def stop(self) -> None:
        """Ask the daemon to shut down (what SIGTERM does)."""
        self._stop.set()

    async def run(self) -> ExitCode:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reopen_sinks)
        try:
            listen = await self._serve()
            await self._preflight()
            self._start_loops()
            self._ready = True
            self._rt.emitter.emit(
                "daemon.started",
                version=__version__,
                jobs=len(self._jobs),
                **({"listen": listen} if listen else {}),
            )
            notify_systemd(f"READY=1\nSTATUS=following builds for {len(self._jobs)} jobs")
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self._ready = False
        try:
            await self._shutdown()
        finally:
            if self._server is not None:
                await self._server.stop()
        return ExitCode.OK

    async def _serve(self) -> str | None:
        """Start `[server]`: probes answer from the start (not ready until the loops run)."""
        rt = self._rt
        server = rt.config.server
        if server is None or rt.metrics is None:
            return None
        self._server = Server(
            server.host,
            server.port,
            rt.metrics,
            Probes(live=self._live, ready=self._readiness, refresh=self._refresh_metrics),
        )
        try:
            return await self._server.start()
        except OSError as exc:
            self._server = None
            raise ConfigError.at(
                str(rt.config.path),
                "server.listen",
                f"cannot listen on {server.host}:{server.port}: {exc.strerror or exc}; "
                "pick a free port or stop what uses it",
            ) from None

    async def _live(self) -> dict[str, str]:
        ended = self._rt.supervisor.ended()
        return {"loops": f"ended: {', '.join(ended)}"} if ended else {}

    async def _readiness(self) -> dict[str, str]:
        rt = self._rt
        problems: dict[str, str] = {}
        if not self._ready:
            problems["daemon"] = "starting up or stopping"
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await rt.store.call(rt.store.sync.outbox_end)
        except Exception as exc:
            problems["store"] = f"the state store does not answer: {describe(exc)}"
        if rt.client.breaker_open:
            problems["api"] = "App Store Connect is unreachable; requests wait for it"
        elif rt.client.reachable is False:
            problems["api"] = "App Store Connect did not answer the last request"
        return problems

    async def _refresh_metrics(self) -> None:
        rt = self._rt
        if rt.metrics is not None:
            names = [s.name for s in rt.sinks]
            rt.metrics.live.store = await rt.store.call(rt.store.sync.stats, names)

    async def _preflight(self) -> None:
        """Credentials once (rejected: exit 77 at once), and every watched workflow exists
        (missing: exit 78). An API outage only postpones these to the loops."""
        rt = self._rt
        try:
            await rt.client.get("/v1/ciProducts", {"limit": "1", "fields[ciProducts]": "name"})
        except AuthFailed:
            raise
        except (ApiUnavailable, ApiError, BadResponse):
            pass  # unreachable or odd now: the loops retry, and report what they see
        for watch in self._watches:
            await self._resolve_watch(watch, at_start=True)
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
            if job_schedule(job) is not None or job.overlap == "buffer_one":
                sup.spawn(
                    f"schedule {job.name}", JobScheduler(self._rt.store, self._rt.clock, job).run
                )
        sup.spawn("intents", self._sweeper.run)
        sup.spawn("follower", self.follower.run)
        for watch in self._watches:
            sup.spawn(f"watch {watch.index}", functools.partial(self._watch_loop, watch))
        sup.spawn("prune", self._prune_loop)

    async def _watch_loop(self, watch: _Watch) -> None:
        rt = self._rt
        failures = 0
        while True:
            try:
                if watch.workflow is None:
                    await self._resolve_watch(watch, at_start=False)
                if watch.workflow is not None:
                    await self._discovery.look(watch.workflow.id)
                failures = 0
            except (ApiUnavailable, ApiError, BadResponse):
                failures += 1  # the client has reported it; poll again, more slowly
            delay = rt.config.polling.interval
            if failures:
                cap = min(WATCH_RETRY_MAX_S, delay * 2 ** min(failures, 8))
                delay = self._rng.uniform(delay, max(delay, cap))
            await rt.clock.sleep(delay)

    async def _prune_loop(self) -> None:
        rt = self._rt
        names = [s.name for s in rt.sinks]
        while True:
            await rt.store.call(
                rt.store.sync.prune,
                names,
                max_events=rt.config.state.outbox_max_events,
                max_age=rt.config.state.outbox_max_age,
                now=rt.clock.time(),
            )
            # Housekeeping on real time: virtual-time tests need not step through it.
            await asyncio.sleep(PRUNE_EVERY_S)

    def _reopen_sinks(self) -> None:
        for sink in self._rt.sinks:
            sink.reopen()

    async def _shutdown(self) -> None:
        rt = self._rt
        notify_systemd("STOPPING=1")
        rt.emitter.emit("daemon.stopping", version=__version__, jobs=len(self._jobs))
        await rt.supervisor.stop(*(f"schedule {name}" for name in self._jobs))
        await rt.supervisor.stop(*(f"watch {w.index}" for w in self._watches))
        await self._sweeper.stop(STOP_GRACE_S)
        await rt.supervisor.stop("intents", "follower", "prune")
        rt.emitter.emit("daemon.stopped", version=__version__, jobs=len(self._jobs))


async def run_daemon(config: Config, *, clock: Clock | None = None) -> ExitCode:
    """Run until SIGTERM/SIGINT. Fatal start-up problems raise XcloudError (one line, its
    exit code): rejected credentials (77), a watched workflow that does not exist (78)."""
    sinks = functools.partial(build_sinks, config.sinks)
    async with open_runtime(config, sinks=lambda s: sinks(session=s), clock=clock) as rt:
        return await Daemon(rt).run()
