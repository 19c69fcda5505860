"""Typed, defensive views of the App Store Connect resources xcloudd reads.

Apple's schema marks no attribute as required, so every attribute may be null or missing, and
one odd field must not make a whole run unreadable: an attribute or relationship of the wrong
type reads as absent. Only a resource that cannot be identified (no string id, the wrong type,
not an object) is a BadResponse, and parsing never raises anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from xcloudd.api import BadResponse

Progress = Literal["PENDING", "RUNNING", "COMPLETE"]
_PROGRESS = ("PENDING", "RUNNING", "COMPLETE")

# Apple's CiStartReason values (API-NOTES b): a run with another one is not understood.
START_REASONS = frozenset(
    (
        "GIT_REF_CHANGE",
        "MANUAL",
        "MANUAL_REBUILD",
        "PULL_REQUEST_OPEN",
        "PULL_REQUEST_UPDATE",
        "SCHEDULE",
    )
)

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
        "product",
        "sourceBranchOrTag",
    )
)

# A poll also names what people know the run by (DESIGN 3.3 build.completed, the otlp and
# slack sinks): the same request, a few hundred bytes more.
RUN_CONTEXT = {
    "include": "workflow,product,sourceBranchOrTag",
    "fields[ciWorkflows]": "name",
    "fields[ciProducts]": "name",
    "fields[scmGitReferences]": "name,kind",
}


def run_context(doc: object, run: object) -> dict[str, str]:
    """Names of the run's workflow, product and branch or tag, from the document's `included`
    resources; whatever is missing or odd is left out."""
    included = doc.get("included") if isinstance(doc, dict) else None
    by_key: dict[tuple[object, object], dict[str, Any]] = {}
    for item in included if isinstance(included, list) else []:
        if isinstance(item, dict):
            attrs = item.get("attributes")
            by_key[(item.get("type"), item.get("id"))] = attrs if isinstance(attrs, dict) else {}
    out: dict[str, str] = {}
    for rel, kind, fields in (
        ("workflow", "ciWorkflows", (("name", "workflow_name"),)),
        ("product", "ciProducts", (("name", "product_name"),)),
        ("sourceBranchOrTag", "scmGitReferences", (("name", "git_ref"), ("kind", "git_ref_kind"))),
    ):
        attrs = by_key.get((kind, related_id(run, rel)))
        for key, name in fields if attrs else ():
            value = _str(attrs or {}, key)
            if value:
                out[name] = value
    return out


def _identify(resource: object, kind: str) -> tuple[str, dict[str, Any]]:
    """The resource's id and attributes (empty when they are not an object)."""
    if (
        not isinstance(resource, dict)
        or not isinstance(resource.get("id"), str)
        or resource.get("type") != kind
    ):
        raise BadResponse(f"App Store Connect sent a malformed {kind} resource")
    attrs = resource.get("attributes")
    return resource["id"], attrs if isinstance(attrs, dict) else {}


def _str(attrs: dict[str, Any], key: str) -> str | None:
    value = attrs.get(key)
    return value if isinstance(value, str) else None


def _int(value: object) -> int | None:
    # JSON true/false arrive as bool, which Python counts as int.
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _date(attrs: dict[str, Any], key: str) -> datetime | None:
    """An aware UTC datetime, or None when absent or unreadable."""
    value = attrs.get(key)
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
        # Apple's dates are UTC; one without an offset must not become a naive datetime that
        # cannot be compared with the others.
        if parsed.utcoffset() is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def related_id(resource: object, name: str) -> str | None:
    rels = resource.get("relationships") if isinstance(resource, dict) else None
    rel = rels.get(name) if isinstance(rels, dict) else None
    data = rel.get("data") if isinstance(rel, dict) else None
    ident = data.get("id") if isinstance(data, dict) else None
    return ident if isinstance(ident, str) else None


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
    product_id: str | None = None

    @classmethod
    def parse(cls, resource: object) -> BuildRun:
        """Any JSON value: a BuildRun, or BadResponse when it is not an identifiable run."""
        run_id, a = _identify(resource, "ciBuildRuns")
        started = _date(a, "startedDate")
        # Unknown or missing progress means "not finished": only COMPLETE ends a watch.
        unknown: Progress = "PENDING" if started is None else "RUNNING"
        raw = a.get("executionProgress")
        progress: Progress = raw if raw in _PROGRESS else unknown
        counts = a.get("issueCounts")
        commit = a.get("sourceCommit")
        return cls(
            id=run_id,
            number=_int(a.get("number")),
            progress=progress,
            # Kept as given even when unknown: a new status is still better reported than lost.
            completion_status=_str(a, "completionStatus"),
            cancel_reason=_str(a, "cancelReason"),
            start_reason=_str(a, "startReason"),
            created=_date(a, "createdDate"),
            started=started,
            finished=_date(a, "finishedDate"),
            issue_counts=(
                {k: v for k, v in counts.items() if _int(v) is not None}
                if isinstance(counts, dict)
                else None
            ),
            source_commit=commit if isinstance(commit, dict) else None,
            workflow_id=related_id(resource, "workflow"),
            git_reference_id=related_id(resource, "sourceBranchOrTag"),
            product_id=related_id(resource, "product"),
        )


@dataclass(frozen=True)
class Named:
    """A product, workflow, git reference or pull request: an id with the names people use."""

    id: str
    name: str
    attributes: dict[str, Any]

    @classmethod
    def parse(cls, resource: object, kind: str, name_key: str = "name") -> Named:
        ident, a = _identify(resource, kind)
        name = a.get(name_key)
        return cls(ident, str(name) if name is not None else "", a)
