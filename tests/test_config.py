"""The config contract (DESIGN 3.2): what loads, the defaults, and the one-line error for each
kind of mistake, naming the file, the key and the reason, without ever showing a secret."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from xcloudd.config import (
    DEFAULT_BASE_URL,
    DEFAULT_CONFIG_PATH,
    KNOWN_KEYS,
    Config,
    FileSinkConfig,
    HttpSinkConfig,
    JournaldSinkConfig,
    PollingConfig,
    SlackSinkConfig,
    StdoutSinkConfig,
    default_state_path,
    load_config,
    parse_duration,
    resolve_config_path,
)
from xcloudd.errors import ConfigError, ExitCode

REPO = Path(__file__).resolve().parents[1]
KEY_ID = "2X9R4HXF34"
ISSUER = "69a6de70-03db-47e3-e053-5b8c7c11a4d1"
WORKFLOW_ID = "a3946af0-cc38-4e0b-acba-5575c8dad050"
TOKEN = "s3cret-webhook-token-0123456789"
SLACK_URL = "https://hooks.slack.com/services/T0000/B0000/slacksecretpart"


def pem(key: object, encryption: serialization.KeySerializationEncryption | None = None) -> bytes:
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        encryption or serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def p256_pem() -> bytes:
    return pem(ec.generate_private_key(ec.SECP256R1()))


def body_lines(pem_bytes: bytes) -> list[str]:
    """The base64 lines of a PEM: the part that must never show up anywhere."""
    return [line for line in pem_bytes.decode().splitlines() if not line.startswith("-----")]


@pytest.fixture
def key_file(tmp_path: Path, p256_pem: bytes) -> Path:
    path = tmp_path / f"AuthKey_{KEY_ID}.p8"
    path.write_bytes(p256_pem)
    path.chmod(0o600)  # a key file others can read is refused
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"STATE_DIRECTORY": str(tmp_path / "state"), "HOME": str(tmp_path / "home")}


API = f"""
[api]
issuer_id = "{ISSUER}"
key_id = "{KEY_ID}"
private_key = "AuthKey_{KEY_ID}.p8"
"""

Load = Callable[[str], Config]
Fail = Callable[[str], str]


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return tmp_path / "config.toml"


@pytest.fixture
def load(config_path: Path, key_file: Path, env: dict[str, str]) -> Load:
    def _load(text: str) -> Config:
        config_path.write_text(text)
        return load_config(config_path, env)

    return _load


@pytest.fixture
def fail(load: Load) -> Fail:
    """Load `text`, expect a ConfigError, and return its (checked one-line) message."""

    def _fail(text: str) -> str:
        with pytest.raises(ConfigError) as info:
            load(text)
        message = str(info.value)
        assert "\n" not in message
        assert info.value.exit_code == ExitCode.CONFIG
        return message

    return _fail


def test_minimal_config_gets_the_documented_defaults(load: Load, tmp_path: Path) -> None:
    config = load(API)

    assert config.api.key.key_id == KEY_ID
    assert config.api.key.issuer_id == ISSUER
    assert config.api.key.source == str(tmp_path / f"AuthKey_{KEY_ID}.p8")
    assert isinstance(config.api.key.private_key.curve, ec.SECP256R1)
    assert config.api.base_url == DEFAULT_BASE_URL
    assert config.api.timeout == 30
    assert config.state.path == tmp_path / "state" / "state.db"
    assert config.polling == PollingConfig(
        interval=30, min_interval=5, max_interval=300, give_up_after=10800, budget=0.8
    )
    assert config.server is None
    assert config.sinks == (StdoutSinkConfig(events=("*",), min_level="debug"),)
    assert config.sinks[0].type == "stdout"
    assert config.jobs == ()
    assert config.watches == ()


def test_individual_key_has_no_issuer(load: Load) -> None:
    config = load(API.replace(f'issuer_id = "{ISSUER}"', ""))
    assert config.api.key.issuer_id is None


def test_example_config_documents_every_key_and_loads(tmp_path: Path, p256_pem: bytes) -> None:
    example = (REPO / "config.example.toml").read_text()
    for section, keys in KNOWN_KEYS.items():
        for key in keys:
            written = f"[{key}]" in example or f"[[{key}]]" in example or f"{key} = " in example
            assert written, f"config.example.toml does not show {section}.{key}"

    # The key as systemd/xcloudd.service hands it over: LoadCredential=asc-key:... puts a copy
    # in $CREDENTIALS_DIRECTORY/asc-key.
    assert '\nprivate_key = "credential:asc-key"\n' in example
    assert '\n# private_key = "/etc/xcloudd/AuthKey_XXXXXXXXXX.p8"\n' in example
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "asc-key").write_bytes(p256_pem)
    path = tmp_path / "config.toml"
    path.write_text(example)
    config = load_config(path, {"HOME": str(tmp_path), "CREDENTIALS_DIRECTORY": str(creds)})

    assert config.api.key.key_id == "XXXXXXXXXX"
    assert config.api.key.source == "credential:asc-key"
    assert config.state.path == tmp_path / ".local" / "state" / "xcloudd" / "state.db"
    assert config.polling == PollingConfig()
    assert config.server is not None
    assert (config.server.host, config.server.port) == ("127.0.0.1", 9464)
    assert [s.type for s in config.sinks] == ["stdout", "file"]
    assert [j.name for j in config.jobs] == ["nightly-main", "release-candidate", "pr-check"]
    nightly = config.job("nightly-main")
    assert (nightly.cron, nightly.timezone, nightly.jitter, nightly.catch_up) == (
        "30 2 * * *",
        "Europe/Berlin",
        600,
        7200,
    )
    assert config.job("release-candidate").at == datetime(2026, 12, 24, 17, tzinfo=UTC)
    assert config.job("pr-check").every == 6 * 3600
    assert len(config.watches) == 1


def test_full_config_values(load: Load, tmp_path: Path) -> None:
    config = load(
        API
        + f"""
base_url = "http://127.0.0.1:8099/"
timeout = 5

[state]
path = "data/state.db"

[polling]
interval = "1m"
min_interval = 10
max_interval = "1h"
give_up_after = "2h30m"
budget = 1

[server]
listen = "[::1]:0"
webhook_token = "{TOKEN}"

[[sinks]]
type = "file"
path = "~/events.jsonl"
events = ["build.*"]

[[sinks]]
type = "http"
url = "https://otel.example.com/v1/logs"
format = "otlp"

