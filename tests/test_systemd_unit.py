"""The shipped unit, systemd/xcloudd.service (DESIGN 3.1, 5): systemd accepts it without a
warning, `systemd-analyze security` rates its exposure 2.0 or lower, and it keeps the contract
the daemon and the README rely on (Type=notify, the watchdog, reload by SIGHUP, the key as a
credential that config.example.toml names)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "xcloudd.service"
INSTALLED = "/opt/xcloudd/bin/xcloudd"  # README "Running as a service" puts the venv there
EXPOSURE_MAX = 2.0

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (no systemd here)"
)


def directives(text: str) -> dict[str, list[str]]:
    """Every `Key=value` of the unit as "Section.Key" -> its values, in order (systemd units
    repeat keys)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return directives(UNIT.read_text())


@pytest.fixture
def testable_unit(tmp_path: Path) -> Path:
    """The unit, its ExecStart pointed at the xcloudd script of the interpreter running the
    tests (verify checks that the program exists and is executable)."""
    script = Path(sys.executable).parent / "xcloudd"
    if not script.is_file():
        pytest.skip(f"{script} is not installed (pip install -e . puts it there)")
    text = UNIT.read_text()
    program = str(script) if not re.search(r"\s", str(script)) else f'"{script}"'
    changed, count = re.subn(
        rf"^ExecStart={re.escape(INSTALLED)} ", f"ExecStart={program} ", text, flags=re.M
    )
    assert count == 1, f"{UNIT}: expected one ExecStart={INSTALLED} line"
    path = tmp_path / "xcloudd.service"
    path.write_text(changed)
    return path


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "--no-pager", *args],
        capture_output=True,
        text=True,
        errors="replace",
        # Plain ASCII output, whatever the locale of the machine running the tests.
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "SYSTEMD_COLORS": "0"},
        timeout=60,
        check=False,
    )


@needs_systemd_analyze
def test_systemd_accepts_the_unit_without_a_warning(testable_unit: Path) -> None:
    # --man=no: Documentation= is a URL anyway; nothing to look up offline. DynamicUser= means
    # no user to look up either, and verify does not open LoadCredential= sources, so the key
    # need not exist here. verify exits 0 even when it ignores a line it cannot parse
    # ("Unknown key name", "Failed to parse ..."), so its stderr must not mention the unit at
    # all; lines about other units (a container's odd system units) are not ours to judge.
    result = analyze("verify", "--man=no", str(testable_unit))
    about_unit = [
        line
        for line in result.stderr.splitlines()
        if str(testable_unit) in line or "xcloudd" in line
    ]
    assert result.returncode == 0, result.stderr
    assert about_unit == [], result.stderr


@needs_systemd_analyze
def test_security_exposure_is_at_most_2(testable_unit: Path) -> None:
    result = analyze("security", "--offline=yes", str(testable_unit))
    if "--offline" in result.stderr and result.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline: {result.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match[1])
    assert exposure <= EXPOSURE_MAX, (
        f"exposure {exposure} > {EXPOSURE_MAX}; the ✗ lines:\n"
        + "\n".join(line for line in result.stdout.splitlines() if "✗" in line)
    )


def test_unit_keeps_the_daemons_contract(unit: dict[str, list[str]]) -> None:
    service = {k.removeprefix("Service."): v for k, v in unit.items() if k.startswith("Service.")}
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["ExecStart"] == [f"{INSTALLED} --config /etc/xcloudd/config.toml run"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["WatchdogSec"] == ["60s"]
    assert service["RestartPreventExitStatus"] == ["77 78"]
    assert service["StateDirectory"] == ["xcloudd"]
    assert service["ConfigurationDirectory"] == ["xcloudd"]
    # The journald sink and sd_notify need AF_UNIX; App Store Connect and sinks need IP.
    assert service["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert {"network-online.target", "time-sync.target"} <= {
        target for value in unit["Unit.After"] for target in value.split()
    }
    # The key reaches the daemon as a credential, never through the environment.
    assert not any(k in service for k in ("Environment", "EnvironmentFile", "PassEnvironment"))


def test_the_example_config_names_the_credential_the_unit_loads(
    unit: dict[str, list[str]],
) -> None:
    (load,) = unit["Service.LoadCredential"]
    name, _, source = load.partition(":")
    assert source == "/etc/xcloudd/AuthKey_XXXXXXXXXX.p8"
    example = tomllib.loads((REPO / "config.example.toml").read_text())
    assert example["api"]["private_key"] == f"credential:{name}"
