"""What the benchmarks share: scaled virtual time, percentiles, tables, JSON results, the
daemon's config file and the events it writes.

Light on imports on purpose: bench/_daemon.py (the daemon's own process in scale.py) imports
this module, and whatever it pulls in would count in the daemon's resident memory. The
simulator side (which only the bench process needs) is in simside.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_SEED = 20260901
# The virtual epoch, 2026-09-01T08:00:00Z: every run of a benchmark shows the same dates.
V0 = 1_788_249_600.0
# Where the virtual monotonic clock starts (any value: only differences count).
MONO0 = 1_000.0


class ScaledClock:
    """Virtual time that runs `factor` times faster than real time (an xcloudd Clock).

    Virtual time = v0 + (real monotonic - r0) * factor, and sleeping s virtual seconds sleeps
    s / factor real ones. Real time is CLOCK_MONOTONIC, which every process on the machine
    shares: a child process given the same r0, v0 and factor reads the same virtual time, so
    a simulator and a daemon in different processes agree on when things happened.
    """

    def __init__(self, factor: float, *, r0: float | None = None, v0: float = V0) -> None:
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor must be a positive number, got {factor}")
        self.factor = factor
        self.r0 = time.monotonic() if r0 is None else r0
        self.v0 = v0

    def time(self) -> float:
        return self.v0 + (time.monotonic() - self.r0) * self.factor

    def monotonic(self) -> float:
        return MONO0 + (time.monotonic() - self.r0) * self.factor

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.factor)

    async def sleep_until(self, wall: float) -> None:
        await self.sleep(wall - self.time())

    def real_monotonic(self, virtual: float) -> float:
        """The real monotonic instant at which virtual time reads `virtual`."""
        return self.r0 + (virtual - self.v0) / self.factor

    def argv(self) -> list[str]:
        """The command-line arguments that give a child process this clock."""
        return ["--r0", repr(self.r0), "--v0", repr(self.v0), "--factor", repr(self.factor)]


# -- statistics --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), interpolating between closest ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Spread:
    """p50/p95/max of a set of latencies (seconds), with how many there were."""

    count: int
    p50: float | None
    p95: float | None
    max: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(
            len(values),
            rounded(percentile(values, 50)),
            rounded(percentile(values, 95)),
            rounded(max(values) if values else None),
        )

    def shifted(self, by: float) -> Spread:
        """The same spread minus `by` seconds (e.g. a webhook's delivery delay)."""

        def minus(v: float | None) -> float | None:
            return None if v is None else round(v - by, 3)

        return Spread(self.count, minus(self.p50), minus(self.p95), minus(self.max))

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "p50_s": self.p50, "p95_s": self.p95, "max_s": self.max}


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# -- output ------------------------------------------------------------------------------------


def fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(items: Sequence[str]) -> str:
        first = items[0].ljust(widths[0])
        rest = (item.rjust(w) for item, w in zip(items[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([title, line(headers), rule, *(line(r) for r in cells)])


def target(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "MISSED")


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def base_arguments(name: str, about: str) -> argparse.ArgumentParser:
    """--seed, --smoke and --json, the same for every benchmark."""
    parser = argparse.ArgumentParser(prog=f"bench/{name}.py", description=about)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="inputs derive from it")
    parser.add_argument("--smoke", action="store_true", help="a small run for CI (seconds)")
    parser.add_argument(
        "--json",
        type=Path,
        default=RESULTS_DIR / f"{name}.json",
        help=f"where to write the results (default bench/results/{name}.json)",
    )
    return parser


def progress(message: str) -> None:
    """A line on stderr about what runs now: stdout is the table."""
    import sys

    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the daemon's config and events ------------------------------------------------------------


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


# xcloudd's documented [polling] defaults.
DEFAULT_POLLING: Mapping[str, str | float] = {
    "interval": "30s",
    "min_interval": "5s",
    "max_interval": "5m",
    "budget": 0.8,
}


def write_config(
    directory: Path,
    api_section: str,
    *,
    polling: Mapping[str, str | float],
    watches: Sequence[str],
    events_path: Path,
    server: tuple[str, str] | None = None,
) -> Path:
    """The daemon's config.toml: the simulator's [api] section (from write_client_files),
    a state store in `directory`, [polling], one file sink, the watched workflow ids, and
    `server` as (listen, webhook_token) when given."""
    lines = [api_section.strip(), "", "[state]", f"path = {_toml(str(directory / 'state.db'))}"]
    lines += ["", "[polling]"]
    for key, value in polling.items():
        lines.append(f"{key} = {_toml(value) if isinstance(value, str) else value}")
    if server is not None:
        listen, token = server
        lines += ["", "[server]", f"listen = {_toml(listen)}", f"webhook_token = {_toml(token)}"]
    lines += ["", "[[sinks]]", 'type = "file"', f"path = {_toml(str(events_path))}"]
    for workflow_id in watches:
        lines += ["", "[[watches]]", f"workflow = {_toml(workflow_id)}"]
    path = directory / "xcloudd.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def api_section(client_config: Path) -> str:
    """The [api] table of a config written by the simulator's write_client_files."""
    text = client_config.read_text(encoding="utf-8")
    return text[text.index("[api]") :]


def event_time(event: Mapping[str, Any]) -> float:
    """An event's `timestamp` (RFC 3339, UTC) as seconds since the epoch."""
    stamp = str(event["timestamp"]).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


class EventTail:
    """Reads a file sink's JSON lines as they are appended, each line once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for its end
        return [json.loads(line) for line in lines if line.strip()]


@dataclass(frozen=True)
class Detected:
    """When a side saw each run's transitions (virtual time), by run id."""

    created: dict[str, float]
    started: dict[str, float]
    completed: dict[str, float]

    @classmethod
    def empty(cls) -> Detected:
        return cls({}, {}, {})

    def take(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Record build events (the first of each kind per run counts)."""
        kinds = {
            "build.created": self.created,
            "build.started": self.started,
            "build.completed": self.completed,
        }
        for event in events:
            seen = kinds.get(str(event.get("event")))
            run_id = event.get("build_run_id")
            if seen is not None and isinstance(run_id, str):
                seen.setdefault(run_id, event_time(event))
