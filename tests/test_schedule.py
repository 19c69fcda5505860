"""Planned instants: crontab meaning, DST nights, epoch-aligned intervals, jitter, missed counts."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from xcloudd.schedule import (
    AtSchedule,
    CronSchedule,
    EverySchedule,
    Missed,
    Schedule,
    build_schedule,
    jitter_offset,
    missed_between,
    upcoming,
    validate_cron,
)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def cron(expr: str, tz: str = "UTC", jitter: float = 0.0, name: str = "job") -> Schedule:
    schedule = build_schedule(
        job_name=name, cron=expr, every=None, at=None, timezone=tz, jitter=jitter
    )
    assert schedule is not None
    return schedule


def between(schedule: Schedule, start: datetime, end: datetime) -> list[datetime]:
    out: list[datetime] = []
    current = start
    while (planned := schedule.next_after(current)) is not None and planned <= end:
        out.append(planned)
        current = planned
    return out


def walls(instants: list[datetime], tz: str) -> list[str]:
    zone = ZoneInfo(tz)
    return [i.astimezone(zone).strftime("%a %Y-%m-%d %H:%M %Z") for i in instants]


# ------------------------------------------------------------------------------------------
# crontab meaning


@pytest.mark.parametrize("dow", ["0", "7", "sun", "SUN", "Sun"])
def test_day_of_week_0_7_and_sun_are_all_sunday(dow: str) -> None:
    fires = upcoming(cron(f"0 12 * * {dow}"), utc(2026, 6, 1), 5)
    assert [f.date().isoformat() for f in fires] == [
        "2026-06-07",
        "2026-06-14",
        "2026-06-21",
        "2026-06-28",
        "2026-07-05",
    ]
    assert all(f.weekday() == 6 and f.hour == 12 for f in fires)


def test_weekday_ranges_by_number_and_name() -> None:
    start, end = utc(2026, 6, 1), utc(2026, 6, 15)  # Monday 1st .. Monday 15th
    workdays = {f.weekday() for f in between(cron("0 9 * * mon-fri"), start, end)}
    assert workdays == {0, 1, 2, 3, 4}
    assert between(cron("0 9 * * 1-5"), start, end) == between(cron("0 9 * * MON-FRI"), start, end)
    # Ranges may end on Sunday by name or as 7; both mean Friday through Sunday.
    weekend = {f.weekday() for f in between(cron("0 9 * * fri-sun"), start, end)}
    assert weekend == {4, 5, 6}
    assert between(cron("0 9 * * 5-7"), start, end) == between(cron("0 9 * * fri-sun"), start, end)


def test_month_names_and_lists() -> None:
    fires = upcoming(cron("0 0 1 jan,JUL,oct-nov *"), utc(2026, 1, 1, 0, 0), 5)
    assert [f.date().isoformat() for f in fires] == [
        "2026-07-01",
        "2026-10-01",
        "2026-11-01",
        "2027-01-01",
        "2027-07-01",
    ]


def test_steps() -> None:
    day = utc(2026, 5, 4)
    assert {f.minute for f in between(cron("*/15 * * * *"), day, day + timedelta(hours=2))} == {
        0,
        15,
        30,
        45,
    }
    assert [f.hour for f in upcoming(cron("0 1-5/2 * * *"), day, 4)] == [1, 3, 5, 1]
    # "5/20" is cronie's shorthand for 5-59/20.
    assert [f.minute for f in upcoming(cron("5/20 * * * *"), day, 4)] == [5, 25, 45, 5]
    assert [f.day for f in upcoming(cron("0 0 */10 * *"), utc(2026, 1, 1), 5)] == [
        11,
        21,
        31,
        1,
        11,
    ]


def test_day_of_month_or_day_of_week_when_both_are_restricted() -> None:
    # Vixie cron: "the 13th, and every Friday", not "Friday the 13th".
    fires = between(cron("0 0 13 * fri"), utc(2026, 2, 1), utc(2026, 3, 1))
    assert [f.day for f in fires] == [6, 13, 20, 27]  # Feb 13 2026 is itself a Friday
    fires = between(cron("0 0 13 * mon"), utc(2026, 3, 1), utc(2026, 3, 31))
    assert [f.day for f in fires] == [2, 9, 13, 16, 23, 30]


def test_day_fields_combine_with_and_when_one_starts_with_star() -> None:
    # Vixie decides by the first character, so "*/2" still counts as unrestricted.
    fires = between(cron("0 0 */2 * fri"), utc(2026, 3, 1), utc(2026, 5, 1))
    assert fires
    assert all(f.weekday() == 4 and f.day % 2 == 1 for f in fires)
    only_dom = between(cron("0 0 13 * *"), utc(2026, 1, 1), utc(2026, 4, 1))
    assert [f.month for f in only_dom] == [1, 2, 3]


def test_macros() -> None:
    after = utc(2026, 5, 6, 10, 17)  # a Wednesday
    assert upcoming(cron("@hourly"), after, 1) == [utc(2026, 5, 6, 11)]
    assert upcoming(cron("@daily"), after, 1) == [utc(2026, 5, 7)]
    assert upcoming(cron("@midnight"), after, 1) == [utc(2026, 5, 7)]
    assert upcoming(cron("@weekly"), after, 1) == [utc(2026, 5, 10)]
    assert upcoming(cron("@monthly"), after, 1) == [utc(2026, 6, 1)]
    assert upcoming(cron("@yearly"), after, 1) == [utc(2027, 1, 1)]
    assert upcoming(cron("@ANNUALLY"), after, 1) == [utc(2027, 1, 1)]


def test_feb_29_or_monday_and_feb_29_alone_are_quick() -> None:
    started = time.perf_counter()
    fires = upcoming(cron("0 0 29 2 1"), utc(2027, 1, 1), 3)
    assert [f.date().isoformat() for f in fires] == ["2027-02-01", "2027-02-08", "2027-02-15"]
    # 2100 is not a leap year: eight years pass between two Feb 29ths.
    assert upcoming(cron("0 0 29 2 *"), utc(2097, 1, 1), 2) == [
        utc(2104, 2, 29),
        utc(2108, 2, 29),
    ]
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize("expr", ["0 0 31 2 *", "0 0 30,31 feb *", "0 0 31 apr,jun,sep,nov *"])
def test_a_cron_that_never_fires_is_rejected(expr: str) -> None:
    with pytest.raises(ValueError, match="never fires"):
        validate_cron(expr)
    with pytest.raises(ValueError, match="never fires"):
        cron(expr)


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("61 * * * *", "minute field '61': out of range 0-59"),
        ("5,61 * * * *", "minute field '5,61': 61 out of range 0-59"),
        ("0 24 * * *", "hour field '24': out of range 0-23"),
        ("0 0 0 * *", "day-of-month field '0': out of range 1-31"),
        ("0 0 * 13 *", "month field '13': out of range 1-12"),
        ("0 0 * * 8", "day-of-week field '8': out of range 0-7"),
        ("0 0 * * mon-fry", "day-of-week field 'mon-fry': unknown name 'fry'"),
        ("0 0 * jna *", "month field 'jna': unknown name 'jna'"),
        ("*/0 * * * *", "minute field '*/0': step must be at least 1"),
        ("0 17-9 * * *", "hour field '17-9': range '17-9' runs backwards"),
        ("1,,2 * * * *", "minute field '1,,2': empty list element"),
        ("mon * * * *", "minute field 'mon': 'mon' is not a number"),
        ("0 2 * *", "expected 5 fields"),
        ("0 0 2 * * *", "expected 5 fields"),
        ("", "expected 5 fields"),
        ("@reboot", "unknown macro '@reboot'"),
    ],
)
def test_validate_cron_names_the_bad_field(expr: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("*", r"\*")) as info:
        validate_cron(expr)
    assert "\n" not in str(info.value)


def test_validate_cron_accepts_good_lines() -> None:
    for expr in ["30 2 * * *", "*/5 9-17 * * mon-fri", "0 0 1,15 * *", "0 0 * * 7", "@daily"]:
        validate_cron(expr)


# ------------------------------------------------------------------------------------------
# time zones and DST


def test_europe_berlin_spring_night_fires_once_at_the_end_of_the_gap() -> None:
    # 2027-03-28: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that night.
    fires = between(cron("30 2 * * *", "Europe/Berlin"), utc(2027, 3, 27), utc(2027, 3, 29, 12))
    assert fires == [utc(2027, 3, 27, 1, 30), utc(2027, 3, 28, 1, 0), utc(2027, 3, 29, 0, 30)]
    assert walls(fires, "Europe/Berlin")[1] == "Sun 2027-03-28 03:00 CEST"


def test_europe_berlin_autumn_night_fires_once_at_the_first_pass() -> None:
    # 2026-10-25: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice.
    fires = between(cron("30 2 * * *", "Europe/Berlin"), utc(2026, 10, 24), utc(2026, 10, 26, 12))
    assert fires == [utc(2026, 10, 24, 0, 30), utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]
    assert walls(fires, "Europe/Berlin")[1] == "Sun 2026-10-25 02:30 CEST"


def test_a_skipped_time_and_the_time_after_the_gap_merge_into_one_fire() -> None:
    fires = between(
        cron("0,30 2,3 * * *", "Europe/Berlin"), utc(2027, 3, 27, 12), utc(2027, 3, 28, 12)
    )
    assert fires == [utc(2027, 3, 28, 1, 0), utc(2027, 3, 28, 1, 30)]


def test_hourly_across_both_berlin_nights() -> None:
    # A wildcard job: it fires once per real hour through both nights.
    hourly = cron("0 * * * *", "Europe/Berlin")
    spring = between(hourly, utc(2027, 3, 27, 22), utc(2027, 3, 28, 3))
    assert spring == [utc(2027, 3, 27, 23), *(utc(2027, 3, 28, h) for h in range(4))]
    assert walls(spring, "Europe/Berlin")[1:3] == [
        "Sun 2027-03-28 01:00 CET",
        "Sun 2027-03-28 03:00 CEST",  # wall 02:00 does not exist that night
    ]
    autumn = between(hourly, utc(2026, 10, 24, 22), utc(2026, 10, 25, 3))
    assert autumn == [utc(2026, 10, 24, 23), *(utc(2026, 10, 25, h) for h in range(4))]
    assert walls(autumn, "Europe/Berlin") == [
        "Sun 2026-10-25 01:00 CEST",
        "Sun 2026-10-25 02:00 CEST",
        "Sun 2026-10-25 02:00 CET",
        "Sun 2026-10-25 03:00 CET",
        "Sun 2026-10-25 04:00 CET",
    ]


def test_every_half_hour_across_both_berlin_nights() -> None:
    half = cron("*/30 * * * *", "Europe/Berlin")
    spring = between(half, utc(2027, 3, 27, 23, 45), utc(2027, 3, 28, 2))
    step = timedelta(minutes=30)
    assert spring == [utc(2027, 3, 28) + i * step for i in range(5)]
    autumn = between(half, utc(2026, 10, 24, 23, 45), utc(2026, 10, 25, 2, 30))
    assert autumn == [utc(2026, 10, 25) + i * step for i in range(6)]
    assert walls(autumn, "Europe/Berlin")[:4] == [
        "Sun 2026-10-25 02:00 CEST",
        "Sun 2026-10-25 02:30 CEST",
        "Sun 2026-10-25 02:00 CET",
        "Sun 2026-10-25 02:30 CET",
    ]


def test_america_new_york_both_nights() -> None:
    # 2027-03-14 02:00 EST -> 03:00 EDT; 2026-11-01 02:00 EDT -> 01:00 EST.
    spring = between(cron("30 2 * * *", "America/New_York"), utc(2027, 3, 13), utc(2027, 3, 15, 12))
    assert spring == [utc(2027, 3, 13, 7, 30), utc(2027, 3, 14, 7, 0), utc(2027, 3, 15, 6, 30)]
    autumn = between(
        cron("30 1 * * *", "America/New_York"), utc(2026, 10, 31), utc(2026, 11, 2, 12)
    )
    assert autumn == [utc(2026, 10, 31, 5, 30), utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]


def test_next_after_from_inside_the_repeated_hour_goes_past_it() -> None:
    # 01:15Z is 02:15 CET, the second pass: the 02:30 of this night has already fired.
    schedule = cron("30 2 * * *", "Europe/Berlin")
    assert schedule.next_after(utc(2026, 10, 25, 1, 15)) == utc(2026, 10, 26, 1, 30)


BERLIN = "Europe/Berlin"
QUARTER = timedelta(minutes=15)


def test_every_quarter_hour_keeps_real_time_through_both_berlin_nights() -> None:
    quarter = cron("*/15 * * * *", BERLIN)
    autumn = between(quarter, utc(2026, 10, 24, 22), utc(2026, 10, 25, 4))
    assert autumn == [utc(2026, 10, 24, 22) + i * QUARTER for i in range(1, 25)]
    # Wall 02:00-03:00 happens twice and the job fires through both passes: 8 fires.
    assert [w for w in walls(autumn, BERLIN) if " 02:" in w] == [
        f"Sun 2026-10-25 02:{m:02d} {zone}" for zone in ("CEST", "CET") for m in (0, 15, 30, 45)
    ]
    spring = between(quarter, utc(2027, 3, 27, 22), utc(2027, 3, 28, 4))
    # Wall 02:00-03:00 does not exist: nothing is made up for it, real time just goes on.
    assert spring == [utc(2027, 3, 27, 22) + i * QUARTER for i in range(1, 25)]
    assert not [w for w in walls(spring, BERLIN) if " 02:" in w]


def test_half_past_every_hour_across_both_berlin_nights() -> None:
    half_past = cron("30 * * * *", BERLIN)
    spring = between(half_past, utc(2027, 3, 27, 22), utc(2027, 3, 28, 3))
    assert walls(spring, BERLIN) == [
        "Sat 2027-03-27 23:30 CET",
        "Sun 2027-03-28 00:30 CET",
        "Sun 2027-03-28 01:30 CET",
        "Sun 2027-03-28 03:30 CEST",  # nothing at 03:00 for the skipped 02:30
        "Sun 2027-03-28 04:30 CEST",
    ]
    assert spring == [utc(2027, 3, 27, 22, 30) + timedelta(hours=h) for h in range(5)]
    autumn = between(half_past, utc(2026, 10, 24, 22), utc(2026, 10, 25, 3))
    assert walls(autumn, BERLIN) == [
        "Sun 2026-10-25 00:30 CEST",
        "Sun 2026-10-25 01:30 CEST",
        "Sun 2026-10-25 02:30 CEST",
        "Sun 2026-10-25 02:30 CET",
        "Sun 2026-10-25 03:30 CET",
    ]
    assert autumn == [utc(2026, 10, 24, 22, 30) + timedelta(hours=h) for h in range(5)]


def test_wildcard_hour_with_a_fixed_minute_across_both_berlin_nights() -> None:
    every_other_hour = cron("0 */2 * * *", BERLIN)
    spring = between(every_other_hour, utc(2027, 3, 27, 20), utc(2027, 3, 28, 6))
    assert walls(spring, BERLIN) == [
        "Sat 2027-03-27 22:00 CET",
        "Sun 2027-03-28 00:00 CET",
        "Sun 2027-03-28 04:00 CEST",  # 02:00 does not exist: no fire, three real hours pass
        "Sun 2027-03-28 06:00 CEST",
        "Sun 2027-03-28 08:00 CEST",
    ]
    autumn = between(every_other_hour, utc(2026, 10, 24, 20), utc(2026, 10, 25, 6))
    assert autumn == [utc(2026, 10, 24, 22), *(utc(2026, 10, 25, h) for h in (0, 1, 3, 5))]
    assert walls(autumn, BERLIN)[1:3] == ["Sun 2026-10-25 02:00 CEST", "Sun 2026-10-25 02:00 CET"]


def test_wildcard_minute_in_a_fixed_hour_skips_the_spring_night_and_doubles_in_autumn() -> None:
    # Vixie cron's rule taken to its end: the hour is fixed, but "*/20" makes it a wildcard job.
    job = cron("*/20 2 * * *", BERLIN)
    autumn = missed_between(job, utc(2026, 10, 24, 12), utc(2026, 10, 25, 12))
    assert autumn == Missed(6, utc(2026, 10, 25, 0), utc(2026, 10, 25, 1, 40))
    assert missed_between(job, utc(2027, 3, 27, 12), utc(2027, 3, 28, 12)) == Missed(0, None, None)
    assert job.next_after(utc(2027, 3, 27, 12)) == utc(2027, 3, 29, 0)  # 02:00 CEST, Monday


def test_fixed_time_jobs_keep_their_rule_next_to_wildcard_jobs() -> None:
    fixed, wildcard = cron("30 2 * * *", BERLIN), cron("30 * * * *", BERLIN)
    autumn = (utc(2026, 10, 25, 0), utc(2026, 10, 25, 2))  # 02:00 CEST .. 03:00 CET
    assert walls(between(fixed, *autumn), BERLIN) == ["Sun 2026-10-25 02:30 CEST"]
    assert walls(between(wildcard, *autumn), BERLIN) == [
        "Sun 2026-10-25 02:30 CEST",
        "Sun 2026-10-25 02:30 CET",
    ]
    spring = (utc(2027, 3, 28, 0, 45), utc(2027, 3, 28, 1, 45))  # 01:45 CET .. 03:45 CEST
    assert walls(between(fixed, *spring), BERLIN) == ["Sun 2027-03-28 03:00 CEST"]
    assert walls(between(wildcard, *spring), BERLIN) == ["Sun 2027-03-28 03:30 CEST"]


def test_wildcard_job_across_lord_howe_half_hour_shifts() -> None:
    tz = "Australia/Lord_Howe"
    quarter = cron("*/15 * * * *", tz)
    # 2026-04-05 02:00 +11 goes back to 01:30 +1030: wall 01:30-02:00 repeats.
    autumn = between(quarter, utc(2026, 4, 4, 14), utc(2026, 4, 4, 16))
    assert autumn == [utc(2026, 4, 4, 14) + i * QUARTER for i in range(1, 9)]
    assert walls(autumn, tz)[1:6] == [
        "Sun 2026-04-05 01:30 +11",
        "Sun 2026-04-05 01:45 +11",
        "Sun 2026-04-05 01:30 +1030",
        "Sun 2026-04-05 01:45 +1030",
        "Sun 2026-04-05 02:00 +1030",
    ]
    # 2026-10-04 02:00 +1030 jumps to 02:30 +11: 02:00 and 02:15 do not exist.
    spring = between(quarter, utc(2026, 10, 3, 15), utc(2026, 10, 3, 16))
    assert spring == [utc(2026, 10, 3, 15) + i * QUARTER for i in range(1, 5)]
    assert walls(spring, tz) == [
        "Sun 2026-10-04 01:45 +1030",
        "Sun 2026-10-04 02:30 +11",
        "Sun 2026-10-04 02:45 +11",
        "Sun 2026-10-04 03:00 +11",
    ]


def _fixed_time_oracle(
    match: Callable[[datetime], bool], tz: str, start: datetime, end: datetime
) -> list[datetime]:
    """The fixed-time DST rule, restated minute by minute over real time, as an independent
    check."""
    zone = ZoneInfo(tz)
    out: list[datetime] = []
    previous = start.astimezone(zone)
    instant = start + timedelta(minutes=1)
    while instant <= end:
        local = instant.astimezone(zone)
        wall = local.replace(tzinfo=None)
        gap_wall = previous.replace(tzinfo=None) + timedelta(minutes=1)
        skipped = False
        while gap_wall < wall:  # wall times the clock jumped over fire at the jump
            skipped = skipped or match(gap_wall)
            gap_wall += timedelta(minutes=1)
        if skipped or (match(wall) and local.fold == 0):
            out.append(instant)
        previous = local
        instant += timedelta(minutes=1)
    return out


def _real_time_oracle(
    match: Callable[[datetime], bool], tz: str, start: datetime, end: datetime
) -> list[datetime]:
    """The wildcard DST rule, restated: every real minute whose wall clock matches."""
    zone = ZoneInfo(tz)
    minutes = int((end - start) / timedelta(minutes=1))
    instants = (start + timedelta(minutes=i) for i in range(1, minutes + 1))
    return [i for i in instants if match(i.astimezone(zone).replace(tzinfo=None))]


def _oracle(
    real_time: bool, match: Callable[[datetime], bool], tz: str, start: datetime, end: datetime
) -> list[datetime]:
    return (_real_time_oracle if real_time else _fixed_time_oracle)(match, tz, start, end)


@pytest.mark.parametrize(
    ("tz", "start"),
    [
        ("Europe/Berlin", utc(2027, 3, 26)),
        ("Europe/Berlin", utc(2026, 10, 23)),
        ("America/New_York", utc(2027, 3, 12)),
        ("America/New_York", utc(2026, 10, 30)),
        ("Australia/Lord_Howe", utc(2026, 4, 3)),  # half-hour DST shift
        ("Australia/Lord_Howe", utc(2026, 10, 2)),
        ("Pacific/Apia", utc(2011, 12, 28)),  # skipped the whole of 2011-12-30
        ("America/Santiago", utc(2026, 9, 4)),  # changes at midnight
    ],
)
@pytest.mark.parametrize(
    ("expr", "real_time", "match"),
    [
        ("30 2 * * *", False, lambda w: w.hour == 2 and w.minute == 30),
        ("15 0,1,2 * * *", False, lambda w: w.minute == 15 and w.hour <= 2),
        ("0 12 * * *", False, lambda w: w.hour == 12 and w.minute == 0),
        ("0 0 * * *", False, lambda w: w.hour == 0 and w.minute == 0),
        # Every half hour, but neither field starts with "*": fixed-time, as in Vixie cron.
        ("0-59/30 0-23 * * *", False, lambda w: w.minute % 30 == 0),
        ("0 * * * *", True, lambda w: w.minute == 0),
        ("@hourly", True, lambda w: w.minute == 0),
        ("*/20 * * * *", True, lambda w: w.minute % 20 == 0),
        ("30 * * * *", True, lambda w: w.minute == 30),
        ("0 */2 * * *", True, lambda w: w.minute == 0 and w.hour % 2 == 0),
        ("*/10 2 * * *", True, lambda w: w.minute % 10 == 0 and w.hour == 2),
    ],
)
def test_dst_rules_match_a_minute_by_minute_oracle(
    tz: str, start: datetime, expr: str, real_time: bool, match: Callable[[datetime], bool]
) -> None:
    end = start + timedelta(days=4)
    got = between(cron(expr, tz), start, end)
    assert got == _oracle(real_time, match, tz, start, end)
    assert all(a < b for a, b in itertools.pairwise(got))


@pytest.mark.parametrize(
    ("expr", "tz", "real_time", "match", "start"),
    [
        ("*/15 * * * *", BERLIN, True, lambda w: w.minute % 15 == 0, utc(2026, 10, 24, 23)),
        ("30 * * * *", BERLIN, True, lambda w: w.minute == 30, utc(2027, 3, 27, 23)),
        ("0 * * * *", BERLIN, True, lambda w: w.minute == 0, utc(2026, 10, 24, 23)),
        (
            "*/15 * * * *",
            "Australia/Lord_Howe",
            True,
            lambda w: w.minute % 15 == 0,
            utc(2026, 4, 4, 13),
        ),
        # Fixed-time: passes before the wildcard rule too; it pins that this kind is unchanged.
        (
            "30 2 * * *",
            BERLIN,
            False,
            lambda w: (w.hour, w.minute) == (2, 30),
            utc(2026, 10, 24, 23),
        ),
    ],
)
def test_next_after_upcoming_and_missed_agree_from_any_instant_of_a_dst_night(
    expr: str,
    tz: str,
    real_time: bool,
    match: Callable[[datetime], bool],
    start: datetime,
) -> None:
    # From an hour early: with jitter, the base instant at `start` itself is planned after it.
    base = _oracle(real_time, match, tz, start - timedelta(hours=1), start + timedelta(days=4))
    for jitter in (0, 600):
        schedule = cron(expr, tz, jitter=jitter, name="nightly-main")
        offset = timedelta(seconds=jitter_offset("nightly-main", jitter))
        expected = [i + offset for i in base]
        # From every minute and half minute, including inside either pass of a repeated hour.
        for step in range(6 * 120 + 1):
            after = start + step * timedelta(seconds=30)
            ahead = [i for i in expected if i > after]
            assert schedule.next_after(after) == ahead[0], (jitter, after)
            assert upcoming(schedule, after, 3) == ahead[:3], (jitter, after)
            past = [i for i in expected if start < i <= after]
            assert missed_between(schedule, start, after) == Missed(
                len(past), past[0] if past else None, past[-1] if past else None
            ), (jitter, after)


# ------------------------------------------------------------------------------------------
# every, at


def test_every_is_aligned_to_the_epoch_whatever_the_start() -> None:
    every = build_schedule(job_name="j", cron=None, every=7 * 3600, at=None, timezone="Asia/Tokyo")
    assert every is not None
    first = every.next_after(utc(2026, 5, 6, 10, 17) + timedelta(seconds=3))
    assert first is not None
    assert int(first.timestamp()) % (7 * 3600) == 0
    # Another "restart" an arbitrary time earlier lands on the same grid.
    assert first in upcoming(every, utc(2026, 5, 5, 3, 1), 10)
    assert upcoming(every, first, 2) == [first + timedelta(hours=7), first + timedelta(hours=14)]
    assert every.next_after(first - timedelta(microseconds=1)) == first
    assert every.describe() == "every 7h"


def test_every_fractional_interval_never_repeats_an_instant() -> None:
    every = EverySchedule(1.1)
    fires = upcoming(every, utc(2026, 1, 1), 1000)
    assert all(b - a == timedelta(seconds=1.1) for a, b in itertools.pairwise(fires))


def test_every_rejects_silly_intervals() -> None:
    for bad in (0.0, -5.0, 0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="every must be at least 1 second"):
            build_schedule(job_name="j", cron=None, every=bad, at=None)


def test_at_fires_once() -> None:
    when = datetime(2026, 12, 24, 18, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    at = build_schedule(job_name="j", cron=None, every=None, at=when)
    assert at is not None
    assert at.next_after(utc(2026, 1, 1)) == utc(2026, 12, 24, 17, 0)
    assert at.next_after(utc(2026, 12, 24, 17, 0)) is None
    assert upcoming(at, utc(2026, 1, 1), 5) == [utc(2026, 12, 24, 17, 0)]
    assert at.describe() == "at 2026-12-24T18:00:00+01:00"
    with pytest.raises(ValueError, match="no time zone"):
        AtSchedule(datetime(2026, 12, 24, 18, 0))


def test_next_after_requires_an_aware_datetime() -> None:
    with pytest.raises(ValueError, match="no time zone"):
        cron("0 * * * *").next_after(datetime(2026, 1, 1))


# ------------------------------------------------------------------------------------------
# jitter


def test_jitter_offset_is_stable_and_known() -> None:
    # Pinned: changing the derivation would move every job's planned instants and with them
    # the identity of occurrences already recorded in users' state stores.
    assert jitter_offset("nightly-main", 600) == 516.0
    assert jitter_offset("nightly-main", 3600) == 620.0
    assert jitter_offset("a", 600) == 167.0


def test_jitter_offset_bounds() -> None:
    offsets = [jitter_offset(f"job-{i}", 90.7) for i in range(500)]
    assert all(0 <= o <= 90 and o == int(o) for o in offsets)
    assert len(set(offsets)) > 50  # actually spreads jobs
    assert jitter_offset("anything", 0) == 0.0
    assert jitter_offset("anything", 0.9) == 0.0
    with pytest.raises(ValueError, match="jitter"):
        jitter_offset("anything", -1)


def test_jitter_is_part_of_the_planned_instant() -> None:
    schedule = cron("30 2 * * *", "Europe/Berlin", jitter=600, name="nightly-main")
    offset = timedelta(seconds=516)
    first = schedule.next_after(utc(2026, 12, 1))
    assert first == utc(2026, 12, 1, 1, 30) + offset
    assert schedule.describe() == "cron '30 2 * * *' Europe/Berlin, jitter 8m36s"
    # From the planned instant itself, the next is the following day's, not the same one again.
    assert schedule.next_after(first) == utc(2026, 12, 2, 1, 30) + offset
    # Between the base instant and the jittered one, the jittered one is still ahead.
    assert schedule.next_after(utc(2026, 12, 1, 1, 31)) == first


def test_jitter_on_every_and_at() -> None:
    every = build_schedule(job_name="nightly-main", cron=None, every=3600, at=None, jitter=600)
    assert every is not None
    first = every.next_after(utc(2026, 1, 1, 0, 0))
    assert first == utc(2026, 1, 1, 0, 8) + timedelta(seconds=36)
    assert every.next_after(first) == utc(2026, 1, 1, 1, 8) + timedelta(seconds=36)
    at = build_schedule(
        job_name="nightly-main", cron=None, every=None, at=utc(2026, 3, 1), jitter=600
    )
    assert at is not None
    assert at.next_after(utc(2026, 1, 1)) == utc(2026, 3, 1, 0, 8) + timedelta(seconds=36)


# ------------------------------------------------------------------------------------------
# missed occurrences


def test_missed_every_minute_for_a_month_is_counted_exactly() -> None:
    every = EverySchedule(60)
    missed = missed_between(every, utc(2026, 4, 1), utc(2026, 5, 1))
    assert missed == Missed(30 * 24 * 60, utc(2026, 4, 1, 0, 1), utc(2026, 5, 1))
    # Arithmetic: a tiny limit does not cap an interval schedule.
    assert missed_between(every, utc(2026, 4, 1), utc(2026, 5, 1), limit=10).count == 43_200


def test_missed_window_is_start_exclusive_end_inclusive() -> None:
    hourly = cron("0 * * * *")
    assert missed_between(hourly, utc(2026, 1, 1, 0), utc(2026, 1, 1, 3)) == Missed(
        3, utc(2026, 1, 1, 1), utc(2026, 1, 1, 3)
    )
    assert missed_between(hourly, utc(2026, 1, 1, 0, 1), utc(2026, 1, 1, 0, 59)) == Missed(
        0, None, None
    )
    assert missed_between(hourly, utc(2026, 1, 1, 3), utc(2026, 1, 1, 1)) == Missed(0, None, None)


def test_missed_cron_over_a_dst_night_counts_each_fire_once() -> None:
    start, end = utc(2026, 10, 24, 12), utc(2026, 10, 25, 12)
    hourly = cron("0 * * * *", "Europe/Berlin")
    # 24 real hours; the repeated wall 02:00 is two of them.
    assert missed_between(hourly, start, end) == Missed(24, utc(2026, 10, 24, 13), end)
    nightly = cron("0 2 * * *", "Europe/Berlin")
    assert missed_between(nightly, start, end) == Missed(
        1, utc(2026, 10, 25, 0), utc(2026, 10, 25, 0)
    )


def test_missed_cron_past_the_limit_is_capped_with_an_exact_newest() -> None:
    every_minute = cron("* * * * *", "Europe/Berlin", jitter=30, name="m")
    offset = timedelta(seconds=jitter_offset("m", 30))
    start, end = utc(2026, 1, 1), utc(2026, 3, 1)
    started = time.perf_counter()
    missed = missed_between(every_minute, start, end, limit=1000)
    assert missed.capped
    assert missed.count == 1000
    assert missed.oldest == start + offset
    assert missed.newest == end - timedelta(minutes=1) + offset
    full = missed_between(every_minute, start, end)
    assert full == Missed(59 * 24 * 60, start + offset, end - timedelta(minutes=1) + offset)
    assert time.perf_counter() - started < 3


def test_missed_at() -> None:
    at = AtSchedule(utc(2026, 6, 1, 12))
    assert missed_between(at, utc(2026, 6, 1), utc(2026, 6, 2)) == Missed(
        1, utc(2026, 6, 1, 12), utc(2026, 6, 1, 12)
    )
    assert missed_between(at, utc(2026, 6, 1, 12), utc(2026, 6, 2)).count == 0


# ------------------------------------------------------------------------------------------
# build_schedule


def test_build_schedule_none_means_manual_only() -> None:
    assert build_schedule(job_name="j", cron=None, every=None, at=None) is None


def test_build_schedule_rejects_two_kinds_and_bad_zones() -> None:
    with pytest.raises(ValueError, match="at most one of cron, every, at"):
        build_schedule(job_name="j", cron="0 * * * *", every=60, at=None)
    with pytest.raises(ValueError, match="unknown time zone 'Europe/Berln'"):
        build_schedule(job_name="j", cron="0 * * * *", every=None, at=None, timezone="Europe/Berln")
    with pytest.raises(ValueError, match="unknown time zone"):
        build_schedule(job_name="j", cron=None, every=60, at=None, timezone="../etc/passwd")
    with pytest.raises(ValueError, match="minute field"):
        build_schedule(job_name="j", cron="99 * * * *", every=None, at=None)


def test_schedules_are_frozen_values() -> None:
    a = CronSchedule("30 2 * * *", "Europe/Berlin", 12.0)
    assert a == CronSchedule("30 2 * * *", "Europe/Berlin", 12.0)
    assert hash(a) == hash(CronSchedule("30 2 * * *", "Europe/Berlin", 12.0))
    assert cron("0 0 * * *").describe() == "cron '0 0 * * *' UTC"
    assert EverySchedule(5400, 61).describe() == "every 1h30m, jitter 1m1s"
