"""The TOML config (DESIGN 3.2), loaded into frozen values and checked completely up front.

Every mistake is one ConfigError naming the file, the dotted key and the reason, so that
`xcloudd check` or a failed `systemctl start` tells the user exactly which line to edit.
The signing key is loaded and checked here too: a bad key is a config problem that should
stop the daemon at start-up, not 401s an hour later.

Which tables and keys exist, and their types, is declared once, as msgspec Structs: msgspec
decodes the parsed TOML into them and refuses unknown keys, and `_explain` rewords its errors
into ours. What msgspec cannot check (durations, cron, time zones, URLs, keys that exclude
each other, the signing key) is code on top of the decoded values. A new sink type is one
more Struct in the SinkConfig union.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, TypeAlias, get_args, get_origin
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
import msgspec.inspect as mi
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from xcloudd.durations import format_duration, parse_duration
from xcloudd.errors import ConfigError, looks_like_key_material
from xcloudd.events import Level
from xcloudd.keyfile import KEY_FILE_MAX, exposure, parse_private_key, pasted_key_kind

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_CONFIG_PATH",
    "KNOWN_KEYS",
    "ApiConfig",
    "Config",
    "FileSinkConfig",
    "HttpSinkConfig",
    "JobConfig",
    "JournaldSinkConfig",
    "PollingConfig",
    "ServerConfig",
    "SigningKey",
    "SinkConfig",
    "SlackSinkConfig",
    "StateConfig",
    "StdoutSinkConfig",
    "WatchConfig",
    "default_state_path",
    "is_workflow_id",
    "load_config",
    "parse_duration",
    "resolve_config_path",
]

DEFAULT_CONFIG_PATH = Path("/etc/xcloudd/config.toml")
DEFAULT_BASE_URL = "https://api.appstoreconnect.apple.com"

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_KEY_ID = re.compile(r"[A-Z0-9]{10}")
_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# RFC 9110 token characters: anything else in a header name breaks the request.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Apple names downloaded keys AuthKey_<KEY ID>.p8; a mismatch means a 401 on every request.
_AUTHKEY_FILE = re.compile(r"AuthKey_([A-Z0-9]{10})\.p8")
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?P<offset>[Zz]|[+-]\d{2}:\d{2})?"
)
# Tokens travel in the webhook URL path, so only characters that need no escaping there.
_WEBHOOK_TOKEN = re.compile(r"[A-Za-z0-9._~-]+")
_WEBHOOK_TOKEN_MIN = 16
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
_OUTBOX_MAX_AGE = 7 * 86400.0  # the default


def is_workflow_id(text: str) -> bool:
    """Xcode Cloud workflow ids are UUIDs; anything else is taken as a workflow name."""
    return _UUID.fullmatch(text) is not None


# --- field types ----------------------------------------------------------------------------


class Secret(str):
    """A credential: the real value wherever a str is read, '<secret>' in repr()."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<secret>'"


# A string setting; an empty or blank one is refused (remove the key instead).
Text = Annotated[str, msgspec.Meta(pattern=r"\S")]


class _Boxed:
    """A decoded value of one of the field types below, until its Struct takes it out."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value


# Values written in a friendlier form than their type. msgspec does not know these classes,
# so it hands their values to _Context.decode; that returns the value in an instance of the
# class (msgspec checks), and the Struct takes it out (_Table.__post_init__). What the fields
# hold, and what mypy is told, is plain floats and datetimes: orjson and msgspec refuse to
# encode subclasses of those.
if TYPE_CHECKING:
    Duration: TypeAlias = float
    PositiveDuration: TypeAlias = float
    Instant: TypeAlias = datetime
    SecretText: TypeAlias = str
else:

    class Duration(_Boxed):
        """Seconds, written "1h30m", "90s" or as a number; at most 100 years."""

    class PositiveDuration(_Boxed):
        """A Duration above 0."""

    class Instant(_Boxed):
        """An RFC 3339 date-time with a UTC offset, as a TOML date-time or a string."""

    SecretText = Secret  # a string that repr() does not show


# --- the config values ----------------------------------------------------------------------


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One TOML table: frozen (configs compare and hash by value; mypy wants frozen=True on
    each subclass too), and any other key is a typo that would otherwise be silently ignored."""

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if isinstance(value, _Boxed):
                msgspec.structs.force_setattr(self, name, value.value)


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


class _ApiTable(_Table, frozen=True, kw_only=True):
    """[api] as written; load_config turns it into an ApiConfig with the loaded key."""

    issuer_id: Text | None = None
    key_id: Text
    private_key: Text
    base_url: Text = DEFAULT_BASE_URL
    timeout: PositiveDuration = 30.0


