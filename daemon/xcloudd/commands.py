"""What each CLI command does, given a loaded config. Parsing arguments is cli.py's job."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any, TextIO

import orjson

from xcloudd.api import ApiError
from xcloudd.config import Config, JobConfig
from xcloudd.errors import ConfigError, ExitCode, UsageError
from xcloudd.events import BuildRef
from xcloudd.resolve import ResolveError
from xcloudd.resources import RUN_FIELDS, BuildRun
from xcloudd.runtime import Runtime
from xcloudd.starter import Starter, Target, resolve_target
from xcloudd.watcher import Outcome, Watcher


async def follow(rt: Runtime, ref: BuildRef, known: BuildRun | None) -> Outcome:
    watcher = Watcher(rt.client, rt.emitter, rt.clock, rt.config.polling)
    loop_task = asyncio.create_task(watcher.run())
    try:
        return await watcher.follow(ref, known=known, created_emitted=known is not None)
    finally:
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)


async def start(rt: Runtime, target: Target, *, wait: bool) -> ExitCode:
    req = await resolve_target(rt.resolver, target)
    started = await Starter(rt.client, rt.emitter, rt.clock).start(req)
    if not wait:
        return ExitCode.OK
    outcome = await follow(rt, started.ref, started.run)
    return outcome.exit_code


async def watch(rt: Runtime, run_id: str) -> ExitCode:
    doc = await rt.client.get(f"/v1/ciBuildRuns/{run_id}", {"fields[ciBuildRuns]": RUN_FIELDS})
    data = doc.get("data")
    run = BuildRun.parse(data) if isinstance(data, dict) else None
    if run is None:
        raise ResolveError(f"App Store Connect sent no build run for {run_id}")
    ref = BuildRef(run.id, run.number, run.workflow_id or "", None, "watch")
    outcome = await follow(rt, ref, None)
    return outcome.exit_code


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
    from xcloudd.schedule import build_schedule, upcoming

    schedule = build_schedule(
        job_name=job.name,
        cron=job.cron,
        every=job.every,
        at=job.at,
        timezone=job.timezone,
        jitter=job.jitter,
    )
    if schedule is None:
        return "manual only", []
    from zoneinfo import ZoneInfo

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
    from xcloudd.store import RunRecord, Store

    store = Store.open(config.state.path, readonly=True)
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
