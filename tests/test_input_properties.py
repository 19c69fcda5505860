"""Whatever a config file or a command line holds, xcloudd answers as DESIGN 3.1 promises: an
exit code from the contract and, for a mistake, one line on stderr that says where it is,
never a traceback, an internal error or key material, and without touching the state store.

Configs are a valid one with random mutations; command lines are random subcommands and options.
Both run through the real `xcloudd.cli.main`, in-process. Nothing here may reach the network:
`asyncio.run` (where every online command starts) and `status` (the state store, tested
elsewhere) are replaced by a stop that tells the test validation passed.
"""

from __future__ import annotations

import asyncio
import copy
import re
import tomllib
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any, NoReturn

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xcloudd import commands
from xcloudd.cli import main
from xcloudd.config import KNOWN_KEYS

# Derandomized, so CI runs the same examples every time (about 20 s in all). capsys and
# monkeypatch are function-scoped: each example empties capsys first, and the patches hold for
# every example alike.
SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

KEY_ID = "2X9R4HXF34"
ISSUER = "69a6de70-03db-47e3-e053-5b8c7c11a4d1"
WORKFLOW_ID = "a3946af0-cc38-4e0b-acba-5575c8dad050"
KEY_FILE = f"AuthKey_{KEY_ID}.p8"
# In the sinks' URLs, password and (through the environment) a header: never to be shown.
SECRET = "sekrit-0f9a8b7c"

PEM = (
    ec.generate_private_key(ec.SECP256R1())
    .private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    .decode()
)
KEY_LINES = [line for line in PEM.splitlines() if not line.startswith("-----")]
KEY_BODY = "".join(KEY_LINES)
# Any 16 characters of the key in a message count as a leak.
KEY_WINDOWS = [KEY_BODY[i : i + 16] for i in range(len(KEY_BODY) - 15)]
KEY_MATERIAL = [KEY_BODY, PEM, "\n".join(KEY_LINES), "\\n".join(KEY_LINES), KEY_LINES[1]]


def assert_no_key_material(text: str) -> None:
    assert "PRIVATE KEY-----" not in text
    leaked = [w for w in KEY_WINDOWS if w in text]
    assert not leaked, f"key material in {text!r}"


# --- writing TOML -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """TOML text written as is: values no Python object turns into (or that tomllib refuses)."""

    text: str


def toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_value(value: object) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # also inf, -inf and nan, as TOML spells them
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        pairs = (f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    raise TypeError(value)


def toml_document(config: dict[str, Any]) -> str:
    """Every table inline, one top-level key a line: nothing else to get right."""
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in config.items())


# --- the valid config and where it can be changed ---------------------------------------------

BASE: dict[str, Any] = {
    "api": {
        "issuer_id": ISSUER,
        "key_id": KEY_ID,
        "private_key": KEY_FILE,
        "base_url": "https://api.appstoreconnect.apple.com",
        "timeout": "30s",
    },
    "state": {"path": "state/state.db", "outbox_max_events": 100000, "outbox_max_age": "7d"},
    "polling": {
        "interval": "30s",
        "min_interval": "5s",
        "max_interval": "5m",
        "give_up_after": "3h",
        "budget": 0.8,
    },
    "sinks": [
        {"type": "stdout", "events": ["build.*", "schedule.*"]},
        {"type": "file", "path": "events.jsonl", "min_level": "info"},
        {"type": "journald", "socket": "journal.sock"},
        {
            "type": "http",
            "url": f"https://logs.example.com/push?token={SECRET}",
            "format": "loki",
            "headers": {"X-Api-Key": "env:XCLOUDD_TEST_HEADER", "X-Team": "ci"},
            "gzip": True,
            "timeout": "10s",
            "batch_max": 500,
            "tenant": "ci",
            "username": "xcloudd",
            "password": SECRET,
        },
        {"type": "slack", "url": f"https://hooks.slack.com/services/T0/B0/{SECRET}"},
    ],
    "jobs": [
        {
            "name": "nightly-main",
            "workflow": WORKFLOW_ID,
            "branch": "main",
            "clean": False,
            "cron": "30 2 * * *",
            "timezone": "Europe/Berlin",
            "jitter": "10m",
            "overlap": "skip",
            "catch_up": "2h",
            "enabled": True,
        },
        {
            "name": "release",
            "workflow": "Release",
            "product": "MyApp",
            "tag": "v1.2.0",
            "at": datetime(2026, 12, 24, 18, tzinfo=timezone(timedelta(hours=1))),
        },
        {
            "name": "pr-check",
            "workflow": WORKFLOW_ID,
            "pull_request": "pr-1",
            "every": "6h",
            "timezone": "Pacific/Kiritimati",
            "overlap": "buffer_one",
        },
    ],
    "watches": [{"workflow": "Release", "product": "MyApp"}],
}