[[sinks]]
type = "slack"
url = "{SLACK_URL}"

[[jobs]]
name = "Nightly_1.x"
workflow = "Nightly"
product = "MyApp"
pull_request = "pr-id-1"
clean = true
at = "2026-03-29T02:30:00Z"
overlap = "allow_all"
enabled = false

[[jobs]]
name = "hourly"
workflow = "{WORKFLOW_ID.upper()}"
tag = "v1"
every = "1h"

[[watches]]
workflow = "Release"
product = "MyApp"
"""
    )
    assert config.api.base_url == "http://127.0.0.1:8099"
    assert config.api.timeout == 5
    assert config.state.path == tmp_path / "data" / "state.db"
    assert config.polling == PollingConfig(60, 10, 3600, 9000, 1.0)
    assert config.server is not None
    assert (config.server.host, config.server.port) == ("::1", 0)
    assert config.server.webhook_token == TOKEN
    file_sink, http_sink, slack_sink = config.sinks
    assert file_sink.path == tmp_path / "home" / "events.jsonl"
    assert file_sink.events == ("build.*",)
    assert (http_sink.url, http_sink.format) == ("https://otel.example.com/v1/logs", "otlp")
    assert slack_sink.url == SLACK_URL
    nightly = config.job("Nightly_1.x")
    assert not nightly.workflow_is_id
    assert (nightly.product, nightly.pull_request, nightly.clean) == ("MyApp", "pr-id-1", True)
    assert nightly.at == datetime(2026, 3, 29, 2, 30, tzinfo=UTC)
    assert (nightly.overlap, nightly.enabled, nightly.timezone) == ("allow_all", False, "UTC")
    hourly = config.job("hourly")
    assert hourly.workflow_is_id
    assert (hourly.tag, hourly.every, hourly.cron, hourly.clean) == ("v1", 3600, None, None)
    assert config.watches[0].product == "MyApp"
    with pytest.raises(KeyError):
        config.job("nope")


def test_at_keeps_the_written_offset(load: Load) -> None:
    config = load(
        API
        + f"""
