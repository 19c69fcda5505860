"""Starting a build: `POST /v1/ciBuildRuns`, which is not idempotent and cannot be undone.

The rule (DESIGN 4): never send the POST again unless App Store Connect said it did nothing.
When the outcome is unknown (timeout, reset, 5xx) the starter lists the workflow's newest runs
and adopts the one this request created; only if none appears does it POST again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from xcloudd.api import JSON, ApiError, ApiUnavailable, AscClient, BadResponse, OutcomeUnknown
from xcloudd.clock import Clock
from xcloudd.config import JobConfig
from xcloudd.events import BuildRef, Emitter, Origin, stable_event_id
from xcloudd.resolve import Resolver
from xcloudd.resources import RUN_FIELDS, BuildRun

# How far Apple's createdDate may lag our own clock and still count as "created by us".
CLOCK_SKEW = timedelta(minutes=2)
# A run created just before a connection drops may take a moment to show up in the list.
RECONCILE_DELAYS = (0.0, 2.0, 5.0, 10.0)
MAX_POSTS = 3


@dataclass(frozen=True)
class StartRequest:
    workflow_id: str
    git_reference_id: str | None = None
    pull_request_id: str | None = None
    rebuild_of: str | None = None
    clean: bool | None = None
    job: str | None = None
    origin: Origin = "manual"

    def body(self) -> JSON:
        """The CiBuildRunCreateRequest, with only what was asked for."""
        relationships: JSON = {
            "workflow": {"data": {"type": "ciWorkflows", "id": self.workflow_id}}
        }
        if self.git_reference_id:
            relationships["sourceBranchOrTag"] = {
                "data": {"type": "scmGitReferences", "id": self.git_reference_id}
            }
        if self.pull_request_id:
            relationships["pullRequest"] = {
                "data": {"type": "scmPullRequests", "id": self.pull_request_id}
            }
        if self.rebuild_of:
            relationships["buildRun"] = {"data": {"type": "ciBuildRuns", "id": self.rebuild_of}}
        data: JSON = {"type": "ciBuildRuns", "relationships": relationships}
        if self.clean is not None:
            data["attributes"] = {"clean": self.clean}
        return {"data": data}


@dataclass(frozen=True)
class Started:
    run: BuildRun
    ref: BuildRef
    reconciled: bool


@dataclass(frozen=True)
class Target:
    """What to build, as people write it: a workflow and at most one source."""

    workflow: str
    product: str | None = None
    branch: str | None = None
    tag: str | None = None
    pull_request: str | None = None
    rebuild: str | None = None
    clean: bool | None = None
    job: str | None = None

    @classmethod
    def of_job(cls, job: JobConfig) -> Target:
        return cls(
            workflow=job.workflow,
            product=job.product,
            branch=job.branch,
            tag=job.tag,
            pull_request=job.pull_request,
            clean=job.clean,
            job=job.name,
        )


async def resolve_target(resolver: Resolver, target: Target) -> StartRequest:
    workflow = await resolver.workflow(target.workflow, target.product)
    ref_id = None
    if target.branch is not None:
        ref_id = (await resolver.git_reference(workflow.id, target.branch, "BRANCH")).id
    elif target.tag is not None:
        ref_id = (await resolver.git_reference(workflow.id, target.tag, "TAG")).id
    pr_id = None
    if target.pull_request is not None:
        pr_id = await resolver.pull_request(workflow.id, target.pull_request)
    return StartRequest(
        workflow_id=workflow.id,
        git_reference_id=ref_id,
        pull_request_id=pr_id,
        rebuild_of=target.rebuild,
        clean=target.clean,
        job=target.job,
        origin="manual",
    )


class Starter:
    def __init__(
        self,
        client: AscClient,
        emitter: Emitter,
        clock: Clock,
        *,
        is_known: Callable[[str], bool] = lambda _run_id: False,
    ) -> None:
        self._client = client
        self._emitter = emitter
        self._clock = clock
        # Runs already accounted for (started by an earlier request, or watched): never adopt them.
        self._is_known = is_known
        self._adopted: set[str] = set()

    async def start(self, req: StartRequest) -> Started:
        self._emitter.emit(
            "build.requested",
            job=req.job,
            workflow_id=req.workflow_id,
            git_reference_id=req.git_reference_id,
            pull_request_id=req.pull_request_id,
            rebuild_of=req.rebuild_of,
            clean=req.clean,
            origin=req.origin,
        )
        for _ in range(MAX_POSTS):
            sent_at = datetime.fromtimestamp(self._clock.time(), tz=UTC)
            try:
                answer = await self._client.post("/v1/ciBuildRuns", req.body())
            except ApiError as exc:
                first = exc.first
                self._emitter.emit(
                    "build.start_failed",
                    job=req.job,
                    workflow_id=req.workflow_id,
                    origin=req.origin,
                    http_status=exc.status,
                    error_code=first.code if first else None,
                    detail=first.detail or first.title if first else None,
                    pointer=first.pointer if first else None,
                )
                raise
            except OutcomeUnknown as exc:
                self._emitter.emit(
                    "build.start_unknown",
                    job=req.job,
                    workflow_id=req.workflow_id,
                    origin=req.origin,
                    reason=exc.reason,
                    http_status=exc.status,
                )
                run = await self.reconcile(req, sent_at)
                if run is not None:
                    return self._created(req, run, reconciled=True)
                continue
            data = answer.get("data")
            if not isinstance(data, dict):
                raise BadResponse("App Store Connect accepted the build but sent no build run")
            return self._created(req, BuildRun.parse(data), reconciled=False)
        raise ApiUnavailable(
            f"could not start a build of workflow {req.workflow_id}: {MAX_POSTS} attempts"
            " ended without an answer and no new run appeared"
        )

    async def reconcile(self, req: StartRequest, sent_at: datetime) -> BuildRun | None:
        """The run this request created, if App Store Connect has it."""
        for delay in RECONCILE_DELAYS:
            if delay:
                await self._clock.sleep(delay)
            try:
                page = await self._client.get(
                    f"/v1/ciWorkflows/{req.workflow_id}/buildRuns",
                    {"sort": "-number", "limit": "10", "fields[ciBuildRuns]": RUN_FIELDS},
                )
            except ApiUnavailable:
                continue
            candidates = [run for run in _runs(page) if self._could_be_ours(run, req, sent_at)]
            if candidates:
                # The oldest unclaimed candidate: a second request's run is newer than ours.
                return min(candidates, key=lambda r: r.number or 0)
        return None

    def _could_be_ours(self, run: BuildRun, req: StartRequest, sent_at: datetime) -> bool:
        if run.id in self._adopted or self._is_known(run.id):
            return False
        if run.start_reason not in (None, "MANUAL", "MANUAL_REBUILD"):
            return False
        if run.created is None or run.created < sent_at - CLOCK_SKEW:
            return False
        return not (
            req.git_reference_id
            and run.git_reference_id
            and run.git_reference_id != req.git_reference_id
        )

    def _created(self, req: StartRequest, run: BuildRun, *, reconciled: bool) -> Started:
        self._adopted.add(run.id)
        ref = BuildRef(
            build_run_id=run.id,
            build_number=run.number,
            workflow_id=req.workflow_id,
            job=req.job,
            origin=req.origin,
        )
        self._emitter.emit(
            "build.created",
            build=ref,
            event_id=stable_event_id(run.id, "build.created"),
            reconciled=reconciled,
            start_reason=run.start_reason,
        )
        return Started(run=run, ref=ref, reconciled=reconciled)


def _runs(page: JSON) -> list[BuildRun]:
    data = page.get("data")
    if not isinstance(data, list):
        raise BadResponse("App Store Connect sent a build run list without data")
    return [BuildRun.parse(item) for item in data if isinstance(item, dict)]