Path_ = tuple[str | int, ...]


def get(config: Any, path: Path_) -> Any:
    for step in path:
        config = config[step]
    return config


def walk(value: Any, path: Path_ = ()) -> Iterator[Path_]:
    """Every location in `value` below the root: tables, arrays and leaves."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in items:
        yield (*path, key)
        if isinstance(child, dict | list):
            yield from walk(child, (*path, key))


LOCATIONS = list(walk(BASE))
# Tables that accept keys: the root, [api], [[jobs]] entries... (not headers: any name goes)
TABLES: list[Path_] = [
    (),
    *(p for p in LOCATIONS if isinstance(get(BASE, p), dict) and p[-1] != "headers"),
]


def table_kind(path: Path_) -> str:
    """The KNOWN_KEYS entry for the table at `path`: [[jobs]] entries are "jobs"."""
    names = [step for step in path if isinstance(step, str)]
    return names[-1] if names else ""


def display(path: Path_) -> str:
    """The key path as xcloudd names it: jobs[0].every, api."odd name"."""
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{shown(step)}" if out else shown(step))
    return out


def shown(name: str) -> str:
    """A key as it is written in TOML: bare, or quoted with anything unprintable escaped."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", name):
        return name
    out = []
    for char in name:
        if char in '"\\':
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        else:
            out.append(f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


# --- values -----------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return text.split()


TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)
ZONES = st.sampled_from(
    [UTC, timezone(timedelta(hours=14)), timezone(-timedelta(hours=12)), timezone(timedelta(0))]
)
SCALARS = st.one_of(
    TEXT,
    st.sampled_from(["", " ", *words("nan NaN inf -inf 1e999 null true 0 -1 ∞ \u0663 ²")]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([2**64, -(2**70), 10**30, 0, -1, 1, 1000, 65536]),
    st.floats(),
    st.booleans(),
    st.datetimes(timezones=st.none() | ZONES),
    st.dates(),
    st.times(),
    st.sampled_from(KEY_MATERIAL),
    st.just(Raw("0x" + "f" * 3000)),  # tomllib has no digit limit for hex: a 12000-bit integer
)
# Values that make the whole file unreadable, so rarer: they would hide everything else.
UNREADABLE = st.sampled_from(
    [
        Raw("1" + "0" * 5000),  # tomllib refuses more than 4300 digits with a ValueError
        Raw("[" * 2000 + "]" * 2000),  # deeper than tomllib's recursion can go
        Raw("{a = " * 2000 + "1" + "}" * 2000),
        Raw('"unterminated'),
    ]
)
KEY_NAMES = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), min_size=0, max_size=10),
    st.sampled_from(["intervall", "Name", "cron ", "every.x", "api", "jobs", "type", "x y"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEY_NAMES, inner, max_size=3),
    max_leaves=5,
)