[[jobs]]
name = "a"
workflow = "{WORKFLOW_ID}"
at = 2026-12-24T18:00:00+01:00
"""
    )
    at = config.job("a").at
    assert at is not None
    assert at.utcoffset() == timedelta(hours=1)
    assert at == datetime(2026, 12, 24, 18, tzinfo=timezone(timedelta(hours=1)))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("1h30m", 5400),
        ("2d", 172800),
        ("1d2h3m4s", 93784),
        ("1.5h", 5400),
        ("0s", 0),
        (45, 45),
        (2.5, 2.5),
        (0, 0),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("90", 'add a unit, e.g. "90s"'),
        ("", "expected a duration"),
        ("1x", "expected a duration"),
        ("30m1h", "expected a duration"),
        ("1h 30m", "expected a duration"),
        ("-5s", "expected a duration"),
        (-5, "must not be negative"),
        (True, "got true"),
        (float("inf"), "expected a duration"),
        ([1], "got list"),
    ],
)
def test_bad_durations(value: object, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_duration(value)


def test_state_path_defaults_follow_systemd_then_xdg_then_home() -> None:
    assert default_state_path({"STATE_DIRECTORY": "/var/lib/xcloudd:/var/lib/other"}) == Path(
        "/var/lib/xcloudd/state.db"
    )
    assert default_state_path({"XDG_STATE_HOME": "/xdg", "HOME": "/home/u"}) == Path(
        "/xdg/xcloudd/state.db"
    )
    # The XDG spec says a relative XDG_STATE_HOME is invalid and must be ignored.
    assert default_state_path({"XDG_STATE_HOME": "rel", "HOME": "/home/u"}) == Path(
        "/home/u/.local/state/xcloudd/state.db"
    )
    assert default_state_path({"HOME": "/home/u"}) == Path("/home/u/.local/state/xcloudd/state.db")


def test_config_path_from_flag_then_env_then_default() -> None:
    env = {"XCLOUDD_CONFIG": "/srv/x.toml"}
    assert resolve_config_path("/tmp/c.toml", env) == Path("/tmp/c.toml")
    assert resolve_config_path(None, env) == Path("/srv/x.toml")
    assert resolve_config_path(None, {}) == DEFAULT_CONFIG_PATH == Path("/etc/xcloudd/config.toml")
    assert resolve_config_path("", {"XCLOUDD_CONFIG": ""}) == DEFAULT_CONFIG_PATH


def test_missing_file_says_how_to_point_at_one(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    message = str(info.value)
    assert message.startswith(f"{path}: no such file")
    assert "--config" in message
    assert "XCLOUDD_CONFIG" in message


def test_toml_syntax_error_names_line_and_column(fail: Fail, config_path: Path) -> None:
    message = fail(API + '\n[polling]\ninterval = "30s\n')
    assert message.startswith(f"{config_path}: line 8, column 16: invalid TOML: ")
    assert "Illegal character" in message


def test_numbers_tomllib_cannot_read(fail: Fail, config_path: Path) -> None:
    # tomllib raises a plain ValueError for these, not TOMLDecodeError.
    message = fail(API + "\n[polling]\nbudget = 1" + "0" * 5000 + "\n")
    assert message == (
        f"{config_path}: invalid TOML: a number is too long (over 4300 digits); shorten it"
    )


def test_too_deeply_nested_toml(fail: Fail, config_path: Path) -> None:
    message = fail(API + "x = " + "[" * 5000 + "]" * 5000 + "\n")
    assert message.startswith(f"{config_path}: invalid TOML: arrays or inline tables nested")


def test_toml_error_at_end_of_document(fail: Fail, config_path: Path) -> None:
    message = fail("[api]\nkey_id = ")
    assert message.startswith(f"{config_path}: line 2, column 10 (end of file): invalid TOML:")


def test_not_utf8(config_path: Path, env: dict[str, str]) -> None:
    config_path.write_bytes(b'[api]\nkey_id = "\xff"\n')
    with pytest.raises(ConfigError, match=r": line 2: not valid UTF-8"):
        load_config(config_path, env)


JOB = f'[[jobs]]\nname = "j"\nworkflow = "{WORKFLOW_ID}"\n'


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        # structure
        ("", "api", "missing; add an [api] table"),
        (API + "\n[polling]\nintervall = 3\n", "polling.intervall", "did you mean 'interval'?"),
        ("sink = 1\n" + API, "sink", "unknown key 'sink' (known: api, state,"),
        (API + "api_key = 1\n", "api.api_key", "unknown key 'api_key'"),
        # Shown as it would be written, so a control character cannot garble the line.
        (API + '"a\\u001bb" = 1\n', 'api."a\\u001bb"', "unknown key 'a\\x1bb'"),
        (API + '"a.b" = 1\n', 'api."a.b"', "unknown key 'a.b'"),
        (API + JOB + JOB.replace('"j"', '"k"') + 'branh = "main"\n', "jobs[1].branh", "branch"),
        ("polling = 3\n" + API, "polling", "expected a table ([polling]), got 3"),
        (API + '\n[sinks]\ntype = "stdout"\n', "sinks", "expected an array of tables ([[sinks]]"),
        # api
        (API.replace(f'"{KEY_ID}"', "12", 1), "api.key_id", "expected a string, got 12"),
        (API.replace(KEY_ID, "2x9r4hxf34", 1), "api.key_id", "10 uppercase letters and digits"),
        (API.replace(f'key_id = "{KEY_ID}"', ""), "api.key_id", "missing; add key_id"),
        (API.replace(ISSUER, "team-1"), "api.issuer_id", 'expected a UUID like "'),
        (API.replace(f'issuer_id = "{ISSUER}"', 'issuer_id = ""'), "api.issuer_id", "not be empty"),
        (API + 'base_url = "ftp://x"\n', "api.base_url", "expected an http:// or https:// URL"),
        (API + 'base_url = "localhost:80"\n', "api.base_url", "http:// or https://"),
        (API + 'base_url = "https://h/v1"\n', "api.base_url", "must not have a path"),
        (API + 'base_url = "https://h?x=1"\n', "api.base_url", "must not have a query"),
        (API + 'base_url = "https://h#top"\n', "api.base_url", "or fragment (#...)"),
        (API + 'base_url = "https://h:99999"\n', "api.base_url", "port must be a number from 1"),
        (API + 'base_url = "https://h:0"\n', "api.base_url", "port must be a number from 1"),
        (API + 'base_url = "https://h:http"\n', "api.base_url", "port must be a number from 1"),
        (API + 'base_url = "http://::1:8080"\n', "api.base_url", "IPv6 address in brackets"),
        (API + 'base_url = "http://[::zz]:8080"\n', "api.base_url", "IPv6 address goes in"),
        (API + 'base_url = "https://a b"\n', "api.base_url", "must not contain spaces"),
        (API + 'base_url = "https://bad!host"\n', "api.base_url", "not a valid host name"),
        (API + 'base_url = "https://bücher.de"\n', "api.base_url", "its xn-- form"),
        (API + 'base_url = "https://"\n', "api.base_url", "http:// or https:// URL"),
        (API + 'timeout = "0s"\n', "api.timeout", "must be more than 0"),
        (API + 'timeout = "soon"\n', "api.timeout", 'expected a duration like "90s"'),
        # state
        (API + "\n[state]\npath = 3\n", "state.path", "expected a string, got 3"),
        (
            API + "\n[state]\noutbox_max_events = 999\n",
            "state.outbox_max_events",
            "must be from 1000 to 1000000000, got 999; default 100000",
        ),
        (
            API + "\n[state]\noutbox_max_events = 1e5\n",
            "state.outbox_max_events",
            "expected a whole number like 100000, got 100000.0",
        ),
        (
            API + '\n[state]\noutbox_max_events = "100000"\n',
            "state.outbox_max_events",
            "expected a whole number",
        ),
        (
            API + '\n[state]\noutbox_max_age = "59m"\n',
            "state.outbox_max_age",
            'use at least "1h" (default "7d")',
        ),
        (API + '\n[state]\noutbox_max_age = "a week"\n', "state.outbox_max_age", "duration"),
        # polling
        (API + '\n[polling]\ninterval = "1s"\n', "polling.interval", "is outside"),
        (API + '\n[polling]\ninterval = "10m"\n', "polling.interval", "(5s..5m)"),
        (API + '\n[polling]\nmin_interval = "10m"\n', "polling.min_interval", "more than"),
        (API + "\n[polling]\nbudget = 1.5\n", "polling.budget", "at most 1 (e.g. 0.8), got 1.5"),
        (API + "\n[polling]\nbudget = 0\n", "polling.budget", "above 0"),
        (API + '\n[polling]\nbudget = "80%"\n', "polling.budget", 'expected a number, got "80%"'),
        (API + "\n[polling]\nbudget = 1" + "0" * 400 + "\n", "polling.budget", "finite number"),
        (API + "\n[polling]\nbudget = 0x" + "f" * 5000 + "\n", "polling.budget", "too large"),
        (API + "\n[polling]\ngive_up_after = 0\n", "polling.give_up_after", "more than 0"),
        # server
        (API + '\n[server]\nlisten = "9464"\n', "server.listen", 'expected "HOST:PORT"'),
        (API + '\n[server]\nlisten = "::1:9464"\n', "server.listen", "IPv6 address in brackets"),
        (API + '\n[server]\nlisten = ":9464"\n', "server.listen", '"0.0.0.0:9464"'),
        (API + '\n[server]\nlisten = "h:70000"\n', "server.listen", "out of range"),
        (API + '\n[server]\nlisten = "[zz]:1"\n', "server.listen", "not an IPv6 address"),
        # "²" passes str.isdigit() but not int().
        (API + '\n[server]\nlisten = "h:²"\n', "server.listen", 'expected "HOST:PORT"'),
        (API + '\n[server]\nlisten = "h:1' + "0" * 5000 + '"\n', "server.listen", "out of range"),
        (API + '\n[server]\nlisten = "b@d:80"\n', "server.listen", "not a host name"),
        (API + '\n[server]\nwebhook_token = "short"\n', "server.webhook_token", "too short"),
        (
            API + '\n[server]\nwebhook_token = "has space in it!!!"\n',
            "server.webhook_token",
            "only",
        ),
        # sinks
        (
            API + '\n[[sinks]]\ntype = "kafka"\n',
            "sinks[0].type",
            'unknown sink type "kafka"; use one of stdout, journald, file, http, slack',
        ),
        (API + "\n[[sinks]]\nevents = []\n", "sinks[0].type", "missing; add type"),
        (API + '\n[[sinks]]\ntype = "file"\n', "sinks[0].path", 'a "file" sink needs path'),
        (API + '\n[[sinks]]\ntype = "slack"\n', "sinks[0].url", 'a "slack" sink needs url'),
        (API + '\n[[sinks]]\ntype = "stdout"\npath = "x"\n', "sinks[0].path", "does not apply"),
        (API + '\n[[sinks]]\ntype = "file"\npath = "x"\nformat = "loki"\n', "sinks[0].format", ""),
        (API + '\n[[sinks]]\ntype = "http"\nurl = "x"\n', "sinks[0].url", "URL"),
        (
            API + '\n[[sinks]]\ntype = "http"\nurl = "http://x"\nformat = "csv"\n',
            "sinks[0].format",
            'expected one of "json" | "loki" | "otlp", got "csv"',
        ),
        (API + '\n[[sinks]]\ntype = "stdout"\nevents = "build.*"\n', "sinks[0].events", "array"),
        (API + '\n[[sinks]]\ntype = "stdout"\nevents = []\n', "sinks[0].events", "is empty"),
        # jobs
        (API + f'[[jobs]]\nworkflow = "{WORKFLOW_ID}"\n', "jobs[0].name", "missing; add name"),
        (API + JOB.replace('"j"', '"-j"'), "jobs[0].name", "must start with a letter or digit"),
        (API + JOB.replace('"j"', '"a b"'), "jobs[0].name", "only letters"),
        (API + JOB + JOB, "jobs[1].name", "duplicate job name 'j' (also jobs[0])"),
        (API + '[[jobs]]\nname = "j"\n', "jobs[0].workflow", "missing; add workflow"),
        (API + JOB.replace(WORKFLOW_ID, "Nightly"), "jobs[0].workflow", 'set product = "..."'),
        (
            API + JOB + 'branch = "main"\ntag = "v1"\n',
            "jobs[0].tag",
            "conflicts with jobs[0].branch",
        ),
        (API + JOB + 'tag = "v"\npull_request = "1"\n', "jobs[0].pull_request", "only one of"),
        (API + JOB + "pull_request = 42\n", "jobs[0].pull_request", "expected a string, got 42"),
        (API + JOB + 'clean = "yes"\n', "jobs[0].clean", 'expected true or false, got "yes"'),
        (API + JOB + 'cron = "* * * * *"\nevery = "1h"\n', "jobs[0].every", "conflicts with"),
        (API + JOB + 'every = "1h"\nat = 2026-01-01T00:00:00Z\n', "jobs[0].at", "conflicts with"),
        (API + JOB + 'every = "0s"\n', "jobs[0].every", "must be more than 0"),
        # Passes as a duration, but the schedule needs at least a second.
        (API + JOB + "every = 0.5\n", "jobs[0].every", "every must be at least 1 second"),
        (API + JOB + 'every = "36501d"\n', "jobs[0].every", 'at most 100 years ("36500d")'),
        (API + JOB + 'every = "1' + "0" * 400 + 's"\n', "jobs[0].every", "at most 100 years"),
        (API + JOB + "every = 1" + "0" * 400 + "\n", "jobs[0].every", "at most 100 years"),
        (API + JOB + 'cron = "* * * * *"\njitter = 1e300\n', "jobs[0].jitter", "at most"),
        (
            API + JOB + "at = 0001-01-01T00:00:00+01:00\n",
            "jobs[0].at",
            "0001-01-01T00:00:00+01:00 is out of range",
        ),
        (API + JOB + 'at = "9999-12-31T23:59:59-01:00"\n', "jobs[0].at", "is out of range"),
        # Plus up to 100 years of jitter, or shown in the job's time zone, past year 9999.
        (
            API + JOB + "at = 9000-01-01T00:00:00Z\n",
            "jobs[0].at",
            "9000-01-01T00:00:00+00:00 is out of range; use a date from the year 1 to 8999",
        ),
        (API + JOB + "at = 2026-12-24T18:00:00\n", "jobs[0].at", "has no UTC offset"),
        (API + JOB + 'at = "2026-12-24T18:00:00"\n', "jobs[0].at", "has no UTC offset"),
        (API + JOB + "at = 2026-12-24\n", "jobs[0].at", "expected an RFC 3339 date-time"),
        (
            API + JOB + 'at = "tomorrow"\n',
            "jobs[0].at",
            "with offset like 2026-12-24T18:00:00+01:00",
        ),
        (API + JOB + 'at = "2026-02-30T18:00:00Z"\n', "jobs[0].at", "not a real date and time"),
        (API + JOB + 'timezone = "Mars/Olympus"\n', "jobs[0].timezone", "unknown time zone"),
        (API + JOB + 'timezone = "../etc/passwd"\n', "jobs[0].timezone", "IANA name"),
        # A folder of the tz database, and a name too long for a file name: OSErrors.
        (API + JOB + 'timezone = "America"\n', "jobs[0].timezone", "unknown time zone"),
        (API + JOB + f'timezone = "{"a" * 300}"\n', "jobs[0].timezone", "unknown time zone"),
        (
            API + JOB + 'overlap = "queue"\n',
            "jobs[0].overlap",
            '"skip" | "buffer_one" | "allow_all"',
        ),
        (API + JOB + 'jitter = "-1m"\n', "jobs[0].jitter", "expected a duration"),
        (API + JOB + 'catch_up = "yesterday"\n', "jobs[0].catch_up", "expected a duration"),
        (API + JOB + 'enabled = "no"\n', "jobs[0].enabled", "expected true or false"),
        # watches
        (API + '[[watches]]\nworkflow = "Release"\n', "watches[0].workflow", "set product"),
        (API + '[[watches]]\nproduct = "p"\n', "watches[0].workflow", "missing; add workflow"),
        (
            API + f'[[watches]]\nworkflow = "{WORKFLOW_ID}"\n' * 2,
            "watches[1].workflow",
            "already watched by watches[0]",
        ),
    ],
)
def test_mistakes_name_file_key_and_reason(
    fail: Fail, config_path: Path, text: str, key: str, reason: str
) -> None:
    message = fail(text)
    assert message.startswith(f"{config_path}: {key}: "), message
    assert reason in message, message


def test_cron_is_checked_when_the_config_loads(fail: Fail, load: Load) -> None:
    assert load(API + JOB + 'cron = "30 2 * * 1-5"\n').job("j").cron == "30 2 * * 1-5"
    message = fail(API + JOB + 'cron = "61 2 * * *"\n')
    assert ': jobs[0].cron: "61 2 * * *": minute' in message
    assert "(fields: minute hour day-of-month month day-of-week)" in message


# --- the signing key ------------------------------------------------------------------------


def key_config(ref: str) -> str:
    return API.replace(f'private_key = "AuthKey_{KEY_ID}.p8"', f'private_key = "{ref}"')


def test_relative_key_path_is_next_to_the_config_not_the_cwd(
    load: Load, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load(API).api.key.source == str(tmp_path / f"AuthKey_{KEY_ID}.p8")


def test_key_from_env_with_literal_newline_escapes(
    config_path: Path, env: dict[str, str], p256_pem: bytes
) -> None:
    config_path.write_text(key_config("env:ASC_KEY"))
    one_line = p256_pem.decode().replace("\n", "\\n")
    config = load_config(config_path, {**env, "ASC_KEY": one_line})
    assert config.api.key.source == "env:ASC_KEY"
    assert isinstance(config.api.key.private_key, ec.EllipticCurvePrivateKey)


def test_key_from_systemd_credential(
    config_path: Path, env: dict[str, str], tmp_path: Path, p256_pem: bytes
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "asc-key").write_bytes(p256_pem)
    config_path.write_text(key_config("credential:asc-key"))
    config = load_config(config_path, {**env, "CREDENTIALS_DIRECTORY": str(creds)})
    assert config.api.key.source == "credential:asc-key"


def test_key_from_default_os_environ(
    config_path: Path, p256_pem: bytes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XCLOUDD_TEST_KEY", p256_pem.decode())
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    config_path.write_text(key_config("env:XCLOUDD_TEST_KEY"))
    assert load_config(config_path).api.key.source == "env:XCLOUDD_TEST_KEY"


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    (tmp_path / name).write_bytes(data)
    (tmp_path / name).chmod(0o600)
    return name


KeyCase = Callable[[Path, bytes], tuple[str, dict[str, str], str]]

KEY_CASES: dict[str, KeyCase] = {
    "missing file": lambda d, _: ("gone.p8", {}, "gone.p8: no such file"),
    "directory": lambda d, _: (str(d), {}, "is a directory"),
    "env unset": lambda d, _: ("env:ASC_KEY", {}, "environment variable ASC_KEY is not set"),
    "env empty": lambda d, _: ("env:ASC_KEY", {"ASC_KEY": " "}, "ASC_KEY is empty"),
    "env bad name": lambda d, _: ("env:1X", {}, 'expected "env:NAME"'),
    "credential without dir": lambda d, _: (
        "credential:asc",
        {},
        "CREDENTIALS_DIRECTORY is not set; credential: keys need systemd's LoadCredential=asc:",
    ),
    "credential missing": lambda d, _: (
        "credential:asc",
        {"CREDENTIALS_DIRECTORY": str(d)},
        f"{d / 'asc'}: no such file",
    ),
    "credential path escape": lambda d, _: ("credential:../x", {}, "with a plain name"),
    "not pem": lambda d, good: (
        _write(d, "k.p8", good.replace(b"-----BEGIN", b"")),
        {},
        "k.p8: not a PEM private key",
    ),
    "damaged pem": lambda d, good: (
        _write(d, "k.p8", good[:80] + good[-30:]),
        {},
        "not a valid PEM private key",
    ),
    "rsa": lambda d, _: (
        _write(d, "k.p8", pem(rsa.generate_private_key(65537, 1024))),
        {},
        "is an RSA key; App Store Connect keys are EC P-256",
    ),
    "p384": lambda d, _: (
        _write(d, "k.p8", pem(ec.generate_private_key(ec.SECP384R1()))),
        {},
        "uses curve secp384r1",
    ),
    "encrypted": lambda d, _: (
        _write(
            d,
            "k.p8",
            pem(
                ec.generate_private_key(ec.SECP256R1()),
                serialization.BestAvailableEncryption(b"pw"),
            ),
        ),
        {},
        "the key is encrypted",
    ),
    "public key": lambda d, _: (
        _write(
            d,
            "k.pub",
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        ),
        {},
        "holds a public key",
    ),
    "pasted pem": lambda d, good: (
        good.decode().replace("\n", "\\n"),
        {},
        "looks like key material pasted inline (PEM text, not shown); put it in a file",
    ),
    "pasted base64 without BEGIN/END lines": lambda d, good: (
        "".join(body_lines(good)),
        {},
        "looks like key material pasted inline (base64 text, not shown)",
    ),
    "pasted base64 lines": lambda d, good: (
        "\\n".join(body_lines(good)),
        {},
        "looks like key material pasted inline (base64 text, not shown); put it in a file and "
        'give its path, or use "env:NAME" or "credential:NAME"',
    ),
    "pasted after env:": lambda d, good: (
        "env:" + "".join(body_lines(good)),
        {},
        "looks like key material pasted inline",
    ),
}


@pytest.mark.parametrize("case", list(KEY_CASES))
def test_unusable_keys(
    case: str, config_path: Path, env: dict[str, str], tmp_path: Path, p256_pem: bytes
) -> None:
    ref, extra_env, reason = KEY_CASES[case](tmp_path, p256_pem)
    config_path.write_text(key_config(ref))
    with pytest.raises(ConfigError) as info:
        load_config(config_path, {**env, **extra_env})
    message = str(info.value)
    assert message.startswith(f"{config_path}: api.private_key: "), message
    assert reason in message, message
    # Nothing of any key, good or bad, may leak into the message.
    for path in tmp_path.iterdir():
        if path.is_file() and path.suffix in (".p8", ".pub"):
            for line in body_lines(path.read_bytes()):
                assert line not in message
    for line in body_lines(p256_pem):
        assert line not in message
        assert line[:20] not in message


def test_key_id_must_match_the_downloaded_file_name(fail: Fail, config_path: Path) -> None:
    message = fail(API.replace(f'key_id = "{KEY_ID}"', 'key_id = "ABCDEFGHIJ"'))
    assert message.startswith(f"{config_path}: api.key_id: 'ABCDEFGHIJ' does not match")
    assert f"AuthKey_{KEY_ID}.p8" in message


KEY_FILE_MODES = {
    0o644: "readable by others (mode 0644)",
    0o640: "readable by its group (mode 0640)",
    0o604: "readable by others (mode 0604)",
    0o620: "writable by its group (mode 0620)",
}


@pytest.mark.parametrize("mode", list(KEY_FILE_MODES), ids=oct)
def test_key_file_others_can_read_is_refused(
    fail: Fail, load: Load, config_path: Path, key_file: Path, mode: int
) -> None:
    reason = KEY_FILE_MODES[mode]
    key_file.chmod(mode)
    assert fail(API) == (
        f"{config_path}: api.private_key: {key_file}: {reason}; run chmod 600 {key_file}, "
        "or use credential:NAME with LoadCredential="
    )
    # The fix the message gives works.
    key_file.chmod(0o600)
    assert load(API).api.key.source == str(key_file)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_key_file_only_its_owner_can_read_loads(load: Load, key_file: Path, mode: int) -> None:
    key_file.chmod(mode)
    assert load(API).api.key.source == str(key_file)


def test_key_file_mode_is_that_of_the_file_a_symlink_names(
    fail: Fail, load: Load, key_file: Path, tmp_path: Path
) -> None:
    link = tmp_path / "link.p8"
    link.symlink_to(key_file)
    text = key_config("link.p8")
    assert load(text).api.key.source == str(link)
    key_file.chmod(0o644)
    assert f"{link}: readable by others (mode 0644); run chmod 600 {link}," in fail(text)


def test_key_file_mode_hint_quotes_a_path_with_spaces(
    fail: Fail, tmp_path: Path, p256_pem: bytes
) -> None:
    folder = tmp_path / "my keys"
    folder.mkdir()
    key = folder / "k.p8"
    key.write_bytes(p256_pem)
    key.chmod(0o644)
    message = fail(key_config(str(key)))
    assert f"{key}: readable by others (mode 0644); run chmod 600 '{key}', or use" in message


def test_credential_key_file_others_can_read_is_accepted(
    config_path: Path, env: dict[str, str], tmp_path: Path, p256_pem: bytes
) -> None:
    # systemd makes the credentials directory and its files, for the service user only;
    # whatever mode a credential file has there is systemd's business.
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "asc-key").write_bytes(p256_pem)
    (creds / "asc-key").chmod(0o644)
    config_path.write_text(key_config("credential:asc-key"))
    config = load_config(config_path, {**env, "CREDENTIALS_DIRECTORY": str(creds)})
    assert config.api.key.source == "credential:asc-key"


def test_what_is_no_key_is_said_before_its_mode(fail: Fail, tmp_path: Path) -> None:
    # A world-readable file that holds no key is the wrong file, not a key to chmod.
    (tmp_path / "cert.pem").write_text("hello\n")
    (tmp_path / "cert.pem").chmod(0o644)
    message = fail(key_config("cert.pem"))
    assert "cert.pem: not a PEM private key" in message
    assert "chmod" not in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_key_file(fail: Fail, key_file: Path) -> None:
    key_file.chmod(0)
    assert "permission denied; make it readable by the user xcloudd runs as" in fail(API)


def test_secrets_absent_from_reprs(load: Load, p256_pem: bytes) -> None:
    config = load(
        API
        + f"""
