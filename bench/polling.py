"""Polling efficiency: API requests per build and detection latency, xcloudd next to a
fixed-interval per-run poller, on the same builds.

    .venv/bin/python bench/polling.py [--seed N] [--smoke] [--json PATH]

A seeded plan of builds (a few products with a few workflows each; per-workflow mean
durations, each build's own pending and running times drawn lognormal around them; builds
arriving per product at random so that several overlap) runs three times against the
simulator on scaled virtual time:

1. xcloudd, in this process through its real code, follows the builds it discovers through
   `[[watches]]` (the bench creates them in the simulator behind its back). A warm-up comes
   first, so the daemon has history in its state store; only builds created after it count.
2. The baseline: a fixed-interval poller that is given each measured run's id for free and
   GETs it every I seconds from its creation until COMPLETE, with I tuned so that its p95
   detection latency matches xcloudd's: the largest I at which its p95 on these builds would
   be at most xcloudd's (about p95 / 0.95: its latencies spread over 0..I).
3. xcloudd again, with its webhook receiver on and the simulator sending webhooks with a
   delay and a seeded loss.

Latency is the event's timestamp (the file sink's JSON lines; the baseline's clock when its
answer came) minus the simulator's true transition time, both on the virtual clock. Requests
are counted from the simulator's traffic, by API key: every request about a measured run,
plus every request about no single run (run lists, discovery, ...) made between the first
measured build's creation and that side's last detection. Virtual time runs `factor` times
faster than real time; whatever the code takes in real time counts `factor` times in the
latencies, so they are upper bounds (lower factors give tighter figures).
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
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
    percentile,
    progress,
    rounded,
    table,
    target,
    write_json,
)
from simside import (
    Baseline,
    Request,
    Requests,
    counted_requests,
    daemon_in_process,
    serve,
    true_times,
    wait_for_event,
    wait_for_first_look,
    wait_until,
    watching_config,
    workflow_ids,
    world,
)
from xcloudd.simulator import BuildRun, Simulator
from xcloudd.simulator.webhooks import WebhookSettings

NAME = "polling"
# Apple's default per-key limit, for xcloudd. The baseline gets a key without a practical
# limit: polling each run as often as it takes to match xcloudd's latency would be throttled
# (budget.py is about that), and its 429s would count as requests here.
RATE_LIMIT = 3600
BASELINE_RATE_LIMIT = 10_000_000
# xcloudd's documented defaults.
POLLING = DEFAULT_POLLING
MAX_INTERVAL_S = 300.0
WEBHOOK_DELAY_S = 2.0
WEBHOOK_LOSS = 0.05
WEBHOOK_TOKEN = "bench-webhook-token-0123456789abcdef"
# Lognormal spread of one build's durations around its workflow's mean: how long a build waits
# for a machine varies a lot, how long one workflow's build runs much less (same project, same
# steps, same machine class).
SIGMA_PENDING = 0.35
SIGMA_RUNNING = 0.12
TARGET_RATIO = 0.3
P95_SLACK_S = 0.5
TARGET_WEBHOOK_REQUESTS = 3.0
TARGET_WEBHOOK_P95_S = 1.0


@dataclass(frozen=True)
class Size:
    products: int
    workflows: int  # per product
    pending_means: tuple[float, float]  # range of the per-workflow mean queue time (s)
    running_means: tuple[float, float]  # range of the per-workflow mean build time (s)
    gap_s: float  # mean time between two builds of one product
    warmup_s: float
    span_s: float  # measured builds arrive during this long after the warm-up
    factor: float  # virtual seconds per real second
    webhook_factor: float  # lower: the webhook path is measured against 1 s


FULL = Size(3, 2, (30, 90), (240, 720), 150, 1200, 1800, 60, 30)
SMOKE = Size(2, 2, (10, 30), (60, 120), 45, 240, 300, 240, 80)


@dataclass(frozen=True)
class Build:
    at: float  # virtual seconds after the daemon's first look
    product: int
    workflow: int
    pending_s: float
    running_s: float
    warmup: bool


def plan(size: Size, seed: int) -> list[Build]:
    """The builds, the same for every side and every run with this seed."""
    rng = random.Random(seed)
    means = [
        [(rng.uniform(*size.pending_means), rng.uniform(*size.running_means)) for _ in range(w)]
        for w in [size.workflows] * size.products
    ]

    def around(mean: float, sigma: float) -> float:
        return round(rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma), 3)

    builds: list[Build] = []
    for product in range(size.products):
        at = rng.expovariate(1 / size.gap_s)
        while at < size.warmup_s + size.span_s:
            workflow = rng.randrange(size.workflows)
            pending, running = means[product][workflow]
            builds.append(
                Build(
                    round(at, 3),
                    product,
                    workflow,
                    around(pending, SIGMA_PENDING),
                    around(running, SIGMA_RUNNING),
                    at < size.warmup_s,
                )
            )
            at += rng.expovariate(1 / size.gap_s)
    return sorted(builds, key=lambda b: b.at)


# -- one side ------------------------------------------------------------------------------------


@dataclass
class Side:
    """What one side did for the measured builds."""

    name: str
    runs: dict[str, BuildRun]  # the measured builds' runs, by id
    detected: Detected
    requests: list[Request]
    statuses: dict[str, int]
    factor: float
    interval: float | None = None  # the baseline's

    def latencies(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"created": [], "started": [], "completed": []}
        for run_id, run in self.runs.items():
            started, finished = true_times(run)
            for kind, seen, at in (
                ("created", self.detected.created, run.created_at),
                ("started", self.detected.started, started),
                ("completed", self.detected.completed, finished),
            ):
                if run_id in seen and at is not None:
                    out[kind].append(seen[run_id] - at)
        return out

    def missed(self) -> int:
        """Transitions (started, completed) never detected."""
        return sum(
            (run_id not in self.detected.started) + (run_id not in self.detected.completed)
            for run_id in self.runs
        )

    def spreads(self, shift: float = 0.0) -> dict[str, Spread]:
        lat = self.latencies()
        out = {kind: Spread.of(values) for kind, values in lat.items()}
        out["all"] = Spread.of(lat["started"] + lat["completed"])
        return {kind: s.shifted(shift) for kind, s in out.items()}

    @property
    def per_build(self) -> float:
        return len(self.requests) / max(1, len(self.runs))


async def create_builds(
    sim: Simulator,
    clock: ScaledClock,
    ids: Sequence[Sequence[str]],
    builds: Sequence[Build],
    *,
    offset: float = 0.0,
    created: Callable[[BuildRun], None] | None = None,
) -> dict[str, tuple[Build, BuildRun]]:
    """Create each build at its time (`offset` earlier), behind the client's back."""
    start = clock.time()
    out: dict[str, tuple[Build, BuildRun]] = {}
    for build in builds:
        await clock.sleep_until(start + build.at - offset)
        run = sim.start_run(
            ids[build.product][build.workflow],
            pending_s=build.pending_s,
            running_s=build.running_s,
        )
        out[run.id] = (build, run)
        if created is not None:
            created(run)
    return out