DURATIONS = st.one_of(
    st.from_regex(r"\A-?[0-9]{0,4}(\.[0-9]{0,3})?[dhmsw]{0,3}\Z"),
    st.sampled_from(
        [
            *words("1h30m 30m1h 1m1m 1.5h 1e3s \u0661s P1D forever -0s 0.5s 36500d 36501d"),
            " 5s ",
            "5 s",
            "1" + "0" * 400 + "s",
            "9" * 30 + "d",
        ]
    ),
    st.sampled_from([0, -1, 1, 0.5, 1e-320, 1e300, float("nan"), float("inf"), 10**30]),
)
CRON_FIELDS = "* */0 */15 0 59 60 -1 1-5 5-1 mon MON-FRI jan foo 1,2,3 , L ? 1#2 7 8 31 32 5/15"
CRONS = st.one_of(
    st.lists(st.sampled_from(words(CRON_FIELDS)), min_size=3, max_size=7).map(" ".join),
    st.sampled_from(["@daily", "@reboot", "@nope", "0 0 31 2 *", "0 0 29 2 *", "* * * *  *"]),
)
TIMEZONES = st.one_of(
    TEXT,
    st.sampled_from(
        [
            *words(
                "UTC America Mars/Olympus ../etc/passwd /etc/localtime Etc/GMT+14 Etc/GMT-14"
                " utc Europe/ posixrules iso3166.tab tzdata.zi Factory EST5EDT Europe\\Berlin"
                " Pacific/Kiritimati"
            ),
            "a" * 300,
            "Europe/Berlin\n",
        ]
    ),
)
DATES = st.one_of(
    st.datetimes(timezones=st.none() | ZONES),
    st.datetimes(timezones=st.none() | ZONES).map(lambda d: d.isoformat()),
    st.dates(),
    st.times(),
    st.sampled_from(
        [
            "2026-02-30T18:00:00Z",
            "2026-12-24T18:00:00",
            "2026-12-24 18:00:00+01:00",
            "9999-12-31T23:59:59-14:00",
            "0001-01-01T00:00:00+14:00",
            "9000-01-01T00:00:00Z",
            "2026-12-24T18:00:00+24:00",
            "2026-13-01T00:00:00Z",
            "2026-12-24t18:00:00z",
            "tomorrow",
            "2026-12-24T18:00:00.1234567890Z",
            "\uff12\uff10\uff12\uff16-12-24T18:00:00Z",
            "",
        ]
    ),
    st.sampled_from(
        [
            datetime(9999, 12, 31, 23, 59, tzinfo=UTC),
            datetime(8999, 12, 31, 23, 59, tzinfo=UTC),
            datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))),
            datetime(9999, 12, 31, 23, tzinfo=timezone(-timedelta(hours=1))),
        ]
    ),
)
LISTENS = st.one_of(
    TEXT,
    st.sampled_from(
        [
            *words(
                "127.0.0.1:9464 [::1]:9464 ::1:9464 :9464 9464 h:70000 h:² h:-1 [zz]:1"
                " 0.0.0.0:0 host: [::1] b@d:80 [::1]:80:80 localhost:09464 ünïcode:80"
            ),
            "h:" + "9" * 5000,
            "a b:80",
        ]
    ),
)
URLS = st.one_of(
    TEXT,
    st.sampled_from(
        [
            *words(
                "https://u:secret@host https://secret@host host https://host/v1 https://host?token=secret"
                " https://host#x https://host:99999 https://h:0 https://[::1]:8080 https://::1:8080"
                " https://[zz] ftp://host https:// http://127.0.0.1:9 https://bücher.de https://h:x"
            ),
            "https://exa mple.com",
        ]
    ),
)
KEY_REFS = st.one_of(
    TEXT,
    st.sampled_from(KEY_MATERIAL),
    st.sampled_from(
        [
            *words(
                "env:NOPE env: env:1X credential:x credential:../x credential: /nonexistent.p8"
                " AuthKey_ABCDEFGHIJ.p8 . config.toml ~/AuthKey.p8"
            ),
            "env:" + KEY_BODY,
        ]
    ),
)
TYPES = st.sampled_from(["stdout", "file", "http", "slack", "journald", "kafka", "STDOUT", ""])
SECRET_REFS = st.one_of(
    TEXT,
    st.sampled_from(
        [
            *words("env:XCLOUDD_TEST_HEADER env:NOPE env: env:1X credential:x credential:../x"),
            f"env:{SECRET}",
            "two\nlines",
            SECRET,
        ]
    ),
)
HEADER_NAMES = st.one_of(KEY_NAMES, st.sampled_from(["X-Api-Key", "x-api-key", "Authorization"]))
JOB_NAMES = st.one_of(TEXT, st.sampled_from(["nightly-main", "release", "pr-check", "-x", "a b"]))

