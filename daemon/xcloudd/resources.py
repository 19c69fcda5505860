"""Typed, defensive views of the App Store Connect resources xcloudd reads.

Apple's schema marks no attribute as required, so every attribute may be null or missing; a
value of the wrong type is a BadResponse with one clear line, never a KeyError deep inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from xcloudd.api import JSON, BadResponse

Progress = Literal["PENDING", "RUNNING", "COMPLETE"]
_PROGRESS = ("PENDING", "RUNNING", "COMPLETE")

# The cheap poll: only what the watcher turns into events (DESIGN 3.3).
RUN_FIELDS = ",".join(
    (
        "number",
        "createdDate",
        "startedDate",
        "finishedDate",
        "executionProgress",
        "completionStatus",
        "cancelReason",
        "issueCounts",
        "sourceCommit",
        "startReason",
        "workflow",
        "sourceBranchOrTag",
    )
)


def _attrs(resource: JSON, kind: str) -> dict[str, Any]:
    if not isinstance(resource.get("id"), str) or resource.get("type") != kind:
        raise BadResponse(f"App Store Connect sent a malformed {kind} resource")
    attrs = resource.get("attributes") or {}
    if not isinstance(attrs, dict):
        raise BadResponse(
            f"App Store Connect sent malformed attributes for {kind} {resource['id']}"
        )
    return attrs


def _str(attrs: dict[str, Any], key: str) -> str | None:
    value = attrs.get(key)
    return value if isinstance(value, str) else None


def _date(attrs: dict[str, Any], key: str) -> datetime | None:
    value = attrs.get(key)
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadResponse(f"App Store Connect sent an unreadable {key}: {value[:40]!r}") from None


def related_id(resource: JSON, name: str) -> str | None:
    rel = (resource.get("relationships") or {}).get(name)
    data = rel.get("data") if isinstance(rel, dict) else None
    return data.get("id") if isinstance(data, dict) and isinstance(data.get("id"), str) else None


@dataclass(frozen=True)
class BuildRun:
    id: str
    number: int | None
    progress: Progress
    completion_status: str | None
    cancel_reason: str | None
    start_reason: str | None
    created: datetime | None
    started: datetime | None
    finished: datetime | None
    issue_counts: dict[str, int] | None
    source_commit: dict[str, Any] | None
    workflow_id: str | None
    git_reference_id: str | None

    @classmethod
    def parse(cls, resource: JSON) -> BuildRun:
        a = _attrs(resource, "ciBuildRuns")
        raw = a.get("executionProgress")
        progress: Progress
        if raw in _PROGRESS:
            progress = raw
        else:
            # Unknown or missing progress means "not finished": only COMPLETE ends a watch.
            progress = "PENDING" if a.get("startedDate") is None else "RUNNING"
        number = a.get("number")
        counts = a.get("issueCounts")
        commit = a.get("sourceCommit")
        return cls(
            id=resource["id"],
            number=number if isinstance(number, int) else None,
            progress=progress,
            completion_status=_str(a, "completionStatus"),
            cancel_reason=_str(a, "cancelReason"),
            start_reason=_str(a, "startReason"),
            created=_date(a, "createdDate"),
            started=_date(a, "startedDate"),
            finished=_date(a, "finishedDate"),
            issue_counts=(
                {k: v for k, v in counts.items() if isinstance(v, int)}
                if isinstance(counts, dict)
                else None
            ),
            source_commit=commit if isinstance(commit, dict) else None,
            workflow_id=related_id(resource, "workflow"),
            git_reference_id=related_id(resource, "sourceBranchOrTag"),
        )


@dataclass(frozen=True)
class Named:
    """A product, workflow, git reference or pull request: an id with the names people use."""

    id: str
    name: str
    attributes: dict[str, Any]

    @classmethod
    def parse(cls, resource: JSON, kind: str, name_key: str = "name") -> Named:
        a = _attrs(resource, kind)
        name = a.get(name_key)
        return cls(resource["id"], str(name) if name is not None else "", a)
