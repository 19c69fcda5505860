"""The bench process's side: a world of products and workflows, the simulator served on scaled
time with a tap on its traffic, the fixed-interval baseline poller, and the daemon run in this
process or in a child process (bench/_daemon.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from common import BENCH_DIR, Detected, EventTail, ScaledClock, api_section, write_config
from xcloudd.api import endpoint_class
from xcloudd.config import load_config
from xcloudd.daemon import Daemon
from xcloudd.errors import ExitCode
from xcloudd.runtime import build_sinks, open_runtime
from xcloudd.simulator import (
    ApiKey,
    BuildRun,
    RunningSimulator,
    Scenario,
    mint_token,
    running_simulator,
    scenario_from_dict,
)
from xcloudd.simulator.traffic import TrafficEntry, TrafficLog

# How often the bench looks at files and counters while it waits (real seconds).
LOOK_S = 0.02


def world(products: int, workflows: int, *, rate_limit: int, seed: int) -> Scenario:
    """`products` products with `workflows` workflows each (outcomes in turn, mostly green)."""
    return scenario_from_dict(
        {
            "rate_limit": rate_limit,
            "seed": seed,
            "products": [
                {
                    "name": f"Product {p + 1}",
                    "repository": {"owner": "bench", "name": f"app-{p + 1}", "branches": ["main"]},
                    "workflows": [
                        {"name": f"Workflow {w + 1}", "outcomes": ["SUCCEEDED", "FAILED"]}
                        for w in range(workflows)
                    ],
                }
                for p in range(products)
            ],
        },
        "<benchmark world>",
    )


def true_times(run: BuildRun) -> tuple[float | None, float]:
    """When the run really started (None: it never did) and finished: its ground truth."""
    truth = run.progress(math.inf)
    assert truth.finished_at is not None  # every run completes, given time
    return truth.started_at, truth.finished_at


def workflow_ids(scenario: Scenario) -> list[list[str]]:
    """Workflow ids by product, in the scenario's order."""
    return [[w.id for w in p.workflows] for p in scenario.products]


# -- traffic -------------------------------------------------------------------------------------


class Tap(TrafficLog):
    """The simulator's traffic log made to keep nothing: each entry goes to the observers
    (kept whole, a benchmark's answers would fill memory with JSON bodies)."""

    def __init__(self) -> None:
        super().__init__(0)
        self.observers: list[Callable[[TrafficEntry], None]] = []

    def append(self, entry: TrafficEntry) -> None:
        super().append(entry)
        for observe in self.observers:
            observe(entry)


def run_of(path: str) -> str | None:
    """The build run a per-run path is about (/v1/ciBuildRuns/{id}[/...]); None otherwise."""
    parts = path.split("/")
    if len(parts) >= 4 and parts[1] == "v1" and parts[2] == "ciBuildRuns" and parts[3]:
        return parts[3]
    return None


def runs_shown(body: Any) -> Iterable[str]:
    """Ids of the build runs an answer shows (one run, or a page of a run list)."""
    data = body.get("data") if isinstance(body, dict) else None
    items = data if isinstance(data, list) else [data]
    for item in items:
        if isinstance(item, dict) and item.get("type") == "ciBuildRuns":
            yield str(item.get("id"))


@dataclass(frozen=True)
class Request:
    time: float  # virtual, when answered
    run_id: str | None  # the run a per-run path is about; None for lists and everything else
    status: int | None  # None: dropped without an answer
    endpoint: str = ""  # "GET /v1/ciBuildRuns/{id}": what kind of request


@dataclass
class Requests:
    """Every /v1 request one key made, and which run lists it has had answered."""

    key_id: str
    keep: bool = True  # False: only count (long runs at scale)
    log: list[Request] = field(default_factory=list)
    listed: set[str] = field(default_factory=set)
    count: int = 0
    by_status: Counter[str] = field(default_factory=Counter)

    def __call__(self, entry: TrafficEntry) -> None:
        if entry.key_id != self.key_id:
            return
        self.count += 1
        self.by_status[str(entry.status)] += 1
        if self.keep:
            endpoint = endpoint_class(entry.method, entry.path)
            self.log.append(Request(entry.time, run_of(entry.path), entry.status, endpoint))
        if entry.status == 200 and entry.path.endswith("/buildRuns"):
            self.listed.add(entry.path)

    def has_looked(self, product_id: str, workflow_id: str) -> bool:
        """Whether a run list that covers this workflow was answered (its own or its
        product's): the daemon's first look, whichever way it reads."""
        return (
            f"/v1/ciWorkflows/{workflow_id}/buildRuns" in self.listed
            or f"/v1/ciProducts/{product_id}/buildRuns" in self.listed
        )

    def statuses(self, requests: Iterable[Request] | None = None) -> dict[str, int]:
        counts = Counter(str(r.status) for r in (self.log if requests is None else requests))
        return dict(sorted(counts.items()))