# What each key is given when a mutation sets it: a plausible mistake more often than not.
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    **dict.fromkeys(
        [
            "timeout",
            "interval",
            "min_interval",
            "max_interval",
            "give_up_after",
            "every",
            "jitter",
            "catch_up",
            "outbox_max_age",
        ],
        DURATIONS,
    ),
    "cron": CRONS,
    "timezone": TIMEZONES,
    "at": DATES,
    "listen": LISTENS,
    "base_url": URLS,
    "url": URLS | SECRET_REFS,
    "headers": st.dictionaries(HEADER_NAMES, SECRET_REFS | VALUES, max_size=3),
    "password": SECRET_REFS,
    "username": st.one_of(TEXT, st.just("user:name")),
    "tenant": TEXT,
    "format": st.sampled_from(["json", "loki", "otlp", "csv", "JSON", ""]),
    "min_level": st.sampled_from(["debug", "info", "warning", "error", "fatal", "INFO", ""]),
    "batch_max": st.integers(min_value=-1, max_value=20000),
    "socket": st.one_of(TEXT, st.sampled_from(["/run/systemd/journal/socket", "", "~/j"])),
    "private_key": KEY_REFS,
    "type": TYPES,
    "name": JOB_NAMES,
    "outbox_max_events": st.integers(min_value=-10, max_value=2 * 10**9),
    "budget": st.floats(min_value=-1, max_value=2),
    "server": st.fixed_dictionaries({"listen": LISTENS}),
    "events": st.lists(TEXT, max_size=2),
}


# --- mutations ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    path: Path_
    value: object  # _DELETE: remove the key
    what: str

    def apply(self, config: dict[str, Any]) -> bool:
        """Make the change; False when an earlier one removed or replaced where it goes."""
        try:
            parent = get(config, self.path[:-1])
        except (KeyError, IndexError, TypeError):
            return False
        key = self.path[-1]
        if isinstance(parent, list) and isinstance(key, int) and key < len(parent):
            if self.value is _DELETE:
                return False  # xcloudd has no way to tell which entry went missing
            parent[key] = self.value
            return True
        if isinstance(parent, dict) and isinstance(key, str):
            if self.value is _DELETE:
                return parent.pop(key, _DELETE) is not _DELETE
            parent[key] = self.value
            return True
        return False


_DELETE = object()


@st.composite
def replaced(draw: st.DrawFn) -> Mutation:
    path = draw(st.sampled_from(LOCATIONS))
    name = path[-1] if isinstance(path[-1], str) else ""
    if draw(st.integers(0, 19)) == 0:
        return Mutation(path, draw(UNREADABLE), "unreadable")
    value = draw(PLAUSIBLE.get(name, VALUES) | VALUES)
    return Mutation(path, value, "replaced")


@st.composite
def unknown_key(draw: st.DrawFn) -> Mutation:
    table = draw(st.sampled_from(TABLES))
    known = KNOWN_KEYS[table_kind(table)]
    name = draw(KEY_NAMES.filter(lambda n: n not in known))
    return Mutation((*table, name), draw(VALUES), "unknown key")


@st.composite
def known_key(draw: st.DrawFn) -> Mutation:
    table = draw(st.sampled_from(TABLES))
    name = draw(st.sampled_from(KNOWN_KEYS[table_kind(table)]))
    return Mutation((*table, name), draw(PLAUSIBLE.get(name, VALUES)), "set")


@st.composite
def removed(draw: st.DrawFn) -> Mutation:
    return Mutation(draw(st.sampled_from(LOCATIONS)), _DELETE, "removed")


@st.composite
def duplicate_job_name(draw: st.DrawFn) -> Mutation:
    names = [job["name"] for job in BASE["jobs"]]
    index = draw(st.integers(0, len(names) - 1))
    other = draw(st.sampled_from([n for i, n in enumerate(names) if i != index]))
    return Mutation(("jobs", index, "name"), other, "duplicate job name")


MUTATIONS = st.lists(
    st.one_of(replaced(), unknown_key(), known_key(), removed(), duplicate_job_name()),
    min_size=1,
    max_size=3,
)


