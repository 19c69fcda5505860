"""What each CLI command does, given a loaded config. Parsing arguments is cli.py's job."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO
from urllib.parse import quote

import orjson

from xcloudd.api import ApiUnavailable, BadResponse, NotFound
from xcloudd.config import Config, JobConfig
from xcloudd.console import plural
from xcloudd.deadline import Deadline, guarded, paused
from xcloudd.durations import format_duration
from xcloudd.errors import ConfigError, ExitCode, UsageError
from xcloudd.follower import RESCAN_S, Follower
from xcloudd.resolve import ResolveError, Resolver
from xcloudd.resources import RUN_FIELDS, BuildRun
from xcloudd.runtime import Runtime
from xcloudd.starter import ON_TIME_S, Starter, Target
from xcloudd.store import NewRun, RunRecord
from xcloudd.targets import (
    Origin,
    Resolved,
    check_run_id,
    product_by_id,
    quoted,
    resolve_named,
)

# How long `xcloudd start` keeps settling a start whose outcome is unknown before it gives up
# (exit 69); the intent stays in the store, and a daemon on the same store settles it.
START_SETTLE_S = 60.0


# -- start, watch, follow --------------------------------------------------------------------------


async def follow(rt: Runtime, run_id: str) -> ExitCode:
    """Follow one run in the store until its watch ends; the exit code of how it ended."""
    follower = Follower(
        rt.store,
        rt.client,
        rt.events,
        rt.clock,
        rt.config.polling,
        report=rt.supervisor.report,
        only={run_id},
    )
    task = asyncio.create_task(follower.run())
    try:
        while True:
            token = rt.store.changed()
            rec = await rt.store.call(rt.store.sync.run, run_id)
            if rec is None or rec.finished:
                return outcome_code(rec)
            waiter = asyncio.create_task(token.wait())
            # Real time: a daemon on the same store may end the watch; no change of this
            # process's store tells of that.
            await asyncio.wait(
                {task, waiter}, timeout=RESCAN_S, return_when=asyncio.FIRST_COMPLETED
            )
            waiter.cancel()
            if task.done():
                task.result()
                return outcome_code(rec)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def outcome_code(rec: RunRecord | None) -> ExitCode:
    if rec is None or not rec.finished or rec.end_reason != "completed":
        return ExitCode.GAVE_UP
    status = rec.completion_status
    if status == "SUCCEEDED":
        return ExitCode.OK
    if status in ("CANCELED", "SKIPPED"):
        return ExitCode.CANCELED
    return ExitCode.FAILED


def _unsettled(rt: Runtime) -> str:
    """What to say about a start whose outcome is not known when the command ends."""
    if rt.config.state.path.exists():
        return (
            "whether the build started is unknown; a daemon on this state store settles it"
            " (`xcloudd status` shows it)"
        )
    return (
        "whether the build started is unknown: look in App Store Connect before starting it again"
    )


async def start(
    rt: Runtime, target: Target, *, wait: bool, deadline: Deadline | None = None
) -> ExitCode:
    """Record the intent, send it (settling an unknown outcome), and optionally follow.

    `deadline` bounds the start (not the following) when App Store Connect stops answering.
    """
    async with guarded(rt, deadline):
        run_id = await _start(rt, target, deadline)
    if not wait:
        return ExitCode.OK
    return await follow(rt, run_id)


async def _start(rt: Runtime, target: Target, deadline: Deadline | None) -> str:
    resolved = await resolve_named(rt, target, Origin.of(rt.config, target))
    db = rt.store.sync
    intent_id = await rt.store.call(
        db.new_manual_intent, resolved.request, owner=rt.owner, job=target.job
    )
    starter = Starter(rt.store, rt.client, rt.resolver, rt.clock, owner=rt.owner)
    settle_by = rt.clock.time() + START_SETTLE_S
    while True:
        intent = await rt.store.call(db.intent, intent_id)
        assert intent is not None
        if intent.state == "done" and intent.run_id is not None:
            return intent.run_id
        if intent.state in ("failed", "missed"):
            refused = starter.errors.get(intent_id)
            if refused is not None:
                raise refused
            raise ApiUnavailable(
                "App Store Connect did not confirm the start (the events above say why):"
                " look in App Store Connect before starting it again"
            )
        if rt.clock.time() > settle_by:
            raise ApiUnavailable(
                "App Store Connect did not answer the start clearly in"
                f" {format_duration(START_SETTLE_S)}: {_unsettled(rt)}"
            )
        if intent.next_try > rt.clock.time():
            with paused(deadline):
                await rt.clock.sleep(intent.next_try - rt.clock.time())
            continue
        if deadline is not None:
            # From the first POST on, a command that ends early leaves its outcome open.
            deadline.hint = _unsettled(rt)
        await starter.step(intent, None)


async def watch(rt: Runtime, run_id: str, *, deadline: Deadline | None = None) -> ExitCode:
    """Follow a run started elsewhere; `deadline` bounds finding it, not following it."""
    check_run_id(run_id)
    async with guarded(rt, deadline):
        run = await _find_run(rt, run_id)
    return await follow(rt, run.id)


async def _find_run(rt: Runtime, run_id: str) -> BuildRun:
    try:
        doc = await rt.client.get(
            f"/v1/ciBuildRuns/{quote(run_id, safe='')}", {"fields[ciBuildRuns]": RUN_FIELDS}
        )
    except NotFound:
        raise UsageError(
            f"RUN_ID {run_id!r}: no build run with this id is visible to this key"
            " (`xcloudd status` lists recent runs)"
        ) from None
    data = doc.get("data")
    run = BuildRun.parse(data) if isinstance(data, dict) else None
    if run is None:
        raise BadResponse(f"App Store Connect sent no build run for {run_id}")
    await rt.store.call(
        rt.store.sync.record_run,
        NewRun(
            run_id=run.id,
            number=run.number,
            workflow_id=run.workflow_id or "",
            job=None,
            origin="watch",
            created_at=run.created,
            start_reason=run.start_reason,
            progress=None,
        ),
        intent_id=None,
        reconciled=False,
    )
    return run


# -- workflows ----------------------------------------------------------------------------------


async def workflows(
    rt: Runtime, out: TextIO, *, as_json: bool, deadline: Deadline | None = None
) -> ExitCode:
    async with guarded(rt, deadline):
        listing = await _listing(rt.resolver)
    if as_json:
        out.write(dumps({"products": listing}))
        return ExitCode.OK
    if not listing:
        out.write("no Xcode Cloud products are visible to this key\n")
    for entry in listing:
        flows = entry["workflows"]
        out.write(f"{entry['name']}: {plural(len(flows), 'workflow')} (product {entry['id']})\n")
        width = max((len(w["name"]) for w in flows), default=0)
        for w in flows:
            state = "  (disabled)" if w["enabled"] is False else ""
            about = f"  {w['description']}" if w["description"] else ""
            out.write(f"  {w['name']:<{width}}  {w['id']}{state}{about}\n")
    return ExitCode.OK


async def _listing(resolver: Resolver) -> list[dict[str, Any]]:
    listing: list[dict[str, Any]] = []
    for product in await resolver.products():
        flows = await resolver.workflows_of(product)
        listing.append(
            {
                "id": product.id,
                "name": product.name,
                "workflows": [
                    {
                        "id": w.id,
                        "name": w.name,
                        "enabled": w.enabled,
                        "description": w.description,
                    }
                    for w in sorted(flows, key=lambda w: w.name)
                ],
            }
        )
    return listing


# -- check ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One job's schedule and its next fire times, as `check` shows them."""

    job: JobConfig
    schedule: str
    times: list[datetime]


