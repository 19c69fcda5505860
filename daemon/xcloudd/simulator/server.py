"""Running the simulator: in-process for tests and benchmarks, or as `xcloudd simulator`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from xcloudd.clock import Clock, SystemClock
from xcloudd.errors import UsageError, XcloudError
from xcloudd.simulator.auth import ApiKey, generate_key, load_or_create_key, write_private
from xcloudd.simulator.core import Simulator
from xcloudd.simulator.scenario import Scenario, default_scenario, load_scenario


def _toml_string(value: str) -> str:
    # TOML basic strings share JSON's escapes for the characters a path or URL can hold.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_client_files(directory: Path, base_url: str, key: ApiKey) -> Path:
    """Write `AuthKey_<KID>.p8` (0600) and a `config.toml` with an [api] section; return the
    config's path. The config names the key file by absolute path, so it works from anywhere."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path = (directory / f"AuthKey_{key.key_id}.p8").resolve()
    write_private(key_path, key.private_key_pem.decode())
    lines = [
        "# Written by `xcloudd simulator`: credentials for the local App Store Connect stand-in.",
        "[api]",
    ]
    if key.issuer_id is not None:
        lines.append(f"issuer_id = {_toml_string(key.issuer_id)}")
    lines += [
        f"key_id = {_toml_string(key.key_id)}",
        f"private_key = {_toml_string(str(key_path))}",
        f"base_url = {_toml_string(base_url)}",
        "",
    ]
    config_path = directory / "config.toml"
    config_path.write_text("\n".join(lines), encoding="utf-8")
    return config_path


@dataclass(frozen=True)
class RunningSimulator:
    url: str
    sim: Simulator

    def write_client_files(self, directory: Path, key: ApiKey | None = None) -> Path:
        return write_client_files(directory, self.url, key or self.sim.primary_key)

    def token(self, key: ApiKey | None = None) -> str:
        return self.sim.token(key)


@asynccontextmanager
async def running_simulator(
    host: str = "127.0.0.1",
    port: int = 0,
    scenario: Scenario | None = None,
    clock: Clock | None = None,
    state_dir: Path | None = None,
    *,
    rate_limit: int | None = None,
    traffic_limit: int | None = None,
    seed: int | None = None,
) -> AsyncIterator[RunningSimulator]:
    """Serve a simulator on host:port (0 picks a free port) for the duration of the block.

    `rate_limit` and `seed` override the scenario's; `traffic_limit` bounds the traffic log
    (benchmarks).
    """
    key = load_or_create_key(state_dir) if state_dir is not None else generate_key()
    sim = Simulator(
        scenario or default_scenario(),
        clock or SystemClock(),
        rate_limit,
        [key],
        traffic_limit=traffic_limit,
        seed=seed,
    )
    # Quiet (no access log) and quick to stop: tests start and stop many of these.
    runner = web.AppRunner(sim.app(), access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        yield RunningSimulator(f"http://{url_host}:{bound_port}", sim)
    finally:
        await runner.cleanup()


def parse_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or :PORT (localhost)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port_text)


STATE_DIR_NAME = "xcloudd-simulator"


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where `xcloudd simulator` keeps its key without --state-dir:
    $XDG_STATE_HOME/xcloudd-simulator, else ~/.local/state/xcloudd-simulator, else a per-user
    folder in the temp directory. Never the current directory, which may be a git checkout
    (the folder holds a private key)."""
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec: a relative value is invalid and ignored
        return Path(xdg) / STATE_DIR_NAME
    try:
        return Path.home() / ".local" / "state" / STATE_DIR_NAME
    except RuntimeError:  # no home directory to be found
        return Path(tempfile.gettempdir()) / f"{STATE_DIR_NAME}-{os.getuid()}"


def describe_workflows(scenario: Scenario) -> list[str]:
    """One line per workflow: product / name, what its builds end as, its description."""
    rows = [
        (f"{p.name} / {w.name}", w.outcome_summary, w.description)
        for p in scenario.products
        for w in p.workflows
    ]
    name_width = max((len(r[0]) for r in rows), default=0)
    outcome_width = max((len(r[1]) for r in rows), default=0)
    return [
        f"{name:<{name_width}}  {outcome:<{outcome_width}}  {about}".rstrip()
        for name, outcome, about in rows
    ]


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGTERM and SIGINT end `serve` normally (exit 0), then the previous handlers return."""
    loop = asyncio.get_running_loop()
    installed: list[tuple[signal.Signals, Any]] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        try:
            loop.add_signal_handler(sig, stop.set)
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread; Windows
            continue
        installed.append((sig, previous))
    try:
        yield
    finally:
        for sig, previous in installed:
            loop.remove_signal_handler(sig)
            with contextlib.suppress(TypeError, ValueError):
                signal.signal(sig, previous)


async def serve(listen: str, scenario_path: Path | None, state_dir: Path | None = None) -> None:
    """Run until SIGTERM, SIGINT or cancellation, printing the URL, the workflows with their
    outcomes, and where the key and a ready client config are (`state_dir`, by default
    `default_state_dir()`)."""
    host, port = parse_listen(listen)
    scenario = load_scenario(scenario_path) if scenario_path is not None else default_scenario()
    state_dir = default_state_dir() if state_dir is None else state_dir
    stop = asyncio.Event()
    try:
        async with running_simulator(host, port, scenario, state_dir=state_dir) as running:
            config = running.write_client_files(state_dir / "client")
            workflows = "\n".join(f"    {line}" for line in describe_workflows(scenario))
            source = str(scenario_path) if scenario_path else "built-in default world"
            # procs.simulator_process reads the URL from the end of the "stand-in at " line.
            print(
                f"xcloudd simulator: App Store Connect stand-in at {running.url}\n"
                f"  world:      {source} ({len(scenario.products)} products, "
                f"{len(scenario.workflows())} workflows; a build ends as listed)\n"
                f"{workflows}\n"
                f"  state:      {state_dir.resolve()} (holds the private key; --state-dir DIR)\n"
                f"  key:        {running.sim.primary_key.key_id} "
                f"(private key in {config.parent})\n"
                f"  config:     {config}  (use: xcloudd --config {config} workflows)\n"
                f"  ground truth: {running.url}/_sim/runs\n"
                "  Stop with Ctrl-C.",
                flush=True,
            )
            with _stop_on_signals(stop):
                await stop.wait()
    except OSError as exc:
        # Binding the port or writing the state directory: say which, without a traceback.
        where = exc.filename or listen
        raise XcloudError(f"simulator: {where}: {exc.strerror or exc}") from None
