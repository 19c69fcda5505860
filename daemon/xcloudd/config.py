"""The TOML config (DESIGN 3.2), loaded into frozen values and checked completely up front.

Every mistake is one ConfigError naming the file, the dotted key and the reason, so that
`xcloudd check` or a failed `systemctl start` tells the user exactly which line to edit.
The signing key is loaded and checked here too: a bad key is a config problem that should
stop the daemon at start-up, not 401s an hour later.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Literal, TypeVar, cast
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ed448, ed25519, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from xcloudd.durations import format_duration, parse_duration
from xcloudd.errors import ConfigError, looks_like_key_material

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_CONFIG_PATH",
    "KNOWN_KEYS",
    "ApiConfig",
    "Config",
    "JobConfig",
    "PollingConfig",
    "ServerConfig",
    "SigningKey",
    "SinkConfig",
    "StateConfig",
    "WatchConfig",
    "default_state_path",
    "is_workflow_id",
    "load_config",
    "parse_duration",
    "resolve_config_path",
]

DEFAULT_CONFIG_PATH = Path("/etc/xcloudd/config.toml")
DEFAULT_BASE_URL = "https://api.appstoreconnect.apple.com"

# Every key each table accepts; anything else is a typo that would otherwise be silently ignored.
KNOWN_KEYS: Mapping[str, tuple[str, ...]] = {
    "": ("api", "state", "polling", "server", "sinks", "jobs", "watches"),
    "api": ("issuer_id", "key_id", "private_key", "base_url", "timeout"),
    "state": ("path", "outbox_max_events", "outbox_max_age"),
    "polling": ("interval", "min_interval", "max_interval", "give_up_after", "budget"),
    "server": ("listen", "webhook_token"),
    "sinks": ("type", "events", "path", "url", "format"),
    "jobs": (
        "name",
        "workflow",
        "product",
        "branch",
        "tag",
        "pull_request",
        "clean",
        "cron",
        "every",
        "at",
        "timezone",
        "jitter",
        "overlap",
        "catch_up",
        "enabled",
    ),
    "watches": ("workflow", "product"),
}

SinkType = Literal["stdout", "file", "http", "slack"]
SinkFormat = Literal["json", "loki", "otlp"]
Overlap = Literal["skip", "buffer_one", "allow_all"]

_SINK_TYPES: tuple[SinkType, ...] = ("stdout", "file", "http", "slack")
_SINK_FORMATS: tuple[SinkFormat, ...] = ("json", "loki", "otlp")
_OVERLAPS: tuple[Overlap, ...] = ("skip", "buffer_one", "allow_all")

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_KEY_ID = re.compile(r"[A-Z0-9]{10}")
_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Apple names downloaded keys AuthKey_<KEY ID>.p8; a mismatch means a 401 on every request.
_AUTHKEY_FILE = re.compile(r"AuthKey_([A-Z0-9]{10})\.p8")
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?P<offset>[Zz]|[+-]\d{2}:\d{2})?"
)
# Tokens travel in the webhook URL path, so only characters that need no escaping there.
_WEBHOOK_TOKEN = re.compile(r"[A-Za-z0-9._~-]+")
_WEBHOOK_TOKEN_MIN = 16
# A .p8 key is about 250 bytes; anything far larger is the wrong file.
_KEY_FILE_MAX = 64 * 1024
# No setting needs more, and the cap keeps every duration within datetime arithmetic (a jitter
# of 10^15 seconds would overflow when the schedule adds it to a date).
_MAX_DURATION = 36500 * 86400.0
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# A host name (also an IPv4 address): letters, digits, '-' and '_' (Docker service names).
_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)
_AT_MAX_YEAR = 9000
_OUTBOX_MIN_EVENTS = 1000
# SQLite integers are 64-bit; far below that, a billion events is already a huge outbox.
_OUTBOX_MAX_EVENTS = 1_000_000_000
_OUTBOX_MIN_AGE = 3600.0


def is_workflow_id(text: str) -> bool:
    """Xcode Cloud workflow ids are UUIDs; anything else is taken as a workflow name."""
    return _UUID.fullmatch(text) is not None


@dataclass(frozen=True)
class SigningKey:
    key_id: str
    issuer_id: str | None  # None: an individual key, whose tokens carry sub="user"
    # compare=False: the key object has no value equality, and Apple never reuses a key id,
    # so key_id + issuer_id + source identify the key (e.g. to detect a change on reload).
    private_key: EllipticCurvePrivateKey = field(repr=False, compare=False)
    source: str  # a path, "env:NAME" or "credential:NAME": safe to print, unlike the key


@dataclass(frozen=True)
class ApiConfig:
    key: SigningKey
    base_url: str = DEFAULT_BASE_URL
    timeout: float = 30.0


@dataclass(frozen=True)
class StateConfig:
    path: Path
    # Bounds on events waiting in the outbox for a sink that is down; older ones are dropped.
    outbox_max_events: int = 100_000
    outbox_max_age: float = 7 * 86400.0  # seconds


@dataclass(frozen=True)
class PollingConfig:
    interval: float = 30.0
    min_interval: float = 5.0
    max_interval: float = 300.0
    give_up_after: float = 10800.0
    budget: float = 0.8


@dataclass(frozen=True)
class ServerConfig:
    host: str
    port: int
    webhook_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SinkConfig:
    type: SinkType
    events: tuple[str, ...] = ("*",)
    path: Path | None = None
    # Slack webhook URLs are credentials, and http URLs may carry user:password.
    url: str | None = field(default=None, repr=False)
    format: SinkFormat = "json"


@dataclass(frozen=True)
class JobConfig:
    name: str
    workflow: str
    product: str | None = None
    branch: str | None = None
    tag: str | None = None
    pull_request: str | None = None
    clean: bool | None = None
    cron: str | None = None
    every: float | None = None
    at: datetime | None = None
    timezone: str = "UTC"
    jitter: float = 0.0
    overlap: Overlap = "skip"
    catch_up: float = 0.0
    enabled: bool = True

    @property
    def workflow_is_id(self) -> bool:
        return is_workflow_id(self.workflow)


@dataclass(frozen=True)
class WatchConfig:
    workflow: str
    product: str | None = None

    @property
    def workflow_is_id(self) -> bool:
        return is_workflow_id(self.workflow)


@dataclass(frozen=True)
class Config:
    path: Path
    api: ApiConfig
    state: StateConfig
    polling: PollingConfig
    server: ServerConfig | None
    sinks: tuple[SinkConfig, ...]
    jobs: tuple[JobConfig, ...]
    watches: tuple[WatchConfig, ...]

    def job(self, name: str) -> JobConfig:
        for job in self.jobs:
            if job.name == name:
                return job
        raise KeyError(name)


def resolve_config_path(cli_value: str | None, env: Mapping[str, str]) -> Path:
    """--config, else $XCLOUDD_CONFIG, else /etc/xcloudd/config.toml (empty counts as unset)."""
    if cli_value:
        return Path(cli_value).expanduser()
    from_env = env.get("XCLOUDD_CONFIG")
    if from_env:
        return Path(from_env).expanduser()
    return DEFAULT_CONFIG_PATH


def default_state_path(env: Mapping[str, str]) -> Path:
    """$STATE_DIRECTORY/state.db (systemd StateDirectory=), else the XDG user state dir."""
    state_dirs = env.get("STATE_DIRECTORY", "")
    # systemd joins several StateDirectory= entries with ':'; the first is ours.
    first = state_dirs.split(":")[0]
    if first:
        return Path(first) / "state.db"
    xdg = env.get("XDG_STATE_HOME", "")
    # The XDG spec says to ignore a relative XDG_STATE_HOME.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "xcloudd" / "state.db"
    return _home(env) / ".local" / "state" / "xcloudd" / "state.db"


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and check the whole config, including the signing key; ConfigError on any problem."""
    ctx = _Context(
        file=str(path), base_dir=path.absolute().parent, env=os.environ if env is None else env
    )
    root = _Table(ctx, "", _read_toml(path), KNOWN_KEYS[""])
    api_table = root.table("api")
    if api_table is None:
        raise ctx.error(
            "api",
            "missing; add an [api] table with key_id and private_key (see config.example.toml)",
        )
    sinks = root.tables("sinks")
    return Config(
        path=path,
        api=_parse_api(api_table),
        state=_parse_state(root.table("state") or _Table(ctx, "state", {}, KNOWN_KEYS["state"])),
        polling=_parse_polling(
            root.table("polling") or _Table(ctx, "polling", {}, KNOWN_KEYS["polling"])
        ),
        server=_map_optional(_parse_server, root.table("server")),
        sinks=(SinkConfig("stdout"),) if sinks is None else tuple(_parse_sink(t) for t in sinks),
        jobs=_unique_jobs(ctx, [_parse_job(t) for t in root.tables("jobs") or []]),
        watches=_unique_watches(ctx, [_parse_watch(t) for t in root.tables("watches") or []]),
    )


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    file: str
    base_dir: Path
    env: Mapping[str, str]

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError.at(self.file, key, reason)

    def path(self, text: str) -> Path:
        """A path from the config: ~ is the user's home, relative means next to the config file."""
        if text == "~" or text.startswith("~/"):
            return _home(self.env) / text[2:]
        return self.base_dir / text


