"""Scale: 100, 1,000 and 10,000 build runs in flight at once, followed by one daemon process.

    .venv/bin/python bench/scale.py [--seed N] [--smoke] [--json PATH] [--sizes 100,1000]

For each size the daemon runs as a real child process (bench/_daemon.py: `run_daemon`, the
code behind `xcloudd run`) on scaled virtual time, watching the workflows of 10 products
(2 each) in the simulator, which runs in this process with a rate limit far too high to
throttle anything. After the daemon's first look the bench creates the runs, all at once,
spread over the products, with long builds so they stay in flight; once the daemon has
written `build.created` for every one and had time to see them start, a steady window of
virtual time is measured:

- resident memory (VmRSS from /proc/<pid>/status, sampled: peak and end; VmHWM is the
  lifetime peak, start-up and discovery included);
- CPU (utime + stime from /proc/<pid>/stat) per simulated hour;
- the daemon's requests per simulated hour, and beside them a fixed-interval per-run poller's
  (run for sizes up to BASELINE_RUN_MAX on the same runs; above that computed as
  N * 3600 / interval, which is what such a poller sends);
- event-loop lag p50/p99, sampled inside the daemon's own event loop every 50 ms (real);
- whether every run was polled within its interval, from the simulator's side: for each run,
  the longest time between two answers to the daemon that showed it (a run list page or a
  GET of the run; the window's edges count as answers, so a run never shown in the window
  has the whole window as its gap);
- the real time from SIGTERM to the process's exit.

Time factor: by default the largest that keeps a per-run poller's request rate near
150 real requests a second (60 at most, 1 at least): at 10,000 runs the daemon runs in real
time. Lag is real time in a loop doing `factor` seconds of work per second, so above x1 it is
an upper bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from common import (
    Detected,
    EventTail,
    ScaledClock,
    base_arguments,
    percentile,
    progress,
    rounded,
    table,
    target,
    write_json,
)
from simside import (
    Baseline,
    ChildDaemon,
    Requests,
    Tap,
    daemon_process,
    runs_shown,
    serve,
    wait_for_event,
    wait_for_first_look,
    wait_until,
    watching_config,
    workflow_ids,
    world,
)
from xcloudd.simulator import RunningSimulator, Simulator
from xcloudd.simulator.traffic import TrafficEntry

NAME = "scale"
PRODUCTS = 10
WORKFLOWS = 2
RATE_LIMIT = 10_000_000
INTERVAL_S = 30.0
# A fixed 30 s cadence (min = interval = max): the runs here have no history and would otherwise
# be looked at less often as they age; fixed, any gap over 30 s is the daemon falling behind.
POLLING: Mapping[str, str | float] = {
    "interval": "30s",
    "min_interval": "30s",
    "max_interval": "30s",
    "budget": 0.8,
}
FULL_SIZES = (100, 1_000, 10_000)
SMOKE_SIZES = (100,)
WINDOW_S = 240.0  # virtual: eight intervals
SMOKE_WINDOW_S = 90.0
PENDING_MAX_S = 20.0
BASELINE_RUN_MAX = 1_000
BASELINE_WINDOW_S = 2 * INTERVAL_S
# A per-run poller at this many real requests a second sets the default time factor.
REAL_RATE = 150.0
SAMPLE_S = 0.25  # real: how often resident memory is read
GAP_SLACK = 0.05  # "within its interval": the longest gap at most 5% over it
TARGET_RSS_MB = 100.0
TARGET_LAG_P99_MS = 50.0


def default_factor(runs: int) -> float:
    return round(min(60.0, max(1.0, REAL_RATE * INTERVAL_S / runs)), 2)


# -- what the bench watches ----------------------------------------------------------------------


@dataclass
class Gaps:
    """For each run, the longest time between two answers to one key that showed it."""

    key_id: str
    last: dict[str, float] = field(default_factory=dict)
    longest: dict[str, float] = field(default_factory=dict)
    open: bool = False

    def start(self, now: float, run_ids: Sequence[str]) -> None:
        self.last = dict.fromkeys(run_ids, now)
        self.longest = dict.fromkeys(run_ids, 0.0)
        self.open = True

    def __call__(self, entry: TrafficEntry) -> None:
        if not self.open or entry.key_id != self.key_id or entry.status != 200:
            return
        for run_id in runs_shown(entry.response_json):
            last = self.last.get(run_id)
            if last is not None:
                self.longest[run_id] = max(self.longest[run_id], entry.time - last)
                self.last[run_id] = entry.time

    def stop(self, now: float) -> list[float]:
        self.open = False
        for run_id, last in self.last.items():
            self.longest[run_id] = max(self.longest[run_id], now - last)
        return list(self.longest.values())


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def sample_rss(pid: int, samples: list[int]) -> None:
    while True:
        samples.append(proc_status(pid)["VmRSS"])
        await asyncio.sleep(SAMPLE_S)


def lag_in(path: Path, real_window: tuple[float, float]) -> list[float]:
    """The daemon's event-loop lag samples (ms) that fall in the window."""
    low, high = real_window
    samples = json.loads(path.read_text(encoding="utf-8"))
    return [lag * 1000 for at, lag in samples if low <= at <= high]


