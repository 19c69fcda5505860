"""`xcloudd demo`: the real daemon against the built-in simulator, for about half a minute.

A few jobs fire every few seconds with different outcomes, one of them on a branch past the
first page of git references, and a watched workflow gets builds started behind xcloudd's
back. Readable lines on a terminal, JSON lines when piped (stdout then holds nothing else: the
opening and closing lines go to stderr); Ctrl-C stops it early. `XCLOUDD_DEMO_SECONDS` sets how
long it runs (default 30).

Everything lives in a temporary directory that is deleted at the end, so the closing line names
no file: it says what the simulator ran, and which builds were still running when it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from xcloudd.config import load_config
from xcloudd.daemon import Daemon
from xcloudd.errors import ExitCode, UsageError
from xcloudd.runtime import build_sinks, open_runtime, wants_console
from xcloudd.simulator.server import RunningSimulator, running_simulator
from xcloudd.sinks import Sink

DEMO_SECONDS = 30.0
SECONDS_ENV = "XCLOUDD_DEMO_SECONDS"

_DEMO_CONFIG = """
[state]
path = "{state}"

[polling]
interval = "1s"
min_interval = "1s"
give_up_after = "5m"

[[sinks]]
type = "stdout"

[[sinks]]
type = "file"
path = "{events}"

[[jobs]]
name = "nightly"
product = "Acme Shop"
workflow = "Nightly"
branch = "main"
every = "9s"

[[jobs]]
name = "release-candidate"
product = "Acme Shop"
workflow = "CI"
branch = "release/2026.12"
every = "11s"

[[jobs]]
name = "ui-tests"
product = "Acme Shop"
workflow = "UI Tests"
branch = "develop"
every = "13s"
overlap = "skip"

[[jobs]]
name = "archive"
product = "Acme Shop"
workflow = "Archive"
tag = "v1.2.0"
every = "17s"

[[watches]]
product = "Acme Shop"
workflow = "Superseded"
"""


async def _foreign_builds(running: RunningSimulator, workflow_name: str, every: float) -> None:
    """Pushes nobody told xcloudd about."""
    sim = running.sim
    workflow = sim.scenario.workflow_named(workflow_name)
    await asyncio.sleep(3.0)
    while True:
        sim.start_run(workflow.id)
        await asyncio.sleep(every)


def demo_seconds(environ: Mapping[str, str] | None = None) -> float:
    """How long the demo runs: $XCLOUDD_DEMO_SECONDS, else DEMO_SECONDS."""
    text = (os.environ if environ is None else environ).get(SECONDS_ENV, "").strip()
    if not text:
        return DEMO_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= 24 * 3600:
        raise UsageError(f"{SECONDS_ENV}={text!r}: expected a number of seconds, e.g. 10")
    return seconds


def _jobs_by_run(events: Path) -> dict[str, str]:
    """Run id -> the job that started it, from the demo's event file (watched runs have none)."""
    jobs: dict[str, str] = {}
    if not events.exists():
        return jobs
    for line in events.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "build.created" and event.get("job"):
                jobs[str(event["build_run_id"])] = str(event["job"])
    return jobs


def summary(running: RunningSimulator, events: Path, seconds: float) -> str:
    """The closing line: what the simulator ran, and what was still running at the stop."""
    sim = running.sim
    now = sim.clock.time()
    runs = sorted(sim.runs.all(), key=lambda r: r.number)
    finished: dict[str, int] = {}
    unfinished = []
    for run in runs:
        status = run.progress(now).completion_status
        if status is None:
            unfinished.append(run)
        else:
            finished[status] = finished.get(status, 0) + 1
    counts = ", ".join(f"{n} {status.lower()}" for status, n in sorted(finished.items()))
    line = f"done after {seconds:.0f}s: the simulator ran {len(runs)} builds"
    line += f" ({counts})" if counts else ""
    if not unfinished:
        return line + "; none was still running when the demo stopped."
    jobs = _jobs_by_run(events)

    def name(run_id: str, workflow_id: str) -> str:
        if run_id in jobs:
            return jobs[run_id]
        workflow = sim.scenario.workflow(workflow_id)
        return f"{workflow.name if workflow else workflow_id} (watched)"

    named = ", ".join(f"#{r.number} {name(r.id, r.workflow_id)}" for r in unfinished)
    were = "build was" if len(unfinished) == 1 else "builds were"
    return f"{line}; {len(unfinished)} {were} still running when the demo stopped: {named}."


async def run_demo(seconds: float | None = None) -> ExitCode:
    seconds = demo_seconds() if seconds is None else seconds
    console = wants_console()
    # On a terminal everything goes to stdout; piped, stdout carries the JSON lines alone.
    notes = sys.stdout if console else sys.stderr
    with tempfile.TemporaryDirectory(prefix="xcloudd-demo-") as tmp:
        work = Path(tmp)
        # A generous hourly limit: the demo polls every second, far above a real key's budget.
        async with running_simulator(rate_limit=36_000) as running:
            config_path = running.write_client_files(work)
            events = work / "events.jsonl"
            with config_path.open("a", encoding="utf-8") as fh:
                fh.write(_DEMO_CONFIG.format(state=work / "state.db", events=events))
            config = load_config(config_path)
            print(
                f"xcloudd demo: App Store Connect simulator at {running.url};"
                f" running the daemon for {seconds:.0f}s (Ctrl-C stops it).",
                file=notes,
                flush=True,
            )
            chosen = [s for s in config.sinks if s.type != "stdout"]

            def sinks(session: aiohttp.ClientSession) -> list[Sink]:
                return build_sinks(chosen, session=session, console=console)

            foreign = asyncio.create_task(_foreign_builds(running, "Superseded", 12.0))
            began = asyncio.get_running_loop().time()
            try:
                async with open_runtime(config, sinks=sinks) as rt:
                    daemon = Daemon(rt)
                    asyncio.get_running_loop().call_later(seconds, daemon.stop)
                    code = await daemon.run()
            finally:
                foreign.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await foreign
            ran = asyncio.get_running_loop().time() - began
            print(summary(running, events, ran), file=notes, flush=True)
            return code
