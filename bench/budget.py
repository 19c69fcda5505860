"""Budget: 300 builds in flight on one API key limited to 3,600 requests an hour.

    .venv/bin/python bench/budget.py [--seed N] [--smoke] [--json PATH]

Apple allows a key 3,600 requests per rolling hour (the simulator's default limit, see
simulator/ratelimit.py). 300 builds are created at once after the daemon's first look, their
transitions (started, completed) spread over the window by seeded durations, and followed for
one window of virtual time by two sides at the same time, each on its own key with its own
full limit (the simulator counts per key):

- xcloudd, as a real child process (bench/_daemon.py) on scaled time, discovering the builds
  through `[[watches]]`, with the documented defaults (`polling.budget` 0.8);
- the fixed-interval per-run poller, given each run's id for free, polling every
  `polling.interval` (the same 30 s) whatever the answers (429s included).

Per side: requests, HTTP 429 answers, the share of transitions detected before the window
ended, and the worst detection latency among them (event time minus the simulator's true
transition time, on the virtual clock). Smoke: 30 builds on a key limited to 360 an hour
(the same budget per build), over 20 minutes.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from common import (
    DEFAULT_POLLING,
    Detected,
    EventTail,
    ScaledClock,
    Spread,
    base_arguments,
    fmt,
    progress,
    table,
    target,
    write_json,
)
from simside import (
    Baseline,
    Requests,
    daemon_process,
    serve,
    true_times,
    wait_for_event,
    wait_for_first_look,
    watching_config,
    workflow_ids,
    world,
)
from xcloudd.simulator import BuildRun, Simulator

NAME = "budget"
INTERVAL_S = 30.0
POLLING = DEFAULT_POLLING
PRODUCTS = 3
WORKFLOWS = 2


@dataclass(frozen=True)
class Size:
    builds: int
    rate_limit: int  # per key per rolling hour
    window_s: float
    factor: float


FULL = Size(300, 3600, 3600.0, 30.0)
SMOKE = Size(30, 360, 1200.0, 120.0)


def create_runs(
    sim: Simulator, ids: Sequence[Sequence[str]], size: Size, seed: int
) -> list[BuildRun]:
    """The builds, all at once: each starts within the window's first quarter and completes
    by 85% of it, so every transition falls inside the window."""
    rng = random.Random(seed)
    w = size.window_s
    runs = []
    for i in range(size.builds):
        product = ids[i % len(ids)]
        runs.append(
            sim.start_run(
                product[(i // len(ids)) % len(product)],
                pending_s=round(rng.uniform(60.0, 0.25 * w), 3),
                running_s=round(rng.uniform(0.1 * w, 0.6 * w), 3),
            )
        )
    return runs


@dataclass(frozen=True)
class Outcome:
    name: str
    requests: int
    throttled: int  # HTTP 429 answers
    transitions: int
    detected: int
    latency: Spread  # of the transitions detected in the window

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "http_429": self.throttled,
            "transitions": self.transitions,
            "detected_in_window": self.detected,
            "share_detected": round(self.detected / self.transitions, 4),
            "latency_s": self.latency.as_dict(),
            "worst_latency_s": self.latency.max,
        }


def outcome(
    name: str, runs: Sequence[BuildRun], detected: Detected, counts: tuple[int, int], end: float
) -> Outcome:
    """One side's figures; `counts` is (requests, 429 answers) when the window ended."""
    latencies = []
    for run in runs:
        started, finished = true_times(run)
        for seen, at in ((detected.started, started), (detected.completed, finished)):
            when = seen.get(run.id)
            if at is not None and when is not None and when <= end:
                latencies.append(when - at)
    transitions = sum(2 if true_times(r)[0] is not None else 1 for r in runs)
    return Outcome(
        name,
        *counts,
        transitions,
        len(latencies),
        Spread.of(latencies),
    )


