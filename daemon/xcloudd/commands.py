"""What each CLI command does, given a loaded config. Parsing arguments is cli.py's job."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any, TextIO

import orjson

from xcloudd.api import ApiError, ApiUnavailable, BadResponse, NotFound
from xcloudd.config import Config, JobConfig
from xcloudd.errors import ConfigError, ExitCode, UsageError, XcloudError
from xcloudd.follower import Follower
from xcloudd.resolve import ResolveError
from xcloudd.resources import RUN_FIELDS, BuildRun
from xcloudd.runtime import Runtime
from xcloudd.starter import Starter, Target, resolve_target
from xcloudd.store import NewRun, RunRecord

# How long `xcloudd start` keeps settling a start whose outcome is unknown before it gives up
# (exit 69); the intent stays in the store, and a daemon on the same store settles it.
START_SETTLE_S = 60.0


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
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
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


async def start(rt: Runtime, target: Target, *, wait: bool) -> ExitCode:
    """Record the intent, send it (settling an unknown outcome), and optionally follow."""
    req = await resolve_target(rt.resolver, target)
    db = rt.store.sync
    intent_id = await rt.store.call(db.new_manual_intent, req, owner=rt.owner, job=target.job)
    starter = Starter(rt.store, rt.client, rt.resolver, rt.clock, owner=rt.owner)
    deadline = rt.clock.time() + START_SETTLE_S
    while True:
        intent = await rt.store.call(db.intent, intent_id)
        assert intent is not None
        if intent.state == "done" and intent.run_id is not None:
            break
        if intent.state in ("failed", "missed"):
            refused = starter.errors.get(intent_id)
            raise refused or XcloudError("App Store Connect refused the start")
        if rt.clock.time() > deadline:
            raise ApiUnavailable(
                "could not find out whether the build started: App Store Connect did not"
                " answer clearly in time; `xcloudd status` shows it once a daemon settles it"
            )
        if intent.next_try > rt.clock.time():
            await rt.clock.sleep(intent.next_try - rt.clock.time())
            continue
        await starter.step(intent, None)
    if not wait:
        return ExitCode.OK
    return await follow(rt, intent.run_id)


async def watch(rt: Runtime, run_id: str) -> ExitCode:
    try:
        doc = await rt.client.get(f"/v1/ciBuildRuns/{run_id}", {"fields[ciBuildRuns]": RUN_FIELDS})
    except NotFound:
        raise UsageError(f"no build run {run_id!r} is visible to this key") from None
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
    return await follow(rt, run.id)


async def workflows(rt: Runtime, out: TextIO, *, as_json: bool) -> ExitCode:
    listing: list[dict[str, Any]] = []
    for product in await rt.resolver.products():
        flows = await rt.resolver.workflows_of(product)
        listing.append(
            {
                "id": product.id,
                "name": product.name,
                "workflows": [
                    {"id": w.id, "name": w.name, "enabled": w.enabled}
                    for w in sorted(flows, key=lambda w: w.name)
                ],
            }
        )
    if as_json:
        out.write(orjson.dumps({"products": listing}, option=orjson.OPT_INDENT_2).decode() + "\n")
        return ExitCode.OK
    if not listing:
        out.write("no Xcode Cloud products are visible to this key\n")
    for entry in listing:
        out.write(f"{entry['name']}  (product {entry['id']})\n")
        for w in entry["workflows"]:
            state = "" if w["enabled"] is not False else "  [disabled]"
            out.write(f"  {w['id']}  {w['name']}{state}\n")
    return ExitCode.OK


def upcoming_for(job: JobConfig, after: datetime, count: int) -> tuple[str, list[datetime]]:
    from zoneinfo import ZoneInfo

    from xcloudd.schedule import upcoming
    from xcloudd.scheduler import job_schedule

    schedule = job_schedule(job)
    if schedule is None:
        return "manual only", []
    zone = ZoneInfo(job.timezone)
    return schedule.describe(), [t.astimezone(zone) for t in upcoming(schedule, after, count)]


def check_offline(
    config: Config, out: TextIO, *, after: datetime, count: int, as_json: bool
) -> ExitCode:
    jobs = []
    for job in config.jobs:
        try:
            described, times = upcoming_for(job, after, count)
        except ValueError as exc:
            index = config.jobs.index(job)
            raise ConfigError.at(str(config.path), f"jobs[{index}]", str(exc)) from None
        jobs.append((job, described, times))
    if as_json:
        doc = {
            "config": str(config.path),
            "jobs": [
                {
                    "name": job.name,
                    "schedule": described,
                    "enabled": job.enabled,
                    "next": [t.isoformat() for t in times],
                }
                for job, described, times in jobs
            ],
        }
        out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return ExitCode.OK
    out.write(
        f"{config.path}: valid ({len(config.jobs)} jobs, {len(config.watches)} watches,"
        f" {len(config.sinks)} sinks, key {config.api.key.key_id} from {config.api.key.source})\n"
    )
    for job, described, times in jobs:
        state = "" if job.enabled else " [disabled]"
        out.write(f"{job.name}: {described}{state}\n")
        for t in times:
            out.write(f"  {t.isoformat()}\n")
    return ExitCode.OK


async def check_online(rt: Runtime, out: TextIO) -> ExitCode:
    """Authenticate and resolve every job's workflow and source, naming the job's key on error."""
    await rt.client.get("/v1/ciProducts", {"limit": "1", "fields[ciProducts]": "name"})
    out.write(f"authenticated as key {rt.config.api.key.key_id}\n")
    for index, job in enumerate(rt.config.jobs):
        try:
            req = await resolve_target(rt.resolver, Target.of_job(job))
        except (ResolveError, ApiError) as exc:
            raise ConfigError.at(
                str(rt.config.path), f"jobs[{index}] ({job.name})", str(exc)
            ) from None
        source = req.git_reference_id or req.pull_request_id or "the workflow's default"
        out.write(f"{job.name}: workflow {req.workflow_id}, source {source}\n")
    for index, w in enumerate(rt.config.watches):
        try:
            flow = await rt.resolver.workflow(w.workflow, w.product)
        except (ResolveError, ApiError) as exc:
            raise ConfigError.at(str(rt.config.path), f"watches[{index}]", str(exc)) from None
        out.write(f"watch: workflow {flow.name} ({flow.id})\n")
    return ExitCode.OK


def parse_time(text: str) -> datetime:
    """An ISO 8601 time for --from; one without an offset is taken as UTC."""
    from datetime import UTC

    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--from {text!r} is not a time: use ISO 8601, e.g. 2026-12-01T00:00:00+01:00"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def status(config: Config, out: TextIO, *, as_json: bool) -> ExitCode:
    """Runs in flight and recent runs, read from the store (safe while the daemon runs)."""
    from xcloudd.clock import SystemClock
    from xcloudd.events import EventFactory
    from xcloudd.store import Store

    store = Store.open(config.state.path, EventFactory(SystemClock()), readonly=True)
    try:
        flying, recent = store.runs_in_flight(), store.recent_runs(20)
    finally:
        store.close()

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
        doc = {"in_flight": [row(r) for r in flying], "recent": [row(r) for r in recent]}
        out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return ExitCode.OK
    for title, runs in (("in flight", flying), ("recent", recent)):
        out.write(f"{title}: {len(runs)}\n")
        for r in runs:
            label = r.job or f"watch {r.workflow_id[:8]}"
            state = r.completion_status or r.progress or "requested"
            out.write(
                f"  #{r.number if r.number is not None else '?'}  {label}  {state}"
                f"  {r.created_at or ''}  {r.run_id}\n"
            )
    return ExitCode.OK