def counted_requests(
    requests: Requests, measured: set[str], window: tuple[float, float]
) -> list[Request]:
    """The requests that count for the measured builds: those about one of them, and those
    about no one run (lists, discovery...) made within `window`. Per-run requests for
    builds outside the measurement (the warm-up's) do not count."""
    low, high = window
    return [
        r
        for r in requests.log
        if r.run_id in measured or (r.run_id is None and low <= r.time <= high)
    ]


@asynccontextmanager
async def serve(
    scenario: Scenario, clock: ScaledClock, *, rate_limit: int, seed: int
) -> AsyncIterator[tuple[RunningSimulator, Tap]]:
    """The simulator on 127.0.0.1 (a free port), on `clock`, its traffic going to a Tap."""
    async with running_simulator(
        scenario=scenario, clock=clock, rate_limit=rate_limit, traffic_limit=0, seed=seed
    ) as running:
        tap = Tap()
        running.sim.traffic = tap
        yield running, tap


# -- the baseline --------------------------------------------------------------------------------


class Baseline:
    """A fixed-interval per-run poller, as one is usually written: given each run's id when the
    run is created (for free), it GETs the run every `interval` seconds from then on until it
    is COMPLETE. Whatever an answer is (a 429 included), it waits for its next tick."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        running: RunningSimulator,
        key: ApiKey,
        clock: ScaledClock,
        interval: float,
    ) -> None:
        self._session = session
        self._url = running.url
        self._key = key
        self._clock = clock
        self.interval = interval
        self.detected = Detected.empty()
        self._tasks: set[asyncio.Task[None]] = set()
        self._token = ("", 0.0)

    def follow(self, run_id: str, since: float) -> None:
        task = asyncio.create_task(self._poll(run_id, since))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _poll(self, run_id: str, since: float) -> None:
        tick = 0
        while True:
            await self._clock.sleep_until(since + tick * self.interval)
            tick += 1
            attributes = await self._get(run_id)
            now = self._clock.time()
            if attributes.get("startedDate"):
                self.detected.started.setdefault(run_id, now)
            if attributes.get("executionProgress") == "COMPLETE":
                self.detected.completed.setdefault(run_id, now)
                return

    async def _get(self, run_id: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._bearer()}"}
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with self._session.get(
                f"{self._url}/v1/ciBuildRuns/{run_id}", headers=headers
            ) as r:
                body = await r.json(content_type=None)
                if r.status == 200 and isinstance(body, dict):
                    attributes = body.get("data", {}).get("attributes", {})
                    return attributes if isinstance(attributes, dict) else {}
        return {}

    def _bearer(self) -> str:
        # A token lasts 15 minutes; a new one every 10 (virtual) keeps signing off the hot path.
        token, made = self._token
        now = self._clock.time()
        if now - made > 600:
            token = mint_token(self._key, now)
            self._token = (token, now)
        return token

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# -- waiting -------------------------------------------------------------------------------------


async def wait_until(
    check: Callable[[], bool],
    *,
    what: str,
    within: float,
    alive: Callable[[], str | None] | None = None,
) -> None:
    """Until `check()` holds, looking every LOOK_S; TimeoutError after `within` real seconds.
    `alive` says why the daemon is gone (then this raises at once), or None while it runs."""
    deadline = time.monotonic() + within
    while not check():
        gone = alive() if alive is not None else None
        if gone is not None:
            raise RuntimeError(f"while waiting for {what}: {gone}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {within:.0f} s")
        await asyncio.sleep(LOOK_S)


async def wait_for_first_look(
    requests: Requests,
    products: Mapping[str, list[str]],
    *,
    within: float,
    alive: Callable[[], str | None] | None = None,
) -> None:
    """Until the daemon has read a run list covering every watched workflow: runs created
    before that are history to it, and would not be followed."""
    await wait_until(
        lambda: all(
            requests.has_looked(product, wf) for product, wfs in products.items() for wf in wfs
        ),
        what="the daemon's first look at every watched workflow",
        within=within,
        alive=alive,
    )


async def wait_for_event(
    tail: EventTail,
    detected: Detected,
    name: str,
    *,
    within: float,
    alive: Callable[[], str | None] | None = None,
) -> dict[str, Any]:
    """The first event called `name` from the file sink (build events seen meanwhile go into
    `detected`)."""
    found: list[dict[str, Any]] = []

    def look() -> bool:
        events = tail.read()
        detected.take(events)
        found.extend(e for e in events if e.get("event") == name)
        return bool(found)

    await wait_until(look, what=f"the daemon's {name} event", within=within, alive=alive)
    return found[0]


# -- the daemon ----------------------------------------------------------------------------------


@asynccontextmanager
async def daemon_in_process(
    config_path: Path, clock: ScaledClock
) -> AsyncIterator[Callable[[], str | None]]:
    """xcloudd's daemon in this process, through its real code (open_runtime + Daemon.run),
    on `clock`. Yields a function that says why the daemon has stopped (None while it runs);
    leaving the block stops it as SIGTERM would."""
    config = load_config(config_path)
    async with open_runtime(
        config, sinks=lambda s: build_sinks(config.sinks, session=s), clock=clock
    ) as rt:
        daemon = Daemon(rt)
        task = asyncio.create_task(daemon.run(), name="xcloudd daemon")

        def alive() -> str | None:
            if not task.done():
                return None
            error = task.exception() if not task.cancelled() else None
            return f"the daemon ended ({error or task.result()})"

        try:
            yield alive
        finally:
            daemon.stop()
            try:
                async with asyncio.timeout(60):
                    code = await task
            except TimeoutError:
                task.cancel()
                raise RuntimeError("the daemon did not stop within 60 s") from None
            if code != ExitCode.OK:
                raise RuntimeError(f"the daemon exited with {code!r}")


@dataclass
class ChildDaemon:
    """xcloudd's daemon in a child process (bench/_daemon.py), on the bench's virtual time."""

    proc: asyncio.subprocess.Process
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> str | None:
        if self.proc.returncode is None:
            return None
        return f"the daemon exited with {self.proc.returncode}: {self.stderr_tail()}"

    def stderr_tail(self) -> str:
        try:
            lines = self.stderr_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "(no stderr)"
        return " | ".join(lines[-5:]) or "(no stderr)"

    async def terminate(self, within: float = 60.0) -> float:
        """SIGTERM, then wait for the exit; the real seconds it took."""
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(within):
            code = await self.proc.wait()
        took = time.monotonic() - began
        if code != 0:
            raise RuntimeError(f"the daemon exited with {code} on SIGTERM: {self.stderr_tail()}")
        return took


@asynccontextmanager
async def daemon_process(
    config_path: Path, clock: ScaledClock, lag_path: Path, work: Path
) -> AsyncIterator[ChildDaemon]:
    """Start bench/_daemon.py; whatever happens, the child is gone when the block ends."""
    stderr_path = work / "daemon.stderr"
    with (work / "daemon.stdout").open("wb") as out, stderr_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(BENCH_DIR / "_daemon.py"),
            "--config",
            str(config_path),
            "--lag-file",
            str(lag_path),
            *clock.argv(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    child = ChildDaemon(proc, stderr_path)
    try:
        yield child
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def watching_config(
    work: Path,
    running: RunningSimulator,
    ids: Sequence[Sequence[str]],
    *,
    polling: Mapping[str, str | float],
    events: Path,
    server: tuple[str, str] | None = None,
) -> Path:
    """A daemon config for the simulator's key that watches every workflow in `ids`, with
    one file sink writing to `events`."""
    return write_config(
        work,
        api_section(running.write_client_files(work / "client")),
        polling=polling,
        watches=[w for wfs in ids for w in wfs],
        events_path=events,
        server=server,
    )
