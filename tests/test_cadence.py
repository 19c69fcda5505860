"""The cadence's rules, one by one: when a run of a workflow with (and without) history is looked
at next."""

from __future__ import annotations

import random

import pytest

from xcloudd.cadence import Cadence, History
from xcloudd.config import PollingConfig
from xcloudd.store import Span

POLLING = PollingConfig(interval=30.0, min_interval=5.0, max_interval=300.0)


def cadence(spans: list[Span] | None = None, seed: int = 1) -> Cadence:
    history = History()
    history.load({"wf": spans or []})
    return Cadence(POLLING, history, random.Random(seed))


# Queued 55-65 s and ran 570-630 s: windows of about [52, 70] and [527, 687].
HISTORY = [Span(55.0 + i, 570.0 + 6 * i) for i in range(11)]


def test_before_the_window_a_run_is_left_alone_until_it_opens() -> None:
    c = cadence(HISTORY)
    window = c.history.window("wf", "start")
    assert window is not None
    gap = c.gap("wf", "start", 0.0, now=0.0)
    assert 0.9 * window.opens <= gap <= window.opens
    # A long way off: no longer than max_interval, so an early end is still seen.
    assert 270 <= c.gap("wf", "end", 0.0, now=0.0) <= 300


def test_inside_the_window_a_run_is_looked_at_every_min_interval() -> None:
    c = cadence(HISTORY)
    assert c.gap("wf", "start", 60.0, now=0.0) == 5.0
    assert c.gap("wf", "end", 600.0, now=0.0) == 5.0


def test_an_overdue_run_is_looked_at_less_and_less_often() -> None:
    c = cadence(HISTORY)
    window = c.history.window("wf", "end")
    assert window is not None
    overdue = [window.closes + s for s in (5.0, 60.0, 400.0, 4000.0)]
    gaps = [c.gap("wf", "end", waited, now=0.0) for waited in overdue]
    assert gaps[0] == 5.0, "just past its window a run is still looked at often"
    assert gaps[0] < gaps[1] < gaps[2] < gaps[3] <= 300


def test_a_short_or_erratic_history_gives_a_wider_window() -> None:
    steady = cadence(HISTORY).history.window("wf", "end")
    short = cadence(HISTORY[:3]).history.window("wf", "end")
    erratic = cadence([Span(60.0, 600.0 * (1.5 if i % 2 else 0.7)) for i in range(11)])
    wide = erratic.history.window("wf", "end")
    assert steady is not None
    assert short is not None
    assert wide is not None
    assert short.closes - short.opens > steady.closes - steady.opens
    assert wide.closes - wide.opens > 3 * (steady.closes - steady.opens)
    assert steady.opens < 570
    assert steady.closes > 630


@pytest.mark.parametrize("samples", [0, 2])
def test_without_history_the_gap_grows_from_interval_toward_max_interval(samples: int) -> None:
    c = cadence(HISTORY[:samples])
    assert 27 <= c.gap("wf", "end", 10.0, now=0.0) <= 30
    assert 90 <= c.gap("wf", "end", 1000.0, now=0.0) <= 100
    assert 270 <= c.gap("wf", "end", 10_000.0, now=0.0) <= 300


def test_while_webhooks_arrive_polling_stretches_to_max_interval() -> None:
    c = cadence(HISTORY)
    c.webhook(now=100.0)
    assert 270 <= c.gap("wf", "end", 600.0, now=200.0) <= 300
    assert 270 <= c.discovery_gap(now=200.0) <= 300
    # An hour without one: back to the regular cadence (the pipe may be broken).
    assert c.gap("wf", "end", 600.0, now=100.0 + 3601) == 5.0


def test_the_budget_floor_and_min_interval_bound_every_gap() -> None:
    c = cadence(HISTORY)
    c.floor = 12.0
    assert c.gap("wf", "end", 600.0, now=0.0) == 12.0
    c.floor = 0.0
    assert min(c.gap("wf", "start", w, now=0.0) for w in range(0, 80)) >= 5.0


def test_jitter_keeps_daemons_on_one_key_out_of_step() -> None:
    gaps = {cadence(seed=seed).gap("wf", "end", 10.0, now=0.0) for seed in range(20)}
    assert len(gaps) == 20
    assert all(27 <= g <= 30 for g in gaps)


def test_discovery_looks_often_enough_to_find_a_run_before_it_starts() -> None:
    # Runs that wait 12-22 s for a machine: their product is looked at about every 10 s, so
    # a new one is found before it starts. Runs that wait about a minute: every 30 s (interval).
    quick = cadence([Span(12.0 + i, 600.0) for i in range(11)])
    slow = cadence(HISTORY)
    assert 9 <= quick.discovery_gap(now=0.0, workflows=["wf"]) <= 12
    assert 27 <= slow.discovery_gap(now=0.0, workflows=["wf"]) <= 30
    assert 27 <= cadence().discovery_gap(now=0.0, workflows=["wf"]) <= 30
    # While webhooks arrive they say when a run is created: the safety net stretches.
    quick.webhook(now=0.0)
    assert 270 <= quick.discovery_gap(now=1.0, workflows=["wf"]) <= 300