def upcoming_for(job: JobConfig, after: datetime, count: int) -> tuple[str, list[datetime]]:
    """The job's schedule described, and its next `count` fire times after `after` in the job's
    time zone. An `after` without a UTC offset is read in the job's time zone."""
    from zoneinfo import ZoneInfo

    from xcloudd.schedule import upcoming
    from xcloudd.scheduler import job_schedule

    schedule = job_schedule(job)
    if schedule is None:
        return "manual only", []
    zone = ZoneInfo(job.timezone)
    if after.tzinfo is None:
        after = after.replace(tzinfo=zone)
    return schedule.describe(), [t.astimezone(zone) for t in upcoming(schedule, after, count)]


def plan(config: Config, *, after: datetime, count: int) -> list[Planned]:
    """Every job's next fire times; a schedule that cannot be computed is a config error."""
    planned = []
    for index, job in enumerate(config.jobs):
        try:
            described, times = upcoming_for(job, after, count)
        except (ValueError, OverflowError) as exc:
            raise ConfigError.at(str(config.path), f"jobs[{index}]", str(exc)) from None
        planned.append(Planned(job, described, times))
    return planned


def warnings(config: Config, now: datetime) -> list[str]:
    """What is valid but surely not meant: an `at` that has passed (it will never fire)."""
    from xcloudd.scheduler import job_schedule

    out = []
    for job in config.jobs:
        if job.at is None:
            continue
        schedule = job_schedule(job)
        try:
            planned = schedule.next_after(datetime.min.replace(tzinfo=UTC)) if schedule else None
        except (ValueError, OverflowError):
            continue
        if planned is None:
            continue
        # A daemon that was down at that instant may still start it within its catch-up.
        window = timedelta(seconds=max(job.catch_up, ON_TIME_S))
        if planned + window < now:
            shown = planned.astimezone(job.at.tzinfo).isoformat()
            out.append(f"job {job.name}: at {shown} is in the past; it will never fire")
    return out


