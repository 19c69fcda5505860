"""The "malformed" fault: a correct answer rewritten into JSON of a shape Apple does not document.

Pure functions on the parsed body; the variants are described in faults.py.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from typing import Any

from xcloudd.simulator.faults import MalformedVariant

# Values outside Apple's enums (CiExecutionProgress, CiCompletionStatus, CiStartReason, ...).
_UNKNOWN_ENUMS: dict[str, dict[str, str]] = {
    "ciBuildRuns": {
        "executionProgress": "QUEUED_FOR_REVIEW",
        "completionStatus": "PARTIALLY_SUCCEEDED",
        "startReason": "EXTERNAL_TRIGGER",
    },
    "ciBuildActions": {
        "executionProgress": "QUEUED_FOR_REVIEW",
        "completionStatus": "PARTIALLY_SUCCEEDED",
        "actionType": "NOTARIZE",
    },
    "ciProducts": {"productType": "APP_CLIP"},
    "scmGitReferences": {"kind": "COMMIT"},
}
_DROPPED: dict[str, frozenset[str]] = {
    "ciBuildRuns": frozenset(
        {"number", "createdDate", "startedDate", "issueCounts", "sourceCommit", "startReason"}
    ),
    "ciBuildActions": frozenset({"name", "actionType", "startedDate", "issueCounts"}),
}
_OFFSET = re.compile(r"(Z|[+-]\d{2}:?\d{2})$")

BAD_JSON_BODY = (
    b"<html><head><title>Service Temporarily Unavailable</title></head>"
    b"<body><h1>Service Temporarily Unavailable</h1></body></html>\n"
)


def _resources(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    data = body.get("data")
    items = data if isinstance(data, list) else [data]
    for item in [*items, *(body.get("included") or [])]:
        if isinstance(item, dict):
            yield item


def _attributes(resource: dict[str, Any]) -> dict[str, Any]:
    attributes = resource.get("attributes")
    return attributes if isinstance(attributes, dict) else {}


def _unknown_enum(resource: dict[str, Any], _index: int) -> None:
    attributes = _attributes(resource)
    for name, value in _UNKNOWN_ENUMS.get(resource.get("type", ""), {}).items():
        # Only attributes the answer has: a sparse fieldset stays sparse.
        if name in attributes:
            attributes[name] = value


def _naive_date(resource: dict[str, Any], _index: int) -> None:
    attributes = _attributes(resource)
    for name, value in attributes.items():
        if name.endswith("Date") and isinstance(value, str):
            attributes[name] = _OFFSET.sub("", value)


def _bad_relationship(resource: dict[str, Any], index: int) -> None:
    relationships = resource.get("relationships")
    linked = (
        next((n for n, v in relationships.items() if isinstance(v, dict) and "data" in v), None)
        if isinstance(relationships, dict)
        else None
    )
    # Cycling through the three forms lets one list answer carry all of them.
    form = index % 3
    if form == 0 or linked is None or not isinstance(relationships, dict):
        names = ",".join(relationships) if isinstance(relationships, dict) else ""
        resource["relationships"] = names
    elif form == 1:
        relationships[linked] = [relationships[linked]["data"]]
    else:
        relationships[linked] = 1


def _missing_optional(resource: dict[str, Any], _index: int) -> None:
    attributes = _attributes(resource)
    dropped = _DROPPED.get(resource.get("type", ""), attributes.keys() - {"name"})
    for name in dropped & attributes.keys():
        del attributes[name]


_REWRITES: dict[MalformedVariant, Callable[[dict[str, Any], int], None]] = {
    MalformedVariant.UNKNOWN_ENUM: _unknown_enum,
    MalformedVariant.NAIVE_DATE: _naive_date,
    MalformedVariant.BAD_RELATIONSHIP: _bad_relationship,
    MalformedVariant.MISSING_OPTIONAL: _missing_optional,
}


def malformed_body(body: Any, variant: MalformedVariant) -> Any:
    """A rewritten copy of a JSON:API answer (BAD_JSON is not a body: see BAD_JSON_BODY)."""
    if not isinstance(body, dict):
        return body
    out = copy.deepcopy(body)
    if variant is MalformedVariant.NOT_OBJECT:
        data = out.get("data")
        if isinstance(data, list):
            out["data"] = len(data)
        elif isinstance(data, dict):
            out["data"] = str(data.get("id", ""))
        return out
    rewrite = _REWRITES.get(variant)
    if rewrite is not None:
        for index, resource in enumerate(_resources(out)):
            rewrite(resource, index)
    return out
