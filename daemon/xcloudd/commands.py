"""What each CLI command does, given a loaded config. Parsing arguments is cli.py's job."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TextIO
from urllib.parse import quote

import orjson

from xcloudd.api import ApiUnavailable, BadResponse, NotFound
from xcloudd.config import Config, JobConfig
from xcloudd.durations import format_duration
from xcloudd.errors import ConfigError, ExitCode, UsageError, XcloudError
from xcloudd.follower import Follower
from xcloudd.resolve import UUID_RE, Product, RefKind, ResolveError, Resolver, Workflow
from xcloudd.resources import RUN_FIELDS, BuildRun
from xcloudd.runtime import Runtime
from xcloudd.starter import ON_TIME_S, Starter, Target
from xcloudd.store import NewRun, RunRecord, StartRequest

# How long `xcloudd start` keeps settling a start whose outcome is unknown before it gives up
# (exit 69); the intent stays in the store, and a daemon on the same store settles it.
START_SETTLE_S = 60.0
# A command gives up when App Store Connect has not answered for DEADLINE_TIMEOUTS x api.timeout
# + DEADLINE_SLACK_S (exit 69), and says what it waits for after NOTICE_AFTER_S.
DEADLINE_TIMEOUTS = 2
DEADLINE_SLACK_S = 5.0
NOTICE_AFTER_S = 3.0
_TICK_S = 0.2


def plural(count: int, noun: str, many: str | None = None) -> str:
    """ "1 job", "2 jobs", "0 watches" (with many="watches")."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"


# -- the deadline -------------------------------------------------------------------------------