[server]
webhook_token = "{TOKEN}"

[[sinks]]
type = "slack"
url = "{SLACK_URL}"
"""
    )
    text = repr(config) + str(config)
    assert "slacksecretpart" not in text
    assert TOKEN not in text
    for line in body_lines(p256_pem):
        assert line not in text
    assert "key_id='2X9R4HXF34'" in text  # the safe parts stay visible for debugging


def test_secrets_absent_from_type_errors(fail: Fail) -> None:
    message = fail(API + "\n[server]\nwebhook_token = 123456789012345678\n")
    assert "123456789012345678" not in message
    assert "expected a string, got an integer" in message
    message = fail(API + '\n[[sinks]]\ntype = "slack"\nurl = "ftp://hooks/slacksecretpart"\n')
    assert "slacksecretpart" not in message


def test_configs_compare_by_value(load: Load) -> None:
    # The daemon can tell whether a reload changed anything.
    assert load(API) == load(API)


@pytest.mark.parametrize(
    "url",
    ["https://u:hunter2-pw@host", "https://hunter2-pw@host", "https://u:hunter2-pw@host:99999/x?y"],
)
def test_base_url_with_credentials_is_refused_without_echoing_them(
    fail: Fail, config_path: Path, url: str
) -> None:
    message = fail(API + f'base_url = "{url}"\n')
    assert message.startswith(f"{config_path}: api.base_url: "), message
    assert "hunter2" not in message
    assert "must not contain a user name or password" in message


@pytest.mark.parametrize(
    ("url", "stored"),
    [
        ("https://api.appstoreconnect.apple.com/", "https://api.appstoreconnect.apple.com"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://[::1]:8080/", "http://[::1]:8080"),
        ("http://sim_host:80", "http://sim_host:80"),
        ("HTTPS://API.EXAMPLE.COM", "HTTPS://API.EXAMPLE.COM"),
    ],
)
def test_base_urls_that_work(load: Load, url: str, stored: str) -> None:
    assert load(API + f'base_url = "{url}"\n').api.base_url == stored


def test_outbox_bounds_default_and_load(load: Load) -> None:
    defaults = load(API).state
    assert (defaults.outbox_max_events, defaults.outbox_max_age) == (100_000, 7 * 86400)
    state = load(API + '\n[state]\noutbox_max_events = 1000\noutbox_max_age = "1h"\n').state
    assert (state.outbox_max_events, state.outbox_max_age) == (1000, 3600)


def test_key_material_pasted_into_another_key_is_not_echoed(
    fail: Fail, p256_pem: bytes, config_path: Path
) -> None:
    body = "".join(body_lines(p256_pem))
    message = fail(API.replace(f'issuer_id = "{ISSUER}"', f'issuer_id = "{body}"'))
    assert message.startswith(f"{config_path}: api.issuer_id: expected a UUID")
    assert "got a string that looks like key material (not shown)" in message
    assert body[:20] not in message


def test_every_command_refuses_what_the_schedule_refuses(load: Load, fail: Fail) -> None:
    # The daemon builds these schedules when it starts; they must fail at load already.
    assert load(API + JOB + "every = 1\n").job("j").every == 1
    assert "jobs[0].every: every must be at least 1 second, got 0.5" in fail(
        API + JOB + "every = 0.5\n"
    )


# --- sinks ------------------------------------------------------------------------------------

HEADER_VALUE = "hdr-secret-value-42"
PASSWORD = "pw-secret-value-42"
SECRET_PARTS = ("slacksecretpart", "hdr-secret", "pw-secret", "urlsecret")


@pytest.fixture
def creds(tmp_path: Path) -> Path:
    directory = tmp_path / "creds"
    directory.mkdir()
    (directory / "slack").write_text(SLACK_URL + "\n")
    (directory / "api-key").write_text(f"  {HEADER_VALUE}\n")
    (directory / "blank").write_text("\n")
    return directory


@pytest.fixture
def sink_env(env: dict[str, str], creds: Path) -> dict[str, str]:
    return {
        **env,
        "CREDENTIALS_DIRECTORY": str(creds),
        "LOKI_PASSWORD": PASSWORD,
        "HDR": HEADER_VALUE,
        "EMPTY": "",
    }


@pytest.fixture
def load_sinks(config_path: Path, key_file: Path, sink_env: dict[str, str]) -> Load:
    def _load(text: str) -> Config:
        config_path.write_text(API + text)
        return load_config(config_path, sink_env)

    return _load


def test_every_sink_type_loads_with_its_values(load_sinks: Load, tmp_path: Path) -> None:
    config = load_sinks(
        """
