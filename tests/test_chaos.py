"""Chaos: API faults at random, `kill -9` and SIGSTOP at random, then the ground truth (DESIGN 3.3).

`xcloudd run` runs as a real process against `xcloudd simulator` (a real process too) on real
time, the one place besides test_crash.py where tests wait on the wall clock. While the
daemon's jobs start builds, a fault driver switches simulator faults on at seeded random
moments (5xx bursts, run-list outages, starts whose answer is lost after the run was created,
hangs longer than the client's timeout, malformed answers, 429s), and the daemon is killed
with SIGKILL (or, about one time in five, frozen with SIGSTOP for a few seconds) and started
again on the same state store and event file. At the end, with the faults cleared, a daemon
without jobs follows everything in flight to the end and stops on SIGTERM. Then everything
is checked against the simulator's ground truth (GET /_sim/runs), the state store and the
event file: each occurrence ended exactly once, no occurrence started two builds, each build
has exactly one `build.created` and, once complete, exactly one `build.completed` with its real
outcome, each `event_id` was written once, no build was started that the store does not know,
and no start took over a build that was created before its own POST (another start's build).

The default run is the CI size (a fixed seed, about a minute, at most ~100 s; >= 20 kills).
The long run (>= 200 build lifecycles, >= 20 kills, about three minutes) with a seed of your
choice:

    XCLOUDD_CHAOS_LONG=1 XCLOUDD_CHAOS_SEED=7 .venv/bin/pytest tests/test_chaos.py -q

(`XCLOUDD_CHAOS_SEED` alone picks the seed of the CI size.) Add `-s` to see the run's figures;
a failing run lists every problem found, with its seed. The simulator serves the default
world's "Acme Shop" with a larger rate limit, so that the daemon's request budget (DESIGN 4)
does not hold back a day's worth of builds squeezed into a minute.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from procs import (
    OPEN_INTENT_STATES,
    add_fault,
    clear_faults,
    in_flight,
    read_events,
    read_store,
    seed_simulator,
    sim_runs,
    sim_traffic,
    simulator_process,
    start_daemon,
)

CI_SEED = 20261201


@dataclass(frozen=True)
class Size:
    name: str
    min_chaos_s: float  # the chaos lasts at least this long,
    min_kills: int  # until this many kills,
    min_starts: int  # and until the simulator has this many builds started by xcloudd,
    max_chaos_s: float  # but no longer than this
    min_lifecycles: int  # builds started by xcloudd and complete at the end


CI_SIZE = Size(
    "ci", min_chaos_s=45.0, min_kills=20, min_starts=0, max_chaos_s=85.0, min_lifecycles=50
)
LONG_SIZE = Size(
    "long", min_chaos_s=60.0, min_kills=20, min_starts=215, max_chaos_s=900.0, min_lifecycles=200
)

KILL_GAP_S = (0.5, 3.0)
STOP_SHARE = 0.2
STOP_S = (2.0, 5.0)
FAULT_GAP_S = (0.3, 1.5)
# A process gets this long to set up before it is asked to stop (it is killed any time).
SETTLE_BEFORE_TERM_S = 2.0
QUIESCE_S = 60.0
# Rounding: the store keeps milliseconds.
CLOCK_SLACK_S = 0.01
TERM_S = 20.0


@dataclass(frozen=True)
class Job:
    name: str
    workflow: str
    branch: str
    every_s: int
    overlap: str


JOBS = (
    Job("ci", "CI", "main", 1, "allow_all"),
    Job("nightly", "Nightly", "develop", 2, "skip"),
    Job("ui", "UI Tests", "main", 1, "buffer_one"),
    Job("archive", "Archive", "develop", 2, "allow_all"),
)

# The default world's product with its workflows and outcomes, and room for many requests.
SCENARIO = """
rate_limit = 1000000
pending_seconds = 1
running_seconds = 3

[[products]]
name = "Acme Shop"
type = "APP"

[products.repository]
owner = "acme"
name = "shop-ios"
branches = ["main", "develop", "feature/dark-mode"]

[[products.workflows]]
name = "CI"
outcomes = ["SUCCEEDED"]

