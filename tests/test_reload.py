"""SIGHUP: a new config takes effect without a restart; runs in flight keep being followed;
a broken config changes nothing."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from conftest import SteppingClock
from world import T0, World, at, job


@pytest.fixture
def fake_clock() -> SteppingClock:
    return SteppingClock(T0.timestamp())


def later(**delta: float) -> datetime:
    return T0 + timedelta(**delta)


def fired(world: World, name: str) -> list[datetime]:
    return [at(e["scheduled_for"]) for e in world.events("schedule.fired") if e["job"] == name]


async def test_a_reload_swaps_jobs_keeps_following_runs_and_refuses_a_broken_config(
    world: World,
) -> None:
    config = world.configure(job("hourly", every="1h"))

    def reconfigure(extra: str) -> None:
        world.configure(extra)
        assert world.daemon is not None
        world.daemon.reload()

    def break_config() -> None:
        world.config_path.write_text(
            world.config_path.read_text(encoding="utf-8") + "\n[[jobs]\n", encoding="utf-8"
        )
        assert world.daemon is not None
        world.daemon.reload()

    await world.run(
        config,
        # 09:00's build of "hourly" takes 4 s: the reload lands while it runs.
        later(hours=1, seconds=2),
        lambda: reconfigure(job("half-hourly", workflow="Nightly", every="30m")),
        later(hours=2, minutes=10),
        break_config,
        later(hours=3, minutes=10),
    )

    (reloaded,) = world.events("daemon.reloaded")
    assert reloaded["jobs_added"] == ["half-hourly"]
    assert reloaded["jobs_removed"] == ["hourly"]
    assert reloaded["jobs"] == 1
    # The build in flight when its job was removed was followed to its end.
    (created,) = [e for e in world.events("build.created") if e["job"] == "hourly"]
    (done,) = [e for e in world.events("build.completed") if e["job"] == "hourly"]
    assert done["build_run_id"] == created["build_run_id"]
    assert done["completion_status"] == "SUCCEEDED"
    # The old schedule stopped, the new one runs, also after the broken config was refused.
    assert fired(world, "hourly") == [later(hours=1)]
    assert fired(world, "half-hourly") == [later(hours=h / 2) for h in range(3, 7)]
    (refused,) = world.events("daemon.reload_failed")
    assert str(world.config_path) in refused["error"]
    assert refused["level"] == "error"
    assert len(world.runs("Nightly")) == 4


async def test_a_reload_adds_a_sink_that_gets_what_waits_and_changes_polling(
    world: World,
) -> None:
    config = world.configure(job("hourly", every="1h"))
    second = world.tmp / "second.jsonl"

    def reconfigure() -> None:
        world.configure(
            job("hourly", every="1h") + f'[[sinks]]\ntype = "file"\npath = "{second}"\n',
            polling='interval = "2s"\nmin_interval = "1s"',
        )
        assert world.daemon is not None
        world.daemon.reload()

    await world.run(config, later(minutes=30), reconfigure, later(hours=1, minutes=5))

    (reloaded,) = world.events("daemon.reloaded")
    assert reloaded["sinks_added"] == [f"file:{second}"]
    assert reloaded["polling_changed"] is True
    assert "jobs_added" not in reloaded
    # The new sink starts at the oldest event kept and then follows the outbox like the first.
    first_ids = [e["event_id"] for e in world.events()]
    second_ids = [line for line in second.read_text().splitlines()]
    assert len(second_ids) == len(first_ids)
    assert fired(world, "hourly") == [later(hours=1)]