[[sinks]]
type = "stdout"

[[sinks]]
type = "journald"
min_level = "info"

[[sinks]]
type = "journald"
socket = "run/journal.sock"

[[sinks]]
type = "file"
path = "events.jsonl"
events = ["build.*", "schedule.*"]
min_level = "warning"

[[sinks]]
type = "http"
url = "https://logs.example.com/loki/api/v1/push?token=urlsecret"
format = "loki"
headers = { "X-Api-Key" = "credential:api-key", "X-Env" = "env:HDR", "X-Plain" = "plain" }
gzip = true
timeout = "1m30s"
batch_max = 10000
tenant = "ci"
username = "xcloudd"
password = "env:LOKI_PASSWORD"

[[sinks]]
type = "slack"
url = "credential:slack"
events = ["build.completed"]
min_level = "error"
"""
    )
    stdout, journald, journald_here, file, http, slack = config.sinks
    assert stdout == StdoutSinkConfig()
    assert (stdout.type, stdout.events, stdout.min_level) == ("stdout", ("*",), "debug")
    assert journald == JournaldSinkConfig(min_level="info")
    assert journald.socket == Path("/run/systemd/journal/socket")
    assert journald.type == "journald"
    # Relative paths are next to the config file, as everywhere else.
    assert journald_here.socket == tmp_path / "run" / "journal.sock"
    assert isinstance(file, FileSinkConfig)
    assert (file.type, file.path) == ("file", tmp_path / "events.jsonl")
    assert (file.events, file.min_level) == (("build.*", "schedule.*"), "warning")
    assert isinstance(http, HttpSinkConfig)
    assert http.type == "http"
    assert http.url == "https://logs.example.com/loki/api/v1/push?token=urlsecret"
    # env: and credential: values are what they refer to (a credential file is stripped).
    assert dict(http.headers) == {
        "X-Api-Key": HEADER_VALUE,
        "X-Env": HEADER_VALUE,
        "X-Plain": "plain",
    }
    assert (http.format, http.gzip, http.timeout, http.batch_max) == ("loki", True, 90, 10000)
    assert (http.tenant, http.username, http.password) == ("ci", "xcloudd", PASSWORD)
    assert isinstance(slack, SlackSinkConfig)
    assert (slack.type, slack.url, slack.events, slack.min_level) == (
        "slack",
        SLACK_URL,
        ("build.completed",),
        "error",
    )
    # The daemon reads secrets as plain strings; repr() shows none of them.
    assert str(http.password) == PASSWORD
    assert f"{slack.url}" == SLACK_URL
    text = repr(config) + str(config)
    for part in SECRET_PARTS:
        assert part not in text
    assert HEADER_VALUE not in text
    assert "X-Api-Key" in text  # the names are no secret
    # Configs stay hashable and compare by value, so a reload can tell what changed.
    assert hash(config) == hash(load_sinks(Path(config.path).read_text().removeprefix(API)))


def test_http_sink_defaults(load_sinks: Load) -> None:
    (http,) = load_sinks('[[sinks]]\ntype = "http"\nurl = "http://127.0.0.1:3100/push"\n').sinks
    assert http == HttpSinkConfig(url="http://127.0.0.1:3100/push")
    assert isinstance(http, HttpSinkConfig)
    assert (http.format, dict(http.headers), http.gzip, http.timeout, http.batch_max) == (
        "json",
        {},
        False,
        10,
        500,
    )
    assert (http.tenant, http.username, http.password) == (None, None, None)
    assert (http.events, http.min_level) == (("*",), "debug")


def test_no_sinks_table_means_one_stdout_sink_and_an_empty_array_none(load: Load) -> None:
    assert load(API).sinks == (StdoutSinkConfig(),)
    assert load("sinks = []\n" + API).sinks == ()


def test_known_keys_of_sinks_are_those_of_every_type() -> None:
    assert KNOWN_KEYS["sinks"][0] == "type"
    assert set(KNOWN_KEYS["sinks"]) == {
        "type",
        "events",
        "min_level",
        "socket",
        "path",
        "url",
        "format",
        "headers",
        "gzip",
        "timeout",
        "batch_max",
        "tenant",
        "username",
        "password",
    }


HTTP = '[[sinks]]\ntype = "http"\nurl = "https://logs.example.com/push"\n'
SLACK = '[[sinks]]\ntype = "slack"\n'


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        # the union of types
        ('[[sinks]]\ntype = "foo"\n', "sinks[0].type", 'unknown sink type "foo"; use one of'),
        ("[[sinks]]\ntype = 3\n", "sinks[0].type", "unknown sink type 3"),
        ("[[sinks]]\nmin_level = 'info'\n", "sinks[0].type", "missing; add type = one of stdout"),
        ('[[sinks]]\ntype = "http"\n', "sinks[0].url", 'missing; a "http" sink needs url = "..."'),
        ('[[sinks]]\ntype = "file"\nsocket = "x"\npath = "p"\n', "sinks[0].socket", "does not"),
        (SLACK + 'url = "https://h"\nheaders = {}\n', "sinks[0].headers", 'type = "slack"; remove'),
        ('[[sinks]]\ntype = "stdout"\nformat = "json"\n', "sinks[0].format", "does not apply"),
        (HTTP + 'formt = "json"\n', "sinks[0].formt", "did you mean 'format'?"),
        # common keys
        ('[[sinks]]\ntype = "stdout"\nmin_level = "fatal"\n', "sinks[0].min_level", '"debug" |'),
        ('[[sinks]]\ntype = "stdout"\nevents = [""]\n', "sinks[0].events", "empty pattern"),
        ('[[sinks]]\ntype = "stdout"\nevents = [1]\n', "sinks[0].events[0]", "expected a string"),
        # journald
        ('[[sinks]]\ntype = "journald"\nsocket = 1\n', "sinks[0].socket", "expected a string"),
        ('[[sinks]]\ntype = "journald"\nsocket = ""\n', "sinks[0].socket", "must not be empty"),
        # http
        (HTTP.replace("https://logs.example.com/push", "logs"), "sinks[0].url", "http:// or"),
        (HTTP + 'format = "csv"\n', "sinks[0].format", 'expected one of "json" | "loki" | "otlp"'),
        (HTTP + "gzip = 1\n", "sinks[0].gzip", "expected true or false, got 1"),
        (HTTP + 'timeout = "0s"\n', "sinks[0].timeout", "must be more than 0"),
        (HTTP + 'timeout = "soon"\n', "sinks[0].timeout", 'expected a duration like "90s"'),
        (HTTP + "batch_max = 0\n", "sinks[0].batch_max", "must be from 1 to 10000, got 0"),
        (HTTP + "batch_max = 10001\n", "sinks[0].batch_max", "default 500"),
        (HTTP + "batch_max = 1.5\n", "sinks[0].batch_max", "expected a whole number like 500"),
        (HTTP + 'tenant = "ci"\n', "sinks[0].tenant", 'only applies to format = "loki"'),
        (HTTP + 'format = "loki"\ntenant = ""\n', "sinks[0].tenant", "must not be empty"),
        (HTTP + 'username = "u"\n', "sinks[0].password", "missing; basic auth needs password"),
        (HTTP + 'password = "env:LOKI_PASSWORD"\n', "sinks[0].username", "needs username"),
        (
            HTTP.replace("https://", "https://me@") + 'username = "u"\npassword = "p"\n',
            "sinks[0].username",
            "conflicts with the user name in url",
        ),
        (HTTP + 'headers = "X-Api-Key: hdr-secret"\n', "sinks[0].headers", "expected a table"),
        (HTTP + 'headers = { "X Key" = "v" }\n', 'sinks[0].headers."X Key"', "not a valid header"),
        (HTTP + 'headers = { "X-A" = "v", "x-a" = "w" }\n', "sinks[0].headers.x-a", "same header"),
        (
            HTTP + 'headers = { "X-A" = 12345 }\n',
            "sinks[0].headers.X-A",
            "expected a string, got an",
        ),
        (HTTP + 'headers = { "X-A" = " " }\n', "sinks[0].headers.X-A", "must not be empty"),
        (HTTP + 'headers = { "X-A" = "env:NOPE" }\n', "sinks[0].headers.X-A", "NOPE is not set"),
        (HTTP + 'headers = { "X-A" = "env:EMPTY" }\n', "sinks[0].headers.X-A", "EMPTY is empty"),
        (HTTP + 'headers = { "X-A" = "env:1X" }\n', "sinks[0].headers.X-A", '"env:NAME" with a'),
        (HTTP + 'headers = { "X-A" = "credential:no" }\n', "sinks[0].headers.X-A", "no such file"),
        (HTTP + 'headers = { "X-A" = "credential:blank" }\n', "sinks[0].headers.X-A", "is empty"),
        (HTTP + 'headers = { "X-A" = "credential:../x" }\n', "sinks[0].headers.X-A", "plain name"),
        (HTTP + 'headers = { "X-A" = "a\\nb" }\n', "sinks[0].headers.X-A", "line break"),
        (HTTP + 'username = "u"\npassword = "env:NOPE"\n', "sinks[0].password", "NOPE is not set"),
        (HTTP + 'username = "u"\npassword = 123\n', "sinks[0].password", "got an integer"),
        # slack
        ('[[sinks]]\ntype = "slack"\n', "sinks[0].url", 'a "slack" sink needs url'),
        (SLACK + 'url = "http://hooks.slack.com/x"\n', "sinks[0].url", "expected an https:// URL"),
        (SLACK + 'url = "env:NOPE"\n', "sinks[0].url", "environment variable NOPE is not set"),
        (SLACK + 'url = "env:HDR"\n', "sinks[0].url", "expected an http:// or https:// URL"),
        (SLACK + 'url = "credential:nope"\n', "sinks[0].url", "no such file"),
    ],
)
def test_sink_mistakes_name_the_key(
    load_sinks: Load, config_path: Path, text: str, key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_sinks(text)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{config_path}: {key}: "), message
    assert reason in message, message
    for part in (*SECRET_PARTS, HEADER_VALUE, PASSWORD):
        assert part not in message, message


def test_credential_values_need_the_credentials_directory(
    config_path: Path, key_file: Path, env: dict[str, str]
) -> None:
    config_path.write_text(API + SLACK + 'url = "credential:slack"\n')
    with pytest.raises(ConfigError) as info:
        load_config(config_path, env)
    assert str(info.value) == (
        f"{config_path}: sinks[0].url: CREDENTIALS_DIRECTORY is not set; credential: values "
        'need systemd\'s LoadCredential=slack:/path/to/file in the unit, or use "env:NAME"'
    )


@pytest.mark.parametrize(
    "text",
    [
        # Each is wrong in a way that could tempt a message to quote the secret.
        SLACK + 'url = "ftp://hooks.slack.com/slacksecretpart"\n',
        SLACK + 'url = "https://hooks.slack.com/slacksecretpart"\nformat = "json"\n',
        SLACK + 'url = ["https://hooks.slack.com/slacksecretpart"]\n',
        '[[sinks]]\ntype = "http"\nurl = "ftp://u:urlsecret@h"\n',
        '[[sinks]]\ntype = "http"\nurl = "https://u:urlsecret@h:99999"\n',
        '[[sinks]]\ntype = "http"\nurl = { a = "urlsecret" }\n',
        HTTP + 'headers = { "X-A" = ["hdr-secret"] }\n',
        HTTP + 'headers = { "X A" = "hdr-secret" }\n',
        HTTP + 'headers = "hdr-secret"\n',
        HTTP + 'password = "pw-secret"\n',
        HTTP + 'username = "u"\npassword = ["pw-secret"]\n',
        HTTP + 'tenant = "t"\nusername = "u"\npassword = "pw-secret"\n',
        '[[sinks]]\ntype = "file"\npath = "p"\npassword = "pw-secret"\n',
    ],
)
def test_sink_secrets_never_in_messages(load_sinks: Load, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_sinks(text)
    for part in SECRET_PARTS:
        assert part not in str(info.value)
