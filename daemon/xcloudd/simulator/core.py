"""The simulator's state: world, keys, runs, rate budget, fault rules, random seed and traffic."""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence

from aiohttp import web

from xcloudd.clock import Clock, SystemClock
from xcloudd.simulator.apierror import ApiError, entity_error
from xcloudd.simulator.auth import ApiKey, TokenVerifier, generate_key, mint_token
from xcloudd.simulator.faults import FaultRules
from xcloudd.simulator.ratelimit import RateLimiter
from xcloudd.simulator.runs import START_REASONS, BuildRun, RunStore, fake_sha
from xcloudd.simulator.scenario import COMPLETION_STATUSES, Scenario, default_scenario
from xcloudd.simulator.traffic import TrafficLog
from xcloudd.simulator.webhooks import WebhookSender

_INVALID = "ENTITY_ERROR.RELATIONSHIP.INVALID"
_INVALID_TITLE = "The provided entity includes a relationship with an invalid value"


class Simulator:
    """One App Store Connect stand-in. `app()` serves it; tests also use the Python API."""

    def __init__(
        self,
        scenario: Scenario | None = None,
        clock: Clock | None = None,
        rate_limit: int | None = None,
        keys: Sequence[ApiKey] = (),
        traffic_limit: int | None = None,
        *,
        seed: int | None = None,
    ) -> None:
        self.scenario = scenario or default_scenario()
        self.clock: Clock = clock or SystemClock()
        self.keys: dict[str, ApiKey] = {}
        for key in keys or (generate_key(),):
            self.keys[key.key_id] = key
        self.primary_key: ApiKey = next(iter(self.keys.values()))
        self.verifier = TokenVerifier(self.keys)
        self.rate_limiter = RateLimiter(self.clock, rate_limit or self.scenario.rate_limit)
        # One generator for every random choice, so a seed replays a chaos run.
        self.seed = self.scenario.seed if seed is None else seed
        self.random = random.Random(self.seed)
        self.faults = FaultRules(self.random)
        self.traffic = TrafficLog(traffic_limit)
        self.runs = RunStore()
        self.webhooks = WebhookSender(self)  # idle until configured (POST /_sim/webhooks)

    def reseed(self, seed: int) -> None:
        """Restart the random sequence (fault probabilities) from `seed`."""
        self.seed = seed
        self.random.seed(seed)

    # -- keys and tokens -------------------------------------------------------------------------

    def add_key(self, individual: bool = False) -> ApiKey:
        key = generate_key(individual=individual)
        self.keys[key.key_id] = key
        return key

    def token(self, key: ApiKey | None = None, lifetime_s: float = 15 * 60) -> str:
        """A valid token at the simulator's current time (for tests and scripts)."""
        return mint_token(key or self.primary_key, self.clock.time(), lifetime_s)

    # -- build runs ------------------------------------------------------------------------------

    def create_run(
        self,
        workflow_id: str | None,
        *,
        git_reference_id: str | None = None,
        pull_request_id: str | None = None,
        rebuild_of: str | None = None,
        clean: bool | None = None,
        start_reason: str | None = None,
        outcome: str | None = None,
        pending_s: float | None = None,
        running_s: float | None = None,
    ) -> BuildRun:
        """Validate like Apple (409 ApiError with a JSON pointer) and create a run.
        `pending_s`/`running_s` override the workflow's timeline for this run (benchmarks give
        each build its own durations)."""
        s = self.scenario
        if workflow_id is None:
            raise entity_error(
                "ENTITY_ERROR.RELATIONSHIP.REQUIRED",
                "The provided entity is missing a required relationship",
                "You must provide a value for the relationship 'workflow' with this request",
                "/data/relationships/workflow",
            )
        workflow = s.workflow(workflow_id)
        if workflow is None:
            raise entity_error(
                _INVALID,
                _INVALID_TITLE,
                f"There is no ciWorkflows resource with id '{workflow_id}'",
                "/data/relationships/workflow",
            )
        if not workflow.is_enabled:
            raise entity_error(
                _INVALID,
                "The workflow is disabled",
                f"The workflow '{workflow.name}' ({workflow.id}) is disabled; enable it in App "
                "Store Connect before starting builds",
                "/data/relationships/workflow",
            )
        given = [
            name
            for name, value in (
                ("sourceBranchOrTag", git_reference_id),
                ("pullRequest", pull_request_id),
                ("buildRun", rebuild_of),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise entity_error(
                _INVALID,
                _INVALID_TITLE,
                f"Provide at most one of sourceBranchOrTag, pullRequest, buildRun (got "
                f"{', '.join(given)})",
                f"/data/relationships/{given[1]}",
            )
        repo = s.repository(workflow.repository_id)
        assert repo is not None  # scenarios are built with one repository per product
        source_ref = None
        pull = None
        reason = start_reason or "MANUAL"
        if rebuild_of is not None:
            previous = self.runs.get(rebuild_of)
            if previous is None or previous.workflow_id != workflow.id:
                raise entity_error(
                    _INVALID,
                    _INVALID_TITLE,
                    f"There is no ciBuildRuns resource with id '{rebuild_of}' in workflow "
                    f"'{workflow.name}'",
                    "/data/relationships/buildRun",
                )
            git_reference_id, pull_request_id = previous.source_ref_id, previous.pull_request_id
            reason = start_reason or "MANUAL_REBUILD"
        if pull_request_id is not None:
            pull = s.pull_request(pull_request_id)
            problem = None
            if pull is None:
                problem = f"There is no scmPullRequests resource with id '{pull_request_id}'"
            elif pull.repository_id != repo.id:
                problem = f"Pull request #{pull.number} is not in the workflow's repository"
            elif pull.is_closed:
                problem = f"Pull request #{pull.number} is closed"
            if problem:
                raise entity_error(
                    _INVALID, _INVALID_TITLE, problem, "/data/relationships/pullRequest"
                )
        elif git_reference_id is not None:
            source_ref = s.git_reference(git_reference_id)
            problem = None
            if source_ref is None:
                problem = f"There is no scmGitReferences resource with id '{git_reference_id}'"
            elif source_ref.repository_id != repo.id:
                problem = (
                    f"The git reference '{source_ref.name}' belongs to another repository than "
                    f"the workflow's ({repo.owner}/{repo.name})"
                )
            elif source_ref.is_deleted:
                problem = f"The git reference '{source_ref.name}' has been deleted"
            if problem:
                raise entity_error(
                    _INVALID, _INVALID_TITLE, problem, "/data/relationships/sourceBranchOrTag"
                )
        else:
            # Without a reference Xcode Cloud builds the repository's default branch (inferred).
            source_ref = next(
                (
                    r
                    for r in repo.references
                    if r.kind == "BRANCH" and r.name == repo.default_branch
                ),
                None,
            )
        if reason not in START_REASONS:
            raise ValueError(f"start_reason must be one of {', '.join(START_REASONS)}")
        if outcome is not None and outcome not in COMPLETION_STATUSES:
            raise ValueError(f"outcome must be one of {', '.join(COMPLETION_STATUSES)}")

        number = self.runs.next_number(workflow.product_id)
        destination_ref = None
        if pull is not None:
            destination_ref = next(
                (
                    r
                    for r in repo.references
                    if r.kind == "BRANCH" and r.name == pull.destination_branch and not r.is_deleted
                ),
                None,
            )
            source_ref = next(
                (r for r in repo.references if r.kind == "BRANCH" and r.name == pull.source_branch),
                None,
            )
        ref_name = pull.source_branch if pull else (source_ref.name if source_ref else "main")
        run = BuildRun(
            id=str(uuid.uuid4()),
            number=number,
            workflow_id=workflow.id,
            product_id=workflow.product_id,
            created_at=self.clock.time(),
            pending_s=workflow.behaviour.pending_s if pending_s is None else pending_s,
            running_s=workflow.behaviour.running_s if running_s is None else running_s,
            outcome=outcome or self.runs.next_outcome(workflow),
            start_reason=reason,
            clean=workflow.clean if clean is None else clean,
            # A PR build also names the PR's source branch, when the repository still has it.
            source_ref_id=source_ref.id if source_ref else None,
            pull_request_id=pull.id if pull else None,
            destination_ref_id=destination_ref.id if destination_ref else None,
            commit_sha=fake_sha(repo.id, ref_name, str(number)),
            commit_message=f"Update {ref_name} for build {number}",
            destination_sha=fake_sha(repo.id, pull.destination_branch) if pull else None,
            actions=workflow.actions,
            rebuild_of=rebuild_of,
        )
        self.runs.add(run)
        self.webhooks.run_created(run)
        return run

    def start_run(
        self,
        workflow_id: str,
        git_reference_id: str | None = None,
        *,
        start_reason: str = "GIT_REF_CHANGE",
        pull_request_id: str | None = None,
        outcome: str | None = None,
        pending_s: float | None = None,
        running_s: float | None = None,
    ) -> BuildRun:
        """Start a build behind the client's back, as a push or a person in Xcode would."""
        return self.create_run(
            workflow_id,
            git_reference_id=git_reference_id,
            pull_request_id=pull_request_id,
            start_reason=start_reason,
            outcome=outcome,
            pending_s=pending_s,
            running_s=running_s,
        )

    def app(self) -> web.Application:
        from xcloudd.simulator.app import build_app

        return build_app(self)


__all__ = ["ApiError", "Simulator"]
