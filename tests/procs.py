"""Helpers for the tests that run xcloudd as real processes (test_crash.py, test_chaos.py).

`xcloudd simulator` and `xcloudd run` as subprocesses, the simulator's admin API (/_sim), and
read-only looks at the daemon's state store and event file.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

OPEN_INTENT_STATES = ("new", "sending", "unknown")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def simulator_process(state_dir: Path, scenario: Path | None = None) -> Iterator[tuple[str, Path]]:
    """(URL, client config path) of an `xcloudd simulator` process, stopped at the end."""
    command = [
        sys.executable,
        "-m",
        "xcloudd",
        "simulator",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--state-dir",
        str(state_dir),
    ]
    if scenario is not None:
        command += ["--scenario", str(scenario)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:
            if "stand-in at " in line:
                url = line.rsplit("stand-in at ", 1)[1].strip()
                break
        assert url, "the simulator did not print its URL"
        yield url, state_dir / "client" / "config.toml"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _admin(url: str, path: str, method: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        f"{url}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method=method,
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status < 300, f"{method} {path}: HTTP {answer.status}"
        return json.load(answer)


def sim_runs(url: str) -> list[dict[str, Any]]:
    """The simulator's ground truth: every build run, with its real progress."""
    runs: list[dict[str, Any]] = _admin(url, "/_sim/runs", "GET")["runs"]
    return runs


def sim_traffic(url: str) -> list[dict[str, Any]]:
    """Every request the simulator answered (or dropped), with the fault rule that shaped it."""
    traffic: list[dict[str, Any]] = _admin(url, "/_sim/traffic", "GET")["traffic"]
    return traffic


def add_fault(url: str, **fault: Any) -> None:
    _admin(url, "/_sim/faults", "POST", fault)


def clear_faults(url: str) -> None:
    _admin(url, "/_sim/faults", "DELETE")


def seed_simulator(url: str, seed: int) -> None:
    _admin(url, "/_sim/seed", "POST", {"seed": seed})


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`xcloudd run` on `config`, its stderr appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "xcloudd", "--config", str(config), "run"],
            stdout=subprocess.DEVNULL,
            stderr=out,
        )


@contextlib.contextmanager
def read_store(state_path: Path) -> Iterator[sqlite3.Connection]:
    """The daemon's state store, read-only (a daemon may be writing it meanwhile)."""
    conn = sqlite3.connect(f"file:{state_path}?mode=ro", uri=True)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        yield conn
    finally:
        conn.close()


def in_flight(state_path: Path) -> int:
    """Runs not finished plus starts whose outcome is not settled yet, from the state store."""
    marks = ",".join("?" * len(OPEN_INTENT_STATES))
    with read_store(state_path) as conn:
        runs = conn.execute("SELECT count(*) FROM runs WHERE finished = 0").fetchone()[0]
        intents = conn.execute(
            f"SELECT count(*) FROM intents WHERE state IN ({marks})", OPEN_INTENT_STATES
        ).fetchone()[0]
    return int(runs) + int(intents)


def read_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            events.append(json.loads(line))
    return events


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """SIGKILL a process if it is still running and reap it; its exit code."""
    if proc.poll() is None:
        proc.kill()
    return proc.wait(timeout=timeout)