def check_document(
    config: Config, planned: list[Planned], resolved: dict[str, Resolved] | None = None
) -> dict[str, Any]:
    """`check --json`: each job's next fire times; with `resolved` (--online), also what its
    workflow, product and source resolved to."""
    jobs = []
    for p in planned:
        entry: dict[str, Any] = {
            "name": p.job.name,
            "schedule": p.schedule,
            "enabled": p.job.enabled,
            "timezone": p.job.timezone,
            "next": [t.isoformat() for t in p.times],
        }
        if resolved is not None:
            entry["resolved"] = resolved[p.job.name].as_json()
        jobs.append(entry)
    return {"config": str(config.path), "jobs": jobs}


def write_plan(config: Config, planned: list[Planned], out: TextIO) -> None:
    key = config.api.key
    out.write(
        f"{config.path}: valid ({plural(len(config.jobs), 'job')},"
        f" {plural(len(config.watches), 'watch', 'watches')},"
        f" {plural(len(config.sinks), 'sink')}; key {key.key_id} from {key.source})\n"
    )
    for p in planned:
        state = " (disabled)" if not p.job.enabled else ""
        out.write(f"{p.job.name}: {p.schedule}{state}\n")
        for t in p.times:
            out.write(f"  {t.isoformat()}\n")


def check_offline(
    config: Config,
    out: TextIO,
    *,
    after: datetime,
    count: int,
    as_json: bool,
) -> ExitCode:
    """Validate the schedules and show each job's next `count` fire times after `after`."""
    planned = plan(config, after=after, count=count)
    if as_json:
        out.write(dumps(check_document(config, planned)))
    else:
        write_plan(config, planned, out)
    return ExitCode.OK


