"""Every command README.md shows runs as written, or is listed here with the reason it cannot.

The commands come from README.md itself, so they cannot drift: every line of a fenced ```sh
block, every inline code span that reads as a command, and the synopses in the Commands table.
Each example command either matches a RUN rule (it runs here, against an `xcloudd simulator`
started for this module, with its config in $XCLOUDD_CONFIG) or a SKIP rule with its reason
(it needs a real Apple key, root, systemd, or runs forever). A command that matches neither
fails `test_every_readme_command_is_run_or_skipped_by_design`: run it, or add a SKIP rule.
Synopses are checked against `xcloudd SUB --help` instead: every option they name exists.

What the runs substitute, and nothing else: the placeholders JOB and RUN_ID (a job of the test
config, a real run), and fixed ports (127.0.0.1:8080, :9464) by free ones. `make demo` runs
for XCLOUDD_DEMO_SECONDS (8 s, not 30), started once in the background at the beginning.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from procs import free_port, simulator_process

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
DEMO_SECONDS = "8"
TIMEOUT_S = 60.0

# ---------------------------------------------------------------------------------------------
# Reading the commands out of README.md

SHELL_LANGUAGES = {"sh", "bash", "shell", "console", "shell-session", "zsh"}
_SPAN = re.compile(r"`([^`]+)`")
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")
_PROGRAM = re.compile(r"(?:\.{0,2}/)?(?:[\w.-]+/)*[a-z][a-z0-9_+-]*")


@dataclass(frozen=True)
class Example:
    command: str
    kind: str  # "sh" (a fenced block's line), "inline" (a code span), "synopsis" (Commands table)
    line: int

    @property
    def id(self) -> str:
        return f"L{self.line}:{self.command}"


def looks_like_command(text: str) -> bool:
    """`xcloudd check --online`, `FOO=1 make demo | jq .`; not `cron = "..."`, `reason: x`,
    `GET /v1/...`, `schedule.fired` or `30 2 * * *`."""
    words = text.split()
    while words and _ASSIGNMENT.fullmatch(words[0]):
        words = words[1:]
    if len(words) < 2 or not _PROGRAM.fullmatch(words[0]):
        return False
    # `active (running)` is output quoted in prose, not a command.
    return words[1] not in ("=", "==") and not words[1].startswith("(")


def _unescape(span: str) -> str:
    return span.replace("\\|", "|").strip()  # `a \| b` inside a table cell


def extract(readme: str) -> list[Example]:
    """The README's commands, in order, each once (at its first appearance)."""
    found: list[Example] = []
    fence: str | None = None
    continued = ""
    paragraph: list[tuple[int, str]] = []

    def inline(lines: list[tuple[int, str]]) -> None:
        # A code span may wrap onto the next line: join the paragraph, then map offsets back.
        text, starts = "", []
        for number, line in lines:
            starts.append((len(text), number))
            text += line + " "
        for match in _SPAN.finditer(text):
            body = " ".join(_unescape(match.group(1)).split())
            if looks_like_command(body):
                number = max(n for offset, n in starts if offset <= match.start())
                found.append(Example(body, "inline", number))
        lines.clear()

    for number, line in enumerate(readme.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is None:
                inline(paragraph)
                fence = stripped[3:].strip().lower() or "text"
            else:
                fence = None
            continue
        if fence is not None:
            if fence in SHELL_LANGUAGES:
                text = continued + stripped
                if text.endswith("\\"):
                    continued = text[:-1] + " "
                    continue
                continued = ""
                text = re.sub(r"^\$ ", "", text)
                text = re.sub(r"\s+#\s.*$", "", text).strip()  # a trailing comment
                if text and not text.startswith("#"):
                    found.append(Example(text, "sh", number))
            continue
        if stripped.startswith("|"):
            # A table row: a command in the first cell is a synopsis; the rest is prose.
            inline(paragraph)
            first, _, rest = stripped.strip("|").partition(" | ")
            match = _SPAN.fullmatch(first.strip())
            if match and looks_like_command(_unescape(match.group(1))):
                found.append(Example(_unescape(match.group(1)), "synopsis", number))
                paragraph.append((number, rest))
            else:
                paragraph.append((number, stripped))
            inline(paragraph)
        elif stripped:
            paragraph.append((number, line))
        else:
            inline(paragraph)
    inline(paragraph)
    seen: set[tuple[str, str]] = set()
    unique = []
    for example in found:
        key = (example.command, "synopsis" if example.kind == "synopsis" else "example")
        if key not in seen:
            seen.add(key)
            unique.append(example)
    return unique


EXAMPLES = extract(README.read_text(encoding="utf-8"))
COMMANDS = [e for e in EXAMPLES if e.kind != "synopsis"]
SYNOPSES = [e for e in EXAMPLES if e.kind == "synopsis"]

# ---------------------------------------------------------------------------------------------
# Commands that cannot run here, by design: pattern (re.search) -> why.

SKIP: dict[str, str] = {
    r"^make test$": "runs ruff, mypy and the whole pytest suite, this test included",
    r"^XCLOUDD_CHAOS_LONG=1 ": "the long chaos run takes minutes; CI runs a short seed of it",
    r"^[A-Za-z_][A-Za-z0-9_]*=\S*$": "sets a shell variable (a real key's id) for the next steps",
    r"^(sudo )?systemctl ": "needs systemd and root: the installed service",
    r"^(sudo )?journalctl ": "reads the systemd journal of the installed service",
    r"^(sudo )?systemd-analyze ": "rates the installed unit (tests/test_systemd_unit.py checks it)",
    r"^(sudo )?(install|useradd|adduser|groupadd|apt|apt-get|dnf|yum|chown|chmod|mkdir|cp|mv"
    r"|ln|rm|tee|visudo)\b": "changes the system (/etc, /opt, /var, users, packages): root",
    r"^sudo(edit)? |\| sudo ": "needs root",
    r"^git ": "fetches this repository from GitHub, for the install under /opt",
    r"^/opt/": "the install under /opt, which root made",
    r"^tail -f ": "follows the installed service's event file until stopped",
    r"^logcli ": "queries a Loki server",
    r"^nc -l": "a listener that runs until stopped, to look at requests by hand",
    r"^kill -9$": "prose: the crash the guarantees survive (tests/test_crash.py does it)",
    r"^kill ": "signals an installed daemon by its pid",
    r"^xcloudd (start|watch)$": "prose naming a subcommand; its synopsis is checked instead",
    r"--config /etc/": "the installed config, with a real key",
    r"^(curl|wget) (?!-s http://127\.0\.0\.1:9464/)": "talks to a remote or installed service",
    r"^(docker|podman|kubectl|helm) ": "needs a container runtime or a cluster",
    r"^(promtool|otelcol|grafana-cli) ": "needs the monitoring tool installed and configured",
    r"^openssl ": "makes a secret for a real deployment",
    r"^\.venv/bin/python bench/": "a full benchmark takes minutes; tests/test_bench.py runs the"
    " --smoke version of each",
}


def skip_reason(command: str) -> str | None:
    return next((why for pattern, why in SKIP.items() if re.search(pattern, command)), None)


# ---------------------------------------------------------------------------------------------
# The world the runnable commands run in


@dataclass
class World:
    tmp: Path
    config: Path
    state: Path
    metrics_port: int
    env: dict[str, str]
    done: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)

    def shell(
        self, command: str, *, cwd: Path | None = None, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`command` in bash (with pipefail, so a failing `make` is not hidden by `| jq`)."""
        return subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=cwd or self.tmp,
            env=dict(env or self.env),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )

    def once(self, command: str) -> subprocess.CompletedProcess[str]:
        """Run a command the first time it is asked for; the same answer afterwards."""
        if command not in self.done:
            self.done[command] = self.shell(command)
        return self.done[command]

    def popen(self, command: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=self.tmp,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def _clean_environment(tmp: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        # An outer make (make test) would make `make demo` print "Entering directory" on
        # stdout; systemd's variables would change how xcloudd writes to stdout.
        if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"}
        and k not in {"JOURNAL_STREAM", "NOTIFY_SOCKET", "INVOCATION_ID", "XCLOUDD_CONFIG"}
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["XDG_STATE_HOME"] = str(tmp / "xdg-state")  # nothing lands in the real home
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _job_config(client_config: Path, state: Path, metrics_port: int) -> str:
    # nightly-main is the README's job; Berlin time shows the DST offsets `check --from` shows.
    return client_config.read_text(encoding="utf-8") + (
        f'\n[state]\npath = "{state}"\n\n'
        '[polling]\ninterval = "1s"\nmin_interval = "1s"\n\n'
        f'[server]\nlisten = "127.0.0.1:{metrics_port}"\n\n'
        '[[sinks]]\ntype = "stdout"\n\n'
        '[[jobs]]\nname = "nightly-main"\nproduct = "Acme Shop"\nworkflow = "CI"\n'
        'branch = "main"\ncron = "30 2 * * *"\ntimezone = "Europe/Berlin"\n'
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("readme")
    with simulator_process(tmp / "sim") as (_url, client_config):
        port = free_port()
        config = tmp / "config.toml"
        config.write_text(_job_config(client_config, tmp / "state.db", port), encoding="utf-8")
        env = _clean_environment(tmp)
        env["XCLOUDD_CONFIG"] = str(config)
        yield World(tmp, config, tmp / "state.db", port, env)


# `make demo` takes seconds of wall time: both forms start together, once, in the background.
DEMO_COMMANDS = ("make demo", "make demo | jq .")


@dataclass
class Demo:
    runs: dict[str, subprocess.Popen[str]]
    results: dict[str, tuple[int, str, str]] = field(default_factory=dict)

    def result(self, command: str) -> tuple[int, str, str]:
        if command not in self.results:
            proc = self.runs[command]
            out, err = proc.communicate(timeout=TIMEOUT_S)
            self.results[command] = (proc.returncode, out, err)
        return self.results[command]


def _venv_is_current() -> bool:
    # Otherwise `make demo` would first reinstall the venv, from the network.
    if shutil.which("make") is None:
        return False
    quiet = subprocess.run(
        ["make", "-q", ".venv/.installed"], cwd=ROOT, capture_output=True, check=False
    )
    return quiet.returncode == 0 and (ROOT / ".venv" / "bin").resolve() == BIN.resolve()


@pytest.fixture(scope="module", autouse=True)
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo | None]:
    if not _venv_is_current() or not any(e.command in DEMO_COMMANDS for e in COMMANDS):
        yield None
        return
    tmp = tmp_path_factory.mktemp("demo")
    env = _clean_environment(tmp)
    env["XCLOUDD_DEMO_SECONDS"] = DEMO_SECONDS
    runs = {
        command: subprocess.Popen(
            ["bash", "-o", "pipefail", "-c", _with_jq(command)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in DEMO_COMMANDS
    }
    try:
        yield Demo(runs)
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def _with_jq(command: str) -> str:
    """Without jq installed, `| jq .` becomes a Python JSON pretty-printer of the same input."""
    if shutil.which("jq") is not None:
        return command
    python = (
        f"{sys.executable} -c 'import json,sys\n"
        "for l in sys.stdin: print(json.dumps(json.loads(l), indent=2))'"
    )
    return command.replace("| jq .", f"| {python}")


# ---------------------------------------------------------------------------------------------
# Checks of what the runnable commands print


def json_values(text: str) -> list[Any]:
    """A stream of JSON values (jq . pretty-prints each one over several lines)."""
    decoder, at = json.JSONDecoder(), 0
    values: list[Any] = []
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return values
        value, at = decoder.raw_decode(text, at)
        values.append(value)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


class _Lines:
    """A process's output lines, read by a thread, so a wait for one can time out."""

    def __init__(self, stream: io.TextIOBase | Any) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, wanted: Callable[[str], bool], timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if wanted(line):
                return line
        raise AssertionError("not seen in the output:\n" + "".join(self.seen[-40:]))

    def rest(self) -> str:
        while (line := self._queue.get(timeout=TIMEOUT_S)) is not None:
            self.seen.append(line)
        return "".join(self.seen)


@contextlib.contextmanager
def running_daemon(world: World) -> Iterator[_Lines]:
    """`xcloudd run` until daemon.started; on leaving, SIGTERM, which must end it with 0."""
    proc = world.popen("xcloudd run")
    assert proc.stdout is not None
    assert proc.stderr is not None
    lines = _Lines(proc.stdout)
    try:
        lines.wait_for(lambda line: '"daemon.started"' in line)
        yield lines
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=TIMEOUT_S)
        stderr = proc.stderr.read()
        assert code == 0, f"xcloudd run exited {code} on SIGTERM:\n{stderr}"
        assert '"daemon.stopped"' in lines.rest()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def ensure_store(world: World) -> None:
    """The daemon's state store exists once `xcloudd run` ran (status and start record in it)."""
    if not world.state.exists():
        with running_daemon(world):
            pass


