"""`xcloudd` as a user runs it: exit codes, what stdout and stderr show.

Commands that talk to App Store Connect run as real processes against a simulator on the real
clock (the CLI has no clock to inject, and its asyncio.run cannot nest in the test's loop);
commands that stay offline run in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import schema_problems
from xcloudd.cli import _parser, exit_code, main
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


# A workflow id (and run id) that no App Store Connect has.
UUID = "a3946af0-cc38-4e0b-acba-5575c8dad050"


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
        (["start", "--workflow", "CI"], "is a name, not an id: give --product too"),
        (["start", "--workflow", UUID, "--rebuild", "../x"], "--rebuild '../x' is not an id"),
        (["watch", "a/b"], "RUN_ID 'a/b' is not an id"),
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


def test_an_argument_mistake_is_reported_before_a_bad_config_by_start_and_watch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _offline_config(tmp_path, HALF_SECOND_JOB)
    assert main(["--config", str(config), "start", "--workflow", "CI"]) == 64
    assert "give --product too" in assert_one_line(capsys.readouterr().err)
    assert main(["--config", str(config), "watch", "a/b"]) == 64
    assert "is not an id" in assert_one_line(capsys.readouterr().err)


# -- exit codes a script can branch on ----------------------------------------------------------


def wf(sim: RunningSimulator, name: str) -> str:
    return sim.sim.scenario.workflow_named(name).id


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--workflow", UUID], f"--workflow: no workflow with id {UUID} is visible to this key"),
        (
            ["--workflow", "CI", "--product", "Acme Nope"],
            "--product: no Xcode Cloud product named 'Acme Nope'",
        ),
        (
            ["--workflow", "Nope", "--product", "Acme Shop"],
            "--workflow: product 'Acme Shop' has no workflow named 'Nope'",
        ),
        (
            ["--workflow", "CI", "--product", "Acme Kit"],
            "--workflow: product 'Acme Kit' has no workflow named 'CI' (workflows: Kit CI)",
        ),
        (
            ["--workflow", "CI", "--product", "Acme Shop", "--branch", "nope"],
            "--branch: the workflow's repository has no branch 'nope'",
        ),
        (
            ["--workflow", "CI", "--product", "Acme Shop", "--branch", "feature/old-login"],
            "--branch: the workflow's repository has no branch 'feature/old-login'",
        ),
        (
            ["--workflow", "CI", "--product", "Acme Shop", "--tag", "v9.9.9"],
            "--tag: the workflow's repository has no tag 'v9.9.9'",
        ),
        (
            ["--workflow", "CI", "--product", "Acme Shop", "--pull-request", "999"],
            "--pull-request: the workflow's repository has no pull request number 999",
        ),
        (
            ["--workflow", "CI", "--product", "Acme Shop", "--pull-request", "pr-nope"],
            "--pull-request 'pr-nope': no pull request with this id is visible to this key",
        ),
        (
            ["--workflow", "CI", "--product", "Acme Shop", "--rebuild", UUID],
            f"--rebuild '{UUID}': no build run with this id is visible to this key",
        ),
    ],
)
async def test_names_and_ids_on_the_command_line_that_do_not_exist_exit_64(
    live_sim: RunningSimulator, tmp_path: Path, args: list[str], says: str
) -> None:
    config = client_config(live_sim, tmp_path)
    result = await xcloudd("--config", str(config), "start", *args, "--wait")
    assert result.code == 64
    assert says in assert_one_line(result.err)
    assert result.out == ""
    assert not live_sim.sim.traffic.matching("POST", "/v1/ciBuildRuns")


async def test_rebuilding_a_run_of_another_workflow_exits_64(
    live_sim: RunningSimulator, tmp_path: Path
) -> None:
    other = live_sim.sim.start_run(wf(live_sim, "Nightly"))
    config = client_config(live_sim, tmp_path)
    result = await xcloudd("--config", str(config), "start", "--workflow", wf(live_sim, "CI"))
    assert result.code == 0
    result = await xcloudd(
        "--config", str(config), "start", "--workflow", wf(live_sim, "CI"), "--rebuild", other.id
    )
    assert result.code == 64
    line = assert_one_line(result.err)
    assert f"--rebuild '{other.id}': run #{other.number} is not a run of workflow \"CI\"" in line
    assert len(live_sim.sim.runs) == 2


async def test_a_workflow_id_of_another_product_than_product_exits_64(
    live_sim: RunningSimulator, tmp_path: Path
) -> None:
    config = client_config(live_sim, tmp_path)
    ci = wf(live_sim, "CI")
    result = await xcloudd(
        "--config", str(config), "start", "--workflow", ci, "--product", "Acme Kit"
    )
    assert result.code == 64
    line = assert_one_line(result.err)
    assert line == f'xcloudd: --workflow \'{ci}\': workflow "CI" is not in product "Acme Kit"'
    assert len(live_sim.sim.runs) == 0


async def test_watch_of_a_run_id_that_does_not_exist_exits_64(
    live_sim: RunningSimulator, tmp_path: Path
) -> None:
    config = client_config(live_sim, tmp_path)
    result = await xcloudd("--config", str(config), "watch", UUID)
    assert result.code == 64
    assert f"RUN_ID '{UUID}': no build run with this id" in assert_one_line(result.err)
    assert result.out == ""


@pytest.mark.parametrize(
    ("job", "key", "says"),
    [
        (f'workflow = "{UUID}"\n', "jobs[0].workflow", f"no workflow with id {UUID}"),
        (
            'workflow = "Nope"\nproduct = "Acme Shop"\n',
            "jobs[0].workflow",
            "product 'Acme Shop' has no workflow named 'Nope'",
        ),
        (
            'workflow = "CI"\nproduct = "Acme Nope"\n',
            "jobs[0].product",
            "no Xcode Cloud product named 'Acme Nope'",
        ),
        (
            'workflow = "CI"\nproduct = "Acme Shop"\nbranch = "nope"\n',
            "jobs[0].branch",
            "the workflow's repository has no branch 'nope'",
        ),
        (
            'workflow = "CI"\nproduct = "Acme Shop"\ntag = "v9.9.9"\n',
            "jobs[0].tag",
            "the workflow's repository has no tag 'v9.9.9'",
        ),
    ],
)
async def test_names_in_the_config_that_do_not_exist_exit_78_alike_from_check_and_start(
    live_sim: RunningSimulator, tmp_path: Path, job: str, key: str, says: str
) -> None:
    """The same mistake gets the same code and the same line from `check --online` and from
    `start JOB`: a config error naming the job's key."""
    config = client_config(live_sim, tmp_path, FAST + '\n[[jobs]]\nname = "nightly"\n' + job)
    checked = await xcloudd("--config", str(config), "check", "--online")
    started = await xcloudd("--config", str(config), "start", "nightly", "--wait")
    assert (checked.code, started.code) == (78, 78)
    line = assert_one_line(checked.err)
    assert line == assert_one_line(started.err)
    assert line.startswith(f"xcloudd: {config}: {key}: ")
    assert says in line
    assert started.out == ""
    assert not live_sim.sim.traffic.matching("POST", "/v1/ciBuildRuns")