class StateConfig(_Table, frozen=True):
    path: Path
    # Bounds on events waiting in the outbox for a sink that is down; older ones are dropped.
    outbox_max_events: Annotated[
        int, msgspec.Meta(ge=_OUTBOX_MIN_EVENTS, le=_OUTBOX_MAX_EVENTS)
    ] = 100_000
    outbox_max_age: Duration = _OUTBOX_MAX_AGE


class PollingConfig(_Table, frozen=True):
    interval: PositiveDuration = 30.0
    min_interval: PositiveDuration = 5.0
    max_interval: PositiveDuration = 300.0
    give_up_after: PositiveDuration = 10800.0
    budget: float = 0.8


@dataclass(frozen=True)
class ServerConfig:
    host: str
    port: int
    webhook_token: str | None = field(default=None, repr=False)


class _ServerTable(_Table, frozen=True):
    """[server] as written; load_config splits listen into host and port."""

    listen: Text = "127.0.0.1:9464"
    webhook_token: SecretText | None = None


class _Sink(_Table, frozen=True, tag_field="type", kw_only=True):
    """What every [[sinks]] entry has. Each sink type is a subclass tagged with its `type`."""

    # Shell-style patterns on event names.
    events: tuple[str, ...] = ("*",)
    min_level: Level = "debug"

    @property
    def type(self) -> str:
        return str(self.__struct_config__.tag)

    def _finish(self, ctx: _Context, where: str) -> Self:
        """Checks msgspec cannot make, and secrets read from where they are kept."""
        return self


class StdoutSinkConfig(_Sink, frozen=True, tag="stdout"):
    pass


class JournaldSinkConfig(_Sink, frozen=True, tag="journald"):
    socket: Path = Path("/run/systemd/journal/socket")


class FileSinkConfig(_Sink, frozen=True, tag="file"):
    path: Path


class _Headers(Mapping[str, str]):
    """Header names to values: a Mapping that hashes, so that sink configs do too."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._items = dict(items or {})

    def __getitem__(self, name: str) -> str:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


class HttpSinkConfig(_Sink, frozen=True, tag="http"):
    # May carry user:password or a token in the query, so never shown.
    url: SecretText
    format: Literal["json", "loki", "otlp"] = "json"
    # Values may be "env:NAME" or "credential:NAME"; load_config puts in what they refer to.
    headers: Mapping[str, SecretText] = _Headers()
    gzip: bool = False
    timeout: PositiveDuration = 10.0
    batch_max: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 500
    tenant: Text | None = None  # Loki's X-Scope-OrgID
    # Basic auth; the password may be "env:NAME" or "credential:NAME" too.
    username: Text | None = None
    password: SecretText | None = None

    def _finish(self, ctx: _Context, where: str) -> Self:
        problem = _url_problem(self.url)
        if problem:
            raise ctx.error(f"{where}.url", problem)
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = _key(f"{where}.headers", name)
            if not _HEADER_NAME.fullmatch(name):
                raise ctx.error(key, "is not a valid header name; use letters, digits and '-'")
            same = next((h for h in headers if h.lower() == name.lower()), None)
            if same is not None:
                raise ctx.error(key, f"the same header as {same!r} (names ignore case); remove one")
            headers[name] = _reveal(ctx, key, value)
            if "\r" in headers[name] or "\n" in headers[name]:
                raise ctx.error(key, "the value contains a line break; a header is one line")
        if self.tenant is not None and self.format != "loki":
            raise ctx.error(
                f"{where}.tenant",
                'only applies to format = "loki" (it is Loki\'s X-Scope-OrgID); remove it',
            )
        if (self.username is None) != (self.password is None):
            have, need = (
                ("username", "password") if self.password is None else ("password", "username")
            )
            raise ctx.error(
                f"{where}.{need}", f'missing; basic auth needs {need} = "..." with {have}'
            )
        if self.username is not None and urlsplit(self.url).username is not None:
            raise ctx.error(
                f"{where}.username",
                "conflicts with the user name in url; give the credentials in one place",
            )
        password = (
            None if self.password is None else _reveal(ctx, f"{where}.password", self.password)
        )
        return msgspec.structs.replace(self, headers=_Headers(headers), password=password)


class SlackSinkConfig(_Sink, frozen=True, tag="slack"):
    # A Slack incoming-webhook URL is a credential: may be "env:NAME" or "credential:NAME".
    url: SecretText

    def _finish(self, ctx: _Context, where: str) -> Self:
        url = _reveal(ctx, f"{where}.url", self.url)
        problem = _url_problem(url)
        if problem is None and urlsplit(url).scheme != "https":
            problem = "expected an https:// URL (Slack webhook URLs start https://hooks.slack.com/)"
        if problem:
            raise ctx.error(f"{where}.url", problem)
        return msgspec.structs.replace(self, url=url)


SinkConfig: TypeAlias = (
    StdoutSinkConfig | JournaldSinkConfig | FileSinkConfig | HttpSinkConfig | SlackSinkConfig
)


class JobConfig(_Table, frozen=True):
    name: Text
    workflow: Text
    product: Text | None = None
    branch: Text | None = None
    tag: Text | None = None
    pull_request: Text | None = None
    clean: bool | None = None
    cron: Text | None = None
    every: PositiveDuration | None = None
    at: Instant | None = None
    timezone: Text = "UTC"
    jitter: Duration = 0.0
    overlap: Literal["skip", "buffer_one", "allow_all"] = "skip"
    catch_up: Duration = 0.0
    enabled: bool = True

    @property
    def workflow_is_id(self) -> bool:
        return is_workflow_id(self.workflow)


class WatchConfig(_Table, frozen=True):
    workflow: Text
    product: Text | None = None

    @property
    def workflow_is_id(self) -> bool:
        return is_workflow_id(self.workflow)


class _Document(_Table, frozen=True):
    """The whole file as written."""

    api: _ApiTable
    state: StateConfig  # load_config puts in the default path first: it depends on the env
    polling: PollingConfig = PollingConfig()
    server: _ServerTable | None = None
    sinks: tuple[SinkConfig, ...] = (StdoutSinkConfig(),)
    jobs: tuple[JobConfig, ...] = ()
    watches: tuple[WatchConfig, ...] = ()


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


def _bare(t: mi.Type) -> mi.Type:
    """`t` without None (TOML has no null) and without msgspec's Metadata wrapper."""
    if isinstance(t, mi.Metadata):
        t = t.type
    if isinstance(t, mi.UnionType):
        rest = tuple(m for m in t.types if not isinstance(m, mi.NoneType))
        return rest[0] if len(rest) == 1 else mi.UnionType(rest)
    return t


