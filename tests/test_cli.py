"""`xcloudd` as a user runs it: exit codes, what stdout and stderr show.

Commands that talk to App Store Connect run as real processes against a simulator on the real
clock (the CLI has no clock to inject, and its asyncio.run cannot nest in the test's loop);
commands that stay offline run in-process.
"""

from __future__ import annotations

import asyncio
import copy
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import schema_problems
from xcloudd.cli import main
from xcloudd.simulator import (
    ApiKey,
    Fault,
    RunningSimulator,
    generate_key,
    running_simulator,
    write_client_files,
)
from xcloudd.simulator.scenario import DEFAULT_SCENARIO, scenario_from_dict

# Fast builds: the simulator runs on the real clock here.
FAST = '[polling]\ninterval = "1s"\nmin_interval = "0.2s"\n'


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.out.splitlines() if line.strip()]


async def xcloudd(*args: str) -> Result:
    """Run `python -m xcloudd ARGS` with stdout and stderr as pipes."""
    env = {k: v for k, v in os.environ.items() if k != "XCLOUDD_CONFIG"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "xcloudd",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


@pytest.fixture
async def live_sim() -> AsyncIterator[RunningSimulator]:
    """A simulator on the real clock whose builds take half a second."""
    data = copy.deepcopy(DEFAULT_SCENARIO)
    data["pending_seconds"] = 0.2
    data["running_seconds"] = 0.3
    async with running_simulator(scenario=scenario_from_dict(data, "fast")) as running:
        yield running
        problems = schema_problems(running.sim.traffic.entries)
    assert not problems, "simulator traffic does not match Apple's schema:\n" + "\n".join(problems)


def client_config(sim: RunningSimulator, directory: Path, extra: str = FAST) -> Path:
    path = sim.write_client_files(directory)
    path.write_text(path.read_text(encoding="utf-8") + "\n" + extra, encoding="utf-8")
    return path


def assert_one_line(err: str) -> str:
    assert err.endswith("\n")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert err.startswith("xcloudd: ")
    return err.strip()


# -- against the simulator, in a real process ---------------------------------------------------


async def test_workflows_json_lists_products_and_workflows_with_ids(
    live_sim: RunningSimulator, tmp_path: Path
) -> None:
    config = client_config(live_sim, tmp_path)
    result = await xcloudd("--config", str(config), "workflows", "--json")
    assert (result.code, result.err) == (0, "")
    doc = orjson.loads(result.out)
    products = {p["name"]: p for p in doc["products"]}
    assert set(products) == {"Acme Shop", "Acme Kit"}
    shop = products["Acme Shop"]
    scenario = live_sim.sim.scenario
    assert shop["id"] == scenario.workflow_named("CI").product_id
    flows = {w["name"]: w for w in shop["workflows"]}
    assert set(flows) == {
        "CI",
        "Nightly",
        "UI Tests",
        "Archive",
        "Superseded",
        "Docs Only",
        "Legacy",
    }
    for name, flow in flows.items():
        assert flow["id"] == scenario.workflow_named(name).id
        assert flow["enabled"] is (name != "Legacy")


async def test_workflows_json_stays_parseable_when_the_api_hiccups(
    live_sim: RunningSimulator, tmp_path: Path
) -> None:
    """Retries are reported on stderr: stdout is the JSON document and nothing else."""
    live_sim.sim.faults.add(Fault(method="GET", path="/v1/ciProducts", status=503))
    config = client_config(live_sim, tmp_path)
    result = await xcloudd("--config", str(config), "workflows", "--json")
    assert result.code == 0
    assert {p["name"] for p in orjson.loads(result.out)["products"]} == {"Acme Shop", "Acme Kit"}
    assert "retry 1" in result.err


async def test_start_and_wait_prints_json_lines_ending_with_completion(
    live_sim: RunningSimulator, tmp_path: Path
) -> None:
    config = client_config(live_sim, tmp_path)
    ci = live_sim.sim.scenario.workflow_named("CI").id
    result = await xcloudd(
        "--config", str(config), "start", "--workflow", ci, "--branch", "main", "--wait"
    )
    assert (result.code, result.err) == (0, "")
    events = result.lines()
    names = [e["event"] for e in events]
    assert names[0] == "build.requested"
    assert names[-1] == "build.completed"
    assert events[-1]["result"] == "success"
    assert events[-1]["build_run_id"] == live_sim.sim.runs.all()[0].id
    assert len(live_sim.sim.runs) == 1


async def test_start_of_a_disabled_workflow_is_one_line_with_apples_words(
    live_sim: RunningSimulator, tmp_path: Path
) -> None:
    config = client_config(live_sim, tmp_path)
    legacy = live_sim.sim.scenario.workflow_named("Legacy").id
    result = await xcloudd("--config", str(config), "start", "--workflow", legacy)
    assert result.code == 1
    line = assert_one_line(result.err)
    assert "409" in line
    assert "ENTITY_ERROR.RELATIONSHIP.INVALID" in line
    assert "The workflow 'Legacy'" in line
    assert "is disabled" in line
    assert "/data/relationships/workflow" in line
    # stdout (a pipe) carries the events, including the refusal.
    assert [e["event"] for e in result.lines()] == ["build.requested", "build.start_failed"]
    assert len(live_sim.sim.runs) == 0


async def test_a_key_that_does_not_match_exits_77(
    live_sim: RunningSimulator, tmp_path: Path
) -> None:
    real = live_sim.sim.primary_key
    impostor = ApiKey(real.key_id, real.issuer_id, generate_key().private_key_pem)
    config = live_sim.write_client_files(tmp_path, key=impostor)
    result = await xcloudd("--config", str(config), "workflows")
    assert result.code == 77
    line = assert_one_line(result.err)
    assert "401" in line
    assert "NOT_AUTHORIZED" in line
    assert "private key" in line
    assert live_sim.sim.traffic.entries[-1].status == 401


# -- offline, in-process --------------------------------------------------------------------------


def test_config_error_exits_78_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = generate_key()
    config = tmp_path / "client" / "config.toml"
    write_client_files(config.parent, "http://127.0.0.1:9", key)
    config.write_text(
        config.read_text(encoding="utf-8") + '\n[polling]\ninterval = "soon"\n', encoding="utf-8"
    )
    assert main(["--config", str(config), "check"]) == 78
    captured = capsys.readouterr()
    line = assert_one_line(captured.err)
    assert str(config) in line
    assert "polling.interval" in line
    assert captured.out == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["frobnicate"],
        ["start", "--branch", "main", "--tag", "v1.2.0"],
        ["check", "--count", "0"],
    ],
)
def test_usage_errors_exit_64(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 64
    captured = capsys.readouterr()
    assert_one_line(captured.err)
    assert captured.out == ""


def test_check_json_shows_upcoming_fire_times(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_client_files(tmp_path / "client", "http://127.0.0.1:9", generate_key())
    job = (
        "\n[[jobs]]\n"
        'name = "nightly-main"\n'
        'workflow = "a3946af0-cc38-4e0b-acba-5575c8dad050"\n'
        'branch = "main"\n'
        'cron = "30 2 * * *"\n'
        'timezone = "Europe/Berlin"\n'
    )
    config.write_text(config.read_text(encoding="utf-8") + job, encoding="utf-8")
    argv = ["--config", str(config), "check", "--json"]
    argv += ["--from", "2026-12-01T00:00:00+01:00", "--count", "3"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    doc = orjson.loads(captured.out)
    assert [job["name"] for job in doc["jobs"]] == ["nightly-main"]
    assert doc["jobs"][0]["next"] == [
        "2026-12-01T02:30:00+01:00",
        "2026-12-02T02:30:00+01:00",
        "2026-12-03T02:30:00+01:00",
    ]
