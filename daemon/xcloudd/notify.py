"""systemd's notify protocol without libsystemd, and the watchdog that only pings while the
daemon's loops make progress.

`sd_notify(3)`: datagrams to `$NOTIFY_SOCKET` (READY=1, RELOADING=1 with MONOTONIC_USEC,
STOPPING=1, STATUS=..., WATCHDOG=1). Without the variable every call does nothing, so the
daemon runs the same in a terminal.

The watchdog is only worth having if a wedged daemon stops pinging: a ping from a timer alone
would keep a daemon alive whose loops are stuck. So the loops that must keep going (each job's
fire loop, the follower) mark the part of each turn where they work; a loop busy for longer than
the watchdog's timeout, a state store that does not answer, or an event loop too blocked to run
the pinger means no WATCHDOG=1, and systemd restarts the service after `WatchdogSec=`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping

from xcloudd.clock import Clock


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """One datagram to $NOTIFY_SOCKET; False when there is none or it could not be sent."""
    address = (os.environ if env is None else env).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.setblocking(False)
            s.connect(address)
            s.sendall(message.encode())
    except OSError:
        return False
    return True


def reloading() -> None:
    # systemd (253+) checks that MONOTONIC_USEC is CLOCK_MONOTONIC "now"; older ones ignore it.
    notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between pings (half of $WATCHDOG_USEC), or None when systemd wants none."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2 / 1_000_000


class Heartbeats:
    """Which of the loops that must keep going is in the middle of its work, since when. A
    loop waiting for its next due time is idle, not stalled; one that stays busy longer than
    `late_s` is wedged (a store that never answers, a lost wake-up)."""

    def __init__(self, clock: Clock, late_s: float = 120.0) -> None:
        self._clock = clock
        self.late_s = late_s
        self._busy: dict[str, float] = {}

    @contextlib.contextmanager
    def busy(self, name: str) -> Iterator[None]:
        self._busy[name] = self._clock.monotonic()
        try:
            yield
        finally:
            self._busy.pop(name, None)

    def stalled(self) -> list[str]:
        now = self._clock.monotonic()
        return sorted(n for n, since in self._busy.items() if now - since > self.late_s)


async def ping_while_alive(
    heartbeats: Heartbeats,
    interval: float,
    store_answers: Callable[[], Awaitable[object]],
    *,
    send: Callable[[str], object] = notify,
) -> None:
    """WATCHDOG=1 every `interval` seconds of real time while no loop is stalled and the state
    store answers within that time."""
    while True:
        began = time.monotonic()
        try:
            async with asyncio.timeout(interval):
                await store_answers()
            healthy = not heartbeats.stalled()
        except Exception:
            healthy = False
        if healthy:
            send("WATCHDOG=1")
        # Real time on purpose: the watchdog answers to systemd's clock, not the injected one.
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - began)))


class StatusLine:
    """STATUS= kept current, sent only when it changes."""

    def __init__(self, send: Callable[[str], object] = notify) -> None:
        self._send = send
        self._last: str | None = None

    def update(self, text: str) -> None:
        text = " ".join(text.split())[:200]
        if text != self._last:
            self._last = text
            with contextlib.suppress(Exception):
                self._send(f"STATUS={text}")