def run_daemon(world: World, _command: str) -> None:
    with running_daemon(world):
        pass


def run_metrics(world: World, command: str) -> None:
    with running_daemon(world):
        out = _ok(world.shell(command.replace(":9464/", f":{world.metrics_port}/")))
    lines = out.splitlines()
    assert lines, "no xcloudd_ metrics"
    assert all(line.startswith("xcloudd_") for line in lines)
    assert any(line.startswith("xcloudd_builds_in_flight") for line in lines)


def run_check(world: World, command: str) -> None:
    out = _ok(world.once(command))
    assert "nightly-main" in out
    if "--from 2026-10-25T01:30:00+02:00" in command:
        # The README: each time shows its UTC offset, on both sides of the DST change.
        assert "+02:00" in out, out
        assert "+01:00" in out, out


def run_workflows(world: World, command: str) -> None:
    out = _ok(world.once(command))
    assert "Acme Shop" in out
    assert "UI Tests" in out


def run_help(world: World, command: str) -> None:
    out = _ok(world.once(command))
    assert "usage: xcloudd" in out
    for subcommand in ("run", "start", "status", "workflows", "check"):
        assert subcommand in out


def run_start(world: World, command: str) -> None:
    ensure_store(world)
    # The test config's JOB is the README's nightly-main: the simulator's CI, which succeeds.
    _ok(world.once(command.replace("JOB", "nightly-main")))