async def check_online(
    rt: Runtime,
    out: TextIO,
    *,
    planned: list[Planned] | None = None,
    as_json: bool = False,
    deadline: Deadline | None = None,
) -> ExitCode:
    """Authenticate and resolve every job's workflow and source and every watch's workflow.

    In text, one line per job with the names it resolved to (check_offline wrote the rest);
    with `as_json`, the whole `check --json` document of `planned`, each job with `resolved`.
    A name that matches nothing is a config error naming the job's key (as `start JOB` says).
    """
    config = rt.config
    async with guarded(rt, deadline):
        await rt.client.get("/v1/ciProducts", {"limit": "1", "fields[ciProducts]": "name"})
        if not as_json:
            out.write(f"authenticated as key {config.api.key.key_id}\n")
        resolved: dict[str, Resolved] = {}
        for job in config.jobs:
            target = Target.of_job(job)
            resolved[job.name] = found = await resolve_named(rt, target, Origin.of(config, target))
            if not as_json:
                out.write(f"{job.name}: {found.describe()}\n")
        watched: list[dict[str, Any]] = []
        for index, w in enumerate(config.watches):
            origin = Origin(config.path, f"watches[{index}]")
            if w.product is not None:
                try:
                    await rt.resolver.product(w.product)
                except ResolveError as exc:
                    raise origin.mistake("product", w.product, str(exc)) from None
            try:
                flow = await rt.resolver.workflow(w.workflow, w.product)
            except ResolveError as exc:
                raise origin.mistake("workflow", w.workflow, str(exc)) from None
            product = None
            if flow.product_id is not None:
                product = await product_by_id(rt.resolver, flow.product_id)
            of = f" of {product.name or product.id}" if product else ""
            if not as_json:
                out.write(f"watch: workflow {quoted(flow.name)}{of}\n")
            watched.append(
                {
                    "workflow": {"id": flow.id, "name": flow.name or None},
                    "product": {"id": product.id, "name": product.name or None}
                    if product
                    else None,
                }
            )
    if as_json:
        doc = check_document(config, planned or [], resolved)
        doc["watches"] = watched
        out.write(dumps(doc))
    return ExitCode.OK


def dumps(doc: object) -> str:
    """One JSON document, indented, as the commands print it."""
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"


def parse_time(text: str) -> datetime:
    """An ISO 8601 time for --from. One without a UTC offset stays naive: each job reads it in
    its own time zone (see upcoming_for)."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--from {text!r} is not a time: use ISO 8601, e.g. 2026-12-01T00:00:00+01:00,"
            " 2026-12-01T00:00Z or 2026-12-01T00:00 (in each job's time zone)"
        ) from None


def status(config: Config, out: TextIO, *, as_json: bool) -> ExitCode:
    """Runs in flight and recent runs, read from the store (safe while the daemon runs), and
    whether a daemon keeps that information current."""
    import time

    from xcloudd.clock import SystemClock
    from xcloudd.events import EventFactory
    from xcloudd.health import daemon_state
    from xcloudd.store import Store

    store = Store.open(config.state.path, EventFactory(SystemClock()), readonly=True)
    try:
        flying, recent = store.runs_in_flight(), store.recent_runs(20)
        beat = store.daemon_beat()
    finally:
        store.close()
    daemon = daemon_state(beat, time.time())

    def row(r: RunRecord) -> dict[str, Any]:
        return {
            "build_run_id": r.run_id,
            "build_number": r.number,
            "workflow_id": r.workflow_id,
            "job": r.job,
            "origin": r.origin,
            "progress": r.progress,
            "completion_status": r.completion_status,
            "created": r.created_at,
        }

    if as_json:
        doc = {
            "daemon": daemon.fields(),
            "in_flight": [row(r) for r in flying],
            "recent": [row(r) for r in recent],
        }
        out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return ExitCode.OK
    out.write(f"daemon: {daemon.summary()}\n")
    # Without a running daemon nobody follows these runs: say what they were, not what they are.
    flying_title = "in flight" if daemon.running else "unfinished when the daemon stopped"
    for title, runs in ((flying_title, flying), ("recent", recent)):
        out.write(f"{title}: {len(runs)}\n")
        for r in runs:
            label = r.job or f"watch {r.workflow_id[:8]}"
            state = r.completion_status or r.progress or "requested"
            out.write(
                f"  #{r.number if r.number is not None else '?'}  {label}  {state}"
                f"  {r.created_at or ''}  {r.run_id}\n"
            )
    return ExitCode.OK