def deadline_of(runs: Mapping[str, BuildRun]) -> float:
    """How long (virtual) to wait for detections: the last true completion, plus twice the
    longest interval any poller here may use."""
    return max(true_times(r)[1] for r in runs.values()) + 2 * MAX_INTERVAL_S


async def until_detected(
    clock: ScaledClock,
    runs: Mapping[str, BuildRun],
    detected: Detected,
    refresh: Callable[[], None] = lambda: None,
    alive: Callable[[], str | None] | None = None,
) -> None:
    """Until every run's completion is detected, or the deadline (what is still missing then
    is reported as missed)."""
    deadline = deadline_of(runs)

    def done() -> bool:
        refresh()
        return runs.keys() <= detected.completed.keys() or clock.time() > deadline

    real_left = (deadline - clock.time()) / clock.factor + 60
    await wait_until(done, what="the measured builds' completions", within=real_left, alive=alive)


def measured_window(runs: Mapping[str, BuildRun], detected: Detected) -> tuple[float, float]:
    """From the first measured build's creation to the side's last detection."""
    low = min(r.created_at for r in runs.values())
    seen = [detected.completed[i] for i in runs if i in detected.completed]
    high = max(seen, default=deadline_of(runs))
    if len(seen) < len(runs):
        high = max(high, deadline_of(runs))
    return low, high


async def xcloudd_side(size: Size, builds: Sequence[Build], seed: int, *, webhooks: bool) -> Side:
    factor = size.webhook_factor if webhooks else size.factor
    clock = ScaledClock(factor)
    scenario = world(size.products, size.workflows, rate_limit=RATE_LIMIT, seed=seed)
    ids = workflow_ids(scenario)
    products = {p.id: [w.id for w in p.workflows] for p in scenario.products}
    with tempfile.TemporaryDirectory(prefix="xcloudd-bench-") as tmp:
        work = Path(tmp)
        async with serve(scenario, clock, rate_limit=RATE_LIMIT, seed=seed) as (running, tap):
            requests = Requests(running.sim.primary_key.key_id)
            tap.observers.append(requests)
            events = work / "events.jsonl"
            config = watching_config(
                work,
                running,
                ids,
                polling=POLLING,
                events=events,
                server=("127.0.0.1:0", WEBHOOK_TOKEN) if webhooks else None,
            )
            tail, detected = EventTail(events), Detected.empty()
            async with daemon_in_process(config, clock) as alive:
                started = await wait_for_event(
                    tail, detected, "daemon.started", within=60, alive=alive
                )
                await wait_for_first_look(requests, products, within=60, alive=alive)
                if webhooks:
                    url = f"http://{started['listen']}/webhooks/xcode-cloud/{WEBHOOK_TOKEN}"
                    await running.sim.webhooks.configure(
                        WebhookSettings(url, WEBHOOK_DELAY_S, WEBHOOK_LOSS, seed)
                    )
                made = await create_builds(running.sim, clock, ids, builds)
                runs = {i: run for i, (b, run) in made.items() if not b.warmup}
                await until_detected(
                    clock, runs, detected, lambda: detected.take(tail.read()), alive
                )
            detected.take(tail.read())  # what the daemon delivered while it stopped
    counted = counted_requests(requests, set(runs), measured_window(runs, detected))
    name = "xcloudd + webhooks" if webhooks else "xcloudd, polling"
    return Side(name, runs, detected, counted, requests.statuses(counted), factor)