def run_status(world: World, command: str) -> None:
    ensure_store(world)
    out = _ok(world.once(command))
    assert out.strip()


def run_simulator(world: World, command: str) -> None:
    port = free_port()
    cwd = world.tmp / "simulator-cwd"
    cwd.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        ["bash", "-c", "exec " + command.replace(":8080", f":{port}")],
        cwd=cwd,
        env=world.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    lines = _Lines(proc.stdout)
    try:
        first = lines.wait_for(lambda line: "stand-in at " in line)
        url = first.rsplit("stand-in at ", 1)[1].strip()
        assert url == f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{url}/_sim/info", timeout=10) as answer:
            outcomes = {w["name"]: w["outcomes"] for w in json.load(answer)["workflows"]}
        assert outcomes["UI Tests"] == ["FAILED"], outcomes
        lines.wait_for(lambda line: "Stop with Ctrl-C" in line)
        banner = "".join(lines.seen)
        # Which workflow gives which outcome.
        for name, outcome in (
            ("CI", "always SUCCEEDED"),
            ("UI Tests", "always FAILED"),
            ("Nightly", "SUCCEEDED, FAILED in turn"),
            ("Legacy", "refused (disabled)"),
        ):
            assert re.search(rf"/ {re.escape(name)}\s+{re.escape(outcome)}", banner), banner
        # The state directory holds a private key: by default it is not the working directory
        # (which may be a git checkout), and the banner says where it is.
        state = re.search(r"^\s*state:\s+(\S+)", banner, re.MULTILINE)
        assert state, banner
        assert Path(state.group(1)).is_relative_to(world.env["XDG_STATE_HOME"]), (
            f"the default --state-dir is {state.group(1)}, expected under $XDG_STATE_HOME: "
            "cli.py must pass None (not ./simulator) when --state-dir is not given"
        )
        assert not any(cwd.iterdir()), "the simulator wrote into its working directory"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=TIMEOUT_S)
        assert code == 0, f"exit {code} on SIGTERM: {proc.stderr.read()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