def acceptable_keys(path: Path_) -> list[str]:
    """Where an error about a change at `path` may point: the key, or a table holding it
    (so a sibling, as in "every conflicts with cron", or a duplicate in the same array)."""
    return [display(path[:n]) for n in range(len(path), 0, -1)]


def names_a_changed_key(rest: str, mutations: list[Mutation]) -> bool:
    # An error at a quoted key (an odd name) normalises whitespace like every message does.
    for mutation in mutations:
        for key in acceptable_keys(mutation.path):
            where = " ".join(key.split())
            if rest.startswith(where) and rest[len(where) : len(where) + 1] in (".", "[", ":"):
                return True
    return False


def has_raw(value: object) -> bool:
    if isinstance(value, Raw):
        return True
    if isinstance(value, list):
        return any(has_raw(v) for v in value)
    if isinstance(value, dict):
        return any(has_raw(v) for v in value.values())
    return False


# --- the tests ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("props")
    (directory / KEY_FILE).write_text(PEM)
    (directory / KEY_FILE).chmod(0o600)  # a key file others can read is refused
    return directory


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, workdir: Path) -> None:
    monkeypatch.delenv("XCLOUDD_CONFIG", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("NOPE", raising=False)
    monkeypatch.setenv("XCLOUDD_TEST_HEADER", SECRET)
    monkeypatch.setenv("HOME", str(workdir / "home"))
    monkeypatch.setenv("STATE_DIRECTORY", str(workdir / "default-state"))


def listing(directory: Path) -> set[Path]:
    return set(directory.rglob("*"))


def test_the_base_config_is_valid_and_round_trips(
    workdir: Path, clean_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tomllib.loads(toml_document(BASE)) == BASE
    path = workdir / "base.toml"
    path.write_text(toml_document(BASE), encoding="utf-8")
    assert main(["--config", str(path), "check"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "valid (3 jobs, 1 watch, 5 sinks" in captured.out


@settings(SETTINGS, max_examples=1500)
@given(mutations=MUTATIONS, as_json=st.booleans())
def test_any_config_is_valid_or_one_line_naming_file_and_key(
    workdir: Path,
    clean_env: None,
    capsys: pytest.CaptureFixture[str],
    mutations: list[Mutation],
    as_json: bool,
) -> None:
    capsys.readouterr()
    config = copy.deepcopy(BASE)
    mutations = [m for m in mutations if m.apply(config)]
    path = workdir / "config.toml"
    path.write_text(toml_document(config), encoding="utf-8")
    before = listing(workdir)

    code = main(["--config", str(path), "check", *(["--json"] if as_json else [])])

    captured = capsys.readouterr()
    assert listing(workdir) == before, "check created files (the state store?)"
    assert_no_key_material(captured.err + captured.out)
    assert SECRET not in captured.err + captured.out
    if code == 0:
        # A valid config may still earn warnings (an `at` date in the past), never errors.
        assert all(line.startswith("xcloudd: warning: ") for line in captured.err.splitlines()), (
            captured.err
        )
        return
    assert code == 78, captured.err
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.endswith("\n")
    line = captured.err.rstrip("\n")
    assert line.startswith(f"xcloudd: {path}: "), line
    assert "Traceback" not in line
    assert "internal error" not in line
    rest = line.removeprefix(f"xcloudd: {path}: ")
    toml_error = rest.startswith(("line ", "invalid TOML")) and any(
        has_raw(m.value) for m in mutations
    )
    assert toml_error or names_a_changed_key(rest, mutations), (line, mutations)
    assert captured.out == ""


# --- command lines ------------------------------------------------------------------------------


class _WouldGoOnline(BaseException):
    """Validation passed and the command would now talk to App Store Connect (or the store).
    A BaseException, so that main's catch-all for bugs does not turn it into exit 1."""


def _stop(*args: object, **kwargs: object) -> NoReturn:
    for arg in args:
        if isinstance(arg, Coroutine):
            arg.close()  # never started: nothing ran, and no "never awaited" warning
    raise _WouldGoOnline


Option = list[str]
COUNTS = st.sampled_from(
    ["-1", "0", "1", "5", "1000", "1001", "abc", "", "1e3", "\u0663", "9" * 5000]
)
TIMES = st.one_of(
    TEXT,
    st.sampled_from(
        [
            *words(
                "garbage 2026-12-01T00:00:00+01:00 2026-12-01 9999-12-31T23:59:59 now"
                " 2026-02-30T00:00:00 0001-01-01T00:00:00+14:00 2026-12-01T00:00+25:00"
                " 9999-12-31T23:59:59-14:00 9999-12-31T00:00:00Z 8999-12-31T23:00:00Z"
                " 0001-01-01 2026-12-01T00:00:00Z"
            ),
            "",
            KEY_BODY,
        ]
    ),
)
WORDS = st.one_of(
    TEXT,
    st.sampled_from(["nightly-main", "release", "nope", WORKFLOW_ID, "main", "-", "--", "-x"]),
)


def option(flag: str, values: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[Option]:
    if values is None:
        return st.just([flag])
    return values.map(lambda v: [flag, v])


GENERIC = [option("--bogus"), option("-z"), WORDS.map(lambda w: [w]), option("--config", WORDS)]
OPTIONS: dict[str, list[st.SearchStrategy[Option]]] = {
    "check": [
        option("--online"),
        option("--json"),
        option("--from", TIMES),
        option("--count", COUNTS),
        option("--count"),
    ],
    "start": [
        WORDS.map(lambda w: [w]),
        option("--workflow", WORDS),
        option("--product", WORDS),
        option("--branch", WORDS),
        option("--tag", WORDS),
        option("--pull-request", WORDS),
        option("--rebuild", WORDS),
        option("--clean"),
        option("--wait"),
    ],
    "watch": [WORDS.map(lambda w: [w])],
    "status": [option("--json")],
    "workflows": [option("--json")],
    "run": [],
    "simulator": [
        option("--listen", LISTENS),
        option("--scenario", WORDS),
        option("--state-dir", WORDS),
    ],
    "demo": [],
}


@st.composite
def command_lines(draw: st.DrawFn, config: str) -> list[str]:
    argv = ["--config", config]
    if draw(st.integers(0, 9)) == 0:
        argv.append(draw(st.sampled_from(["--bogus", "--help", "--version", "-h"])))
    command = draw(st.sampled_from([*OPTIONS, "frobnicate", ""]))
    if command:
        argv.append(command)
    own = OPTIONS.get(command) or GENERIC
    for _ in range(draw(st.integers(0, 4))):
        # Mostly the command's own options: a stray one ends parsing before anything else.
        pool = GENERIC if draw(st.integers(0, 5)) == 0 else own
        argv += draw(draw(st.sampled_from(pool)))
    return argv


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncio, "run", _stop)
    monkeypatch.setattr(commands, "status", _stop)


def run_main(argv: list[str]) -> int | str:
    """main's exit code, or "online" where it got past validation to the network or store."""
    try:
        return main(argv)
    except _WouldGoOnline:
        return "online"
    except SystemExit as exc:  # --help and --version print and exit, as argparse does
        return exc.code if isinstance(exc.code, int) else repr(exc.code)


@settings(SETTINGS, max_examples=1000)
@given(data=st.data())
def test_any_command_line_is_done_or_one_usage_or_config_line(
    workdir: Path,
    clean_env: None,
    offline: None,
    capsys: pytest.CaptureFixture[str],
    data: st.DataObject,
) -> None:
    path = workdir / "cli.toml"
    if not path.exists():
        path.write_text(toml_document(BASE), encoding="utf-8")
    argv = data.draw(command_lines(str(path)), label="argv")
    capsys.readouterr()

    result = run_main(argv)

    captured = capsys.readouterr()
    assert_no_key_material(captured.err)
    if result in (0, "online"):
        assert captured.err == "", (argv, captured.err)
        return
    assert result in (64, 78), (argv, result, captured.err)
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.endswith("\n")
    assert captured.err.startswith("xcloudd: ")
    assert "Traceback" not in captured.err
    assert "internal error" not in captured.err
    assert captured.out == ""