[[products.workflows]]
name = "Nightly"
outcomes = ["SUCCEEDED", "FAILED"]
clean = true

[[products.workflows]]
name = "UI Tests"
outcomes = ["FAILED"]

[[products.workflows]]
name = "Archive"
actions = ["BUILD", "ARCHIVE"]
outcomes = ["ERRORED"]
"""

POST_PATH = "/v1/ciBuildRuns"
POLL_PATH = "/v1/ci(BuildRuns/[^/]+|Products/[^/]+/buildRuns)"
LIST_PATH = "/v1/ciWorkflows/[^/]+/buildRuns"
ACTIONS_PATH = "/v1/ciBuildRuns/[^/]+/actions"
BURST_PATHS = (
    ("POST", POST_PATH),
    ("GET", POLL_PATH),
    ("GET", LIST_PATH),
    ("GET", ACTIONS_PATH),
    ("*", ".*"),
)
MALFORMED_PATHS = (("POST", POST_PATH), ("GET", POLL_PATH), ("GET", LIST_PATH))
VARIANTS = (
    "unknown_enum",
    "naive_date",
    "bad_relationship",
    "missing_optional",
    "not_object",
    "bad_json",
)


def chaos_settings() -> tuple[Size, int]:
    long = os.environ.get("XCLOUDD_CHAOS_LONG", "") not in ("", "0")
    seed = int(os.environ.get("XCLOUDD_CHAOS_SEED", CI_SEED))
    return (LONG_SIZE if long else CI_SIZE), seed


class FaultDriver(threading.Thread):
    """Every 0.3-1.5 s one seeded choice: a fault rule in the simulator, or nothing."""

    def __init__(self, url: str, rng: random.Random) -> None:
        super().__init__(name="fault driver", daemon=True)
        self._url = url
        self._rng = rng
        self._halt = threading.Event()
        self.injected: Counter[str] = Counter()
        self.log: list[tuple[float, str]] = []
        self.error: BaseException | None = None
        self._outage_until: float | None = None

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=15)

    def run(self) -> None:
        try:
            while not self._halt.wait(self._rng.uniform(*FAULT_GAP_S)):
                self._tick()
        except BaseException as exc:  # reported by the test, which asserts on it
            self.error = exc

    def _add(self, kind: str, **rule: Any) -> None:
        add_fault(self._url, **rule)
        self.injected[kind] += 1
        self.log.append((time.time(), f"{kind}: {rule}"))

    def _tick(self) -> None:
        rng = self._rng
        now = time.monotonic()
        if self._outage_until is not None and now >= self._outage_until:
            # The admin API clears every rule at once; the others are short-lived anyway.
            clear_faults(self._url)
            self._outage_until = None
            self.log.append((time.time(), "cleared all rules: the run-list outage is over"))
        choice = rng.choice(
            ("burst", "outage", "after_create", "hang", "malformed", "throttle", "nothing")
        )
        if choice == "burst":
            method, path = rng.choice(BURST_PATHS)
            self._add(
                "5xx burst",
                status=rng.choice((500, 502, 503, 504)),
                times=rng.randint(2, 8),
                method=method,
                path=path,
            )
        elif choice == "outage" and self._outage_until is None:
            self._add("run-list outage", status=503, times=None, method="GET", path=LIST_PATH)
            self._outage_until = now + rng.uniform(2.0, 6.0)
        elif choice == "after_create":
            action = rng.choice(("drop_after_create", "error_after_create", "hang_after_create"))
            extra = {"delay": 3} if action == "hang_after_create" else {}
            self._add(action, action=action, method="POST", path=POST_PATH, **extra)
        elif choice == "hang":
            self._add(
                "hang on a poll",
                action="hang",
                delay=3,
                then_drop=rng.random() < 0.5,
                method="GET",
                path=POLL_PATH,
            )
        elif choice == "malformed":
            method, path = rng.choice(MALFORMED_PATHS)
            self._add(
                "malformed",
                action="malformed",
                variant=rng.choice(VARIANTS),
                times=rng.randint(1, 3),
                method=method,
                path=path,
            )
        elif choice == "throttle":
            method, path = rng.choice(BURST_PATHS)
            self._add("429", status=429, retry_after=1, method=method, path=path)
        else:
            self.injected["nothing"] += 1


@dataclass
class Chaos:
    """What the chaos phase did."""

    kills: int = 0
    stops: int = 0
    processes: int = 0
    seconds: float = 0.0
    exits: list[str] = field(default_factory=list)


def daemon_config(client_config: Path, state: Path, events: Path, *, jobs: bool) -> str:
    """The simulator's client config with a 2 s API timeout, the store, a file sink and jobs."""
    text = client_config.read_text(encoding="utf-8")
    if re.search(r"^timeout\s*=", text, flags=re.MULTILINE):
        text = re.sub(r"^timeout\s*=.*$", 'timeout = "2s"', text, flags=re.MULTILINE)
    else:
        text = text.replace("[api]\n", '[api]\ntimeout = "2s"\n', 1)
    assert 'timeout = "2s"' in text, "cannot set the API timeout in the simulator's config"
    text += f"""
[state]
path = "{state}"

[polling]
interval = "1s"
min_interval = "1s"

[[sinks]]
type = "file"
path = "{events}"
"""
    if jobs:
        for job in JOBS:
            text += f"""
[[jobs]]
name = "{job.name}"
product = "Acme Shop"
workflow = "{job.workflow}"
branch = "{job.branch}"
every = "{job.every_s}s"
overlap = "{job.overlap}"
catch_up = "1h"
"""
    return text