RUN: dict[str, Callable[[World, str], None]] = {
    r"^xcloudd run$": run_daemon,
    r"^xcloudd --help$": run_help,
    r"^curl -s http://127\.0\.0\.1:9464/metrics ": run_metrics,
    r"^xcloudd check( |$)": run_check,
    r"^xcloudd workflows( |$)": run_workflows,
    r"^xcloudd start (JOB|nightly-main)( --wait)?$": run_start,
    r"^xcloudd status( |$)": run_status,
    r"^xcloudd simulator --listen 127\.0\.0\.1:8080$": run_simulator,
}


def runner(command: str) -> Callable[[World, str], None] | None:
    return next((run for pattern, run in RUN.items() if re.search(pattern, command)), None)


# ---------------------------------------------------------------------------------------------
# The tests


def test_the_readme_has_commands_to_check() -> None:
    assert any(e.command == "make demo | jq ." for e in COMMANDS)
    assert len(SYNOPSES) >= 5


def test_every_readme_command_is_run_or_skipped_by_design() -> None:
    neither = [
        f"README.md:{e.line}: {e.command}"
        for e in COMMANDS
        if e.command not in DEMO_COMMANDS
        and runner(e.command) is None
        and skip_reason(e.command) is None
    ]
    assert not neither, (
        "README commands this test neither runs nor lists as skipped by design (add a RUN or "
        "SKIP rule in tests/test_readme.py):\n" + "\n".join(neither)
    )