async def test_a_watched_workflow_that_does_not_exist_exits_78(
    live_sim: RunningSimulator, tmp_path: Path
) -> None:
    config = client_config(live_sim, tmp_path, FAST + f'\n[[watches]]\nworkflow = "{UUID}"\n')
    result = await xcloudd("--config", str(config), "check", "--online", "--json")
    assert result.code == 78
    line = assert_one_line(result.err)
    assert line.startswith(f"xcloudd: {config}: watches[0].workflow: no workflow with id {UUID}")
    assert result.out == ""


@pytest.mark.parametrize(
    ("workflow", "code", "status"),
    [
        ("UI Tests", 1, "FAILED"),
        ("Archive", 1, "ERRORED"),
        ("Superseded", 3, "CANCELED"),
        ("Docs Only", 3, "SKIPPED"),
    ],
)
async def test_start_wait_exits_with_the_builds_outcome(
    live_sim: RunningSimulator, tmp_path: Path, workflow: str, code: int, status: str
) -> None:
    config = client_config(live_sim, tmp_path)
    result = await xcloudd(
        "--config", str(config), "start", "--workflow", wf(live_sim, workflow), "--wait"
    )
    assert (result.code, result.err) == (code, "")
    last = result.lines()[-1]
    assert (last["event"], last["completion_status"]) == ("build.completed", status)


