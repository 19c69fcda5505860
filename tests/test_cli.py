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
from xcloudd.errors import redact_key_material
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
        ["check", "--count", "1001"],
        ["check", "--count", "abc"],
        ["start", "--workflow", "W", "--tag", "v1", "--pull-request", "7"],
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


def _offline_config(tmp_path: Path, extra: str = "") -> Path:
    config = write_client_files(tmp_path / "client", "http://127.0.0.1:9", generate_key())
    config.write_text(config.read_text(encoding="utf-8") + extra, encoding="utf-8")
    return config


HALF_SECOND_JOB = (
    '\n[[jobs]]\nname = "fast"\nworkflow = "a3946af0-cc38-4e0b-acba-5575c8dad050"\nevery = 0.5\n'
)


@pytest.mark.parametrize(
    "command",
    [["check"], ["status"], ["run"], ["start", "fast"], ["watch", "run-1"], ["workflows"]],
)
def test_every_command_refuses_a_schedule_the_daemon_would_refuse(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
) -> None:
    def went_online(main: Any) -> None:
        main.close()
        raise AssertionError("the config passed, and the command went on to the network")

    # A command that got past the config would hang retrying 127.0.0.1:9; fail fast instead.
    monkeypatch.setattr(asyncio, "run", went_online)
    config = _offline_config(tmp_path, HALF_SECOND_JOB)
    assert main(["--config", str(config), *command]) == 78
    line = assert_one_line(capsys.readouterr().err)
    assert line == f"xcloudd: {config}: jobs[0].every: every must be at least 1 second, got 0.5"


def test_base_url_with_a_password_exits_78_without_showing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _offline_config(tmp_path)
    text = config.read_text(encoding="utf-8").replace(
        'base_url = "http://127.0.0.1:9"', 'base_url = "https://u:hunter2-pw@127.0.0.1:9"'
    )
    config.write_text(text, encoding="utf-8")
    assert main(["--config", str(config), "check"]) == 78
    line = assert_one_line(capsys.readouterr().err)
    assert f"{config}: api.base_url: must not contain a user name or password" in line
    assert "hunter2" not in line


def test_key_material_in_any_message_is_redacted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """parse_time quotes what it could not read; the CLI still must not print a key."""
    key = generate_key()
    body = "".join(
        line for line in key.private_key_pem.decode().splitlines() if not line.startswith("-----")
    )
    config = _offline_config(tmp_path)
    assert main(["--config", str(config), "check", "--from", body]) == 64
    line = assert_one_line(capsys.readouterr().err)
    assert "[redacted]" in line
    assert "is not a time" in line
    assert body[:20] not in line


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "a -----BEGIN PRIVATE KEY----- MIGHAgEAMBMG ByqGSM49 -----END PRIVATE KEY----- b",
            "a [redacted] b",
        ),
        ("cut short: -----BEGIN EC PRIVATE KEY----- MIGHAgEAMBMG", "cut short: [redacted]"),
        (
            "key MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg+x/y== here",
            "key [redacted] here",
        ),
        # Long paths and digit strings are base64 characters too, but nothing like a key.
        (
            "/Users/JohnSmith/Library/ApplicationSupport/xcloudd/config.toml: no",
            "/Users/JohnSmith/Library/ApplicationSupport/xcloudd/config.toml: no",
        ),
        ("--count 99999999999999999999999999999999999999999", None),
        ("short Ab3dE5gH", None),
        ("k.p8: not a PEM private key (no -----BEGIN line); App Store Connect keys", None),
    ],
)
def test_redaction_of_key_material(text: str, shown: str | None) -> None:
    assert redact_key_material(text) == (text if shown is None else shown)


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["start", "nightly", "--product", "P"], "drop --product"),
        (["start", "nightly", "--workflow", "W"], "either a JOB or --workflow, not both"),
        (["start", "nightly", "--branch", "main"], "drop --branch/--tag"),
        (["start", "nope"], "no job 'nope' in"),
        (["start"], "name a JOB from the config, or give --workflow"),
        (["check", "--from", "garbage"], "--from 'garbage' is not a time"),
        # Shown in a job's time zone, these would be outside Python's calendar.
        (["check", "--from", "9999-12-31T00:00:00Z"], "out of range; give a time from 1970"),
        (["check", "--from", "0001-01-01"], "out of range; give a time from 1970 to 8999"),
    ],
)
def test_argument_mistakes_exit_64_with_a_valid_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], reason: str
) -> None:
    job = '\n[[jobs]]\nname = "nightly"\nworkflow = "a3946af0-cc38-4e0b-acba-5575c8dad050"\n'
    config = _offline_config(tmp_path, job)
    assert main(["--config", str(config), *argv]) == 64
    captured = capsys.readouterr()
    assert reason in assert_one_line(captured.err)
    assert captured.out == ""


def test_a_bad_argument_is_reported_before_a_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same mistake gets the same exit code, whatever else is wrong."""
    config = _offline_config(tmp_path, HALF_SECOND_JOB)
    assert main(["--config", str(config), "check", "--from", "garbage"]) == 64
    assert "--from 'garbage' is not a time" in assert_one_line(capsys.readouterr().err)