def _structs(t: mi.Type) -> tuple[mi.StructType, ...]:
    """The tables `t` declares: one, or several (a tagged union)."""
    t = _bare(t)
    if isinstance(t, mi.UnionType):
        return tuple(s for s in t.types if isinstance(s, mi.StructType))
    return (t,) if isinstance(t, mi.StructType) else ()


def _keys(t: mi.Type) -> tuple[str, ...]:
    """The keys a table, or an array of tables, of type `t` accepts."""
    t = _bare(t)
    structs = _structs(t.item_type if isinstance(t, mi.VarTupleType) else t)
    tags = [s.tag_field for s in structs[:1] if s.tag_field]
    return tuple(dict.fromkeys([*tags, *(f.name for s in structs for f in s.fields)]))


_DOCUMENT = mi.type_info(_Document)
assert isinstance(_DOCUMENT, mi.StructType)

# Every key each table accepts, by table ("jobs" for [[jobs]]); [[sinks]] lists the keys of
# every sink type.
KNOWN_KEYS: Mapping[str, tuple[str, ...]] = {
    "": _keys(_DOCUMENT),
    **{f.name: _keys(f.type) for f in _DOCUMENT.fields},
}

_TYPES = "use one of " + ", ".join(str(s.tag) for s in _structs(mi.type_info(SinkConfig)))
_ADD_WORKFLOW = 'add workflow = "<id>" (`xcloudd workflows` lists products and workflow ids)'
# What to add for a required key that is missing.
_MISSING: Mapping[tuple[type, str], str] = {
    (_Document, "api"): (
        "add an [api] table with key_id and private_key (see config.example.toml)"
    ),
    (_ApiTable, "key_id"): 'add key_id = "..." (the 10-character Key ID from App Store Connect)',
    (_ApiTable, "private_key"): (
        'add private_key = "/etc/xcloudd/AuthKey_<KEY ID>.p8" (or "env:NAME" or "credential:NAME")'
    ),
    (JobConfig, "name"): 'add name = "..." (used in `xcloudd start NAME` and events)',
    (JobConfig, "workflow"): _ADD_WORKFLOW,
    (WatchConfig, "workflow"): _ADD_WORKFLOW,
}


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
    data = _read_toml(path)
    # The default state path depends on the environment, so it goes in before decoding.
    state = data.setdefault("state", {})
    if isinstance(state, dict) and "path" not in state:
        state["path"] = str(default_state_path(ctx.env).absolute())
    try:
        doc = msgspec.convert(data, _Document, dec_hook=ctx.decode)
    except msgspec.ValidationError as err:
        raise ctx.error(*_explain(ctx, str(err), data)) from None
    return Config(
        path=path,
        api=_check_api(ctx, doc.api),
        state=_check_state(ctx, doc.state),
        polling=_check_polling(ctx, doc.polling),
        server=None if doc.server is None else _check_server(ctx, doc.server),
        sinks=tuple(_check_sink(ctx, f"sinks[{i}]", s) for i, s in enumerate(doc.sinks)),
        jobs=_unique_jobs(ctx, [_check_job(ctx, f"jobs[{i}]", j) for i, j in enumerate(doc.jobs)]),
        watches=_unique_watches(
            ctx, [_check_watch(ctx, f"watches[{i}]", w) for i, w in enumerate(doc.watches)]
        ),
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

    def decode(self, kind: type, value: object) -> object:
        """msgspec's dec_hook, for the field types above; the reason of a ValueError or
        TypeError becomes msgspec's error at the field."""
        parse = _PARSERS.get(kind)
        if parse is not None:
            return kind(parse(value))
        if kind is Path:
            return self.path(_text(value))
        if kind is Secret:
            return Secret(_text(value, secret=True))
        raise NotImplementedError(kind)


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


def _key(where: str, name: str) -> str:
    """The key `name` in the table at `where`, as the user would write it: a dotted path,
    with odd names quoted."""
    shown = name if _BARE_KEY.fullmatch(name) else _quote(name)
    return f"{where}.{shown}" if where else shown


def _text(value: object, *, secret: bool = False) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {_show(value, secret=secret)}")
    if not value.strip():
        raise ValueError(_EMPTY)
    return value


_EMPTY = "must not be empty; remove the key or give it a value"


def _duration(value: object, *, positive: bool) -> float:
    try:
        seconds = parse_duration(value)
    except OverflowError:
        # parse_duration turns the number into a float, which a huge integer cannot be.
        seconds = math.inf
    if positive and seconds <= 0:
        raise ValueError('must be more than 0, e.g. "30s"')
    if not seconds <= _MAX_DURATION:
        raise ValueError(f'must be at most 100 years ("36500d"), got {_show(value)}')
    return seconds


def _instant(value: object) -> datetime:
    example = "like 2026-12-24T18:00:00+01:00 (or ...Z for UTC)"
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{_show(value)} has no UTC offset; write it {example}")
        return _in_range(value)
    if not isinstance(value, str):
        raise TypeError(f"expected an RFC 3339 date-time with offset {example}, got {_show(value)}")
    match = _RFC3339.fullmatch(value.strip())
    if match is None:
        raise ValueError(
            f"expected an RFC 3339 date-time with offset {example}, got {_show(value)}"
        )
    if match["offset"] is None:
        raise ValueError(f"{_show(value)} has no UTC offset; write it {example}")
    text = value.strip()
    text = text[:10] + "T" + text[11:]
    if text[-1] in "Zz":
        text = text[:-1] + "+00:00"
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{_show(value)} is not a real date and time; check the numbers") from None
    return _in_range(at)


def _in_range(at: datetime) -> datetime:
    # TOML allows 0001-01-01T00:00:00+01:00, which is no instant Python can hold in UTC, and
    # 9999-12-31T23:00:00Z, which plus the jitter (up to 100 years) or shown in the job's time
    # zone is past the end of Python's calendar.
    try:
        utc = at.astimezone(UTC)
    except OverflowError:
        utc = None
    if utc is None or utc.year >= _AT_MAX_YEAR:
        raise ValueError(
            f"{_show(at)} is out of range; use a date from the year 1 to {_AT_MAX_YEAR - 1}"
        ) from None
    return at


_PARSERS: Mapping[type, Callable[[object], object]] = {
    Duration: partial(_duration, positive=False),
    PositiveDuration: partial(_duration, positive=True),
    Instant: _instant,
}


# --- msgspec's errors in our words ----------------------------------------------------------

# msgspec's message ends in " - at `$.jobs[0].cron`" (nothing for the top level); a mapping's
# key shows as "[...]".
_LOCATED = re.compile(r"(?P<message>.*) - at `\$(?P<path>[^`]*)`", re.DOTALL)
_STEP = re.compile(r"\.(?P<name>\w+)|\[(?P<index>\d+)\]|\[\.\.\.\]")


@dataclass(frozen=True)
class _Spot:
    """A place in the document, followed along msgspec's path: its key as the user would
    write it, the type the Structs declare there and what the file holds there."""

    key: str
    type: mi.Type
    value: Any
    declared: msgspec.structs.FieldInfo | None = None  # when it is a key of a table

    def struct(self) -> mi.StructType | None:
        """The table declared here; for a tagged union, the one the value's tag picks."""
        structs = _structs(self.type)
        if len(structs) == 1:
            return structs[0]
        tag = self.value.get(structs[0].tag_field) if structs else None
        return next((s for s in structs if s.tag == tag), None)

    def field(self, name: str) -> _Spot:
        struct = self.struct()
        assert struct is not None
        info = next(f for f in struct.fields if f.name == name)
        declared = next(f for f in msgspec.structs.fields(struct.cls) if f.name == name)
        return _Spot(_key(self.key, name), info.type, self.value[name], declared)

    def item(self, index: int) -> _Spot:
        t = _bare(self.type)
        assert isinstance(t, mi.VarTupleType)
        return _Spot(f"{self.key}[{index}]", t.item_type, self.value[index])

    def entry(self, ctx: _Context) -> _Spot:
        """The entry of a mapping that msgspec refused (it does not name the key)."""
        t = _bare(self.type)
        assert isinstance(t, mi.DictType)
        values = _bare(t.value_type)
        for name, value in self.value.items():
            try:
                if isinstance(values, mi.CustomType):
                    ctx.decode(values.cls, value)
            except (TypeError, ValueError):
                return _Spot(_key(self.key, name), values, value)
        return self


def _explain(ctx: _Context, error: str, data: dict[str, object]) -> tuple[str, str]:
    """(the dotted key, the reason) for msgspec's error `error` about `data`."""
    located = _LOCATED.fullmatch(error)
    message, path = (located["message"], located["path"]) if located else (error, "")
    spot = _Spot("", _DOCUMENT, data)
    for step in _STEP.finditer(path):
        name, index = step["name"], step["index"]
        if index is not None:
            spot = spot.item(int(index))
        elif name is None:
            spot = spot.entry(ctx)
        elif (table := spot.struct()) is None or name == table.tag_field:
            return _key(spot.key, name), f"unknown sink type {_show(spot.value[name])}; {_TYPES}"
        else:
            spot = spot.field(name)

    missing = re.fullmatch(r"Object missing required field `(.*)`", message)
    if missing:
        return _key(spot.key, missing[1]), f"missing; {_missing(spot, missing[1])}"
    if message.startswith("Object contains unknown field"):
        return _unknown(spot)
    t = _bare(spot.type)
    if isinstance(t, mi.CustomType):
        return spot.key, message  # the reason _Context.decode gave
    return spot.key, _mismatch(spot, t)


def _missing(spot: _Spot, name: str) -> str:
    struct = spot.struct()
    if struct is None:  # a [[sinks]] entry without its type
        return f"add {name} = one of {_TYPES.removeprefix('use one of ')}"
    if struct.tag is not None:
        return f'a "{struct.tag}" sink needs {name} = "..."'
    return _MISSING.get((struct.cls, name), f"add {name} = ...")


def _unknown(spot: _Spot) -> tuple[str, str]:
    struct = spot.struct()
    assert struct is not None
    known = [*([struct.tag_field] if struct.tag_field else []), *(f.name for f in struct.fields)]
    name = next(k for k in spot.value if k not in known)
    if struct.tag is not None and any(name in _keys(s) for s in _structs(spot.type)):
        return _key(spot.key, name), f'does not apply to type = "{struct.tag}"; remove it'
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return _key(spot.key, name), f"unknown key {name!r} (known: {', '.join(known)}){hint}"


def _mismatch(spot: _Spot, t: mi.Type) -> str:
    """Why the value at `spot` does not fit its declared type `t`."""
    value = spot.value
    default = None if spot.declared is None else spot.declared.default
    if isinstance(t, mi.LiteralType):
        # In the order declared (msgspec sorts them): the default first.
        declared = None if spot.declared is None else spot.declared.type
        values = get_args(declared) if get_origin(declared) is Literal else t.values
        listed = " | ".join(f'"{v}"' for v in values)
        return f"expected one of {listed}, got {_show(value)}"
    if isinstance(t, mi.StrType) and isinstance(value, str):
        return _EMPTY  # the one pattern declared: Text
    if isinstance(t, mi.IntType) and type(value) is int:
        return f"must be from {t.ge} to {t.le}, got {_show(value)}; default {default}"
    if isinstance(t, mi.StrType):
        expected = "a string"
    elif isinstance(t, mi.BoolType):
        expected = "true or false"
    elif isinstance(t, mi.IntType):
        expected = f"a whole number like {default}"
    elif isinstance(t, mi.FloatType):
        # msgspec refuses an integer only when it is too large for a float.
        expected = "a finite number" if isinstance(value, int) else "a number"
    elif isinstance(t, mi.VarTupleType) and _structs(t.item_type):
        expected = f"an array of tables ([[{spot.key}]] sections)"
    elif isinstance(t, mi.VarTupleType):
        example = ' like ["build.*"]' if spot.key.endswith(".events") else ""
        expected = f"an array of strings{example}"
    elif _structs(t) and not spot.key.endswith("]"):
        expected = f"a table ([{spot.key}])"
    else:
        expected = "a table"
    return f"expected {expected}, got {_show(value, secret=_holds_secret(t))}"


def _holds_secret(t: mi.Type) -> bool:
    t = _bare(t)
    if isinstance(t, mi.DictType):
        return _holds_secret(t.value_type)
    return isinstance(t, mi.CustomType) and t.cls is Secret


# --- the checks msgspec cannot make ---------------------------------------------------------


def _check_api(ctx: _Context, t: _ApiTable) -> ApiConfig:
    if not _KEY_ID.fullmatch(t.key_id):
        raise ctx.error(
            "api.key_id",
            f'expected 10 uppercase letters and digits like "2X9R4HXF34", got {_show(t.key_id)}; '
            "copy the Key ID from App Store Connect > Users and Access > Integrations",
        )
    if t.issuer_id is not None and not _UUID.fullmatch(t.issuer_id):
        raise ctx.error(
            "api.issuer_id",
            f'expected a UUID like "69a6de70-03db-47e3-e053-5b8c7c11a4d1", '
            f"got {_show(t.issuer_id)}; "
            "copy the Issuer ID from App Store Connect, or remove it for an individual key",
        )
    reason = _base_url_problem(t.base_url)
    if reason:
        # A password, or a token in the query, must not be echoed back.
        shown = "" if "@" in t.base_url or "?" in t.base_url else f", got {_show(t.base_url)}"
        raise ctx.error("api.base_url", f"{reason}{shown}")
    return ApiConfig(
        key=_load_signing_key(ctx, t), base_url=t.base_url.rstrip("/"), timeout=t.timeout
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


def _check_state(ctx: _Context, state: StateConfig) -> StateConfig:
    if state.outbox_max_age < _OUTBOX_MIN_AGE:
        raise ctx.error(
            "state.outbox_max_age",
            f"{format_duration(state.outbox_max_age)} is too short: a sink may well be down "
            f'for an hour; use at least "1h" (default "{format_duration(_OUTBOX_MAX_AGE)}")',
        )
    return state


def _check_polling(ctx: _Context, p: PollingConfig) -> PollingConfig:
    if p.min_interval > p.max_interval:
        raise ctx.error(
            "polling.min_interval",
            f"{format_duration(p.min_interval)} is more than polling.max_interval "
            f"({format_duration(p.max_interval)}); lower it or raise max_interval",
        )
    if not p.min_interval <= p.interval <= p.max_interval:
        raise ctx.error(
            "polling.interval",
            f"{format_duration(p.interval)} is outside polling.min_interval.."
            f"polling.max_interval ({format_duration(p.min_interval)}.."
            f"{format_duration(p.max_interval)}); pick a value in that range",
        )
    if not math.isfinite(p.budget):
        raise ctx.error("polling.budget", f"expected a finite number, got {p.budget}")
    if not 0 < p.budget <= 1:
        raise ctx.error(
            "polling.budget",
            f"expected a share of the hourly request limit above 0 and at most 1 "
            f"(e.g. 0.8), got {p.budget:g}",
        )
    return p


def _check_server(ctx: _Context, t: _ServerTable) -> ServerConfig:
    host, port = _parse_listen(ctx, t.listen)
    token = t.webhook_token
    if token is not None:
        if not _WEBHOOK_TOKEN.fullmatch(token):
            raise ctx.error(
                "server.webhook_token",
                "may contain only letters, digits and . _ ~ - (it goes in the webhook URL); "
                "generate one with `openssl rand -hex 32`",
            )
        if len(token) < _WEBHOOK_TOKEN_MIN:
            raise ctx.error(
                "server.webhook_token",
                f"too short ({len(token)} characters); anyone who guesses it can make xcloudd "
                f"poll, so use at least {_WEBHOOK_TOKEN_MIN}, e.g. from `openssl rand -hex 32`",
            )
    return ServerConfig(host=host, port=port, webhook_token=token)


def _parse_listen(ctx: _Context, listen: str) -> tuple[str, int]:
    def error(reason: str) -> ConfigError:
        return ctx.error("server.listen", reason)

    expected = f'expected "HOST:PORT" like "127.0.0.1:9464" or "[::1]:9464", got {_show(listen)}'
    host, sep, port_text = listen.rpartition(":")
    # isdigit() alone also accepts "²" and other digits that int() refuses or reads oddly.
    if not sep or not (port_text.isascii() and port_text.isdigit()):
        raise error(expected)
    digits = port_text.lstrip("0") or "0"
    # int() of thousands of digits is slow, and refused past 4300.
    if len(digits) > 5 or int(digits) > 65535:
        raise error(f"port {_show(port_text)} is out of range (0-65535)")
    port = int(digits)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise error(f"{host!r} is not an IPv6 address; {expected}") from None
    elif ":" in host or "[" in host or "]" in host:
        raise error(f'write an IPv6 address in brackets, e.g. "[::1]:{port}"')
    if not host:
        raise error(f'missing host; use "0.0.0.0:{port}" to listen on all interfaces')
    if ":" not in host and not _HOSTNAME.fullmatch(host):
        raise error(f"{_show(host)} is not a host name or IP address; {expected}")
    return host, port


def _check_sink(ctx: _Context, where: str, sink: SinkConfig) -> SinkConfig:
    if not sink.events:
        raise ctx.error(
            f"{where}.events", "is empty, so the sink would get nothing; remove it for all events"
        )
    if any(not pattern.strip() for pattern in sink.events):
        raise ctx.error(f"{where}.events", 'contains an empty pattern; use e.g. "build.*"')
    return sink._finish(ctx, where)


def _reveal(ctx: _Context, key: str, value: str) -> Secret:
    """The secret `value` refers to with "env:NAME" or "credential:NAME", else `value`.
    Messages name the variable or file, never the value."""
    if value.startswith("env:"):
        name = value.removeprefix("env:")
        if not _ENV_NAME.fullmatch(name):
            raise ctx.error(key, 'expected "env:NAME" with a variable name')
        text = ctx.env.get(name)
        if not text or not text.strip():
            state = "empty" if text is not None else "not set"
            raise ctx.error(key, f"environment variable {name} is {state}; set it to the value")
        return Secret(text)
    if value.startswith("credential:"):
        name = value.removeprefix("credential:")
        hint = (
            f"credential: values need systemd's LoadCredential={name}:/path/to/file "
            'in the unit, or use "env:NAME"'
        )
        file = _credential_file(ctx, key, name, hint=hint)
        data = _read_file(ctx, key, file)
        if len(data) > KEY_FILE_MAX:
            raise ctx.error(key, f"{file}: too large for a secret; is it the right file?")
        try:
            text = data.decode().strip()
        except UnicodeDecodeError:
            raise ctx.error(key, f"{file}: not UTF-8 text") from None
        if not text:
            raise ctx.error(key, f"{file}: is empty; put the value in it")
        return Secret(text)
    return Secret(value)


def _check_workflow(ctx: _Context, where: str, workflow: str, product: str | None) -> None:
    if product is None and not is_workflow_id(workflow):
        raise ctx.error(
            f"{where}.workflow",
            f'{_show(workflow)} is not a workflow id (a UUID), so also set product = "..." '
            "to say whose workflow it is, or use the id (`xcloudd workflows` lists them)",
        )


def _check_job(ctx: _Context, where: str, job: JobConfig) -> JobConfig:
    if not _JOB_NAME.fullmatch(job.name):
        raise ctx.error(
            f"{where}.name",
            f"{_show(job.name)} must start with a letter or digit and contain only letters, "
            "digits, '.', '_' and '-'",
        )
    _check_workflow(ctx, where, job.workflow, job.product)
    refs = {"branch": job.branch, "tag": job.tag, "pull_request": job.pull_request}
    _at_most_one(ctx, where, [ref for ref, value in refs.items() if value is not None])
    schedules = {"cron": job.cron, "every": job.every, "at": job.at}
    _at_most_one(ctx, where, [kind for kind, value in schedules.items() if value is not None])
    if job.cron is not None:
        from xcloudd.schedule import validate_cron

        try:
            validate_cron(job.cron)
        except ValueError as err:
            raise ctx.error(
                f"{where}.cron",
                f"{_show(job.cron)}: {err} (fields: minute hour day-of-month month day-of-week)",
            ) from None
    try:
        ZoneInfo(job.timezone)
    # OSError: names of tzdata folders ("America") and names too long for a file name.
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ctx.error(
            f"{where}.timezone",
            f"unknown time zone {_show(job.timezone)}; "
            'use an IANA name like "Europe/Berlin" or "UTC"',
        ) from None
    _check_schedule(ctx, where, job)
    return job


def _check_schedule(ctx: _Context, where: str, job: JobConfig) -> None:
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
            raise ctx.error(f"{where}.{key}", str(err)) from None


def _at_most_one(ctx: _Context, where: str, present: list[str]) -> None:
    if len(present) > 1:
        raise ctx.error(
            f"{where}.{present[1]}",
            f"conflicts with {where}.{present[0]}; set only one of {' and '.join(present)}",
        )


def _check_watch(ctx: _Context, where: str, watch: WatchConfig) -> WatchConfig:
    _check_workflow(ctx, where, watch.workflow, watch.product)
    return watch


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


def _load_signing_key(ctx: _Context, t: _ApiTable) -> SigningKey:
    def error(reason: str) -> ConfigError:
        return ctx.error("api.private_key", reason)

    ref = t.private_key
    # Someone pasting the key itself into the config must not get it echoed back in an error;
    # after this check every message below may quote `ref`.
    pasted = pasted_key_kind(ref)
    if pasted:
        raise error(
            f"looks like key material pasted inline ({pasted}, not shown); put it in a file "
            'and give its path, or use "env:NAME" or "credential:NAME"'
        )
    file: Path | None = None
    # Why a plain key file is open to others; refused once it is known to hold a key at all.
    exposed: str | None = None
    if ref.startswith("env:"):
        name = ref.removeprefix("env:")
        if not _ENV_NAME.fullmatch(name):
            raise error(f'expected "env:NAME" with a variable name, got {_show(ref)}')
        text = ctx.env.get(name)
        if not text or not text.strip():
            raise error(
                f"environment variable {name} is {'empty' if text is not None else 'not set'}; "
                "set it to the contents of the .p8 file"
            )
        # Many env-file formats keep PEM on one line with literal \n escapes.
        data = text.replace("\\n", "\n").strip().encode()
        source = ref
    else:
        if ref.startswith("credential:"):
            name = ref.removeprefix("credential:")
            hint = (
                f"credential: keys need systemd's LoadCredential={name}:/path/to/AuthKey.p8 "
                "in the unit, or give a file path instead"
            )
            file = _credential_file(ctx, "api.private_key", name, hint=hint, shown=ref)
            source = ref
        else:
            file = ctx.path(ref)
            source = str(file)
        data, mode = _read_file_and_mode(ctx, "api.private_key", file)
        # Files in the credentials directory are exempt: systemd makes them, for the service
        # user only.
        if not ref.startswith("credential:"):
            exposed = exposure(file, mode)

    result = parse_private_key(data)
    if isinstance(result, str):
        raise error(f"{source}: {result}")
    if exposed:
        raise error(exposed)
    if file is not None:
        named = _AUTHKEY_FILE.fullmatch(file.name)
        if named and named[1] != t.key_id:
            raise ctx.error(
                "api.key_id",
                f"{t.key_id!r} does not match the key file {file.name}; use the Key ID "
                "App Store Connect shows for that key",
            )
    return SigningKey(key_id=t.key_id, issuer_id=t.issuer_id, private_key=result, source=source)


def _credential_file(ctx: _Context, key: str, name: str, *, hint: str, shown: str = "") -> Path:
    """$CREDENTIALS_DIRECTORY/name, for "credential:NAME"; `hint` says what to do when that is
    not set, `shown` is the value when it is safe to quote."""
    if not name or "/" in name or name in (".", ".."):
        got = f", got {_show(shown)}" if shown else ""
        raise ctx.error(key, f'expected "credential:NAME" with a plain name{got}')
    directory = ctx.env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise ctx.error(key, f"CREDENTIALS_DIRECTORY is not set; {hint}")
    return Path(directory) / name


def _read_file(ctx: _Context, key: str, file: Path) -> bytes:
    """The start of a key or credential file: more than KEY_FILE_MAX bytes is the wrong file."""
    return _read_file_and_mode(ctx, key, file)[0]


def _read_file_and_mode(ctx: _Context, key: str, file: Path) -> tuple[bytes, int]:
    """_read_file, with the permission bits of the file read (fstat: the same file, also when
    `file` is a symlink or is replaced meanwhile)."""
    try:
        with file.open("rb") as fh:
            return fh.read(KEY_FILE_MAX + 1), stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
    except FileNotFoundError:
        reason = "no such file"
    except PermissionError:
        reason = "permission denied; make it readable by the user xcloudd runs as"
    except IsADirectoryError:
        reason = "is a directory; give the file itself"
    except OSError as err:
        reason = f"cannot read: {err.strerror or type(err).__name__}"
    raise ctx.error(key, f"{file}: {reason}")