async def measure(size: Size, seed: int) -> tuple[Outcome, Outcome]:
    clock = ScaledClock(size.factor)
    scenario = world(PRODUCTS, WORKFLOWS, rate_limit=size.rate_limit, seed=seed)
    ids = workflow_ids(scenario)
    products = {p.id: [w.id for w in p.workflows] for p in scenario.products}
    with tempfile.TemporaryDirectory(prefix="xcloudd-bench-") as tmp:
        work = Path(tmp)
        async with (
            serve(scenario, clock, rate_limit=size.rate_limit, seed=seed) as (running, tap),
            aiohttp.ClientSession() as session,
        ):
            ours = Requests(running.sim.primary_key.key_id, keep=False)
            key = running.sim.add_key()
            theirs = Requests(key.key_id, keep=False)
            tap.observers += [ours, theirs]
            events = work / "events.jsonl"
            config = watching_config(work, running, ids, polling=POLLING, events=events)
            tail, detected = EventTail(events), Detected.empty()
            poller = Baseline(session, running, key, clock, INTERVAL_S)
            try:
                async with daemon_process(config, clock, work / "lag.json", work) as child:
                    await wait_for_event(
                        tail, detected, "daemon.started", within=60, alive=child.alive
                    )
                    await wait_for_first_look(ours, products, within=60, alive=child.alive)
                    runs = create_runs(running.sim, ids, size, seed)
                    for run in runs:
                        poller.follow(run.id, run.created_at)
                    end = runs[0].created_at + size.window_s
                    progress(f"budget: {len(runs)} builds; a window of {size.window_s:g} s")
                    await clock.sleep_until(end)
                    counts = [(r.count, r.by_status.get("429", 0)) for r in (ours, theirs)]
                    gone = child.alive()
                    if gone is not None:
                        raise RuntimeError(gone)
                    await poller.aclose()
                    await child.terminate()
            finally:
                await poller.aclose()
            detected.take(tail.read())
    return (
        outcome("xcloudd", runs, detected, counts[0], end),
        outcome(f"baseline, every {INTERVAL_S:g} s", runs, poller.detected, counts[1], end),
    )


def report(
    size: Size, seed: int, smoke: bool, sides: Sequence[Outcome]
) -> tuple[str, dict[str, Any]]:
    xcloudd, baseline = sides
    text = table(
        f"Budget: {size.builds} builds in flight on one key limited to {size.rate_limit:,} "
        f"requests/hour; {size.window_s / 60:g} min window; seed {seed}"
        f"{' (smoke)' if smoke else ''}",
        ["side", "requests", "HTTP 429", "detected", "share", "p95 s", "worst s"],
        [
            [
                o.name,
                o.requests,
                o.throttled,
                f"{o.detected}/{o.transitions}",
                f"{o.detected / o.transitions:.1%}",
                o.latency.p95,
                o.latency.max,
            ]
            for o in sides
        ],
    )
    zero = xcloudd.throttled == 0
    text += (
        f"\n(latencies in virtual seconds, of the transitions detected before the window ended; "
        f"time x{size.factor:g}; each side on its own key)\n"
        f"Targets:\n  zero HTTP 429 for xcloudd ({fmt(xcloudd.throttled)}): {target(zero)}"
    )
    doc = {
        "benchmark": NAME,
        "seed": seed,
        "smoke": smoke,
        "polling": dict(POLLING),
        "builds": size.builds,
        "rate_limit_per_hour": size.rate_limit,
        "window_s": size.window_s,
        "time_factor": size.factor,
        "xcloudd": xcloudd.as_dict(),
        "baseline": baseline.as_dict() | {"interval_s": INTERVAL_S},
        "targets": {"xcloudd_zero_429": zero},
    }
    return text, doc


async def main(argv: Sequence[str]) -> int:
    args = base_arguments(NAME, "HTTP 429s and detection on one key's hourly budget.").parse_args(
        argv
    )
    size = SMOKE if args.smoke else FULL
    progress(f"budget: time x{size.factor:g}")
    sides = await measure(size, args.seed)
    text, doc = report(size, args.seed, args.smoke, sides)
    print(text)
    write_json(args.json, doc)
    progress(f"budget: results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
