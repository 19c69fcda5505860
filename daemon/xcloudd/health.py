"""How the daemon tells others how it is: systemd (READY, STATUS, WATCHDOG), `[server]`'s
probes and metrics, and the heartbeat in the state store that `xcloudd status` reads.

Nothing here changes what the daemon does; the heartbeat is the only thing it writes.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from xcloudd import __version__
from xcloudd.console import plural
from xcloudd.errors import ConfigError
from xcloudd.notify import Heartbeats, StatusLine, ping_while_alive, watchdog_interval
from xcloudd.runtime import Runtime
from xcloudd.server import CHECK_TIMEOUT_S, Probes, Server
from xcloudd.store import DaemonBeat
from xcloudd.supervisor import describe
from xcloudd.webhooks import WebhookReceiver

# The daemon writes its heartbeat this often (real time); `status` calls one older than
# STALE_S not current.
BEAT_EVERY_S = 15.0
STALE_S = 3 * BEAT_EVERY_S


def beat_is_current(beat: DaemonBeat, now: float) -> bool:
    return beat.stopped is None and now - beat.beat <= STALE_S


@dataclass(frozen=True)
class DaemonState:
    """What `status` says about the daemon on a store, from its heartbeat."""

    running: bool
    beat: DaemonBeat | None
    age_s: float | None  # since its last heartbeat

    def fields(self) -> dict[str, object]:
        b = self.beat
        return {
            "running": self.running,
            "pid": b.pid if b else None,
            "host": b.host if b else None,
            "version": b.version if b else None,
            "last_heartbeat": _iso(b.beat) if b else None,
            "heartbeat_age_s": None if self.age_s is None else round(self.age_s, 1),
            "stopped_cleanly": None if b is None else b.stopped is not None,
        }

    def summary(self) -> str:
        b = self.beat
        if b is None:
            return "no daemon has run on this state store"
        ago = _ago(self.age_s or 0.0)
        if self.running:
            return f"running (pid {b.pid} on {b.host}, xcloudd {b.version}, heartbeat {ago} ago)"
        if b.stopped is not None:
            return f"not running (stopped {ago} ago); what follows may be out of date"
        return (
            f"not running (last heartbeat {ago} ago, pid {b.pid} on {b.host}; it did not stop "
            "cleanly); what follows may be out of date"
        )


def daemon_state(beat: DaemonBeat | None, now: float) -> DaemonState:
    if beat is None:
        return DaemonState(False, None, None)
    running = beat_is_current(beat, now)
    if running and beat.host == socket.gethostname():
        # What cannot be told is shown as the heartbeat says: running.
        running = seen_running(beat.pid) is not False
    return DaemonState(running, beat, max(0.0, now - beat.beat))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _ago(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def seen_running(pid: int) -> bool | None:
    """Whether an xcloudd process runs with this pid: True when it is seen to, False when the
    pid is gone or belongs to another program, None when it cannot be told (another user's
    process, or /proc hidden by ProtectProc=)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return None
    try:
        return b"xcloudd" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


@dataclass
class Health:
    rt: Runtime
    heartbeats: Heartbeats
    jobs: int = 0
    ready: bool = False
    started: float = 0.0
    server: Server | None = None

    @classmethod
    def create(cls, rt: Runtime) -> Health:
        # A loop busy for longer than systemd's watchdog timeout is wedged; without a watchdog,
        # two minutes (what /livez uses).
        interval = watchdog_interval()
        late = interval * 2 if interval else 120.0
        return cls(rt, Heartbeats(rt.clock, late))

    # --- the state store's heartbeat -----------------------------------------------------

    async def claim_store(self) -> None:
        """Refuse to run beside another live daemon on the same state store (config error)."""
        rt = self.rt
        beat = await rt.store.call(rt.store.sync.daemon_beat)
        if beat is None or beat.pid == os.getpid() or beat.host != socket.gethostname():
            return
        # Only a daemon seen to run refuses this one: refusing on a guess (a pid that
        # cannot be told) would keep a restarted service down.
        if beat_is_current(beat, rt.clock.time()) and seen_running(beat.pid) is True:
            raise ConfigError.at(
                str(rt.config.path),
                "state.path",
                f"another xcloudd daemon (pid {beat.pid}) runs on {rt.config.state.path}; "
                "stop it, or give this one its own [state] path",
            )

    async def beat(self, *, stopped: bool = False) -> None:
        rt = self.rt
        await rt.store.call(
            rt.store.sync.heartbeat,
            pid=os.getpid(),
            host=socket.gethostname(),
            version=__version__,
            started=self.started,
            stopped=stopped,
        )

    async def status_loop(self, line: StatusLine) -> None:
        """STATUS= and the store's heartbeat, kept current."""
        rt = self.rt
        while True:
            try:
                await self.beat()
                flying = await rt.store.call(rt.store.sync.in_flight_count)
                text = f"{plural(self.jobs, 'job')}, {plural(flying, 'run')} in flight"
            except Exception as exc:
                text = f"{plural(self.jobs, 'job')}; the state store fails: {describe(exc)}"
            if rt.supervisor.last_error:
                text += f"; last error: {rt.supervisor.last_error}"
            line.update(text)
            # Real time: systemd and `status` look at real time, and virtual-time tests need not
            # step through it.
            await asyncio.sleep(BEAT_EVERY_S)

    async def watchdog(self) -> None:
        interval = watchdog_interval()
        assert interval is not None, "only spawned when systemd asked for a watchdog"
        rt = self.rt
        await ping_while_alive(
            self.heartbeats, interval, lambda: rt.store.call(rt.store.sync.outbox_end)
        )

    # --- [server] -----------------------------------------------------------------------------

    async def serve(self, webhooks: WebhookReceiver | None = None) -> str | None:
        """Start `[server]`: probes answer from the start (not ready until the loops run)."""
        rt = self.rt
        server = rt.config.server
        if server is None or rt.metrics is None:
            return None
        self.server = Server(
            server.host,
            server.port,
            rt.metrics,
            Probes(live=self.live, ready=self.readiness, refresh=self.refresh_metrics),
            webhooks=webhooks,
        )
        try:
            return await self.server.start()
        except OSError as exc:
            self.server = None
            raise ConfigError.at(
                str(rt.config.path),
                "server.listen",
                f"cannot listen on {server.host}:{server.port}: {exc.strerror or exc}; "
                "pick a free port or stop what uses it",
            ) from None

    async def stop_serving(self) -> None:
        if self.server is not None:
            await self.server.stop()

    async def live(self) -> dict[str, str]:
        problems: dict[str, str] = {}
        if ended := self.rt.supervisor.ended():
            problems["loops"] = f"ended: {', '.join(ended)}"
        if stalled := self.heartbeats.stalled():
            problems["progress"] = f"stalled: {', '.join(stalled)}"
        return problems

    async def readiness(self) -> dict[str, str]:
        rt = self.rt
        problems: dict[str, str] = {}
        if not self.ready:
            problems["daemon"] = "starting up, reloading or stopping"
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

    async def refresh_metrics(self) -> None:
        rt = self.rt
        if rt.metrics is not None:
            names = [s.name for s in rt.sinks]
            rt.metrics.live.store = await rt.store.call(rt.store.sync.stats, names)
