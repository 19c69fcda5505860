"""`xcloudd demo`: the real daemon against the built-in simulator, for about half a minute.

A few jobs fire every few seconds with different outcomes, one of them on a branch past the
first page of git references, and a watched workflow gets builds started behind xcloudd's
back. Readable lines on a terminal, JSON lines when piped; Ctrl-C stops it early.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from pathlib import Path

import aiohttp

from xcloudd.config import load_config
from xcloudd.daemon import Daemon
from xcloudd.errors import ExitCode
from xcloudd.runtime import build_sinks, open_runtime, wants_console
from xcloudd.simulator.server import running_simulator
from xcloudd.sinks import Sink

DEMO_SECONDS = 30.0

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


async def _foreign_builds(running: object, workflow_name: str, every: float) -> None:
    """Pushes nobody told xcloudd about."""
    from xcloudd.simulator.server import RunningSimulator

    assert isinstance(running, RunningSimulator)
    sim = running.sim
    workflow = next(w for w in sim.scenario.workflows() if w.name == workflow_name)
    await asyncio.sleep(3.0)
    while True:
        sim.start_run(workflow.id)
        await asyncio.sleep(every)


async def run_demo(seconds: float = DEMO_SECONDS) -> ExitCode:
    console = wants_console()
    with tempfile.TemporaryDirectory(prefix="xcloudd-demo-") as tmp:
        work = Path(tmp)
        # A generous hourly limit: the demo polls every second, far above a real key's budget.
        async with running_simulator(rate_limit=36_000) as running:
            config_path = running.write_client_files(work)
            events = work / "events.jsonl"
            with config_path.open("a", encoding="utf-8") as fh:
                fh.write(_DEMO_CONFIG.format(state=work / "state.db", events=events))
            config = load_config(config_path)
            if console:
                print(
                    f"xcloudd demo: App Store Connect simulator at {running.url};"
                    f" running the daemon for {seconds:.0f}s (Ctrl-C stops it).",
                    flush=True,
                )
            chosen = [s for s in config.sinks if s.type != "stdout"]

            def sinks(session: aiohttp.ClientSession) -> list[Sink]:
                return build_sinks(chosen, session=session, console=console)

            foreign = asyncio.create_task(_foreign_builds(running, "Superseded", 12.0))
            try:
                async with open_runtime(config, sinks=sinks) as rt:
                    daemon = Daemon(rt)
                    asyncio.get_running_loop().call_later(seconds, daemon.stop)
                    code = await daemon.run()
            finally:
                foreign.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await foreign
            if console:
                lines = events.read_text(encoding="utf-8").count("\n") if events.exists() else 0
                truth = running.sim.runs
                print(
                    f"done: {lines} events written as JSON lines;"
                    f" the simulator ran {len(truth.all())} builds.",
                    file=sys.stdout,
                    flush=True,
                )
            return code
