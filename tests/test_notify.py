"""`xcloudd run` under systemd's notify protocol, as a real process: READY once it works,
STATUS kept current, WATCHDOG at half of $WATCHDOG_USEC and only while its loops make progress,
RELOADING/READY around SIGHUP, STOPPING at SIGTERM. The test owns the notify socket."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from procs import read_events, simulator_process

WATCHDOG_USEC = 1_000_000  # pings every 0.5 s


class NotifySocket:
    """What systemd would receive: (monotonic time, message) per datagram."""

    def __init__(self) -> None:
        # AF_UNIX paths are short: keep it out of pytest's deep tmp_path.
        self.dir = tempfile.mkdtemp(prefix="xn", dir="/tmp")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, str]] = []

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.got.append((time.monotonic(), data.decode()))

    def wait_for(self, text: str, seconds: float) -> float:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for at, message in self.got:
                if text in message.split("\n"):
                    return at
            self.pump(0.2)
        raise AssertionError(f"no {text!r} within {seconds}s; got {self.messages()}")

    def messages(self) -> list[str]:
        return [m for _, m in self.got]

    def pings(self, since: float = 0.0) -> list[float]:
        return [t for t, m in self.got if m == "WATCHDOG=1" and t >= since]

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    ns = NotifySocket()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with simulator_process(tmp_path / "sim") as running:
        yield running


def write_config(path: Path, client_config: Path, tmp: Path, jobs: str) -> None:
    path.write_text(
        client_config.read_text(encoding="utf-8")
        + f'\n[state]\npath = "{tmp / "state.db"}"\n\n[polling]\ninterval = "1s"\n'
        + f'min_interval = "1s"\n\n[[sinks]]\ntype = "file"\npath = "{tmp / "events.jsonl"}"\n\n'
        + jobs,
        encoding="utf-8",
    )


JOB = (
    '[[jobs]]\nname = "{name}"\nproduct = "Acme Shop"\nworkflow = "CI"\nbranch = "main"\n'
    'every = "{every}"\n\n'
)


def run_daemon(config: Path, ns: NotifySocket, **env: str) -> subprocess.Popen[bytes]:
    with (config.parent / "daemon.stderr").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "xcloudd", "--config", str(config), "run"],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={
                **os.environ,
                "NOTIFY_SOCKET": ns.path,
                "WATCHDOG_USEC": str(WATCHDOG_USEC),
                **env,
            },
        )


def status(config: Path) -> dict[str, Any]:
    """`xcloudd status --json`, as a script would read it."""
    out = subprocess.run(
        [sys.executable, "-m", "xcloudd", "--config", str(config), "status", "--json"],
        capture_output=True,
        check=True,
    ).stdout
    doc: dict[str, Any] = json.loads(out)
    return doc


def test_ready_status_watchdog_reload_and_stopping(
    simulator: tuple[str, Path], tmp_path: Path, notify_socket: NotifySocket
) -> None:
    _url, client_config = simulator
    config = tmp_path / "config.toml"
    write_config(config, client_config, tmp_path, JOB.format(name="ci", every="2s"))
    proc = run_daemon(config, notify_socket)
    try:
        ready = notify_socket.wait_for("READY=1", 20)
        notify_socket.pump(3.0)
        running = status(config)
        assert running["daemon"]["running"] is True
        assert running["daemon"]["pid"] == proc.pid
        # STATUS: one line about jobs, runs and the last error, sent when it changes.
        statuses = [m for m in notify_socket.messages() if m.startswith("STATUS=")]
        assert statuses
        assert statuses[0].startswith("STATUS=1 job, ")
        # WATCHDOG at half of WATCHDOG_USEC, steadily.
        pings = notify_socket.pings(ready)
        assert len(pings) >= 4
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.25 <= g <= 1.0 for g in gaps), gaps

        # SIGHUP with a second job: RELOADING=1 (with MONOTONIC_USEC), then READY=1.
        write_config(
            config,
            client_config,
            tmp_path,
            JOB.format(name="ci", every="2s") + JOB.format(name="other", every="3s"),
        )
        before = len(notify_socket.got)
        proc.send_signal(signal.SIGHUP)
        notify_socket.pump(3.0)
        after = notify_socket.messages()[before:]
        reloading = [m for m in after if m.startswith("RELOADING=1")]
        assert len(reloading) == 1
        assert reloading[0].split("\n")[1].startswith("MONOTONIC_USEC=")
        assert after.index(reloading[0]) < after.index("READY=1")

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        notify_socket.pump(0.5)
        assert "STOPPING=1" in notify_socket.messages()
        stopped = status(config)
        assert stopped["daemon"]["running"] is False
        assert stopped["daemon"]["stopped_cleanly"] is True
        human = subprocess.run(
            [sys.executable, "-m", "xcloudd", "--config", str(config), "status"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert human.startswith("daemon: not running (stopped ")
        assert "\nin flight:" not in human
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = read_events(tmp_path / "events.jsonl")
    (reloaded,) = [e for e in events if e["event"] == "daemon.reloaded"]
    assert reloaded["jobs_added"] == ["other"]
    assert any(e["event"] == "schedule.fired" and e["job"] == "other" for e in events)


def test_watchdog_pings_stop_when_a_loop_is_wedged(
    simulator: tuple[str, Path], tmp_path: Path, notify_socket: NotifySocket
) -> None:
    _url, client_config = simulator
    config = tmp_path / "config.toml"
    write_config(config, client_config, tmp_path, JOB.format(name="ci", every="1s"))
    # From 3 s after start-up on, the fire loop's work never returns: the process lives on,
    # its event loop answers, but it makes no progress.
    proc = run_daemon(config, notify_socket, XCLOUDD_FAILPOINTS="schedule=hang@3")
    try:
        ready = notify_socket.wait_for("READY=1", 20)
        notify_socket.pump(max(0.0, ready + 8.0 - time.monotonic()))
        assert proc.poll() is None, "the process itself must stay up: systemd kills it"
        assert len(notify_socket.pings(ready)) >= 2, "it pinged while it worked"
        # The wedge begins at the fire loop's first turn after 3 s (a turn a second); a loop
        # busy for two ping intervals counts as stalled, and no ping has come since.
        quiet_since = time.monotonic() - 2.0
        notify_socket.pump(0.1)
        assert notify_socket.pings(quiet_since) == []
    finally:
        proc.kill()
        proc.wait()


def test_a_second_daemon_on_the_same_state_store_is_refused(
    simulator: tuple[str, Path], tmp_path: Path, notify_socket: NotifySocket
) -> None:
    _url, client_config = simulator
    config = tmp_path / "config.toml"
    write_config(config, client_config, tmp_path, JOB.format(name="ci", every="1h"))
    first = run_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1", 20)
        second = subprocess.run(
            [sys.executable, "-m", "xcloudd", "--config", str(config), "run"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert second.returncode == 78
        lines = second.stderr.splitlines()
        assert len(lines) == 1, second.stderr
        assert f"another xcloudd daemon (pid {first.pid})" in lines[0]
        assert first.poll() is None, "the first daemon runs on"
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0
    # Once it stopped cleanly, the next one starts.
    notify_socket.got.clear()
    again = run_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1", 20)
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=20) == 0