# -- one size ------------------------------------------------------------------------------------


def create_runs(sim: Simulator, ids: Sequence[Sequence[str]], n: int, seed: int) -> list[str]:
    """n runs, round-robin over products and their workflows, each PENDING for a few seconds
    and then RUNNING for nearly Xcode Cloud's two hours."""
    rng = random.Random(seed)
    made = []
    for i in range(n):
        product = ids[i % len(ids)]
        run = sim.start_run(
            product[(i // len(ids)) % len(product)],
            pending_s=round(rng.uniform(1.0, PENDING_MAX_S), 3),
            running_s=round(7200 - rng.uniform(0, 600), 3),
        )
        made.append(run.id)
    return made


@dataclass
class Window:
    """What the steady window measured on the daemon's side."""

    virtual_s: float
    real: tuple[float, float]
    requests: int
    cpu_s: float
    rss_kb: list[int]
    hwm_kb: int
    gaps: list[float]


async def steady_window(
    child: ChildDaemon,
    clock: ScaledClock,
    *,
    requests: Requests,
    gaps: Gaps,
    runs: Sequence[str],
    length: float,
) -> Window:
    pid = child.pid
    rss: list[int] = []
    sampler = asyncio.create_task(sample_rss(pid, rss))
    try:
        v0, r0 = clock.time(), time.monotonic()
        cpu0, count0 = cpu_seconds(pid), requests.count
        gaps.start(v0, runs)
        await clock.sleep(length)
        alive = child.alive()
        if alive is not None:
            raise RuntimeError(alive)
        v1, r1 = clock.time(), time.monotonic()
        cpu1, count1 = cpu_seconds(pid), requests.count
        longest = gaps.stop(v1)
        status = proc_status(pid)
    finally:
        sampler.cancel()
    rss.append(status["VmRSS"])  # the end
    return Window(v1 - v0, (r0, r1), count1 - count0, cpu1 - cpu0, rss, status["VmHWM"], longest)


async def baseline_rate(
    running: RunningSimulator, tap: Tap, clock: ScaledClock, runs: Sequence[str], seed: int
) -> float:
    """Requests per simulated hour of a fixed-interval per-run poller on the same runs: it
    takes them up spread over one interval, then is counted for BASELINE_WINDOW_S."""
    key = running.sim.add_key()
    requests = Requests(key.key_id, keep=False)
    tap.observers.append(requests)
    rng = random.Random(seed)
    async with aiohttp.ClientSession() as session:
        poller = Baseline(session, running, key, clock, INTERVAL_S)
        try:
            start = clock.time()
            for run_id in runs:
                poller.follow(run_id, start + rng.uniform(0, INTERVAL_S))
            await clock.sleep(INTERVAL_S)
            before, began = requests.count, clock.time()
            await clock.sleep(BASELINE_WINDOW_S)
            counted, took = requests.count - before, clock.time() - began
        finally:
            await poller.aclose()
    return counted / took * 3600


async def one_size(n: int, factor: float, window_s: float, seed: int) -> dict[str, Any]:
    clock = ScaledClock(factor)
    scenario = world(PRODUCTS, WORKFLOWS, rate_limit=RATE_LIMIT, seed=seed)
    ids = workflow_ids(scenario)
    products = {p.id: [w.id for w in p.workflows] for p in scenario.products}
    with tempfile.TemporaryDirectory(prefix="xcloudd-bench-") as tmp:
        work = Path(tmp)
        async with serve(scenario, clock, rate_limit=RATE_LIMIT, seed=seed) as (running, tap):
            key_id = running.sim.primary_key.key_id
            requests, gaps = Requests(key_id, keep=False), Gaps(key_id)
            tap.observers += [requests, gaps]
            events = work / "events.jsonl"
            config = watching_config(work, running, ids, polling=POLLING, events=events)
            tail, detected = EventTail(events), Detected.empty()
            lag_path = work / "lag.json"
            async with daemon_process(config, clock, lag_path, work) as child:
                await wait_for_event(
                    tail, detected, "daemon.started", within=120, alive=child.alive
                )
                await wait_for_first_look(requests, products, within=120, alive=child.alive)
                runs = create_runs(running.sim, ids, n, seed)
                progress(f"scale {n:,}: runs created; waiting for build.created of each")

                def all_created() -> bool:
                    detected.take(tail.read())
                    return len(detected.created) >= n

                await wait_until(
                    all_created,
                    what=f"build.created for all {n} runs",
                    within=120 + n / 10,
                    alive=child.alive,
                )
                # Every run has started and been looked at since before the window opens.
                await clock.sleep(PENDING_MAX_S + INTERVAL_S)
                progress(f"scale {n:,}: steady window of {window_s:g} s (virtual)")
                window = await steady_window(
                    child, clock, requests=requests, gaps=gaps, runs=runs, length=window_s
                )
                stop_s = await child.terminate()
            lag = lag_in(lag_path, window.real)
            measured_baseline = n <= BASELINE_RUN_MAX
            if measured_baseline:
                progress(f"scale {n:,}: baseline poller")
                baseline = await baseline_rate(running, tap, clock, runs, seed)
            else:
                baseline = n * 3600 / INTERVAL_S
            statuses = dict(requests.by_status)
    per_hour = 3600 / window.virtual_s
    over = sum(g > INTERVAL_S * (1 + GAP_SLACK) for g in window.gaps)
    return {
        "runs": n,
        "time_factor": factor,
        "window_s": round(window.virtual_s, 1),
        "rss_mb": {
            "peak": round(max(window.rss_kb) / 1024, 1),
            "end": round(window.rss_kb[-1] / 1024, 1),
            "lifetime_peak": round(window.hwm_kb / 1024, 1),
        },
        "cpu_s_per_sim_hour": round(window.cpu_s * per_hour, 1),
        "requests_per_sim_hour": round(window.requests * per_hour),
        "baseline_requests_per_sim_hour": round(baseline),
        "baseline_computed": not measured_baseline,
        "event_loop_lag_ms": {
            "samples": len(lag),
            "p50": rounded(percentile(lag, 50), 2),
            "p99": rounded(percentile(lag, 99), 2),
            "max": rounded(max(lag, default=0.0), 2),
        },
        "poll_gap_s": {
            "interval": INTERVAL_S,
            "max": rounded(max(window.gaps, default=0.0)),
            "p99": rounded(percentile(window.gaps, 99)),
            "runs_over_interval": over,
            "all_within_interval": over == 0,
        },
        "sigterm_to_exit_s": round(stop_s, 3),
        "statuses": statuses,
    }


# -- report --------------------------------------------------------------------------------------


def report(sizes: Sequence[dict[str, Any]], seed: int, smoke: bool) -> tuple[str, dict[str, Any]]:
    rows = [
        [
            s["runs"],
            s["time_factor"],
            s["rss_mb"]["peak"],
            s["rss_mb"]["end"],
            s["cpu_s_per_sim_hour"],
            s["requests_per_sim_hour"],
            f"{s['baseline_requests_per_sim_hour']:,}"
            + (" (computed)" if s["baseline_computed"] else ""),
            s["event_loop_lag_ms"]["p50"],
            s["event_loop_lag_ms"]["p99"],
            s["poll_gap_s"]["max"],
            s["poll_gap_s"]["runs_over_interval"],
            s["sigterm_to_exit_s"],
        ]
        for s in sizes
    ]
    text = table(
        f"Scale: runs in flight followed by one daemon process; {PRODUCTS} products x "
        f"{WORKFLOWS} workflows, polling.interval {INTERVAL_S:g} s; seed {seed}"
        f"{' (smoke)' if smoke else ''}",
        [
            "runs",
            "time x",
            "RSS peak MB",
            "RSS end MB",
            "CPU s/sim h",
            "req/sim h",
            "baseline req/sim h",
            "lag p50 ms",
            "lag p99 ms",
            "max gap s",
            "runs > interval",
            "SIGTERM->exit s",
        ],
        rows,
    )
    largest = max(sizes, key=lambda s: s["runs"])
    targets = {
        "runs": largest["runs"],
        "rss_under_100mb": largest["rss_mb"]["peak"] < TARGET_RSS_MB,
        "lag_p99_under_50ms": (largest["event_loop_lag_ms"]["p99"] or 0.0) < TARGET_LAG_P99_MS,
        "each_run_polled_within_interval": largest["poll_gap_s"]["all_within_interval"],
    }
    text += (
        f"\n(max gap: the longest time a run went without an answer that showed it, virtual; "
        f"'> interval' counts runs more than {GAP_SLACK:.0%} over; baseline: a fixed-interval "
        f"per-run poller, run on the same runs up to {BASELINE_RUN_MAX:,}, computed above)\n"
        f"Targets at {largest['runs']:,} runs:\n"
        f"  resident memory {largest['rss_mb']['peak']} MB (< {TARGET_RSS_MB:g} MB): "
        f"{target(targets['rss_under_100mb'])}\n"
        f"  event-loop lag p99 {largest['event_loop_lag_ms']['p99']} ms "
        f"(< {TARGET_LAG_P99_MS:g} ms): {target(targets['lag_p99_under_50ms'])}\n"
        f"  each run polled within its interval (max gap {largest['poll_gap_s']['max']} s): "
        f"{target(targets['each_run_polled_within_interval'])}"
    )
    doc = {
        "benchmark": NAME,
        "seed": seed,
        "smoke": smoke,
        "polling": dict(POLLING),
        "rate_limit_per_hour": RATE_LIMIT,
        "world": {"products": PRODUCTS, "workflows_per_product": WORKFLOWS},
        "sizes": list(sizes),
        "targets": targets,
    }
    return text, doc


async def main(argv: Sequence[str]) -> int:
    parser = base_arguments(NAME, "Memory, CPU, requests and lag with many runs in flight.")
    parser.add_argument("--sizes", help="comma-separated run counts (default 100,1000,10000)")
    parser.add_argument("--factor", type=float, help="time factor for every size")
    parser.add_argument("--window", type=float, help="steady window, virtual seconds")
    args = parser.parse_args(argv)
    if args.sizes:
        sizes = tuple(int(s.replace("_", "")) for s in args.sizes.split(","))
    else:
        sizes = SMOKE_SIZES if args.smoke else FULL_SIZES
    window = args.window or (SMOKE_WINDOW_S if args.smoke else WINDOW_S)
    results = []
    for n in sizes:
        factor = args.factor or default_factor(n)
        began = time.monotonic()
        progress(f"scale {n:,}: time x{factor:g}")
        results.append(await one_size(n, factor, window, args.seed))
        results[-1]["wall_s"] = round(time.monotonic() - began, 1)
        progress(f"scale {n:,}: done in {results[-1]['wall_s']} s")
    text, doc = report(results, args.seed, args.smoke)
    print(text)
    write_json(args.json, doc)
    progress(f"scale: results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