class Deadline:
    """How long a command waits for App Store Connect without an answer.

    Each request has its own timeout (api.timeout), but retries and backoff multiply it: an
    endpoint that accepts connections and never answers held a command for minutes. Under
    `guard`, `limit` seconds without any answer (an error status counts as one) end the
    command with ApiUnavailable (exit 69), and after `notice_after` seconds one line on
    `notice` says what it is waiting for. Following a build is not guarded: it may take up to
    polling.give_up_after. Waits the command chooses itself go under `paused`.
    """

    def __init__(
        self,
        base_url: str,
        limit: float,
        *,
        notice: TextIO | None = None,
        notice_after: float = NOTICE_AFTER_S,
    ) -> None:
        self.base_url = base_url
        self.limit = limit
        self.notice_after = notice_after
        self._notice = notice
        # Said with the error when the deadline ends the command (e.g. a start's outcome).
        self.hint: str | None = None
        self._paused = 0

    @classmethod
    def of(cls, config: Config, notice: TextIO | None) -> Deadline:
        limit = DEADLINE_TIMEOUTS * config.api.timeout + DEADLINE_SLACK_S
        return cls(config.api.base_url, limit, notice=notice)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """A wait of the command's own choosing (not App Store Connect's silence)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _message(self) -> str:
        text = (
            f"App Store Connect ({self.base_url}) did not answer for"
            f" {format_duration(round(self.limit))}: check api.base_url, the network and any"
            " proxy, or raise api.timeout"
        )
        return f"{text}; {self.hint}" if self.hint else text

    @contextlib.asynccontextmanager
    async def guard(self, rt: Runtime) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as timer:
                watcher = asyncio.create_task(self._watch(rt, timer, loop))
                try:
                    yield
                finally:
                    # Not awaited: a cancellation of this task (a signal) must not be taken
                    # for the watcher's own.
                    watcher.cancel()
        except TimeoutError:
            if not timer.expired():
                raise
            raise ApiUnavailable(self._message()) from None

    async def _watch(
        self, rt: Runtime, timer: asyncio.Timeout, loop: asyncio.AbstractEventLoop
    ) -> None:
        seen, since, noticed = _answers(rt), loop.time(), False
        while True:
            await asyncio.sleep(_TICK_S)
            now, answers = loop.time(), _answers(rt)
            if answers != seen or self._paused:
                seen, since, noticed = answers, now, False
                continue
            if not noticed and now - since >= self.notice_after and self._notice is not None:
                noticed = True
                line = f"xcloudd: waiting for App Store Connect ({self.base_url}) ...\n"
                self._notice.write(line)
                self._notice.flush()
            if now - since >= self.limit:
                timer.reschedule(now)
                return


def _answers(rt: Runtime) -> int:
    """How many answers (of any status) the client has had."""
    return sum(n for (_, status), n in rt.client.outcomes.items() if status != "error")


@contextlib.asynccontextmanager
async def _guarded(rt: Runtime, deadline: Deadline | None) -> AsyncIterator[None]:
    if deadline is None:
        yield
        return
    async with deadline.guard(rt):
        yield


def _paused(deadline: Deadline | None) -> contextlib.AbstractContextManager[None]:
    return deadline.paused() if deadline is not None else contextlib.nullcontext()


# -- names people write -> what App Store Connect wants -----------------------------------------

SourceKind = Literal["branch", "tag", "pull_request", "rebuild", "default"]
# The command-line option for each key a target may come from.
_OPTIONS = {
    "workflow": "--workflow",
    "product": "--product",
    "branch": "--branch",
    "tag": "--tag",
    "pull_request": "--pull-request",
    "rebuild": "--rebuild",
}


@dataclass(frozen=True)
class Origin:
    """Where a target came from, so that a name or id that matches nothing is reported there:
    an option on the command line (exit 64) or a key of the config (exit 78). The same mistake
    in a job gets the same message and code from `check --online` and from `start JOB`."""

    config_path: Path | None = None
    table: str = ""  # "jobs[0]", "watches[1]"

    @classmethod
    def of(cls, config: Config, target: Target) -> Origin:
        if target.job is None:
            return cls()
        index = next((i for i, j in enumerate(config.jobs) if j.name == target.job), None)
        return cls(config.path, f"jobs[{index}]" if index is not None else "jobs")

    def mistake(self, key: str, value: str, reason: str) -> XcloudError:
        # The value, unless the reason names it already.
        named = re.search(rf"(?<![\w.-]){re.escape(value)}(?![\w.-])", reason)
        shown = "" if named else f" {value!r}"
        if self.config_path is None:
            return ResolveError(f"{_OPTIONS[key]}{shown}: {reason}")
        return ConfigError.at(str(self.config_path), f"{self.table}.{key}{shown}", reason)


@dataclass(frozen=True)
class Resolved:
    """A target as App Store Connect knows it (the request), with the names people know it by."""

    request: StartRequest
    workflow: Workflow
    product: Product | None
    source_kind: SourceKind
    source_name: str | None = None  # the branch or tag, "#12" for a pull request or a run
    source_id: str | None = None

    def source(self) -> str:
        match self.source_kind:
            case "branch" | "tag":
                return f"{self.source_kind} {self.source_name}"
            case "pull_request":
                return f"pull request {self.source_name}"
            case "rebuild":
                return f"a rebuild of run {self.source_name}"
        return "the workflow's default branch"

    def describe(self) -> str:
        """ "workflow "CI" of Acme Shop, branch main"."""
        product = f" of {self.product.name or self.product.id}" if self.product else ""
        return f"workflow {_quoted(self.workflow.name)}{product}, {self.source()}"

    def as_json(self) -> dict[str, Any]:
        product = None
        if self.product is not None:
            product = {"id": self.product.id, "name": self.product.name or None}
        return {
            "workflow": {"id": self.workflow.id, "name": self.workflow.name or None},
            "product": product,
            "source": {
                "kind": self.source_kind,
                "name": self.source_name,
                "id": self.source_id,
            },
        }


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '\\"') + '"'


def _id_problem(value: str) -> str | None:
    """Why `value` cannot be an App Store Connect id in a URL path, if it cannot."""
    if not value.strip():
        return "is empty"
    if value in (".", "..") or any(c in value for c in "/?#%\\") or any(c.isspace() for c in value):
        return "is not an id"
    return None


def check_run_id(run_id: str) -> None:
    """A RUN_ID from the command line that could not be one: a usage error before any request."""
    if (problem := _id_problem(run_id)) is not None:
        raise UsageError(f"RUN_ID {run_id!r} {problem} (`xcloudd status` lists recent runs)")


def check_target(target: Target) -> None:
    """What can be told wrong about a command-line target without asking App Store Connect."""
    if not UUID_RE.match(target.workflow) and target.product is None:
        raise UsageError(
            f"--workflow {target.workflow!r} is a name, not an id: give --product too, or the"
            " workflow's id (`xcloudd workflows` lists them)"
        )
    for key in ("pull_request", "rebuild"):
        value = getattr(target, key)
        if value is not None and (problem := _id_problem(value)) is not None:
            raise UsageError(f"{_OPTIONS[key]} {value!r} {problem}")


async def resolve_named(rt: Runtime, target: Target, origin: Origin) -> Resolved:
    """Resolve `target` like the starter does, keeping the names; a name or id that matches
    nothing is the user's mistake, reported where it came from (see Origin)."""
    resolver = rt.resolver
    product: Product | None = None
    if target.product is not None:
        try:
            product = await resolver.product(target.product)
        except ResolveError as exc:
            raise origin.mistake("product", target.product, str(exc)) from None
    try:
        workflow = await resolver.workflow(target.workflow, target.product)
    except ResolveError as exc:
        raise origin.mistake("workflow", target.workflow, str(exc)) from None
    if product is not None and workflow.product_id not in (None, product.id):
        raise origin.mistake(
            "workflow",
            target.workflow,
            f"workflow {_quoted(workflow.name)} is not in product {_quoted(product.name)}",
        )
    if product is None and workflow.product_id is not None:
        product = await _product_by_id(resolver, workflow.product_id)
    kind: SourceKind = "default"
    name = ident = ref_id = pr_id = None
    if target.branch is not None or target.tag is not None:
        ref_kind: RefKind
        if target.branch is not None:
            kind, wanted, ref_kind = "branch", target.branch, "BRANCH"
        else:
            kind, wanted, ref_kind = "tag", target.tag or "", "TAG"
        try:
            ref = await resolver.git_reference(workflow.id, wanted, ref_kind)
        except ResolveError as exc:
            raise origin.mistake(kind, wanted, str(exc)) from None
        name, ident = ref.name or wanted, ref.id
        ref_id = ref.id
    elif target.pull_request is not None:
        kind = "pull_request"
        pr_id, name = await _pull_request(rt, workflow, target.pull_request, origin)
        ident = pr_id
    elif target.rebuild is not None:
        kind = "rebuild"
        name = await _rebuilt_run(rt, workflow, target.rebuild, origin)
        ident = target.rebuild
    request = StartRequest(
        workflow_id=workflow.id,
        git_reference_id=ref_id,
        pull_request_id=pr_id,
        rebuild_of=target.rebuild,
        clean=target.clean,
        workflow_name=workflow.name or None,
    )
    return Resolved(request, workflow, product, kind, name, ident)


