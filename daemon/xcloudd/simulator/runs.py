"""Build runs: the ground truth, and their progress as a pure function of time.

A run never changes after creation; what a client sees (PENDING, RUNNING, COMPLETE) is computed
from its creation time and the clock, so advancing a FakeClock is all a test needs to do.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

from xcloudd.simulator.scenario import Workflow

# Issue counts a client can show per outcome: failures have errors, successes a warning or two.
_ISSUE_COUNTS: dict[str, dict[str, int]] = {
    "SUCCEEDED": {"analyzerWarnings": 0, "errors": 0, "testFailures": 0, "warnings": 2},
    "FAILED": {"analyzerWarnings": 0, "errors": 1, "testFailures": 3, "warnings": 2},
    "ERRORED": {"analyzerWarnings": 0, "errors": 1, "testFailures": 0, "warnings": 0},
    "CANCELED": {"analyzerWarnings": 0, "errors": 0, "testFailures": 0, "warnings": 0},
    "SKIPPED": {"analyzerWarnings": 0, "errors": 0, "testFailures": 0, "warnings": 0},
}

START_REASONS = (
    "GIT_REF_CHANGE",
    "MANUAL",
    "MANUAL_REBUILD",
    "PULL_REQUEST_OPEN",
    "PULL_REQUEST_UPDATE",
    "SCHEDULE",
)


@dataclass(frozen=True)
class Progress:
    execution_progress: str  # PENDING | RUNNING | COMPLETE
    started_at: float | None
    finished_at: float | None
    completion_status: str | None


@dataclass(frozen=True)
class BuildRun:
    id: str
    number: int
    workflow_id: str
    product_id: str
    created_at: float
    pending_s: float
    running_s: float
    outcome: str
    start_reason: str
    clean: bool
    source_ref_id: str | None
    pull_request_id: str | None
    destination_ref_id: str | None
    commit_sha: str
    commit_message: str
    destination_sha: str | None
    actions: tuple[str, ...]
    rebuild_of: str | None = None

    @property
    def is_pull_request_build(self) -> bool:
        return self.pull_request_id is not None

    @property
    def cancel_reason(self) -> str | None:
        return "AUTOMATICALLY_BY_NEWER_BUILD" if self.outcome == "CANCELED" else None

    @property
    def issue_counts(self) -> dict[str, int]:
        return dict(_ISSUE_COUNTS[self.outcome])

    def progress(self, now: float) -> Progress:
        started = self.created_at + self.pending_s
        if now < started:
            return Progress("PENDING", None, None, None)
        if self.outcome == "SKIPPED":
            # Skipped runs never start: PENDING straight to COMPLETE, startedDate stays null.
            return Progress("COMPLETE", None, started, "SKIPPED")
        finished = started + self.running_s
        if now < finished:
            return Progress("RUNNING", started, None, None)
        return Progress("COMPLETE", started, finished, self.outcome)

    def action_progress(self, index: int, now: float) -> Progress:
        """Actions run one after another, splitting the run's RUNNING time evenly."""
        run = self.progress(now)
        if run.started_at is None:
            if run.execution_progress == "COMPLETE":
                return Progress("COMPLETE", None, None, "SKIPPED")
            return Progress("PENDING", None, None, None)
        slot = self.running_s / len(self.actions)
        start = run.started_at + index * slot
        end = start + slot
        if now < start:
            return Progress("PENDING", None, None, None)
        if now < end:
            return Progress("RUNNING", start, None, None)
        return Progress("COMPLETE", start, end, self.action_outcome(index))

    def action_outcome(self, index: int) -> str:
        # A FAILED run fails in its last (test) action; earlier actions succeed.
        if self.outcome == "FAILED" and index < len(self.actions) - 1:
            return "SUCCEEDED"
        return self.outcome

    def action_id(self, index: int) -> str:
        return str(uuid.uuid5(uuid.UUID(self.id), f"action/{index}"))

    def ground_truth(self, now: float) -> dict[str, Any]:
        p = self.progress(now)
        return {
            "id": self.id,
            "number": self.number,
            "workflow_id": self.workflow_id,
            "product_id": self.product_id,
            "created_at": self.created_at,
            "start_reason": self.start_reason,
            "outcome": self.outcome,
            "execution_progress": p.execution_progress,
            "completion_status": p.completion_status,
            "started_at": p.started_at,
            "finished_at": p.finished_at,
            "source_ref_id": self.source_ref_id,
            "pull_request_id": self.pull_request_id,
            "clean": self.clean,
        }


def fake_sha(*parts: str) -> str:
    return hashlib.sha1("/".join(parts).encode(), usedforsecurity=False).hexdigest()


class RunStore:
    """All runs, numbered per product (as Xcode Cloud does), outcomes taken in turn per workflow."""

    def __init__(self) -> None:
        self._runs: dict[str, BuildRun] = {}
        self._by_workflow: dict[str, list[BuildRun]] = {}
        self._by_product: dict[str, list[BuildRun]] = {}
        self._outcome_turn: dict[str, int] = {}
        self._actions: dict[str, tuple[BuildRun, int]] = {}
        self._deleted: set[str] = set()

    def delete(self, run_id: str) -> None:
        """The run is gone from App Store Connect (its product or workflow was removed): the
        API answers 404 for it and no list shows it. Its number is not given out again."""
        self._deleted.add(run_id)

    def next_number(self, product_id: str) -> int:
        return len(self._by_product.get(product_id, ())) + 1

    def next_outcome(self, workflow: Workflow) -> str:
        turn = self._outcome_turn.get(workflow.id, 0)
        self._outcome_turn[workflow.id] = turn + 1
        outcomes = workflow.behaviour.outcomes
        return outcomes[turn % len(outcomes)]

    def add(self, run: BuildRun) -> None:
        self._runs[run.id] = run
        self._by_workflow.setdefault(run.workflow_id, []).append(run)
        self._by_product.setdefault(run.product_id, []).append(run)
        for index in range(len(run.actions)):
            self._actions[run.action_id(index)] = (run, index)

    def action(self, action_id: str) -> tuple[BuildRun, int] | None:
        """A build action as (its run, its position in the run)."""
        found = self._actions.get(action_id)
        return None if found is None or found[0].id in self._deleted else found

    def get(self, run_id: str) -> BuildRun | None:
        return None if run_id in self._deleted else self._runs.get(run_id)

    def of_workflow(self, workflow_id: str) -> tuple[BuildRun, ...]:
        runs = self._by_workflow.get(workflow_id, ())
        return tuple(r for r in runs if r.id not in self._deleted)

    def of_product(self, product_id: str) -> tuple[BuildRun, ...]:
        runs = self._by_product.get(product_id, ())
        return tuple(r for r in runs if r.id not in self._deleted)

    def all(self) -> tuple[BuildRun, ...]:
        """Every run ever created, deleted ones included (the ground truth)."""
        return tuple(self._runs.values())

    def __len__(self) -> int:
        return len(self._runs)
