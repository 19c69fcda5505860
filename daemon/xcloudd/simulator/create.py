"""POST /v1/ciBuildRuns: Apple's body checks (409 with a JSON pointer), then a new run.

Faults "after create" act on this route's 201 answer, in the app's middleware.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from xcloudd.simulator.answers import SIM_KEY, json_response
from xcloudd.simulator.apierror import ApiError, entity_error
from xcloudd.simulator.query import QuerySpec, parse_query
from xcloudd.simulator.resources import Renderer

_LINKAGE_TYPES = {
    "workflow": "ciWorkflows",
    "sourceBranchOrTag": "scmGitReferences",
    "pullRequest": "scmPullRequests",
    "buildRun": "ciBuildRuns",
}


def _shape_error(detail: str, pointer: str, code: str = "ENTITY_ERROR") -> ApiError:
    return entity_error(code, "The provided entity is invalid", detail, pointer)


def _parse_create(body: Any) -> tuple[dict[str, str], bool | None]:
    """The linkage ids and `clean` of a CiBuildRunCreateRequest, or 409 naming the bad spot."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise _shape_error("The request body must be a JSON object with a 'data' object", "/data")
    if data.get("type") != "ciBuildRuns":
        raise _shape_error(
            f"The resource type must be 'ciBuildRuns', not {data.get('type')!r}", "/data/type"
        )
    for key in data:
        if key not in ("type", "attributes", "relationships"):
            raise _shape_error(f"'{key}' is not allowed in 'data'", f"/data/{key}")
    attributes = data.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise _shape_error("'attributes' must be an object", "/data/attributes")
    clean: bool | None = None
    for key, value in attributes.items():
        if key != "clean":
            raise _shape_error(
                f"'{key}' is not a valid attribute for 'ciBuildRuns'",
                f"/data/attributes/{key}",
                "ENTITY_ERROR.ATTRIBUTE.UNKNOWN",
            )
        if value is not None and not isinstance(value, bool):
            raise _shape_error(
                "'clean' must be true, false or null",
                "/data/attributes/clean",
                "ENTITY_ERROR.ATTRIBUTE.INVALID",
            )
        clean = value
    relationships = data.get("relationships") or {}
    if not isinstance(relationships, dict):
        raise _shape_error("'relationships' must be an object", "/data/relationships")
    ids: dict[str, str] = {}
    for name, value in relationships.items():
        pointer = f"/data/relationships/{name}"
        expected = _LINKAGE_TYPES.get(name)
        if expected is None:
            raise _shape_error(
                f"'{name}' is not a valid relationship for 'ciBuildRuns'",
                pointer,
                "ENTITY_ERROR.RELATIONSHIP.UNKNOWN",
            )
        linkage = value.get("data") if isinstance(value, dict) else None
        if linkage is None:
            continue  # {"data": null}: the relationship is not set
        if (
            not isinstance(linkage, dict)
            or linkage.get("type") != expected
            or not isinstance(linkage.get("id"), str)
        ):
            raise _shape_error(
                f"The relationship '{name}' needs data {{type: '{expected}', id: '<id>'}}",
                f"{pointer}/data",
                "ENTITY_ERROR.RELATIONSHIP.INVALID",
            )
        ids[name] = linkage["id"]
    return ids, clean


async def create_build_run(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    parse_query(request.query, list(request.query.keys()), QuerySpec())
    content_type = request.headers.get("Content-Type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            "The media type is not supported",
            "Send the request body as JSON with 'Content-Type: application/json'",
        )
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise ApiError(
            400,
            "ENTITY_INVALID",
            "The request entity is invalid",
            "The request body is not valid JSON",
        ) from None
    ids, clean = _parse_create(body)
    run = sim.create_run(
        ids.get("workflow"),
        git_reference_id=ids.get("sourceBranchOrTag"),
        pull_request_id=ids.get("pullRequest"),
        rebuild_of=ids.get("buildRun"),
        clean=clean,
    )
    renderer = Renderer(sim.scenario, str(request.url.origin()), sim.clock.time(), {})
    self_url = f"{request.url.origin()}/v1/ciBuildRuns/{run.id}"
    return json_response(
        {"data": renderer.render(run), "links": {"self": self_url}},
        201,
        {"Location": self_url},
    )