def _home(env: Mapping[str, str]) -> Path:
    home = env.get("HOME")
    return Path(home) if home else Path.home()


def _read_toml(path: Path) -> dict[str, object]:
    file = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError.at(
            file,
            "",
            "no such file; pass --config PATH or set XCLOUDD_CONFIG "
            "(config.example.toml shows every key)",
        ) from None
    except IsADirectoryError:
        raise ConfigError.at(
            file, "", "is a directory; pass the config file itself with --config PATH"
        ) from None
    except PermissionError:
        raise ConfigError.at(
            file, "", "permission denied; make it readable by the user xcloudd runs as"
        ) from None
    except OSError as err:
        raise ConfigError.at(file, "", f"cannot read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError.at(
            file, f"line {line}", "not valid UTF-8; save the file as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError.at(file, *_toml_error(text, str(err))) from None
    except ValueError:
        # tomllib lets int() refuse a number of more than 4300 digits (CPython's limit).
        raise ConfigError.at(
            file, "", "invalid TOML: a number is too long (over 4300 digits); shorten it"
        ) from None
    except RecursionError:
        raise ConfigError.at(
            file, "", "invalid TOML: arrays or inline tables nested too deeply; flatten them"
        ) from None


def _toml_error(text: str, message: str) -> tuple[str, str]:
    """(where, reason) from tomllib's message, which ends in '(at line L, column C)' (3.11)."""
    reason, where = message, ""
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match:
        reason, where = message[: match.start()], f"line {match[1]}, column {match[2]}"
    elif message.endswith("(at end of document)"):
        lines = text.split("\n")
        reason = message.removesuffix("(at end of document)").rstrip()
        where = f"line {len(lines)}, column {len(lines[-1]) + 1} (end of file)"
    return where, f"invalid TOML: {reason}; fix the syntax there"


_T = TypeVar("_T")
_U = TypeVar("_U")


def _map_optional(func: Callable[[_T], _U], value: _T | None) -> _U | None:
    return None if value is None else func(value)


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, datetime):
        return "a date-time"
    if isinstance(value, date):
        return "a date"
    if isinstance(value, time):
        return "a time"
    return type(value).__name__


