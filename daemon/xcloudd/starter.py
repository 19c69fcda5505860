"""Starting a build: `POST /v1/ciBuildRuns`, which is not idempotent and cannot be undone.

A start is an intent in the state store before anything goes out, and every step of it is a
transaction (see store.py): sending (the POST may leave), unknown (it left, and nobody knows
what it did), done (its run is recorded), failed, missed. The rules (DESIGN 4):
- the POST is sent again only when App Store Connect said it did nothing (a refusal before
  anything was created, a connection that never opened), or when a successful read of the
  workflow's newest runs, a few seconds after the outcome became unknown, shows no run it
  could have created. A read that failed proves nothing: the intent waits and reads again;
- a run is adopted only if it was created between the POST and the moment its outcome became
  unknown (plus clock skew), by hand (MANUAL), on the same reference, and is not known yet;
- an intent becomes "sending" only when the request budget gives its POST a turn. A scheduled
  start whose turn would come after its catch_up is counted missed, with nothing sent.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from xcloudd.api import (
    JSON,
    ApiError,
    ApiUnavailable,
    AscClient,
    AuthFailed,
    BadResponse,
    OutcomeUnknown,
    TooLate,
)
from xcloudd.asyncstore import AsyncStore
from xcloudd.clock import Clock
from xcloudd.config import JobConfig
from xcloudd.errors import XcloudError
from xcloudd.resolve import ResolveError, Resolver
from xcloudd.resources import RUN_FIELDS, START_REASONS, BuildRun
from xcloudd.store import Intent, NewRun, StartRequest

# How far Apple's createdDate may differ from our clock and still count as "created by us".
CLOCK_SKEW = timedelta(minutes=2)
# A run created just before a connection dropped may take a moment to show up in the list:
# "not in the list" counts only for a read this long after the outcome became unknown.
SETTLE_S = 5.0
MAX_POSTS = 3
# An occurrence still starts when the daemon gets to it this late, whatever its catch_up.
ON_TIME_S = 60.0
# A start asked for by a CLI process that has not touched it for this long is taken over.
ORPHAN_S = 600.0
RECONCILE_PAGE = 50
RECONCILE_PAGES = 4
RETRY_MAX_S = 300.0
# How long reads that cannot tell whether a start created a run are tried before giving up.
INCONCLUSIVE_GIVE_UP_S = 3600.0
AUTH_RETRY_MAX_S = 60.0
BUDGET_EXHAUSTED = "could not be sent within the job's catch_up: the request budget was exhausted"


class _Settled(Exception):
    """The intent was moved on elsewhere (another process) before its POST could go out."""


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
        workflow_name=workflow.name or None,
    )


def request_body(req: StartRequest) -> JSON:
    """The CiBuildRunCreateRequest, with only what was asked for."""
    relationships: JSON = {"workflow": {"data": {"type": "ciWorkflows", "id": req.workflow_id}}}
    if req.git_reference_id:
        relationships["sourceBranchOrTag"] = {
            "data": {"type": "scmGitReferences", "id": req.git_reference_id}
        }
    if req.pull_request_id:
        relationships["pullRequest"] = {
            "data": {"type": "scmPullRequests", "id": req.pull_request_id}
        }
    if req.rebuild_of:
        relationships["buildRun"] = {"data": {"type": "ciBuildRuns", "id": req.rebuild_of}}
    data: JSON = {"type": "ciBuildRuns", "relationships": relationships}
    if req.clean is not None:
        data["attributes"] = {"clean": req.clean}
    return {"data": data}


class Starter:
    """Moves one intent one step on; the caller decides when to call again (`next_try`)."""

    def __init__(
        self,
        store: AsyncStore,
        client: AscClient,
        resolver: Resolver,
        clock: Clock,
        *,
        owner: str,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._db = store.sync
        self._client = client
        self._resolver = resolver
        self._clock = clock
        self._owner = owner
        self._rng = rng or random.Random()
        self._failures: dict[str, int] = {}
        # Why an intent failed, as the error a CLI command shows (Apple's own words).
        self.errors: dict[str, XcloudError] = {}

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.time(), tz=UTC)

    def _later(self, intent_id: str, cap: float = RETRY_MAX_S) -> float:
        """When to try this intent again after trouble: backoff with full jitter."""
        n = self._failures[intent_id] = self._failures.get(intent_id, 0) + 1
        return self._clock.time() + self._rng.uniform(1.0, min(cap, 2.0 ** min(n, 9)))

    async def step(self, intent: Intent, job: JobConfig | None) -> None:
        """One step: send a new intent, or settle one whose outcome is unknown. `job`: the
        intent's job as the config has it now (None: gone, or a start without a job)."""
        if intent.state == "new":
            await self._send(intent, job)
        elif intent.state == "sending":
            # The process that sent it stopped before the answer: nobody knows what it did.
            await self._store.call(
                self._db.intent_unknown,
                intent.id,
                reason="xcloudd stopped while the request was under way",
                http_status=None,
                next_try=self._clock.time(),
            )
        elif intent.state == "unknown":
            await self._reconcile(intent, job)

    @staticmethod
    def _not_after(intent: Intent, job: JobConfig | None) -> float | None:
        """The last moment a scheduled start may go out (wall-clock seconds), if it has one."""
        if intent.origin != "schedule" or job is None or intent.planned is None:
            return None
        return intent.planned.timestamp() + max(job.catch_up, ON_TIME_S)

    def _too_late(self, intent: Intent, job: JobConfig | None) -> str | None:
        """Why a scheduled start should no longer go out, if it should not."""
        if intent.origin != "schedule":
            return None
        if job is None:
            return "the job is no longer in the config"
        if not job.enabled:
            return "the job is disabled"
        not_after = self._not_after(intent, job)
        if not_after is not None and self._clock.time() > not_after:
            return "older than the job's catch_up when it could be sent"
        return None

    async def _send(self, intent: Intent, job: JobConfig | None) -> None:
        if (reason := self._too_late(intent, job)) is not None:
            await self._store.call(self._db.intent_missed, intent.id, reason)
            return
        if intent.posts >= MAX_POSTS:
            await self._fail(
                intent,
                f"no build run appeared after {MAX_POSTS} attempts to start one",
            )
            return
        try:
            req = await self._request(intent, job)
        except (ResolveError, ApiError) as exc:
            if isinstance(exc, AuthFailed):
                await self._retry(intent, cap=AUTH_RETRY_MAX_S)
                return
            if isinstance(exc, ApiError) and exc.status == 429:
                await self._retry(intent)
                return
            self.errors[intent.id] = exc
            await self._store.call(
                self._db.intent_failed,
                intent.id,
                http_status=getattr(exc, "status", None),
                error_code=None,
                detail=str(exc),
            )
            return
        except (ApiUnavailable, BadResponse):
            await self._retry(intent)
            return
        await self._post(intent, req, self._not_after(intent, job))

    async def _request(self, intent: Intent, job: JobConfig | None) -> StartRequest:
        if intent.workflow_id is not None:
            return StartRequest(
                intent.workflow_id,
                intent.git_reference_id,
                intent.pull_request_id,
                intent.rebuild_of,
                intent.clean,
            )
        assert job is not None
        return await resolve_target(self._resolver, Target.of_job(job))

    async def _fail(self, intent: Intent, detail: str) -> None:
        """The start ends without a build, for a reason of ours (not Apple's refusal)."""
        await self._store.call(
            self._db.intent_failed, intent.id, http_status=None, error_code=None, detail=detail
        )

    async def _retry(
        self,
        intent: Intent,
        *,
        resend: bool = False,
        refused: bool = False,
        cap: float = RETRY_MAX_S,
    ) -> None:
        await self._store.call(
            self._db.intent_retry,
            intent.id,
            next_try=self._later(intent.id, cap),
            resend=resend,
            refused=refused,
        )

    async def _post(self, intent: Intent, req: StartRequest, not_after: float | None) -> None:
        sent: Intent | None = None

        async def sending() -> None:
            # Only now, with the budget's turn in hand: a start that never gets one is missed,
            # not fired.
            nonlocal sent
            sent = await self._store.call(self._db.intent_sending, intent.id, req)
            if sent is None:
                raise _Settled

        try:
            answer = await self._client.post(
                "/v1/ciBuildRuns", request_body(req), not_after=not_after, before_send=sending
            )
            data = answer.get("data")
            if not isinstance(data, dict):
                raise BadResponse("App Store Connect accepted the build but sent no build run")
            run = BuildRun.parse(data)
        except _Settled:
            return
        except TooLate:
            if sent is None:
                await self._store.call(self._db.intent_missed, intent.id, BUDGET_EXHAUSTED)
            else:
                # Its first try was refused (429) or never connected: nothing was created.
                await self._fail(intent, f"no build run was created: {BUDGET_EXHAUSTED}")
            return
        except AuthFailed:
            # Refused before anything was created: safe to send again once the key works,
            # which a person fixes at any moment: look again at least once a minute.
            await self._retry(intent, resend=True, refused=True, cap=AUTH_RETRY_MAX_S)
            return
        except ApiError as exc:
            if exc.status == 429:
                # Throttled past the client's patience: not a refusal, nothing was created.
                await self._retry(intent, resend=True, refused=True)
                return
            first = exc.first
            self.errors[intent.id] = exc
            await self._store.call(
                self._db.intent_failed,
                intent.id,
                http_status=exc.status,
                error_code=first.code if first else None,
                detail=(first.detail or first.title) if first else str(exc),
                pointer=first.pointer if first else None,
            )
            return
        except ApiUnavailable:
            # The connection never opened: nothing can have been created.
            await self._retry(intent, resend=True, refused=True)
            return
        except (OutcomeUnknown, BadResponse) as exc:
            reason = exc.reason if isinstance(exc, OutcomeUnknown) else str(exc)
            status = exc.status if isinstance(exc, OutcomeUnknown) else None
            await self._store.call(
                self._db.intent_unknown,
                intent.id,
                reason=reason,
                http_status=status,
                next_try=self._clock.time() + SETTLE_S,
            )
            return
        self._failures.pop(intent.id, None)
        await self._store.call(
            self._db.record_run,
            self._new_run(intent, req.workflow_id, run),
            intent_id=intent.id,
            reconciled=False,
        )

    @staticmethod
    def _new_run(intent: Intent, workflow_id: str, run: BuildRun) -> NewRun:
        return NewRun(
            run_id=run.id,
            number=run.number,
            workflow_id=workflow_id,
            job=intent.job,
            origin=intent.origin,
            created_at=run.created,
            start_reason=run.start_reason,
            progress=run.progress,
            product_id=run.product_id,
        )

    async def _reconcile(self, intent: Intent, job: JobConfig | None) -> None:
        assert intent.workflow_id is not None
        try:
            runs = await self._recent_runs(intent)
        except (ApiError, ApiUnavailable, BadResponse):
            # Unknown is not no: a read that failed proves nothing. Read again later.
            await self._retry(intent)
            return
        known = await self._store.call(self._db.known_runs, [r.id for r in runs])
        unknown = [r for r in runs if r.id not in known]
        now = self._now()
        if any(_unreadable(r) and _in_window(r, intent, now) for r in unknown):
            # A run whose creation time or cause cannot be read might be ours: the read
            # settles nothing, and nothing is sent again on its strength. Should it stay that
            # way, the start ends as failed rather than hold its job back for ever.
            since = intent.unknown_at or intent.created_at
            if (now - since).total_seconds() > INCONCLUSIVE_GIVE_UP_S:
                await self._fail(
                    intent,
                    "the start's outcome stayed unknown: the workflow's runs could not"
                    " be read clearly",
                )
                return
            await self._retry(intent)
            return
        others = [
            sent
            for other, sent, _ in await self._store.call(
                self._db.pending_windows, intent.workflow_id
            )
            if other != intent.id
        ]
        candidates = [r for r in unknown if _could_be(r, intent, now, others)]
        if candidates:
            # The oldest candidate: a later request's run is newer than ours.
            run = min(candidates, key=lambda r: (r.number or 0, r.created or now))
            self._failures.pop(intent.id, None)
            new = await self._store.call(
                self._db.record_run,
                self._new_run(intent, intent.workflow_id, run),
                intent_id=intent.id,
                reconciled=True,
            )
            if not new:
                # Recorded meanwhile by someone else (discovery, another process): look again.
                await self._retry(intent)
            return
        settled_at = (intent.unknown_at or self._now()) + timedelta(seconds=SETTLE_S)
        if self._now() < settled_at:
            await self._store.call(
                self._db.intent_retry, intent.id, next_try=settled_at.timestamp()
            )
            return
        # A successful read, late enough, shows no run this request could have created.
        if intent.origin != "schedule" and intent.owner != self._owner:
            await self._fail(
                intent,
                "the start's outcome was unknown and no build run appeared",
            )
            return
        late = self._too_late(intent, job)
        if late is not None:
            await self._fail(
                intent,
                f"no build run appeared, and it is not sent again: {late}",
            )
            return
        await self._store.call(
            self._db.intent_retry, intent.id, next_try=self._clock.time(), resend=True
        )

    async def _recent_runs(self, intent: Intent) -> list[BuildRun]:
        """The workflow's newest runs, back to the oldest that could be this intent's."""
        assert intent.workflow_id is not None
        floor = (intent.sent_at or intent.created_at) - CLOCK_SKEW
        runs: list[BuildRun] = []
        page = await self._client.get(
            f"/v1/ciWorkflows/{intent.workflow_id}/buildRuns",
            {"sort": "-number", "limit": str(RECONCILE_PAGE), "fields[ciBuildRuns]": RUN_FIELDS},
            lane="start",
        )
        for _ in range(RECONCILE_PAGES):
            batch = runs_of(page)
            runs.extend(batch)
            links = page.get("links")
            nxt = links.get("next") if isinstance(links, dict) else None
            oldest = min((r.created for r in batch if r.created), default=None)
            if not isinstance(nxt, str) or not nxt or oldest is None or oldest < floor:
                break
            page = await self._client.get(nxt, lane="start")
        return runs


