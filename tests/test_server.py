"""`[server]`: what Prometheus scrapes and what probes see, from a real daemon on the simulator,
and the names build events carry for people (workflow, product, branch, previous result)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import SteppingClock
from world import T0, World, job
from xcloudd.simulator import Fault


@pytest.fixture
def fake_clock() -> SteppingClock:
    return SteppingClock(start=T0.timestamp())


def later(**delta: float) -> datetime:
    return T0 + timedelta(**delta)


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Probe:
    """Scrapes the daemon's server as Prometheus and a load balancer would."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.seen: dict[str, dict[str, Any]] = {}

    def url(self, path: str) -> str:
        (started,) = self.world.events("daemon.started")[-1:]
        return f"http://{started['listen']}{path}"

    def at(self, tag: str) -> Callable[[], Awaitable[None]]:
        async def scrape() -> None:
            async with aiohttp.ClientSession() as session:
                out: dict[str, Any] = {}
                for path in ("/livez", "/readyz"):
                    async with session.get(self.url(path)) as resp:
                        out[path] = (resp.status, await resp.json())
                async with session.get(self.url("/metrics")) as resp:
                    assert resp.status == 200
                    assert resp.content_type == "text/plain"
                    out["metrics"] = parse(await resp.text())
            self.seen[tag] = out

        return scrape


def parse(text: str) -> Samples:
    """The exposition, parsed by prometheus-client's own parser (it refuses bad syntax)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_metrics_and_probes_tell_what_the_daemon_does(world: World) -> None:
    config = world.configure('[server]\nlisten = "127.0.0.1:0"\n\n' + job("hourly", every="1h"))
    probe = Probe(world)

    def outage() -> None:
        world.sim.sim.faults.add(Fault(method="GET", status=503, times=None))

    await world.run(
        config,
        later(hours=1, seconds=30),
        probe.at("healthy"),
        later(hours=2),  # the 10:00 build is created, then App Store Connect goes away
        outage,
        later(hours=2, minutes=5),
        probe.at("outage"),
        world.sim.sim.faults.clear,
        later(hours=2, minutes=20),
        probe.at("recovered"),
    )

    healthy = probe.seen["healthy"]
    assert healthy["/livez"] == (200, {"status": "ok"})
    assert healthy["/readyz"] == (200, {"status": "ok"})
    m = healthy["metrics"]
    # Build counts by the workflow's name, which the poll learned from App Store Connect.
    assert (
        value(m, "xcloudd_builds_completed_total", workflow="CI", job="hourly", result="success")
        == 1
    )
    assert value(m, "xcloudd_builds_requested_total", job="hourly", workflow="CI") == 1
    assert value(m, "xcloudd_builds_created_total", workflow="CI", origin="schedule") == 1
    assert value(m, "xcloudd_schedule_fired_total", job="hourly") == 1
    assert value(m, "xcloudd_build_duration_seconds_count", workflow="CI") == 1
    assert value(m, "xcloudd_build_queue_seconds_count", workflow="CI") == 1
    assert value(m, "xcloudd_builds_in_flight") == 0
    done = world.events("build.completed")[0]
    finished = datetime.fromisoformat(done["timestamp"].replace("Z", "+00:00"))
    last = value(m, "xcloudd_last_successful_build_timestamp_seconds", job="hourly")
    assert last is not None
    assert abs(last - finished.timestamp()) < 2
    polls = value(
        m,
        "xcloudd_api_requests_total",
        endpoint="GET /v1/ciProducts/{id}/buildRuns",
        status="200",
    )
    assert polls is not None
    assert polls >= 1
    assert value(m, "xcloudd_api_rate_limit_limit") == 3600
    sink = f"file:{world.events_path}"
    assert value(m, "xcloudd_sink_up", sink=sink) == 1
    delivered = value(m, "xcloudd_sink_delivered_events_total", sink=sink)
    assert delivered is not None
    assert delivered >= 6
    assert value(m, "xcloudd_outbox_events") is not None
    assert value(m, "xcloudd_info", version=__import__("xcloudd").__version__) == 1
    # Bounded labels: no run id or build number in any label value.
    run_ids = {e["build_run_id"] for e in world.events("build.created")}
    for _name, labels in m:
        for key, label in labels:
            assert label not in run_ids
            assert key not in ("build_run_id", "build_number")
            assert not UUID.fullmatch(label), (key, label)

    during = probe.seen["outage"]
    assert during["/livez"][0] == 200, "an outage of the API is no reason to restart xcloudd"
    status, body = during["/readyz"]
    assert status == 503
    assert set(body["problems"]) == {"api"}
    errors = value(
        during["metrics"],
        "xcloudd_api_requests_total",
        endpoint="GET /v1/ciProducts/{id}/buildRuns",
        status="503",
    )
    assert errors is not None
    assert errors >= 1
    assert value(during["metrics"], "xcloudd_builds_in_flight") == 1

    after = probe.seen["recovered"]
    assert after["/readyz"] == (200, {"status": "ok"})
    assert (
        value(
            after["metrics"],
            "xcloudd_builds_completed_total",
            workflow="CI",
            job="hourly",
            result="success",
        )
        == 2
    )


async def test_build_events_name_the_workflow_product_branch_and_the_result_before(
    world: World,
) -> None:
    # "Nightly" alternates SUCCEEDED and FAILED.
    config = world.configure(job("nightly", workflow="Nightly", every="1h"))
    await world.run(config, later(hours=3, minutes=1))
    done = world.events("build.completed")
    assert [e["result"] for e in done] == ["success", "failure", "success"]
    assert [e["previous_result"] for e in done] == [None, "success", "failure"]
    for e in done:
        assert e["workflow_name"] == "Nightly"
        assert e["product_name"] == "Acme Shop"
        assert e["git_ref"] == "main"
        assert e["git_ref_kind"] == "BRANCH"
        assert datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).tzinfo == UTC


async def test_an_api_that_refuses_include_still_gets_its_runs_followed(world: World) -> None:
    # A stand-in that does not know `include` answers 400: the names are left out, the run is
    # followed to its end all the same.
    world.sim.sim.faults.add(
        Fault(method="GET", path=r"/v1/ci(BuildRuns/[^/]+|Products/[^/]+/buildRuns)", status=400)
    )
    config = world.configure(job("hourly", every="1h"))
    await world.run(config, later(hours=1, minutes=1))
    assert world.events("build.watch_ended") == []
    (done,) = world.events("build.completed")
    assert done["completion_status"] == "SUCCEEDED"
    assert "workflow_name" not in done