@pytest.mark.parametrize(
    "example",
    [e for e in COMMANDS if e.command in DEMO_COMMANDS or runner(e.command)],
    ids=lambda e: e.id,
)
def test_readme_command_runs_as_written(example: Example, world: World, demo: Demo | None) -> None:
    command = example.command
    run = runner(command)
    if run is not None:
        run(world, command)
        return
    if demo is None:
        pytest.skip("the venv is older than pyproject.toml: `make demo` would reinstall it")
    code, out, err = demo.result(command)
    assert code == 0, f"{command}: exit {code}\n{err}"
    # Piped, stdout holds the events and nothing else (no make echo, no banner).
    events = json_values(out)
    assert events, f"{command}: no output\n{err}"
    assert all(isinstance(e, dict) and e.get("service") == "xcloudd" for e in events)
    names = [e["event"] for e in events]
    assert names[0] == "daemon.started", names
    assert names[-1] == "daemon.stopped", names
    assert any(n.startswith(("build.", "schedule.")) for n in names), names
    # The closing summary (on stderr when piped) names no file of the deleted temp directory.
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("done after "), err
    assert "/" not in summary, summary
    assert "xcloudd-demo-" not in summary, summary


@pytest.mark.parametrize("example", SYNOPSES, ids=lambda e: e.id)
def test_commands_table_synopsis_matches_the_cli(example: Example) -> None:
    from xcloudd.cli import main

    words = example.command.split()
    assert words[0] == "xcloudd", example
    subcommand = words[1]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main([subcommand, "--help"])
    assert exited.value.code == 0, f"`xcloudd {subcommand}` is not a command"
    helptext = out.getvalue()
    for option in re.findall(r"--[a-z][a-z-]*", example.command):
        assert re.search(rf"(^|[\s,\[]){option}\b", helptext), (
            f"README.md:{example.line}: {option} is not an option of `xcloudd {subcommand}`"
        )