async def baseline_side(size: Size, builds: Sequence[Build], seed: int, interval: float) -> Side:
    """The baseline on the measured builds only (it has no use for history): they arrive at
    the same times after the warm-up as they did for xcloudd."""
    clock = ScaledClock(size.factor)
    scenario = world(size.products, size.workflows, rate_limit=BASELINE_RATE_LIMIT, seed=seed)
    ids = workflow_ids(scenario)
    measured = [b for b in builds if not b.warmup]
    async with (
        serve(scenario, clock, rate_limit=BASELINE_RATE_LIMIT, seed=seed) as (running, tap),
        aiohttp.ClientSession() as session,
    ):
        key = running.sim.add_key()
        requests = Requests(key.key_id)
        tap.observers.append(requests)
        poller = Baseline(session, running, key, clock, interval)
        try:
            made = await create_builds(
                running.sim,
                clock,
                ids,
                measured,
                offset=size.warmup_s,
                created=lambda run: poller.follow(run.id, run.created_at),
            )
            runs = {i: run for i, (_, run) in made.items()}
            await until_detected(clock, runs, poller.detected)
        finally:
            await poller.aclose()
    counted = counted_requests(requests, set(runs), measured_window(runs, poller.detected))
    name = f"baseline, every {interval:.1f} s"
    statuses = requests.statuses(counted)
    return Side(name, runs, poller.detected, counted, statuses, size.factor, interval)


# -- report --------------------------------------------------------------------------------------


def side_doc(side: Side, shift: float = 0.0) -> dict[str, Any]:
    return {
        "builds": len(side.runs),
        "requests": len(side.requests),
        "requests_per_build": round(side.per_build, 3),
        "requests_by_endpoint": dict(Counter(r.endpoint for r in side.requests).most_common()),
        "statuses": side.statuses,
        "latency_s": {kind: s.as_dict() for kind, s in side.spreads(shift).items()},
        "missed_transitions": side.missed(),
        "time_factor": side.factor,
    }