def _show(value: object, *, secret: bool = False) -> str:
    """The value as the user wrote it, short; only its kind when it may hold a secret."""
    if secret or isinstance(value, dict | list):
        return _kind(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if looks_like_key_material(value):
            return "a string that looks like key material (not shown)"
        return _quote(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, int) and value.bit_length() > 64:
        # str() refuses ints past 4300 digits, and nobody needs to see one.
        return "an integer too large for any setting"
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return str(value)


def _quote(text: str) -> str:
    """`text` in double quotes, TOML-escaped, so control characters cannot garble the line."""
    return '"' + "".join(_escape(c) for c in text) + '"'


def _escape(char: str) -> str:
    if char in '"\\':
        return "\\" + char
    if char.isprintable():
        return char
    return f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}"


class _Table:
    """One TOML table at a dotted location, with typed getters that raise located errors."""

    def __init__(
        self, ctx: _Context, where: str, data: Mapping[str, object], known: Sequence[str]
    ) -> None:
        self.ctx = ctx
        self.where = where
        self.data = data
        for name in data:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise self.error(name, f"unknown key {name!r} (known: {', '.join(known)}){hint}")

    def key(self, name: str) -> str:
        # As the user would write it in TOML: a dotted path, with odd names quoted.
        shown = name if _BARE_KEY.fullmatch(name) else _quote(name)
        return f"{self.where}.{shown}" if self.where else shown

    def error(self, name: str, reason: str) -> ConfigError:
        return self.ctx.error(self.key(name), reason)

    def wrong_type(self, name: str, expected: str, *, secret: bool = False) -> ConfigError:
        value = self.data[name]
        return self.error(name, f"expected {expected}, got {_show(value, secret=secret)}")

    def string(self, name: str, *, secret: bool = False) -> str | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.wrong_type(name, "a string", secret=secret)
        if not value.strip():
            raise self.error(name, "must not be empty; remove the key or give it a value")
        return value

    def required_string(self, name: str, hint: str) -> str:
        value = self.string(name)
        if value is None:
            raise self.error(name, f"missing; {hint}")
        return value

    def boolean(self, name: str) -> bool | None:
        value = self.data.get(name)
        if value is None or isinstance(value, bool):
            return value
        raise self.wrong_type(name, "true or false")

    def number(self, name: str, default: float) -> float:
        value = self.data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.wrong_type(name, "a number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise self.wrong_type(name, "a finite number")
        return number

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        value = self.data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.wrong_type(name, f"a whole number like {default}")
        if not minimum <= value <= maximum:
            raise self.error(
                name, f"must be from {minimum} to {maximum}, got {_show(value)}; default {default}"
            )
        return value

    def duration(self, name: str, default: float, *, positive: bool = False) -> float:
        if name not in self.data:
            return default
        try:
            seconds = parse_duration(self.data[name])
        except ValueError as err:
            raise self.error(name, str(err)) from None
        except OverflowError:
            # parse_duration turns the number into a float, which a huge integer cannot be.
            seconds = math.inf
        if positive and seconds <= 0:
            raise self.error(name, 'must be more than 0, e.g. "30s"')
        if not seconds <= _MAX_DURATION:
            raise self.error(
                name, f'must be at most 100 years ("36500d"), got {_show(self.data[name])}'
            )
        return seconds

    def choice(self, name: str, options: Sequence[_T], default: _T) -> _T:
        if name not in self.data:
            return default
        value = self.data[name]
        for option in options:
            if value == option:
                return option
        listed = " | ".join(f'"{o}"' for o in options)
        raise self.error(name, f"expected one of {listed}, got {_show(value)}")

    def table(self, name: str) -> _Table | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.wrong_type(name, f"a table ([{self.key(name)}])")
        return _Table(self.ctx, self.key(name), value, KNOWN_KEYS[name])

    def tables(self, name: str) -> list[_Table] | None:
        """An array of tables ([[name]]); None when absent."""
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise self.wrong_type(name, f"an array of tables ([[{name}]] sections)")
        return [
            _Table(
                self.ctx, f"{self.key(name)}[{i}]", cast(dict[str, object], item), KNOWN_KEYS[name]
            )
            for i, item in enumerate(value)
        ]


# --- sections -------------------------------------------------------------------------------


def _parse_api(t: _Table) -> ApiConfig:
    key_id = t.required_string(
        "key_id", 'add key_id = "..." (the 10-character Key ID from App Store Connect)'
    )
    if not _KEY_ID.fullmatch(key_id):
        raise t.error(
            "key_id",
            f'expected 10 uppercase letters and digits like "2X9R4HXF34", got {_show(key_id)}; '
            "copy the Key ID from App Store Connect > Users and Access > Integrations",
        )
    issuer_id = t.string("issuer_id")
    if issuer_id is not None and not _UUID.fullmatch(issuer_id):
        raise t.error(
            "issuer_id",
            f'expected a UUID like "69a6de70-03db-47e3-e053-5b8c7c11a4d1", got {_show(issuer_id)}; '
            "copy the Issuer ID from App Store Connect, or remove it for an individual key",
        )
    base_url = t.string("base_url") or DEFAULT_BASE_URL
    reason = _base_url_problem(base_url)
    if reason:
        # A password, or a token in the query, must not be echoed back.
        shown = "" if "@" in base_url or "?" in base_url else f", got {_show(base_url)}"
        raise t.error("base_url", f"{reason}{shown}")
    return ApiConfig(
        key=_load_signing_key(t, key_id, issuer_id),
        base_url=base_url.rstrip("/"),
        timeout=t.duration("timeout", 30.0, positive=True),
    )


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        return "expected an http:// or https:// URL"
    return None


def _base_url_problem(url: str) -> str | None:
    """Why `url` cannot be the API's address, in words that do not quote it."""
    like = '; use just scheme://host[:port], e.g. "https://api.appstoreconnect.apple.com"'
    if any(c.isspace() or not c.isprintable() for c in url):
        return f"must not contain spaces or control characters{like}"
    try:
        parts = urlsplit(url)
    except ValueError:  # brackets that hold no IPv6 address
        return f'not a valid URL (an IPv6 address goes in brackets, e.g. "http://[::1]:8080"){like}'
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"expected an http:// or https:// URL{like}"
    if "@" in parts.netloc:
        return (
            "must not contain a user name or password (App Store Connect authenticates "
            "with the API key); remove the part up to '@'"
        )
    try:
        port = parts.port
    except ValueError:
        if parts.netloc.count(":") > 1 and "[" not in parts.netloc:
            return f'write an IPv6 address in brackets, e.g. "http://[::1]:8080"{like}'
        return f"the port must be a number from 1 to 65535{like}"
    if port == 0:
        return f"the port must be a number from 1 to 65535{like}"
    host = parts.hostname or ""
    if not host:
        return f"the host is missing{like}"
    if ":" not in host and not _HOSTNAME.fullmatch(host):
        hint = "" if host.isascii() else " (write an international name in its xn-- form)"
        return f"the host is not a valid host name{hint}{like}"
    if parts.path.strip("/"):
        # Requests go to base_url + "/v1/...", and the API's own links name the host only.
        return f"must not have a path (xcloudd adds /v1/... itself){like}"
    if parts.query or parts.fragment or url.rstrip("/").endswith(("?", "#")):
        return f"must not have a query (?...) or fragment (#...){like}"
    return None


def _parse_state(t: _Table) -> StateConfig:
    text = t.string("path")
    defaults = StateConfig(path=Path())
    max_events = t.integer(
        "outbox_max_events",
        defaults.outbox_max_events,
        minimum=_OUTBOX_MIN_EVENTS,
        maximum=_OUTBOX_MAX_EVENTS,
    )
    max_age = t.duration("outbox_max_age", defaults.outbox_max_age)
    if max_age < _OUTBOX_MIN_AGE:
        raise t.error(
            "outbox_max_age",
            f"{format_duration(max_age)} is too short: a sink may well be down for an hour; "
            f'use at least "1h" (default "{format_duration(defaults.outbox_max_age)}")',
        )
    return StateConfig(
        path=default_state_path(t.ctx.env) if text is None else t.ctx.path(text),
        outbox_max_events=max_events,
        outbox_max_age=max_age,
    )


def _parse_polling(t: _Table) -> PollingConfig:
    defaults = PollingConfig()
    interval = t.duration("interval", defaults.interval, positive=True)
    min_interval = t.duration("min_interval", defaults.min_interval, positive=True)
    max_interval = t.duration("max_interval", defaults.max_interval, positive=True)
    give_up_after = t.duration("give_up_after", defaults.give_up_after, positive=True)
    budget = t.number("budget", defaults.budget)
    if min_interval > max_interval:
        raise t.error(
            "min_interval",
            f"{format_duration(min_interval)} is more than {t.key('max_interval')} "
            f"({format_duration(max_interval)}); lower it or raise max_interval",
        )
    if not min_interval <= interval <= max_interval:
        raise t.error(
            "interval",
            f"{format_duration(interval)} is outside {t.key('min_interval')}.."
            f"{t.key('max_interval')} ({format_duration(min_interval)}.."
            f"{format_duration(max_interval)}); pick a value in that range",
        )
    if not 0 < budget <= 1:
        raise t.error(
            "budget",
            f"expected a share of the hourly request limit above 0 and at most 1 "
            f"(e.g. 0.8), got {budget:g}",
        )
    return PollingConfig(
        interval=interval,
        min_interval=min_interval,
        max_interval=max_interval,
        give_up_after=give_up_after,
        budget=budget,
    )


def _parse_server(t: _Table) -> ServerConfig:
    listen = t.string("listen") or "127.0.0.1:9464"
    host, port = _parse_listen(t, listen)
    token = t.string("webhook_token", secret=True)
    if token is not None:
        if not _WEBHOOK_TOKEN.fullmatch(token):
            raise t.error(
                "webhook_token",
                "may contain only letters, digits and . _ ~ - (it goes in the webhook URL); "
                "generate one with `openssl rand -hex 32`",
            )
        if len(token) < _WEBHOOK_TOKEN_MIN:
            raise t.error(
                "webhook_token",
                f"too short ({len(token)} characters); anyone who guesses it can make xcloudd "
                f"poll, so use at least {_WEBHOOK_TOKEN_MIN}, e.g. from `openssl rand -hex 32`",
            )
    return ServerConfig(host=host, port=port, webhook_token=token)


def _parse_listen(t: _Table, listen: str) -> tuple[str, int]:
    expected = f'expected "HOST:PORT" like "127.0.0.1:9464" or "[::1]:9464", got {_show(listen)}'
    host, sep, port_text = listen.rpartition(":")
    # isdigit() alone also accepts "²" and other digits that int() refuses or reads oddly.
    if not sep or not (port_text.isascii() and port_text.isdigit()):
        raise t.error("listen", expected)
    digits = port_text.lstrip("0") or "0"
    # int() of thousands of digits is slow, and refused past 4300.
    if len(digits) > 5 or int(digits) > 65535:
        raise t.error("listen", f"port {_show(port_text)} is out of range (0-65535)")
    port = int(digits)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise t.error("listen", f"{host!r} is not an IPv6 address; {expected}") from None
    elif ":" in host or "[" in host or "]" in host:
        raise t.error("listen", f'write an IPv6 address in brackets, e.g. "[::1]:{port}"')
    if not host:
        raise t.error("listen", f'missing host; use "0.0.0.0:{port}" to listen on all interfaces')
    if ":" not in host and not _HOSTNAME.fullmatch(host):
        raise t.error("listen", f"{_show(host)} is not a host name or IP address; {expected}")
    return host, port


def _parse_sink(t: _Table) -> SinkConfig:
    if "type" not in t.data:
        raise t.error("type", f"missing; add type = one of {', '.join(_SINK_TYPES)}")
    sink_type = t.choice("type", _SINK_TYPES, "stdout")
    needs = {"file": "path", "http": "url", "slack": "url"}.get(sink_type)
    allowed = (
        {"type", "events"}
        | ({needs} if needs else set())
        | ({"format"} if sink_type == "http" else set())
    )
    for name in t.data:
        if name not in allowed:
            raise t.error(name, f'does not apply to type = "{sink_type}"; remove it')
    if needs and needs not in t.data:
        raise t.error(needs, f'missing; a "{sink_type}" sink needs {needs} = "..."')

    path_text = t.string("path")
    url = t.string("url", secret=True)
    if url is not None:
        reason = _url_problem(url)
        if reason:
            # The URL itself is not shown: Slack webhook URLs are credentials.
            raise t.error("url", reason)
    return SinkConfig(
        type=sink_type,
        events=_parse_events(t),
        path=None if path_text is None else t.ctx.path(path_text),
        url=url,
        format=t.choice("format", _SINK_FORMATS, "json"),
    )


def _parse_events(t: _Table) -> tuple[str, ...]:
    value = t.data.get("events")
    if value is None:
        return ("*",)
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise t.wrong_type("events", 'an array of strings like ["build.*"]')
    if not value:
        raise t.error("events", "is empty, so the sink would get nothing; remove it for all events")
    patterns = tuple(cast(list[str], value))
    for pattern in patterns:
        if not pattern.strip():
            raise t.error("events", 'contains an empty pattern; use e.g. "build.*"')
    return patterns


def _parse_workflow(t: _Table) -> tuple[str, str | None]:
    workflow = t.required_string(
        "workflow", 'add workflow = "<id>" (`xcloudd workflows` lists products and workflow ids)'
    )
    product = t.string("product")
    if product is None and not is_workflow_id(workflow):
        raise t.error(
            "workflow",
            f'{_show(workflow)} is not a workflow id (a UUID), so also set product = "..." '
            "to say whose workflow it is, or use the id (`xcloudd workflows` lists them)",
        )
    return workflow, product


def _parse_job(t: _Table) -> JobConfig:
    name = t.required_string("name", 'add name = "..." (used in `xcloudd start NAME` and events)')
    if not _JOB_NAME.fullmatch(name):
        raise t.error(
            "name",
            f"{_show(name)} must start with a letter or digit and contain only letters, "
            "digits, '.', '_' and '-'",
        )
    workflow, product = _parse_workflow(t)

    refs = {ref: t.string(ref) for ref in ("branch", "tag", "pull_request")}
    _at_most_one(t, [ref for ref, value in refs.items() if value is not None])
    clean = t.boolean("clean")

    cron = t.string("cron")
    every = None if "every" not in t.data else t.duration("every", 0.0, positive=True)
    at = None if "at" not in t.data else _parse_at(t)
    _at_most_one(t, [k for k, v in (("cron", cron), ("every", every), ("at", at)) if v is not None])
    if cron is not None:
        _check_cron(t, cron)

    timezone = t.string("timezone") or "UTC"
    try:
        ZoneInfo(timezone)
    # OSError: names of tzdata folders ("America") and names too long for a file name.
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise t.error(
            "timezone",
            f'unknown time zone {_show(timezone)}; use an IANA name like "Europe/Berlin" or "UTC"',
        ) from None

    enabled = t.boolean("enabled")
    job = JobConfig(
        name=name,
        workflow=workflow,
        product=product,
        branch=refs["branch"],
        tag=refs["tag"],
        pull_request=refs["pull_request"],
        clean=clean,
        cron=cron,
        every=every,
        at=at,
        timezone=timezone,
        jitter=t.duration("jitter", 0.0),
        overlap=t.choice("overlap", _OVERLAPS, "skip"),
        catch_up=t.duration("catch_up", 0.0),
        enabled=True if enabled is None else enabled,
    )
    _check_schedule(t, job)
    return job


def _check_schedule(t: _Table, job: JobConfig) -> None:
    """Build the schedule as the daemon will, so that whatever it refuses fails here, for
    every command, instead of when `xcloudd run` starts."""
    from xcloudd.schedule import build_schedule

    # build_schedule does not say which key it refuses: giving it one more input at a time
    # finds the key to name.
    steps: list[tuple[str, str | None]] = [("timezone", None), ("jitter", None)]
    for kind, value in (("cron", job.cron), ("every", job.every), ("at", job.at)):
        if value is not None:
            steps.append((kind, kind))
    for key, schedule_key in steps:
        try:
            build_schedule(
                job_name=job.name,
                cron=job.cron if schedule_key == "cron" else None,
                every=job.every if schedule_key == "every" else None,
                at=job.at if schedule_key == "at" else None,
                timezone=job.timezone,
                jitter=0.0 if key == "timezone" else job.jitter,
            )
        except ValueError as err:
            raise t.error(key, str(err)) from None


def _at_most_one(t: _Table, present: list[str]) -> None:
    if len(present) > 1:
        raise t.error(
            present[1],
            f"conflicts with {t.key(present[0])}; set only one of {' and '.join(present)}",
        )


def _parse_at(t: _Table) -> datetime:
    value = t.data["at"]
    example = "like 2026-12-24T18:00:00+01:00 (or ...Z for UTC)"
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise t.error("at", f"{_show(value)} has no UTC offset; write it {example}")
        return _in_range(t, value)
    if not isinstance(value, str):
        raise t.wrong_type("at", f"an RFC 3339 date-time with offset {example}")
    match = _RFC3339.fullmatch(value.strip())
    if match is None:
        raise t.error(
            "at", f"expected an RFC 3339 date-time with offset {example}, got {_show(value)}"
        )
    if match["offset"] is None:
        raise t.error("at", f"{_show(value)} has no UTC offset; write it {example}")
    text = value.strip()
    text = text[:10] + "T" + text[11:]
    if text[-1] in "Zz":
        text = text[:-1] + "+00:00"
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise t.error(
            "at", f"{_show(value)} is not a real date and time; check the numbers"
        ) from None
    return _in_range(t, at)


def _in_range(t: _Table, at: datetime) -> datetime:
    # TOML allows 0001-01-01T00:00:00+01:00, which is no instant Python can hold in UTC, and
    # 9999-12-31T23:00:00Z, which plus the jitter (up to 100 years) or shown in the job's time
    # zone is past the end of Python's calendar.
    try:
        utc = at.astimezone(UTC)
    except OverflowError:
        utc = None
    if utc is None or utc.year >= _AT_MAX_YEAR:
        raise t.error(
            "at", f"{_show(at)} is out of range; use a date from the year 1 to {_AT_MAX_YEAR - 1}"
        ) from None
    return at


def _check_cron(t: _Table, expr: str) -> None:
    from xcloudd.schedule import validate_cron

    try:
        validate_cron(expr)
    except ValueError as err:
        raise t.error(
            "cron",
            f"{_show(expr)}: {err} (fields: minute hour day-of-month month day-of-week)",
        ) from None


def _parse_watch(t: _Table) -> WatchConfig:
    workflow, product = _parse_workflow(t)
    return WatchConfig(workflow=workflow, product=product)


def _unique_jobs(ctx: _Context, jobs: list[JobConfig]) -> tuple[JobConfig, ...]:
    seen: dict[str, int] = {}
    for i, job in enumerate(jobs):
        if job.name in seen:
            raise ctx.error(
                f"jobs[{i}].name",
                f"duplicate job name {job.name!r} (also jobs[{seen[job.name]}]); "
                "job names must be unique",
            )
        seen[job.name] = i
    return tuple(jobs)


def _unique_watches(ctx: _Context, watches: list[WatchConfig]) -> tuple[WatchConfig, ...]:
    seen: dict[tuple[str, str | None], int] = {}
    for i, watch in enumerate(watches):
        ident = (watch.workflow, watch.product)
        if ident in seen:
            raise ctx.error(
                f"watches[{i}].workflow",
                f"the same workflow is already watched by watches[{seen[ident]}]; remove one",
            )
        seen[ident] = i
    return tuple(watches)


# --- the signing key ------------------------------------------------------------------------


def _load_signing_key(t: _Table, key_id: str, issuer_id: str | None) -> SigningKey:
    ref = t.required_string(
        "private_key",
        'add private_key = "/etc/xcloudd/AuthKey_<KEY ID>.p8" (or "env:NAME" or "credential:NAME")',
    )
    # Someone pasting the key itself into the config must not get it echoed back in an error;
    # after this check every message below may quote `ref`.
    pasted = _pasted_key_kind(ref)
    if pasted:
        raise t.error(
            "private_key",
            f"looks like key material pasted inline ({pasted}, not shown); put it in a file "
            'and give its path, or use "env:NAME" or "credential:NAME"',
        )
    env = t.ctx.env
    file: Path | None = None
    if ref.startswith("env:"):
        name = ref.removeprefix("env:")
        if not _ENV_NAME.fullmatch(name):
            raise t.error(
                "private_key", f'expected "env:NAME" with a variable name, got {_show(ref)}'
            )
        text = env.get(name)
        if not text or not text.strip():
            raise t.error(
                "private_key",
                f"environment variable {name} is {'empty' if text is not None else 'not set'}; "
                "set it to the contents of the .p8 file",
            )
        # Many env-file formats keep PEM on one line with literal \n escapes.
        data = text.replace("\\n", "\n").strip().encode()
        source = ref
    else:
        if ref.startswith("credential:"):
            name = ref.removeprefix("credential:")
            if not name or "/" in name or name in (".", ".."):
                raise t.error(
                    "private_key", f'expected "credential:NAME" with a plain name, got {_show(ref)}'
                )
            directory = env.get("CREDENTIALS_DIRECTORY")
            if not directory:
                raise t.error(
                    "private_key",
                    "CREDENTIALS_DIRECTORY is not set; credential: keys need systemd's "
                    f"LoadCredential={name}:/path/to/AuthKey.p8 in the unit, "
                    "or give a file path instead",
                )
            file = Path(directory) / name
            source = ref
        else:
            file = t.ctx.path(ref)
            source = str(file)
        data = _read_key_file(t, file)

    result = _parse_private_key(data)
    if isinstance(result, str):
        raise t.error("private_key", f"{source}: {result}")
    if file is not None:
        named = _AUTHKEY_FILE.fullmatch(file.name)
        if named and named[1] != key_id:
            raise t.error(
                "key_id",
                f"{key_id!r} does not match the key file {file.name}; use the Key ID "
                "App Store Connect shows for that key",
            )
    return SigningKey(key_id=key_id, issuer_id=issuer_id, private_key=result, source=source)


def _pasted_key_kind(ref: str) -> str | None:
    """What kind of key material `ref` looks like, when it is no path or reference."""
    if "-----" in ref or "PRIVATE KEY" in ref:
        return "PEM text"
    if looks_like_key_material(ref):
        return "base64 text"
    if "\n" in ref:
        return "text of several lines"
    if len(ref) > 1024:
        return "text far longer than a path"
    return None


def _read_key_file(t: _Table, file: Path) -> bytes:
    try:
        with file.open("rb") as fh:
            return fh.read(_KEY_FILE_MAX + 1)
    except FileNotFoundError:
        reason = "no such file"
    except PermissionError:
        reason = "permission denied; make it readable by the user xcloudd runs as"
    except IsADirectoryError:
        reason = "is a directory; give the .p8 file"
    except OSError as err:
        reason = f"cannot read: {err.strerror or type(err).__name__}"
    raise t.error("private_key", f"{file}: {reason}")


_KEY_KINDS: tuple[tuple[type, str], ...] = (
    (rsa.RSAPrivateKey, "an RSA"),
    (dsa.DSAPrivateKey, "a DSA"),
    (ed25519.Ed25519PrivateKey, "an Ed25519"),
    (ed448.Ed448PrivateKey, "an Ed448"),
    (x25519.X25519PrivateKey, "an X25519"),
    (x448.X448PrivateKey, "an X448"),
)


_ENCRYPTED = (
    "the key is encrypted; use the unencrypted .p8 file as downloaded from App Store Connect"
)


def _parse_private_key(data: bytes) -> EllipticCurvePrivateKey | str:
    """The key, or the reason it is unusable. Never includes any of `data` in the reason."""
    wanted = "App Store Connect keys are EC P-256 (.p8 files from Users and Access > Integrations)"
    if len(data) > _KEY_FILE_MAX:
        return f"too large to be a .p8 key; {wanted}"
    if b"-----BEGIN" not in data:
        return f"not a PEM private key (no -----BEGIN line); {wanted}"
    if b"ENCRYPTED" in data:
        return _ENCRYPTED
    if b"PUBLIC KEY-----" in data or b"CERTIFICATE-----" in data:
        return f"holds a public key or certificate, not a private key; {wanted}"
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        return _ENCRYPTED
    except (ValueError, UnsupportedAlgorithm):
        # cryptography's own message is not passed on: it is not helpful and must not risk
        # quoting key material.
        return f"not a valid PEM private key (damaged or incomplete?); {wanted}"
    if not isinstance(key, EllipticCurvePrivateKey):
        kind = next((name for cls, name in _KEY_KINDS if isinstance(key, cls)), "a non-EC")
        return f"is {kind} key; {wanted}"
    if not isinstance(key.curve, SECP256R1):
        return f"uses curve {key.curve.name}; {wanted}"
    return key