async def _product_by_id(resolver: Resolver, product_id: str) -> Product:
    """The product, named for people (its id alone if the list does not have it)."""
    products = await resolver.products()
    return next((p for p in products if p.id == product_id), Product(product_id, ""))


async def _pull_request(
    rt: Runtime, workflow: Workflow, given: str, origin: Origin
) -> tuple[str, str]:
    """(id, "#number") of a pull request given by number or by id."""
    try:
        pr_id = await rt.resolver.pull_request(workflow.id, given)
    except ResolveError as exc:
        raise origin.mistake("pull_request", given, str(exc)) from None
    if pr_id != given:
        return pr_id, f"#{given}"
    if (problem := _id_problem(given)) is not None:
        raise origin.mistake("pull_request", given, problem)
    try:
        doc = await rt.client.get(
            f"/v1/scmPullRequests/{quote(given, safe='')}", {"fields[scmPullRequests]": "number"}
        )
    except NotFound:
        raise origin.mistake(
            "pull_request", given, "no pull request with this id is visible to this key"
        ) from None
    data = doc.get("data")
    attrs = data.get("attributes") if isinstance(data, dict) else None
    number = attrs.get("number") if isinstance(attrs, dict) else None
    shown = f"#{number}" if isinstance(number, int) and not isinstance(number, bool) else given
    return given, shown


async def _rebuilt_run(rt: Runtime, workflow: Workflow, run_id: str, origin: Origin) -> str:
    """ "#12" for the run to build again, which must be one of the workflow's."""
    if (problem := _id_problem(run_id)) is not None:
        raise origin.mistake("rebuild", run_id, problem)
    try:
        doc = await rt.client.get(
            f"/v1/ciBuildRuns/{quote(run_id, safe='')}", {"fields[ciBuildRuns]": RUN_FIELDS}
        )
    except NotFound:
        raise origin.mistake(
            "rebuild", run_id, "no build run with this id is visible to this key"
        ) from None
    data = doc.get("data")
    run = BuildRun.parse(data)
    shown = f"#{run.number}" if run.number is not None else run.id
    if run.workflow_id is not None and run.workflow_id != workflow.id:
        raise origin.mistake(
            "rebuild",
            run_id,
            f"run {shown} is not a run of workflow {_quoted(workflow.name)}; give that"
            " workflow's --workflow",
        )
    return shown


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
    async with _guarded(rt, deadline):
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
            with _paused(deadline):
                await rt.clock.sleep(intent.next_try - rt.clock.time())
            continue
        if deadline is not None:
            # From the first POST on, a command that ends early leaves its outcome open.
            deadline.hint = _unsettled(rt)
        await starter.step(intent, None)


async def watch(rt: Runtime, run_id: str, *, deadline: Deadline | None = None) -> ExitCode:
    """Follow a run started elsewhere; `deadline` bounds finding it, not following it."""
    check_run_id(run_id)
    async with _guarded(rt, deadline):
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
    async with _guarded(rt, deadline):
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
            out.write(f"  {w['name']:<{width}}  {w['id']}{state}\n")
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
                    {"id": w.id, "name": w.name, "enabled": w.enabled}
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
    async with _guarded(rt, deadline):
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
                product = await _product_by_id(rt.resolver, flow.product_id)
            of = f" of {product.name or product.id}" if product else ""
            if not as_json:
                out.write(f"watch: workflow {_quoted(flow.name)}{of}\n")
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
