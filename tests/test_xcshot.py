"""The simulator is faithful enough for a client we did not write: xcshot 0.2.0 from PyPI.

xcshot is synchronous (urllib, time.sleep, time.time), so the simulator runs on the real clock
in a thread with its own event loop, and its builds take half a second.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Iterator

import pytest
from xcshot import asc, cloud

from conftest import schema_problems
from xcloudd.simulator import Fault, RunningSimulator, Scenario, running_simulator
from xcloudd.simulator.scenario import DEFAULT_SCENARIO, scenario_from_dict


def _quiet(*_args: object) -> None:
    return None


class SimulatorThread:
    """A simulator served from a background thread until `stop()`."""

    def __init__(self, scenario: Scenario) -> None:
        self._scenario = scenario
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._running: RunningSimulator | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="simulator", daemon=True)

    def start(self) -> RunningSimulator:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("the simulator did not start")
        if self._error is not None:
            raise self._error
        assert self._running is not None
        return self._running

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive(), "the simulator thread did not stop"

    def _main(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to the test by start()
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with running_simulator(scenario=self._scenario) as running:
            self._running = running
            self._ready.set()
            await self._stop.wait()


@pytest.fixture
def xc_sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningSimulator]:
    """A running simulator with xcshot pointed at it through its documented settings."""
    data = copy.deepcopy(DEFAULT_SCENARIO)
    data["pending_seconds"] = 0.2
    data["running_seconds"] = 0.3
    server = SimulatorThread(scenario_from_dict(data, "fast"))
    running = server.start()
    try:
        key = running.sim.primary_key
        assert key.issuer_id is not None
        monkeypatch.setattr(asc, "BASE", running.url)
        monkeypatch.setattr(asc, "_TOKEN", None)
        monkeypatch.setenv("ASC_API_KEY_ID", key.key_id)
        monkeypatch.setenv("ASC_API_ISSUER_ID", key.issuer_id)
        monkeypatch.setenv("ASC_API_KEY_P8", key.private_key_pem.decode())
        yield running
    finally:
        server.stop()
    problems = schema_problems(running.sim.traffic.entries)
    assert not problems, "simulator traffic does not match Apple's schema:\n" + "\n".join(problems)


def test_xcshot_starts_a_build_and_waits_for_it(xc_sim: RunningSimulator) -> None:
    workflow = cloud.find_workflow("Nightly")
    scenario = xc_sim.sim.scenario
    nightly = scenario.workflow_named("Nightly")
    assert workflow["id"] == nightly.id
    assert workflow["attributes"]["name"] == "Nightly"

    ref = cloud.branch_ref(workflow, "main")
    assert ref == scenario.reference_named(nightly.repository_id, "main").id

    started = cloud.start_run(workflow["id"], ref)
    assert started["type"] == "ciBuildRuns"
    assert started["attributes"]["executionProgress"] == "PENDING"

    run = cloud.wait(started["id"], poll_seconds=1, log=_quiet)
    assert run["id"] == started["id"]
    assert run["attributes"]["executionProgress"] == "COMPLETE"
    assert run["attributes"]["completionStatus"] == "SUCCEEDED"

    truth = xc_sim.sim.runs.all()
    assert [(r.id, r.source_ref_id, r.start_reason) for r in truth] == [
        (started["id"], ref, "MANUAL")
    ]
    assert [r["id"] for r in cloud.runs(nightly.id)] == [started["id"]]


def test_xcshot_finds_a_workflow_by_id_and_a_branch_past_the_first_page(
    xc_sim: RunningSimulator,
) -> None:
    scenario = xc_sim.sim.scenario
    ui_tests = scenario.workflow_named("UI Tests")
    workflow = cloud.find_workflow(ui_tests.id)
    assert workflow["attributes"]["name"] == "UI Tests"

    ref = cloud.branch_ref(workflow, "release/2026.12")
    assert ref == scenario.reference_named(ui_tests.repository_id, "release/2026.12").id
    pages = [e for e in xc_sim.sim.traffic.entries if e.path.endswith("/gitReferences")]
    assert len(pages) == 2  # links.next was followed as given

    # A GET that meets a 503 with Retry-After is retried; the build still ends as FAILED.
    run_path = r"/v1/ciBuildRuns/[^/]+"
    xc_sim.sim.faults.add(Fault(method="GET", path=run_path, status=503, retry_after=0))
    started = cloud.start_run(workflow["id"], ref)
    run = cloud.wait(started["id"], poll_seconds=1, log=_quiet)
    assert run["attributes"]["executionProgress"] == "COMPLETE"
    assert run["attributes"]["completionStatus"] == "FAILED"
    assert any(e.status == 503 for e in xc_sim.sim.traffic.entries)


def test_xcshot_sees_apples_error_for_a_disabled_workflow(xc_sim: RunningSimulator) -> None:
    legacy = cloud.find_workflow("Legacy")
    ref = cloud.branch_ref(legacy, "main")
    with pytest.raises(asc.AscError) as caught:
        cloud.start_run(legacy["id"], ref)
    error = caught.value
    assert error.status == 409
    assert error.errors[0]["code"] == "ENTITY_ERROR.RELATIONSHIP.INVALID"
    assert error.errors[0]["source"] == {"pointer": "/data/relationships/workflow"}
    assert "disabled" in str(error)
    assert len(xc_sim.sim.runs) == 0