def _unreadable(run: BuildRun) -> bool:
    """A run that cannot be told apart from ours: no creation time, or an unknown cause."""
    return run.created is None or (
        run.start_reason is not None and run.start_reason not in START_REASONS
    )


def _in_window(run: BuildRun, intent: Intent, now: datetime) -> bool:
    """Created between the POST and the moment its outcome became unknown, give or take the
    clock skew; a run whose creation time is unreadable might be anywhere."""
    if run.created is None or intent.sent_at is None:
        return True
    end = intent.unknown_at or now
    return intent.sent_at - CLOCK_SKEW <= run.created <= end + CLOCK_SKEW


def _could_be(run: BuildRun, intent: Intent, now: datetime, others: list[datetime]) -> bool:
    """Could this run be the one the intent's POST created? `others`: when the workflow's other
    unsettled starts were sent. A run created before our POST is only ours within the clock
    skew, and never when another start was already under way when it was created."""
    if run.start_reason not in (None, "MANUAL", "MANUAL_REBUILD"):
        return False
    if run.created is None or intent.sent_at is None or not _in_window(run, intent, now):
        return False
    if run.created < intent.sent_at and any(sent <= run.created for sent in others):
        return False
    return not (
        intent.git_reference_id
        and run.git_reference_id
        and run.git_reference_id != intent.git_reference_id
    )


def runs_of(page: JSON) -> list[BuildRun]:
    data = page.get("data")
    if not isinstance(data, list):
        raise BadResponse("App Store Connect sent a build run list without data")
    out = []
    for item in data:
        if not isinstance(item, dict):
            raise BadResponse("App Store Connect sent a build run list with a malformed entry")
        out.append(BuildRun.parse(item))
    return out


def could_be_pending(
    windows: list[tuple[str, datetime, datetime | None]], now: datetime
) -> Callable[[BuildRun], bool]:
    """For discovery: is this run possibly one of our starts whose outcome is not settled?"""

    def check(run: BuildRun) -> bool:
        if not windows:
            return False
        if _unreadable(run):
            return True
        if run.start_reason not in (None, "MANUAL", "MANUAL_REBUILD"):
            return False
        assert run.created is not None
        return any(
            sent - CLOCK_SKEW <= run.created <= (unknown or now) + CLOCK_SKEW
            for _, sent, unknown in windows
        )

    return check