def test_exit_codes_of_errors_that_are_no_failed_build() -> None:
    """1 stays for failed builds and refused starts: an unreadable API or a broken store has
    a code of its own."""
    from xcloudd.api import ApiError, BadResponse
    from xcloudd.store import StoreError

    assert exit_code(BadResponse("App Store Connect sent no JSON object")) == 69
    assert exit_code(StoreError("cannot open the state store")) == 74
    assert exit_code(ApiError("POST", "/v1/ciBuildRuns", 409, ())) == 1


def test_an_internal_error_is_one_line_and_exits_70(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from xcloudd import commands

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug\nover two lines")

    monkeypatch.setattr(commands, "plan", broken)
    assert main(["--config", str(_offline_config(tmp_path)), "check"]) == 70
    line = assert_one_line(capsys.readouterr().err)
    assert line == "xcloudd: internal error: RuntimeError: a bug over two lines"


# -- signals -------------------------------------------------------------------------------------


@pytest.fixture
async def slow_sim() -> AsyncIterator[RunningSimulator]:
    """A simulator whose builds run for two minutes: still running when the test ends."""
    data = copy.deepcopy(DEFAULT_SCENARIO)
    data["pending_seconds"] = 0.2
    data["running_seconds"] = 120
    async with running_simulator(scenario=scenario_from_dict(data, "slow")) as running:
        yield running


async def signalled(sig: signal.Signals, event: str, *args: str) -> tuple[Result, float]:
    """Run `python -m xcloudd ARGS`, send `sig` once it printed `event`; the result and how
    long it took to exit after the signal."""
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
    assert proc.stdout is not None
    seen: list[bytes] = []

    async def until_event() -> None:
        while True:
            line = await proc.stdout.readline()  # type: ignore[union-attr]
            assert line, f"xcloudd ended before it printed {event}"
            seen.append(line)
            if orjson.loads(line)["event"] == event:
                return

    try:
        await asyncio.wait_for(until_event(), timeout=30)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    proc.send_signal(sig)
    sent = time.monotonic()
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    elapsed = time.monotonic() - sent
    assert proc.returncode is not None
    return Result(proc.returncode, b"".join(seen).decode() + out.decode(), err.decode()), elapsed


@pytest.mark.parametrize(
    "ending",
    [
        (signal.SIGINT, 130, "interrupted (SIGINT)"),
        (signal.SIGTERM, 143, "terminated (SIGTERM)"),
    ],
    ids=["SIGINT", "SIGTERM"],
)
@pytest.mark.parametrize("command", ["start --wait", "watch"])
async def test_a_signal_ends_start_wait_and_watch_with_130_or_143(
    slow_sim: RunningSimulator,
    tmp_path: Path,
    command: str,
    ending: tuple[signal.Signals, int, str],
) -> None:
    sig, code, says = ending
    config = client_config(slow_sim, tmp_path)
    ci = wf(slow_sim, "CI")
    if command == "watch":
        run = slow_sim.sim.start_run(ci)
        args = ["watch", run.id]
    else:
        args = ["start", "--workflow", ci, "--wait"]
    result, elapsed = await signalled(sig, "build.started", "--config", str(config), *args)
    # An exit code of its own, not "killed by signal" (-2 or -15), and soon.
    assert result.code == code
    line = assert_one_line(result.err)
    assert says in line
    assert "goes on in Xcode Cloud" in line
    assert elapsed < 10
    assert [e["event"] for e in result.lines()][-1] == "build.started"
    # Only xcloudd stopped: the build itself runs on.
    (run_truth,) = slow_sim.sim.runs.all()
    assert run_truth.progress(time.time()).execution_progress == "RUNNING"


# -- the command line itself -----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after", "both"])
def test_config_goes_before_or_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    config = _offline_config(tmp_path)
    argv = {
        "before": ["--config", str(config), "check"],
        "after": ["check", "--config", str(config)],
        # The one nearest the command's own options wins.
        "both": ["--config", str(tmp_path / "nowhere.toml"), "check", "--config", str(config)],
    }[where]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{config}: valid (0 jobs, 0 watches, 1 sink; key ")
    assert captured.err == ""


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_option_and_argument_has_help_text_and_shows_its_default() -> None:
    helps = {}
    for parser in _parsers(_parser()):
        helps[parser.prog] = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help, f"{parser.prog}: {name} has no help text"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in action.help, f"{parser.prog}: {name} hides its default"
    assert set(helps) >= {f"xcloudd {c}" for c in ("run", "check", "start", "watch", "status")}
    assert "--count N      fire times per job, 1 to 1000 (default: 5)" in helps["xcloudd check"]
    assert "(default: 127.0.0.1:8080)" in helps["xcloudd simulator"]
    check = " ".join(helps["xcloudd check"].split())
    assert "--from TIME show fire times after TIME, an ISO 8601 time" in check
    assert "without an offset (2026-12-01T00:00, 2026-12-01) read in each job's own time zone" in (
        check
    )
    for prog, text in helps.items():
        assert "--config PATH" in text, f"{prog} does not take --config"
    top = " ".join(helps["xcloudd"].split())
    for code in ("0 ", "1 ", "3 ", "4 ", "64 ", "69 ", "77 ", "78 ", "130 "):
        assert f" {code}" in top


def test_help_imports_nothing_heavy() -> None:
    """`xcloudd --help` must stay fast: no aiohttp, asyncio, msgspec or cryptography."""
    code = (
        "import sys\n"
        "from xcloudd.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = {'aiohttp', 'asyncio', 'msgspec', 'cryptography', 'jwt', 'orjson', 'structlog'}\n"
        "print('HEAVY:', *sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert "exit codes:" in done.stdout
    assert done.stdout.splitlines()[-1] == "HEAVY:"


# -- what check shows ------------------------------------------------------------------------------


JOB_AT = '\n[[jobs]]\nname = "launch"\nworkflow = "{uuid}"\nat = "{at}"\n'


@pytest.mark.parametrize("as_json", [False, True])
def test_check_warns_about_an_at_in_the_past_and_still_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    past = JOB_AT.format(uuid=UUID, at="2025-01-01T09:00:00+01:00")
    future = JOB_AT.format(uuid=UUID, at="2999-01-01T09:00:00+01:00").replace("launch", "later")
    config = _offline_config(tmp_path, past + future)
    assert main(["--config", str(config), "check", *(["--json"] if as_json else [])]) == 0
    captured = capsys.readouterr()
    assert captured.err == (
        "xcloudd: warning: job launch: at 2025-01-01T09:00:00+01:00 is in the past;"
        " it will never fire\n"
    )
    if as_json:
        jobs = orjson.loads(captured.out)["jobs"]
        assert [(j["name"], j["next"]) for j in jobs] == [
            ("launch", []),
            ("later", ["2999-01-01T08:00:00+00:00"]),  # in the job's time zone, UTC
        ]
    else:
        assert "launch: at 2025-01-01T09:00:00+01:00\n" in captured.out


WATCH = f'\n[[watches]]\nworkflow = "{UUID}"\n'


@pytest.mark.parametrize(
    ("extra", "counts"),
    [
        ("", "0 jobs, 0 watches, 1 sink"),
        (JOB_AT.format(uuid=UUID, at="2999-01-01T00:00:00Z") + WATCH, "1 job, 1 watch, 1 sink"),
        (
            JOB_AT.format(uuid=UUID, at="2999-01-01T00:00:00Z")
            + JOB_AT.format(uuid=UUID, at="2999-01-02T00:00:00Z").replace("launch", "other")
            + WATCH
            + WATCH.replace(UUID, UUID.replace("a", "b"))
            + '\n[[sinks]]\ntype = "stdout"\n\n[[sinks]]\ntype = "file"\npath = "events.log"\n',
            "2 jobs, 2 watches, 2 sinks",
        ),
    ],
)
def test_check_counts_with_correct_plurals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, counts: str
) -> None:
    config = _offline_config(tmp_path, extra)
    assert main(["--config", str(config), "check"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{config}: valid ({counts}; key ")


@pytest.mark.parametrize(
    ("timezone", "first"),
    [("Europe/Berlin", "2026-12-01T02:30:00+01:00"), ("UTC", "2026-12-01T02:30:00+00:00")],
)
def test_from_without_an_offset_is_read_in_each_jobs_time_zone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], timezone: str, first: str
) -> None:
    job = (
        f'\n[[jobs]]\nname = "nightly"\nworkflow = "{UUID}"\ncron = "30 2 * * *"\n'
        f'timezone = "{timezone}"\n'
    )
    config = _offline_config(tmp_path, job)
    # 02:00 in Berlin is 01:00 UTC: read as UTC, Berlin's first fire would be the next day.
    argv = [
        "--config",
        str(config),
        "check",
        "--json",
        "--from",
        "2026-12-01T02:00",
        "--count",
        "1",
    ]
    assert main(argv) == 0
    assert orjson.loads(capsys.readouterr().out)["jobs"][0]["next"] == [first]


async def test_check_online_names_what_each_job_resolved_to(
    live_sim: RunningSimulator, tmp_path: Path
) -> None:
    scenario = live_sim.sim.scenario
    ci = scenario.workflow_named("CI")
    nightly = scenario.workflow_named("Nightly")
    jobs = (
        '\n[[jobs]]\nname = "by-name"\nworkflow = "CI"\nproduct = "Acme Shop"\nbranch = "main"\n'
        f'\n[[jobs]]\nname = "by-id"\nworkflow = "{nightly.id}"\ntag = "v1.2.0"\n'
        '\n[[jobs]]\nname = "default"\nworkflow = "Kit CI"\nproduct = "Acme Kit"\n'
        '\n[[watches]]\nworkflow = "UI Tests"\nproduct = "Acme Shop"\n'
    )
    config = client_config(live_sim, tmp_path, FAST + jobs)

    text = await xcloudd("--config", str(config), "check", "--online")
    assert (text.code, text.err) == (0, "")
    lines = text.out.splitlines()
    assert lines[0].startswith(f"{config}: valid (3 jobs, 1 watch, 1 sink; ")
    assert lines[-5:] == [
        f"authenticated as key {live_sim.sim.primary_key.key_id}",
        'by-name: workflow "CI" of Acme Shop, branch main',
        'by-id: workflow "Nightly" of Acme Shop, tag v1.2.0',
        'default: workflow "Kit CI" of Acme Kit, the workflow\'s default branch',
        'watch: workflow "UI Tests" of Acme Shop',
    ]

    live_sim.sim.faults.add(Fault(method="GET", path="/v1/ciProducts", status=503))
    doc = await xcloudd("--config", str(config), "check", "--online", "--json")
    assert doc.code == 0
    # Retries are progress: on stderr, while stdout holds the document and nothing else.
    assert "retry 1" in doc.err
    parsed = orjson.loads(doc.out)
    resolved = {j["name"]: j["resolved"] for j in parsed["jobs"]}
    shop = {"id": ci.product_id, "name": "Acme Shop"}
    main_ref = scenario.reference_named(ci.repository_id, "main", "BRANCH")
    tag_ref = scenario.reference_named(nightly.repository_id, "v1.2.0", "TAG")
    assert resolved["by-name"] == {
        "workflow": {"id": ci.id, "name": "CI"},
        "product": shop,
        "source": {"kind": "branch", "name": "main", "id": main_ref.id},
    }
    assert resolved["by-id"] == {
        "workflow": {"id": nightly.id, "name": "Nightly"},
        "product": shop,
        "source": {"kind": "tag", "name": "v1.2.0", "id": tag_ref.id},
    }
    kit = scenario.workflow_named("Kit CI")
    assert resolved["default"] == {
        "workflow": {"id": kit.id, "name": "Kit CI"},
        "product": {"id": kit.product_id, "name": "Acme Kit"},
        "source": {"kind": "default", "name": None, "id": None},
    }
    ui = scenario.workflow_named("UI Tests")
    assert parsed["watches"] == [
        {"workflow": {"id": ui.id, "name": "UI Tests"}, "product": shop},
    ]


async def test_workflows_lists_names_first_with_plurals(
    live_sim: RunningSimulator, tmp_path: Path
) -> None:
    config = client_config(live_sim, tmp_path)
    result = await xcloudd("--config", str(config), "workflows")
    assert (result.code, result.err) == (0, "")
    scenario = live_sim.sim.scenario
    legacy = scenario.workflow_named("Legacy")
    kit = scenario.workflow_named("Kit CI")
    lines = result.out.splitlines()
    assert f"Acme Shop: 7 workflows (product {legacy.product_id})" in lines
    legacy_line = next(line for line in lines if line.startswith("  Legacy "))
    assert legacy_line.startswith(f"  Legacy      {legacy.id}  (disabled)")
    assert f"Acme Kit: 1 workflow (product {kit.product_id})" in lines
    assert any(line.startswith(f"  Kit CI  {kit.id}") for line in lines)
    # Each workflow's description follows it: the simulator's says how its builds end.
    ui = next(line for line in lines if line.startswith("  UI Tests "))
    assert "always FAILED" in ui


# -- an endpoint that never answers -------------------------------------------------------------


@pytest.fixture
async def silent_endpoint() -> AsyncIterator[str]:
    """The URL of a TCP server that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # until the client gives up

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_an_endpoint_that_never_answers_ends_each_command_in_twice_the_timeout(
    silent_endpoint: str, tmp_path: Path
) -> None:
    """With api.timeout = 1s, every command gives up after 2 x 1s + 5s without an answer
    (exit 69), having said after a few seconds what it waits for; `--wait` does not exempt
    the start itself."""
    config = write_client_files(tmp_path / "client", silent_endpoint, generate_key())
    text = config.read_text(encoding="utf-8").replace("[api]\n", '[api]\ntimeout = "1s"\n', 1)
    job = f'\n[[jobs]]\nname = "nightly"\nworkflow = "{UUID}"\n'
    config.write_text(text + job, encoding="utf-8")
    commands = [
        ["workflows", "--json"],
        ["check", "--online", "--json"],
        ["start", "nightly", "--wait"],
        ["start", "--workflow", UUID, "--branch", "main"],
        ["watch", UUID],
    ]

    async def timed(args: list[str]) -> tuple[Result, float]:
        began = time.monotonic()
        result = await xcloudd("--config", str(config), *args)
        return result, time.monotonic() - began

    results = await asyncio.gather(*(timed(args) for args in commands))
    for args, (result, elapsed) in zip(commands, results, strict=True):
        assert result.code == 69, (args, result)
        lines = result.err.splitlines()
        assert f"xcloudd: waiting for App Store Connect ({silent_endpoint}) ..." in lines, args
        assert lines[-1] == (
            f"xcloudd: App Store Connect ({silent_endpoint}) did not answer for 7s: check"
            " api.base_url, the network and any proxy, or raise api.timeout"
        ), args
        assert "Traceback" not in result.err
        # 7 s, plus starting Python and ending cleanly; it used to take minutes.
        assert elapsed < 15, (args, elapsed)
        if args[0] != "start" and args[0] != "watch":
            assert result.out == "", args