def report(
    size: Size, builds: Sequence[Build], seed: int, smoke: bool, sides: Sequence[Side]
) -> tuple[str, dict[str, Any]]:
    xcloudd, baseline, hooked = sides
    x_all = xcloudd.spreads()["all"]
    b_all = baseline.spreads()["all"]
    h_all = hooked.spreads(WEBHOOK_DELAY_S)["all"]
    ratio = xcloudd.per_build / baseline.per_build if baseline.per_build else None
    # "Equal" within what the measurement can tell apart (timing noise, the 0.01 s tuning).
    p95_ok = None
    if x_all.p95 is not None and b_all.p95 is not None:
        p95_ok = x_all.p95 <= b_all.p95 + P95_SLACK_S
    targets = {
        "ratio_at_most_0.3": None if ratio is None else ratio <= TARGET_RATIO,
        "p95_equal_or_better": p95_ok,
        "webhooks_at_most_3_requests_per_build": hooked.per_build <= TARGET_WEBHOOK_REQUESTS,
        "webhooks_p95_under_1s_after_delay": None
        if h_all.p95 is None
        else h_all.p95 < TARGET_WEBHOOK_P95_S,
    }
    rows = []
    for side, shift in ((xcloudd, 0.0), (baseline, 0.0), (hooked, WEBHOOK_DELAY_S)):
        s = side.spreads(shift)
        rows.append(
            [
                side.name,
                len(side.requests),
                round(side.per_build, 2),
                s["started"].p50,
                s["started"].p95,
                s["completed"].p50,
                s["completed"].p95,
                s["all"].p95,
                side.missed(),
                side.statuses.get("429", 0),
            ]
        )
    warmup = sum(b.warmup for b in builds)
    text = table(
        f"Polling efficiency: {len(builds) - warmup} measured builds after {warmup} in a "
        f"{size.warmup_s / 60:.0f} min warm-up; {size.products} products x {size.workflows} "
        f"workflows; seed {seed}{' (smoke)' if smoke else ''}",
        [
            "side",
            "requests",
            "req/build",
            "started p50",
            "started p95",
            "completed p50",
            "completed p95",
            "p95 all",
            "missed",
            "429s",
        ],
        rows,
    )
    text += (
        f"\n(latencies in virtual seconds; webhooks row minus the {WEBHOOK_DELAY_S:g} s webhook "
        f"delay, {WEBHOOK_LOSS:.0%} of webhooks lost; time x{size.factor:g}, webhooks "
        f"x{size.webhook_factor:g})\n"
        f"Targets:\n"
        f"  requests per build, xcloudd / baseline: {ratio:.2f} (<= {TARGET_RATIO}): "
        f"{target(targets['ratio_at_most_0.3'])}\n"
        f"  p95 xcloudd {fmt(x_all.p95)} s vs baseline {fmt(b_all.p95)} s (equal or better, "
        f"+/- {P95_SLACK_S:g} s): "
        f"{target(p95_ok)}\n"
        f"  with webhooks: {hooked.per_build:.2f} requests per build (<= "
        f"{TARGET_WEBHOOK_REQUESTS:g}): "
        f"{target(targets['webhooks_at_most_3_requests_per_build'])}\n"
        f"  with webhooks: p95 {fmt(h_all.p95)} s after the delay (< {TARGET_WEBHOOK_P95_S:g} s): "
        f"{target(targets['webhooks_p95_under_1s_after_delay'])}"
    )
    doc: dict[str, Any] = {
        "benchmark": NAME,
        "seed": seed,
        "smoke": smoke,
        "polling": dict(POLLING),
        "rate_limit_per_hour": {"xcloudd": RATE_LIMIT, "baseline": BASELINE_RATE_LIMIT},
        "world": {"products": size.products, "workflows_per_product": size.workflows},
        "builds": {"measured": len(builds) - warmup, "warmup": warmup},
        "warmup_s": size.warmup_s,
        "xcloudd": side_doc(xcloudd),
        "baseline": side_doc(baseline)
        | {
            "interval_s": baseline.interval,
            "interval_rule": "largest I whose p95 on these builds is at most xcloudd's",
        },
        "webhooks": side_doc(hooked, WEBHOOK_DELAY_S)
        | {
            "delay_s": WEBHOOK_DELAY_S,
            "loss": WEBHOOK_LOSS,
            "latency_includes_delay_s": {k: s.as_dict() for k, s in hooked.spreads().items()},
        },
        "ratio_requests_per_build": rounded(ratio),
        "targets": targets,
    }
    return text, doc


def predicted_latencies(builds: Sequence[Build], interval: float) -> list[float]:
    """The baseline's latencies if answers took no time: it polls at creation + k * I, so a
    transition d seconds after creation is seen ceil(d / I) * I - d seconds late."""
    offsets = [d for b in builds for d in (b.pending_s, b.pending_s + b.running_s)]
    return [math.ceil(d / interval) * interval - d for d in offsets]


def baseline_interval(xcloudd: Side, builds: Sequence[Build]) -> float:
    """The largest I (to 0.01 s) at which the baseline's p95 on the measured builds is at most
    xcloudd's: the cheapest fixed-interval poller that is as quick. (I = p95 / 0.95 holds only
    on average; on a few dozen builds the spread is uneven.)"""
    goal = xcloudd.spreads()["all"].p95
    if goal is None or goal <= 0:
        raise RuntimeError("xcloudd detected no transitions: nothing to tune the baseline to")
    measured = [b for b in builds if not b.warmup]
    for step in range(math.ceil(goal / 0.95 * 150), 0, -1):  # from 1.5 * p95 / 0.95 down
        interval = step / 100
        p95 = percentile(predicted_latencies(measured, interval), 95)
        if p95 is not None and p95 <= goal:
            return interval
    return 0.01


async def main(argv: Sequence[str]) -> int:
    args = base_arguments(NAME, "Requests per build and detection latency.").parse_args(argv)
    size = SMOKE if args.smoke else FULL
    builds = plan(size, args.seed)
    progress(f"polling: {len(builds)} builds; xcloudd (polling) at x{size.factor:g}")
    xcloudd = await xcloudd_side(size, builds, args.seed, webhooks=False)
    interval = baseline_interval(xcloudd, builds)
    progress(f"polling: baseline every {interval} s")
    baseline = await baseline_side(size, builds, args.seed, interval)
    progress(f"polling: xcloudd with webhooks at x{size.webhook_factor:g}")
    hooked = await xcloudd_side(size, builds, args.seed, webhooks=True)
    text, doc = report(size, builds, args.seed, args.smoke, [xcloudd, baseline, hooked])
    print(text)
    write_json(args.json, doc)
    progress(f"polling: results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
