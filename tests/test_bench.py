"""The benchmarks in bench/ run: each script's --smoke mode, as a subprocess, exits 0, prints
its table and writes its JSON with figures in it. Whether the figures meet the targets is for
the benchmarks to say, not for these tests (timing depends on the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = ("polling", "scale", "budget")
# Each smoke run takes about 15 s alone; together (they mostly sleep) about as long.
TIMEOUT_S = 150


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str
    doc: dict[str, Any]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Ran]]:
    """All three smoke runs, started at once; their output, exit codes and JSON."""
    work = tmp_path_factory.mktemp("bench")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in SCRIPTS:
            with (work / f"{name}.out").open("wb") as out, (work / f"{name}.err").open("wb") as err:
                procs[name] = subprocess.Popen(
                    [
                        sys.executable,
                        str(BENCH / f"{name}.py"),
                        "--smoke",
                        "--json",
                        str(work / f"{name}.json"),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                )
        deadline = time.monotonic() + TIMEOUT_S
        for proc in procs.values():
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        ran = {}
        for name, proc in procs.items():
            path = work / f"{name}.json"
            ran[name] = Ran(
                proc.returncode,
                (work / f"{name}.out").read_text(),
                (work / f"{name}.err").read_text(),
                json.loads(path.read_text()) if path.exists() else {},
            )
        yield ran
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def ran_ok(ran: Ran, title: str) -> dict[str, Any]:
    assert ran.code == 0, ran.stderr[-2000:]
    lines = ran.stdout.splitlines()
    assert lines, ran.stderr[-2000:]
    assert lines[0].startswith(title), ran.stdout
    assert any(set(line) <= {"-", " "} and "--" in line for line in lines), "no table rule"
    assert "Targets" in ran.stdout
    return ran.doc


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def test_polling_smoke(smoke: dict[str, Ran]) -> None:
    doc = ran_ok(smoke["polling"], "Polling efficiency")
    assert doc["benchmark"] == "polling"
    assert doc["smoke"] is True
    measured = doc["builds"]["measured"]
    assert measured > 0
    assert doc["builds"]["warmup"] > 0
    for side in ("xcloudd", "baseline", "webhooks"):
        figures = doc[side]
        assert figures["builds"] == measured
        assert figures["requests"] > 0
        assert figures["requests_per_build"] > 0
        for kind in ("started", "completed", "all"):
            spread = figures["latency_s"][kind]
            assert spread["count"] > 0, (side, kind)
            assert all(is_number(spread[k]) for k in ("p50_s", "p95_s", "max_s"))
    assert doc["baseline"]["interval_s"] > 0
    assert doc["webhooks"]["delay_s"] > 0
    assert is_number(doc["ratio_requests_per_build"])
    assert doc["ratio_requests_per_build"] > 0
    assert set(doc["targets"]) == {
        "ratio_at_most_0.3",
        "p95_equal_or_better",
        "webhooks_at_most_3_requests_per_build",
        "webhooks_p95_under_1s_after_delay",
    }


def test_scale_smoke(smoke: dict[str, Ran]) -> None:
    doc = ran_ok(smoke["scale"], "Scale")
    assert doc["benchmark"] == "scale"
    (size,) = doc["sizes"]
    assert size["runs"] == 100
    assert 0 < size["rss_mb"]["end"] <= size["rss_mb"]["peak"] <= size["rss_mb"]["lifetime_peak"]
    assert size["cpu_s_per_sim_hour"] > 0
    assert size["requests_per_sim_hour"] > 0
    assert size["baseline_requests_per_sim_hour"] > 0
    assert size["baseline_computed"] is False
    lag = size["event_loop_lag_ms"]
    assert lag["samples"] > 0
    assert is_number(lag["p50"])
    assert is_number(lag["p99"])
    assert size["poll_gap_s"]["max"] > 0
    assert size["poll_gap_s"]["interval"] == 30
    assert size["sigterm_to_exit_s"] > 0
    assert set(doc["targets"]) >= {"rss_under_100mb", "lag_p99_under_50ms"}


def test_budget_smoke(smoke: dict[str, Ran]) -> None:
    doc = ran_ok(smoke["budget"], "Budget")
    assert doc["benchmark"] == "budget"
    assert doc["builds"] == 30
    assert doc["rate_limit_per_hour"] == 360
    for side in ("xcloudd", "baseline"):
        figures = doc[side]
        assert figures["requests"] > 0
        assert figures["transitions"] == 60
        assert 0 < figures["detected_in_window"] <= 60
        assert 0 < figures["share_detected"] <= 1
        assert is_number(figures["worst_latency_s"])
        assert is_number(figures["http_429"])
    # The scenario's point: a poller that ignores the key's budget runs into it.
    assert doc["baseline"]["http_429"] > 0
    assert "xcloudd_zero_429" in doc["targets"]
