"""`xcloudd run` as a real process, where only a real process shows the fault: a stdout reader
that stops reading, and a key App Store Connect refuses at start-up. Real time, kept short."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from procs import add_fault, read_events, simulator_process

F_SETPIPE_SZ = 1031  # from <fcntl.h>: Python's fcntl module names it only from 3.10 on Linux


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with simulator_process(tmp_path / "sim") as running:
        yield running


def daemon_config(client_config: Path, tmp: Path, jobs: str) -> tuple[Path, Path]:
    events = tmp / "events.jsonl"
    config = tmp / "config.toml"
    config.write_text(
        client_config.read_text(encoding="utf-8")
        + f'\n[state]\npath = "{tmp / "state.db"}"\n\n[polling]\ninterval = "1s"\n'
        + 'min_interval = "1s"\n\n[[sinks]]\ntype = "stdout"\n\n'
        + f'[[sinks]]\ntype = "file"\npath = "{events}"\n\n'
        + jobs,
        encoding="utf-8",
    )
    return config, events


JOBS = """
[[jobs]]
name = "ci"
product = "Acme Shop"
workflow = "CI"
branch = "main"
every = "1s"
overlap = "allow_all"
"""


def test_a_stdout_reader_that_stops_reading_stalls_nothing_else(
    simulator: tuple[str, Path], tmp_path: Path
) -> None:
    url, client_config = simulator
    config, events = daemon_config(client_config, tmp_path, JOBS)
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)  # a pipe that fills after a dozen lines
    daemon = subprocess.Popen(
        [sys.executable, "-m", "xcloudd", "--config", str(config), "run"],
        stdout=write_end,
        stderr=subprocess.PIPE,
    )
    os.close(write_end)
    try:
        time.sleep(8)
        assert daemon.poll() is None
        fired = [e for e in read_events(events) if e["event"] == "schedule.fired"]
        # Nobody read stdout, yet builds kept starting and the file sink kept writing.
        assert len(fired) >= 5, f"only {len(fired)} occurrences fired in 8 s"
        began = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=20)
        assert daemon.returncode == 0, stderr.decode()
        assert time.monotonic() - began < 15, "SIGTERM took too long with stdout blocked"
        assert b"Traceback" not in stderr
        assert any(e["event"] == "daemon.stopped" for e in read_events(events))
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        os.close(read_end)
    assert url


def test_a_refused_key_stops_the_daemon_at_once_with_one_line(
    simulator: tuple[str, Path], tmp_path: Path
) -> None:
    url, client_config = simulator
    config, _ = daemon_config(client_config, tmp_path, JOBS)
    add_fault(url, status=401, times=None)
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "xcloudd", "--config", str(config), "run"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 77
    assert time.monotonic() - began < 15
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("xcloudd: ")
    assert "401" in lines[0]
    assert "BEGIN" not in lines[0]
