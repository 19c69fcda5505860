"""A daemon on virtual time against the in-process simulator, for tests that observe it the way a
user would: the events in a file sink, the simulator's ground truth, the store, `xcloudd status`.

Time is virtual. `SteppingClock` (a FakeClock) lets every sleeper wait for its own instant, and
`Pump` moves the clock to the earliest one only after the event loop and the store's thread have
settled (requests to the in-process simulator answered), so a day of schedule costs a few
milliseconds and the daemon sees instants in the order a real clock would give them.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import itertools
import json
import sqlite3
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conftest import SteppingClock
from xcloudd import commands
from xcloudd.config import Config, load_config
from xcloudd.daemon import Daemon
from xcloudd.errors import ExitCode
from xcloudd.runtime import Runtime, build_sinks, open_runtime
from xcloudd.simulator import RunningSimulator
from xcloudd.simulator.runs import BuildRun

# An hour boundary: every="1s"/"2s"/"1h" instants fall on whole multiples after it.
T0 = datetime(2026, 9, 1, 8, 0, tzinfo=UTC)
SETTLE_PASSES = 50


async def settle(rt: Runtime | None = None) -> None:
    """Let the event loop, the store's thread and requests on the wire finish what they can do
    at this instant."""
    quiet = 0
    while True:
        for _ in range(SETTLE_PASSES):
            await asyncio.sleep(0)
        if rt is None:
            return
        if rt.store.inflight == 0 and rt.client.exchanging == 0:
            quiet += 1
            # Quiet twice, a moment apart: what threads and sockets hand back in between
            # (a busy machine is slow to) has been taken up before time moves on.
            if quiet == 2:
                return
        else:
            quiet = 0
        await asyncio.sleep(0.0005)


class Pump:
    """Runs one Daemon on the stepping clock; `until(t)` lets virtual time reach t."""

    def __init__(self, clock: SteppingClock, daemon: Daemon, rt: Runtime) -> None:
        self.clock = clock
        self.daemon = daemon
        self.rt = rt
        self.task = asyncio.create_task(daemon.run())

    async def _step(self, limit: float) -> None:
        await settle(self.rt)
        wake = self.clock.next_wakeup()
        self.clock.advance_to(limit if wake is None else min(wake, limit))

    async def until(self, instant: datetime | float) -> None:
        end = instant.timestamp() if isinstance(instant, datetime) else instant
        while self.clock.time() < end and not self.task.done():
            await self._step(end)
        await settle(self.rt)
        if self.task.done():
            self.task.result()  # the daemon's own error, if it stopped with one
            raise AssertionError("the daemon ended on its own")

    async def stop(self) -> ExitCode:
        self.daemon.stop()
        for round_ in itertools.count():
            await settle(self.rt)
            if self.task.done():
                break
            if round_ >= 20:
                # A start under way still gets its (virtual) retry and reconcile delays.
                await self._step(self.clock.time() + 3600)
        return await self.task


class World:
    """A config for the simulator, a store, and the events of every process run on them."""

    def __init__(self, sim: RunningSimulator, clock: SteppingClock, tmp: Path) -> None:
        self.sim = sim
        self.clock = clock
        self.tmp = tmp
        self.events_path = tmp / "events.jsonl"
        self.config_path = sim.write_client_files(tmp)
        self.rt: Runtime | None = None  # the runtime of the process running now
        self.daemon: Daemon | None = None

    def configure(
        self, extra: str, *, polling: str = 'interval = "1s"\nmin_interval = "1s"'
    ) -> Config:
        base = self.config_path.read_text(encoding="utf-8").split("[state]")[0]
        self.config_path.write_text(
            base
            + f'[state]\npath = "{self.tmp / "state.db"}"\n\n[polling]\n{polling}\n\n'
            + f'[[sinks]]\ntype = "file"\npath = "{self.events_path}"\n\n'
            + extra,
            encoding="utf-8",
        )
        return load_config(self.config_path)

    async def run(self, config: Config, *steps: Any) -> ExitCode:
        """Run one daemon process: each step is an instant to reach, or a callable to call
        (and await, when it returns an awaitable)."""
        async with open_runtime(
            config, sinks=lambda s: build_sinks(config.sinks, session=s), clock=self.clock
        ) as rt:
            self.rt = rt
            pump = Pump(self.clock, Daemon(rt), rt)
            self.daemon = pump.daemon
            for step in steps:
                if callable(step):
                    result = step()
                    if inspect.isawaitable(result):
                        await result
                else:
                    await pump.until(step)
            code = await pump.stop()
        self.outbox_checked()
        return code

    def outbox_checked(self) -> None:
        """Whatever waits in the outbox has one body per id and reached the file sink."""
        conn = sqlite3.connect(self.tmp / "state.db")
        try:
            left = conn.execute("SELECT event_id FROM outbox").fetchall()
            cursor = conn.execute("SELECT seq FROM sink_cursors").fetchall()
            end = conn.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0]
        finally:
            conn.close()
        strays = [e for e in self.events("daemon.error") if e["where"] == "event loop"]
        assert strays == [], f"an exception escaped a task or callback: {strays}"
        delivered = {e["event_id"] for e in self.events()}
        assert {r[0] for r in left} <= delivered
        assert all(c[0] == end for c in cursor), "a sink was left behind at shutdown"

    def events(self, *names: str) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        out = [json.loads(line) for line in self.events_path.read_text().splitlines()]
        return [e for e in out if not names or e["event"] in names]

    def workflow_id(self, name: str) -> str:
        return next(w.id for w in self.sim.sim.scenario.workflows() if w.name == name)

    def runs(self, workflow: str, start_reason: str | None = "MANUAL") -> list[BuildRun]:
        runs = self.sim.sim.runs.of_workflow(self.workflow_id(workflow))
        return [r for r in runs if start_reason is None or r.start_reason == start_reason]

    def intents(self) -> list[tuple[str, str, str, str | None]]:
        """(job, planned, state, run_id) of every start intent in the store."""
        conn = sqlite3.connect(self.tmp / "state.db")
        try:
            rows = conn.execute("SELECT job, planned, state, run_id FROM intents").fetchall()
        finally:
            conn.close()
        return [tuple(r) for r in rows]

    def status(self) -> dict[str, Any]:
        out = io.StringIO()
        assert commands.status(load_config(self.config_path), out, as_json=True) == ExitCode.OK
        doc: dict[str, Any] = json.loads(out.getvalue())
        return doc


def job(name: str, workflow: str = "CI", **keys: str) -> str:
    lines = [
        "[[jobs]]",
        f'name = "{name}"',
        'product = "Acme Shop"',
        f'workflow = "{workflow}"',
        'branch = "main"',
    ]
    lines += [f'{key} = "{value}"' for key, value in keys.items()]
    return "\n".join(lines) + "\n\n"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def assert_each_run_once(world: World) -> None:
    """Each build run: exactly one build.created, at most one build.completed, and each
    event id written once with one body."""
    source = world.events()
    ids = Counter(e["event_id"] for e in source)
    assert all(n == 1 for n in ids.values()), ids
    created = Counter(e["build_run_id"] for e in source if e["event"] == "build.created")
    completed = Counter(e["build_run_id"] for e in source if e["event"] == "build.completed")
    assert all(n == 1 for n in created.values()), created
    assert all(n == 1 for n in completed.values()), completed
    assert set(completed) <= set(created)


def finished_at(run: BuildRun) -> float:
    return run.created_at + run.pending_s + run.running_s