def terminate(proc: subprocess.Popen[bytes], what: str, problems: list[str]) -> None:
    """SIGTERM, as systemd stops it: a clean exit (0) within TERM_S."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=TERM_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        problems.append(f"{what} did not exit within {TERM_S:.0f} s of SIGTERM (killed)")
        return
    if code != 0:
        problems.append(f"{what} exited with {code} on SIGTERM, not 0")


def alive_for(started: float, seconds: float) -> None:
    time.sleep(max(0.0, started + seconds - time.monotonic()))


def manual_runs(url: str) -> int:
    return sum(1 for r in sim_runs(url) if r["start_reason"] == "MANUAL")


def run_chaos(
    url: str, config: Path, log: Path, *, size: Size, rng: random.Random, problems: list[str]
) -> Chaos:
    """Kill (or freeze) the daemon at random moments until the size is reached."""
    chaos = Chaos()
    began = time.monotonic()
    daemon = start_daemon(config, log)
    born = time.monotonic()
    chaos.processes = 1

    def done() -> bool:
        elapsed = time.monotonic() - began
        if elapsed >= size.max_chaos_s:
            return True
        if elapsed < size.min_chaos_s or chaos.kills < size.min_kills:
            return False
        return size.min_starts == 0 or manual_runs(url) >= size.min_starts

    try:
        while not done():
            time.sleep(rng.uniform(*KILL_GAP_S))
            if (code := daemon.poll()) is not None:
                # It is not supposed to end by itself: note it and go on with a new one.
                chaos.exits.append(f"daemon process {chaos.processes} exited by itself: {code}")
            elif rng.random() < STOP_SHARE:
                daemon.send_signal(signal.SIGSTOP)
                time.sleep(rng.uniform(*STOP_S))
                daemon.send_signal(signal.SIGCONT)
                chaos.stops += 1
                continue
            else:
                daemon.send_signal(signal.SIGKILL)
                daemon.wait()
                chaos.kills += 1
            daemon = start_daemon(config, log)
            born = time.monotonic()
            chaos.processes += 1
        chaos.seconds = time.monotonic() - began
        alive_for(born, SETTLE_BEFORE_TERM_S)
        terminate(daemon, "the last daemon of the chaos phase", problems)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    return chaos


def quiesce(config: Path, state: Path, log: Path, problems: list[str]) -> float:
    """A daemon without jobs follows what is in flight to the end; then SIGTERM."""
    began = time.monotonic()
    final = start_daemon(config, log)
    try:
        left = -1
        while time.monotonic() - began < QUIESCE_S:
            time.sleep(0.5)
            if final.poll() is not None:
                break
            left = in_flight(state)
            if not left and time.monotonic() - began >= SETTLE_BEFORE_TERM_S:
                break
        if final.poll() is not None:
            problems.append(f"the final daemon exited by itself with {final.returncode}")
        elif left:
            problems.append(
                f"{left} runs or starts were still in flight {QUIESCE_S:.0f} s after the faults"
                f" ended: {describe_in_flight(state)}"
            )
        waited = time.monotonic() - began
        if final.poll() is None:
            terminate(final, "the final daemon (no jobs)", problems)
    finally:
        if final.poll() is None:
            final.kill()
            final.wait()
    return waited


def describe_in_flight(state: Path) -> str:
    marks = ",".join("?" * len(OPEN_INTENT_STATES))
    with read_store(state) as conn:
        runs = conn.execute("SELECT run_id, job, progress FROM runs WHERE finished = 0").fetchall()
        intents = conn.execute(
            "SELECT id, job, planned, state, posts, next_try, run_id FROM intents"
            f" WHERE state IN ({marks})",
            OPEN_INTENT_STATES,
        ).fetchall()
    return f"runs {runs}, intents {intents}"


@pytest.fixture
def chaos_simulator(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO, encoding="utf-8")
    with simulator_process(tmp_path / "sim", scenario) as running:
        yield running


def test_chaos_loses_and_duplicates_nothing(
    chaos_simulator: tuple[str, Path], tmp_path: Path
) -> None:
    size, seed = chaos_settings()
    url, client_config = chaos_simulator
    began = time.monotonic()
    events_path = tmp_path / "events.jsonl"
    state = tmp_path / "state.db"
    config = tmp_path / "config.toml"
    log = tmp_path / "daemon.stderr"
    config.write_text(daemon_config(client_config, state, events_path, jobs=True), "utf-8")
    seed_simulator(url, seed)
    problems: list[str] = []

    driver = FaultDriver(url, random.Random(f"faults {seed}"))
    driver.start()
    try:
        chaos = run_chaos(
            url, config, log, size=size, rng=random.Random(f"kills {seed}"), problems=problems
        )
    finally:
        driver.stop()
        clear_faults(url)
    assert driver.error is None, f"seed {seed}: the fault driver failed: {driver.error!r}"
    problems.extend(chaos.exits)

    config.write_text(daemon_config(client_config, state, events_path, jobs=False), "utf-8")
    quiet_s = quiesce(config, state, log, problems)

    truth = sim_runs(url)
    lifecycles = check_everything(truth, state, events_path, log, problems)
    elapsed = time.monotonic() - began
    if lifecycles < size.min_lifecycles:
        problems.append(f"only {lifecycles} build lifecycles, expected >= {size.min_lifecycles}")
    if chaos.kills < size.min_kills:
        problems.append(f"only {chaos.kills} kills, expected >= {size.min_kills}")

    faults = sum(n for kind, n in driver.injected.items() if kind != "nothing")
    summary = (
        f"chaos {size.name} seed {seed}: {elapsed:.1f} s ({chaos.seconds:.1f} s of chaos,"
        f" {quiet_s:.1f} s to quiesce); {lifecycles} build lifecycles; {chaos.kills} kills,"
        f" {chaos.stops} stops, {chaos.processes + 1} daemon processes; {faults} faults"
        f" injected {dict(sorted(driver.injected.items()))}"
        f"\n  {event_figures(read_events(events_path))}"
    )
    print(f"\n{summary}")
    if problems:
        traffic = sim_traffic(url)
        problems.extend(explain_unreported(truth, read_events(events_path), traffic))
        (tmp_path / "truth.json").write_text(json.dumps(truth, indent=1), "utf-8")
        (tmp_path / "traffic.json").write_text(json.dumps(traffic), "utf-8")
        faults_log = "".join(f"{when:.3f} {what}\n" for when, what in driver.log)
        (tmp_path / "faults.log").write_text(faults_log, "utf-8")
        problems.append(f"ground truth, traffic, faults, store, events, stderr: {tmp_path}")
    assert not problems, f"{summary}\n" + "\n".join(f"- {p}" for p in problems)


def event_figures(events: list[dict[str, Any]]) -> str:
    names = Counter(e.get("event") for e in events)
    wanted = (
        "schedule.fired",
        "schedule.skipped",
        "schedule.missed",
        "build.requested",
        "build.start_unknown",
        "build.start_failed",
        "build.created",
        "build.completed",
        "build.watch_ended",
        "api.unavailable",
        "daemon.error",
    )
    reconciled = sum(1 for e in events if e.get("event") == "build.created" and e.get("reconciled"))
    counts = ", ".join(f"{n} {names[n]}" for n in wanted)
    errors = Counter(
        f"{e.get('where', '').split(' ')[0]}: {e.get('error')}"
        for e in events
        if e.get("event") == "daemon.error"
    )
    return f"events: {counts} ({reconciled} created by reconciling); daemon.error: {dict(errors)}"


def check_everything(
    truth: list[dict[str, Any]], state: Path, events_path: Path, log: Path, problems: list[str]
) -> int:
    """Every check; what fails goes to `problems`. Returns the number of build lifecycles."""
    lines = events_path.read_text(encoding="utf-8").splitlines()
    events = read_events(events_path)
    if len(events) != len(lines):
        problems.append(f"{len(lines) - len(events)} lines of the event file are not JSON")
    check_event_ids(lines, problems)
    check_occurrences(events, problems)
    with read_store(state) as conn:
        check_store(conn, truth, problems)
    lifecycles = check_builds(events, truth, problems)
    stderr = log.read_text(encoding="utf-8", errors="replace")
    for needle in ("Traceback", "internal error"):
        if needle in stderr:
            at = stderr.index(needle)
            problems.append(f"{needle!r} in the daemon's stderr: {stderr[at : at + 2000]}")
    return lifecycles


def check_event_ids(lines: list[str], problems: list[str]) -> None:
    """The file sink writes each event once: every event_id appears on one line only."""
    seen: dict[str, list[str]] = defaultdict(list)
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):
            seen[str(json.loads(line).get("event_id"))].append(line)
    twice = {i: ls for i, ls in seen.items() if len(ls) > 1}
    if twice:
        same = sum(1 for ls in twice.values() if len(set(ls)) == 1)
        shown = "\n    ".join(
            ls[0] if len(set(ls)) == 1 else f"{ls[0]}\n    {ls[1]}"
            for ls in list(twice.values())[:5]
        )
        problems.append(
            f"{len(twice)} event_ids appear more than once in the event file ({same} of them"
            f" on identical lines), e.g.:\n    {shown}"
        )


def _instant(scheduled_for: str, every_s: int) -> int:
    return round(datetime.fromisoformat(scheduled_for).timestamp() / every_s)


def check_occurrences(events: list[dict[str, Any]], problems: list[str]) -> None:
    """Every planned instant of a job, from its first to its last, ends exactly once: fired,
    skipped, or counted in a schedule.missed (whose count covers `oldest` and the instants
    after it)."""
    for job in JOBS:
        ends: dict[int, list[str]] = defaultdict(list)
        decided = 0
        missed_total = 0
        for e in events:
            if e.get("job") != job.name:
                continue
            if e["event"] in ("schedule.fired", "schedule.skipped"):
                ends[_instant(e["scheduled_for"], job.every_s)].append(e["event"])
                decided += 1
            elif e["event"] == "schedule.missed":
                if e.get("oldest") is None or e.get("capped"):
                    problems.append(f"job {job.name}: a schedule.missed without its instants: {e}")
                    continue
                first = _instant(e["oldest"], job.every_s)
                missed_total += int(e["count"])
                for k in range(int(e["count"])):
                    ends[first + k].append("schedule.missed")
        if not ends:
            problems.append(f"job {job.name}: no occurrence was decided at all")
            continue
        low, high = min(ends), max(ends)
        planned = high - low + 1
        twice = {
            datetime.fromtimestamp(k * job.every_s, UTC).isoformat(): v
            for k, v in ends.items()
            if len(v) > 1
        }
        holes = [
            datetime.fromtimestamp(k * job.every_s, UTC).isoformat()
            for k in range(low, high + 1)
            if k not in ends
        ]
        if twice:
            problems.append(
                f"job {job.name}: {len(twice)} occurrences ended more than once, e.g."
                f" {dict(list(twice.items())[:5])}"
            )
        if holes:
            problems.append(
                f"job {job.name}: {len(holes)} of {planned} planned occurrences never ended"
                f" (no schedule.fired, .skipped or .missed), e.g. {holes[:5]}"
            )
        if decided + missed_total != planned:
            problems.append(
                f"job {job.name}: {decided} fired or skipped + {missed_total} missed !="
                f" {planned} planned instants"
            )


def check_store(conn: sqlite3.Connection, truth: list[dict[str, Any]], problems: list[str]) -> None:
    """The store against the ground truth: one build per occurrence, every build known."""
    doubled = conn.execute(
        "SELECT job, planned, count(run_id) FROM intents WHERE planned IS NOT NULL"
        " GROUP BY job, planned HAVING count(run_id) > 1"
    ).fetchall()
    if doubled:
        problems.append(f"occurrences that started more than one build: {doubled}")
    shared = conn.execute(
        "SELECT run_id, group_concat(id) FROM intents WHERE run_id IS NOT NULL"
        " GROUP BY run_id HAVING count(*) > 1"
    ).fetchall()
    if shared:
        problems.append(f"build runs claimed by more than one start intent: {shared}")
    manual = {r["id"]: r for r in truth if r["start_reason"] == "MANUAL"}
    done = conn.execute(
        "SELECT id, job, planned, workflow_id, git_reference_id, run_id, created_at, sent_at,"
        " posts FROM intents WHERE state = 'done'"
    ).fetchall()
    if len(manual) != len(done):
        unknown = sorted(set(manual) - {row[5] for row in done})
        problems.append(
            f"{len(manual)} builds were started in the simulator but {len(done)} start intents"
            f" are done; runs the store does not know: {describe_runs(unknown, manual)}"
        )
    for intent_id, job, planned, workflow_id, ref_id, run_id, decided, sent, posts in done:
        run = manual.get(run_id)
        if run is None:
            problems.append(
                f"intent {intent_id} ({job} {planned}) is done with run {run_id}, which is not"
                " a build started by hand in the simulator"
            )
            continue
        if (run["workflow_id"], run["source_ref_id"]) != (workflow_id, ref_id):
            problems.append(
                f"intent {intent_id} ({job} {planned}) adopted run {run_id} of workflow"
                f" {run['workflow_id']} on {run['source_ref_id']}, but asked for {workflow_id}"
                f" on {ref_id}"
            )
        # Its build cannot be older than its POST (sent_at is the last one's: with one POST,
        # that one; else the intent's birth). The simulator and the daemon share this host's
        # clock, so there is no skew to allow for.
        what, bound = ("its only POST", sent) if posts == 1 else ("the start was decided", decided)
        early = datetime.fromisoformat(bound).timestamp() - run["created_at"]
        if early > CLOCK_SLACK_S:
            problems.append(
                f"intent {intent_id} ({job} {planned}, decided {decided}, {posts} POSTs, last"
                f" at {sent}) is done with run {run_id} (number {run['number']}), created"
                f" {early:.3f} s before {what}: another start's build (and if that start"
                " POSTs again, its occurrence has started two builds)"
            )
    still_open = conn.execute(
        "SELECT job, planned, state FROM occurrences WHERE state IN ('firing', 'held')"
    ).fetchall()
    if still_open:
        problems.append(f"occurrences still open in the store at the end: {still_open}")
    pending = conn.execute(
        "SELECT s.sink, s.seq, (SELECT max(seq) FROM outbox) FROM sink_cursors s"
        " WHERE s.seq < (SELECT coalesce(max(seq), 0) FROM outbox)"
    ).fetchall()
    if pending:
        problems.append(f"events left undelivered in the outbox (sink, cursor, end): {pending}")


def describe_runs(ids: list[str], runs: dict[str, dict[str, Any]]) -> str:
    keys = ("id", "number", "workflow_id", "created_at", "execution_progress")
    return str([{k: runs[i].get(k) for k in keys} for i in ids[:5]]) + (
        f" and {len(ids) - 5} more" if len(ids) > 5 else ""
    )


def check_builds(
    events: list[dict[str, Any]], truth: list[dict[str, Any]], problems: list[str]
) -> int:
    """Each build: exactly one build.created, and once complete exactly one build.completed
    that reports its real outcome. Returns the number of builds started and complete."""
    runs = {r["id"]: r for r in truth}
    manual = {i: r for i, r in runs.items() if r["start_reason"] == "MANUAL"}
    created = Counter(e["build_run_id"] for e in events if e["event"] == "build.created")
    completed = [e for e in events if e["event"] == "build.completed"]
    completions = Counter(e["build_run_id"] for e in completed)

    not_once = {i: created[i] for i in manual if created[i] != 1}
    if not_once:
        problems.append(
            f"{len(not_once)} builds started in the simulator do not have exactly one"
            f" build.created (run: count) {dict(list(not_once.items())[:5])}:"
            f" {describe_runs(list(not_once), manual)}"
        )
    unreal = sorted(set(created) - set(runs))
    if unreal:
        problems.append(f"build.created for runs the simulator does not have: {unreal[:5]}")
    twice = {i: n for i, n in completions.items() if n > 1}
    if twice:
        problems.append(f"runs with more than one build.completed: {twice}")
    orphans = sorted(set(completions) - set(created))
    if orphans:
        problems.append(f"build.completed without build.created: {orphans[:5]}")
    finished = {i for i, r in manual.items() if r["execution_progress"] == "COMPLETE"}
    unreported = sorted(i for i in finished if created[i] and not completions[i])
    if unreported:
        problems.append(
            f"{len(unreported)} complete builds without build.completed: "
            f"{describe_runs(unreported, manual)}"
        )
    for e in completed:
        run = runs.get(e["build_run_id"])
        if run is None:
            continue
        if e.get("completion_status") != run["completion_status"]:
            problems.append(
                f"build.completed of {run['id']} says {e.get('completion_status')}, the run"
                f" ended {run['completion_status']}: {e}"
            )
        if e.get("build_number") not in (None, run["number"]):
            problems.append(
                f"build.completed of {run['id']} says build {e.get('build_number')}, the run"
                f" is number {run['number']}"
            )
    return len(finished)


def explain_unreported(
    truth: list[dict[str, Any]], events: list[dict[str, Any]], traffic: list[dict[str, Any]]
) -> list[str]:
    """For each build started in the simulator but never reported: the POST that created it
    and what the workflow's run-list reads that could have found it got."""
    reported = {e["build_run_id"] for e in events if e["event"] == "build.created"}
    out = []
    for run in truth:
        if run["start_reason"] != "MANUAL" or run["id"] in reported:
            continue
        created, workflow = run["created_at"], run["workflow_id"]
        posts = [
            _exchange(t)
            for t in traffic
            if t["method"] == "POST"
            and t["path"] == POST_PATH
            and abs(t["time"] - created) < 5.0
            and _posted_workflow(t) == workflow
        ]
        lists = [
            _exchange(t)
            for t in traffic
            if t["method"] == "GET"
            and t["path"] == f"/v1/ciWorkflows/{workflow}/buildRuns"
            and created <= t["time"] <= created + 30.0
        ]
        out.append(
            f"unreported build {run['id']} (number {run['number']}, created at {created:.3f}):"
            f" POSTs of its workflow around then: {posts}; its workflow's run-list reads in the"
            f" 30 s after: {lists}"
        )
    return out


def _posted_workflow(entry: dict[str, Any]) -> str | None:
    try:
        return str(entry["request_json"]["data"]["relationships"]["workflow"]["data"]["id"])
    except (KeyError, TypeError):
        return None


def _exchange(entry: dict[str, Any]) -> str:
    rule = entry.get("fault_rule") or {}
    fault = entry.get("fault")
    if fault == "malformed":
        fault = f"malformed {rule.get('variant')}"
    answer = entry.get("response_json")
    data = answer.get("data") if isinstance(answer, dict) else None
    made = f" -> run {data.get('id')}" if isinstance(data, dict) else ""
    return f"{entry['time']:.3f} HTTP {entry['status']}{made} ({fault or 'no fault'})"
