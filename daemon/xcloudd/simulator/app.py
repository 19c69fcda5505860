"""HTTP layer: Apple's routes, the auth/rate-limit/fault/traffic middleware, the /_sim admin API.

Request pipeline for /v1 paths: traffic log, then token check (401), rate budget (429), fault
rules, then the route. Errors anywhere become Apple's ErrorResponse; every answer to an
authenticated key carries `X-Rate-Limit`, errors included.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from xcloudd.simulator.apierror import (
    ApiError,
    entity_error,
    method_not_allowed,
    not_found,
    path_error,
)
from xcloudd.simulator.core import Simulator
from xcloudd.simulator.faults import Fault, FaultAction
from xcloudd.simulator.query import Query, QuerySpec, paginate, parse_query
from xcloudd.simulator.ratelimit import RateDecision
from xcloudd.simulator.resources import Entity, Renderer
from xcloudd.simulator.runs import BuildRun
from xcloudd.simulator.traffic import TrafficEntry

SIM_KEY = web.AppKey("simulator", Simulator)


class _DropConnection(Exception):
    """Close the connection without answering."""

    def __init__(self, fault: str) -> None:
        super().__init__(fault)
        self.fault = fault


class JsonResponse(web.Response):
    """A JSON answer that keeps the object it was made from, for the traffic log."""

    def __init__(self, body: Any, status: int, headers: dict[str, str] | None) -> None:
        super().__init__(
            body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
        )
        self.json_body = body
        self.fault: str | None = None  # the fault rule that shaped this answer, if any


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> JsonResponse:
    return JsonResponse(body, status, headers)


def error_response(error: ApiError) -> JsonResponse:
    return json_response(error.body(), error.status, dict(error.headers))


# -- route declarations ---------------------------------------------------------------------------

_RUN_FIELDS = (
    "ciBuildRuns",
    "builds",
    "ciWorkflows",
    "ciProducts",
    "scmGitReferences",
    "scmPullRequests",
)
_RUN_INCLUDE = (
    "builds",
    "workflow",
    "product",
    "sourceBranchOrTag",
    "destinationBranch",
    "pullRequest",
)
RUN_ONE = QuerySpec(fields=_RUN_FIELDS, include=_RUN_INCLUDE, extra=("limit[builds]",))
RUN_LIST = QuerySpec(
    fields=_RUN_FIELDS,
    include=_RUN_INCLUDE,
    paged=True,
    sort=("number", "-number"),
    filters={"builds": None},
    extra=("limit[builds]",),
)
_PRODUCT_FIELDS = ("ciProducts", "apps", "bundleIds", "scmRepositories")
_PRODUCT_INCLUDE = ("app", "bundleId", "primaryRepositories")
PRODUCT_ONE = QuerySpec(
    fields=_PRODUCT_FIELDS, include=_PRODUCT_INCLUDE, extra=("limit[primaryRepositories]",)
)
PRODUCT_LIST = QuerySpec(
    fields=_PRODUCT_FIELDS,
    include=_PRODUCT_INCLUDE,
    paged=True,
    filters={"productType": ("APP", "FRAMEWORK"), "app": None},
    extra=("limit[primaryRepositories]",),
)
_WORKFLOW_FIELDS = (
    "ciWorkflows",
    "ciProducts",
    "scmRepositories",
    "ciXcodeVersions",
    "ciMacOsVersions",
)
_WORKFLOW_INCLUDE = ("product", "repository", "xcodeVersion", "macOsVersion")
WORKFLOW_ONE = QuerySpec(fields=_WORKFLOW_FIELDS, include=_WORKFLOW_INCLUDE)
WORKFLOW_LIST = QuerySpec(fields=_WORKFLOW_FIELDS, include=_WORKFLOW_INCLUDE, paged=True)
_REPO_FIELDS = ("scmRepositories", "scmProviders", "scmGitReferences")
REPO_ONE = QuerySpec(fields=_REPO_FIELDS, include=("scmProvider", "defaultBranch"))
REPO_LIST = QuerySpec(
    fields=_REPO_FIELDS,
    include=("scmProvider", "defaultBranch"),
    paged=True,
    filters={"id": None},
)
REF_ONE = QuerySpec(fields=("scmGitReferences", "scmRepositories"), include=("repository",))
REF_LIST = QuerySpec(
    fields=("scmGitReferences", "scmRepositories"), include=("repository",), paged=True
)
PULL_ONE = QuerySpec(fields=("scmPullRequests", "scmRepositories"), include=("repository",))
PULL_LIST = QuerySpec(
    fields=("scmPullRequests", "scmRepositories"), include=("repository",), paged=True
)
ACTION_ONE = QuerySpec(fields=("ciBuildActions", "ciBuildRuns"), include=("buildRun",))
ACTION_LIST = QuerySpec(fields=("ciBuildActions", "ciBuildRuns"), include=("buildRun",), paged=True)


def _empty_list(kind: str) -> QuerySpec:
    return QuerySpec(fields=(kind,), paged=True)


@dataclass(frozen=True)
class _Ctx:
    sim: Simulator
    request: web.Request
    query: Query

    @property
    def id(self) -> str:
        return self.request.match_info["id"]


def _product(c: _Ctx) -> Entity:
    found = c.sim.scenario.product(c.id)
    if found is None:
        raise not_found("ciProducts", c.id)
    return found


def _workflow(c: _Ctx) -> Entity:
    found = c.sim.scenario.workflow(c.id)
    if found is None:
        raise not_found("ciWorkflows", c.id)
    return found


def _repository(c: _Ctx) -> Entity:
    found = c.sim.scenario.repository(c.id)
    if found is None:
        raise not_found("scmRepositories", c.id)
    return found


def _run(c: _Ctx) -> BuildRun:
    found = c.sim.runs.get(c.id)
    if found is None:
        raise not_found("ciBuildRuns", c.id)
    return found


def _action(c: _Ctx) -> tuple[BuildRun, int]:
    found = c.sim.runs.action(c.id)
    if found is None:
        raise not_found("ciBuildActions", c.id)
    return found


def _sorted_runs(c: _Ctx, runs: Sequence[BuildRun]) -> Sequence[BuildRun]:
    # Apple's default order is oldest first; only sort=-number gives newest first.
    ordered = sorted(runs, key=lambda r: r.number, reverse=c.query.sort == "-number")
    wanted = c.query.filters.get("builds")
    # No simulated run produces App Store builds, so a builds filter matches nothing.
    return [] if wanted else ordered


def _products(c: _Ctx) -> Sequence[Entity]:
    types = c.query.filters.get("productType")
    return [p for p in c.sim.scenario.products if not types or p.product_type in types]


def _git_reference(c: _Ctx) -> Entity:
    found = c.sim.scenario.git_reference(c.id)
    if found is None:
        raise not_found("scmGitReferences", c.id)
    return found


def _pull_request(c: _Ctx) -> Entity:
    found = c.sim.scenario.pull_request(c.id)
    if found is None:
        raise not_found("scmPullRequests", c.id)
    return found


def _repositories(c: _Ctx) -> Sequence[Entity]:
    ids = c.query.filters.get("id")
    return [r for r in c.sim.scenario.repositories() if not ids or r.id in ids]


def _workflow_repository(c: _Ctx) -> Entity:
    wf = c.sim.scenario.workflow(c.id)
    if wf is None:
        raise not_found("ciWorkflows", c.id)
    found = c.sim.scenario.repository(wf.repository_id)
    if found is None:
        raise not_found("scmRepositories", wf.repository_id)
    return found


def _runs_of_workflow(c: _Ctx) -> Sequence[Entity]:
    _workflow(c)
    return _sorted_runs(c, c.sim.runs.of_workflow(c.id))


def _runs_of_product(c: _Ctx) -> Sequence[Entity]:
    _product(c)
    return _sorted_runs(c, c.sim.runs.of_product(c.id))


def _actions_of_run(c: _Ctx) -> Sequence[Entity]:
    run = _run(c)
    return [(run, i) for i in range(len(run.actions))]


def _workflows_of_product(c: _Ctx) -> Sequence[Entity]:
    product = c.sim.scenario.product(c.id)
    if product is None:
        raise not_found("ciProducts", c.id)
    return product.workflows


def _primary_repositories(c: _Ctx) -> Sequence[Entity]:
    product = c.sim.scenario.product(c.id)
    if product is None:
        raise not_found("ciProducts", c.id)
    return [product.repository]


def _references(c: _Ctx) -> Sequence[Entity]:
    repo = c.sim.scenario.repository(c.id)
    if repo is None:
        raise not_found("scmRepositories", c.id)
    return repo.references


def _pull_requests(c: _Ctx) -> Sequence[Entity]:
    repo = c.sim.scenario.repository(c.id)
    if repo is None:
        raise not_found("scmRepositories", c.id)
    return repo.pull_requests


def _nothing_of_action(c: _Ctx) -> Sequence[Entity]:
    _action(c)
    return []


def _action_run(c: _Ctx) -> Entity:
    return _action(c)[0]


GET_ONE: tuple[tuple[str, QuerySpec, Callable[[_Ctx], Entity]], ...] = (
    ("/v1/ciProducts/{id}", PRODUCT_ONE, _product),
    ("/v1/ciWorkflows/{id}", WORKFLOW_ONE, _workflow),
    ("/v1/ciWorkflows/{id}/repository", REPO_ONE, _workflow_repository),
    ("/v1/ciBuildRuns/{id}", RUN_ONE, _run),
    ("/v1/ciBuildActions/{id}", ACTION_ONE, _action),
    ("/v1/ciBuildActions/{id}/buildRun", RUN_ONE, _action_run),
    ("/v1/scmRepositories/{id}", REPO_ONE, _repository),
    ("/v1/scmGitReferences/{id}", REF_ONE, _git_reference),
    ("/v1/scmPullRequests/{id}", PULL_ONE, _pull_request),
)
GET_MANY: tuple[tuple[str, QuerySpec, Callable[[_Ctx], Sequence[Entity]]], ...] = (
    ("/v1/ciProducts", PRODUCT_LIST, _products),
    ("/v1/ciProducts/{id}/workflows", WORKFLOW_LIST, _workflows_of_product),
    ("/v1/ciProducts/{id}/buildRuns", RUN_LIST, _runs_of_product),
    ("/v1/ciProducts/{id}/primaryRepositories", REPO_LIST, _primary_repositories),
    ("/v1/ciWorkflows/{id}/buildRuns", RUN_LIST, _runs_of_workflow),
    ("/v1/ciBuildRuns/{id}/actions", ACTION_LIST, _actions_of_run),
    ("/v1/ciBuildActions/{id}/artifacts", _empty_list("ciArtifacts"), _nothing_of_action),
    ("/v1/ciBuildActions/{id}/issues", _empty_list("ciIssues"), _nothing_of_action),
    ("/v1/ciBuildActions/{id}/testResults", _empty_list("ciTestResults"), _nothing_of_action),
    ("/v1/scmRepositories", REPO_LIST, _repositories),
    ("/v1/scmRepositories/{id}/gitReferences", REF_LIST, _references),
    ("/v1/scmRepositories/{id}/pullRequests", PULL_LIST, _pull_requests),
)


def _context(sim: Simulator, request: web.Request, spec: QuerySpec) -> tuple[_Ctx, Renderer]:
    query = parse_query(request.query, list(request.query.keys()), spec)
    ctx = _Ctx(sim, request, query)
    renderer = Renderer(sim.scenario, str(request.url.origin()), sim.clock.time(), query.fields)
    return ctx, renderer


Handler = Callable[[web.Request], Awaitable[web.Response]]


def _one_handler(spec: QuerySpec, finder: Callable[[_Ctx], Entity]) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        ctx, renderer = _context(request.app[SIM_KEY], request, spec)
        entity = finder(ctx)
        body: dict[str, Any] = {
            "data": renderer.render(entity),
            "links": {"self": str(request.url)},
        }
        if ctx.query.include:
            body["included"] = renderer.included([entity], ctx.query.include)
        return json_response(body)

    return handle


def _many_handler(spec: QuerySpec, finder: Callable[[_Ctx], Sequence[Entity]]) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        ctx, renderer = _context(request.app[SIM_KEY], request, spec)
        page, links, meta = paginate(finder(ctx), ctx.query, request.url)
        body = {"data": [renderer.render(e) for e in page], "links": links, "meta": meta}
        if ctx.query.include:
            body["included"] = renderer.included(page, ctx.query.include)
        return json_response(body)

    return handle


# -- POST /v1/ciBuildRuns -------------------------------------------------------------------------

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
    fault = sim.faults.take(request.method, request.path, after_create=True)
    if fault is not None:
        if fault.action is FaultAction.DROP_AFTER_CREATE:
            raise _DropConnection(str(fault.action))
        failed = error_response(fault.error())
        failed.fault = str(fault.action)
        return failed
    renderer = Renderer(sim.scenario, str(request.url.origin()), sim.clock.time(), {})
    self_url = f"{request.url.origin()}/v1/ciBuildRuns/{run.id}"
    return json_response(
        {"data": renderer.render(run), "links": {"self": self_url}},
        201,
        {"Location": self_url},
    )


# -- middleware -----------------------------------------------------------------------------------


def _parsed_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


@web.middleware
async def api_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path.startswith("/_sim/"):
        return await handler(request)
    sim = request.app[SIM_KEY]
    request_json = _parsed_json(await request.read()) if request.can_read_body else None
    key_id: str | None = None
    fault_name: str | None = None
    rate: RateDecision | None = None
    response: web.StreamResponse
    try:
        key = sim.verifier.verify(
            request.headers.get("Authorization"),
            request.method,
            request.path,
            request.query_string,
            sim.clock.time(),
        )
        key_id = key.key_id
        rate = sim.rate_limiter.check(key_id)
        if not rate.allowed:
            raise ApiError(
                429,
                "RATE_LIMIT_EXCEEDED",
                "The request rate limit has been reached.",
                "We've received too many requests for this API. Please wait and try again or "
                "slow down your request rate.",
                headers={"Retry-After": str(rate.retry_after_s)},
            )
        fault = sim.faults.take(request.method, request.path, after_create=False)
        if fault is not None:
            fault_name = str(fault.action)
            response = _fault_response(fault)
        else:
            response = await handler(request)
    except ApiError as error:
        response = error_response(error)
    except web.HTTPNotFound:
        response = error_response(path_error(request.path))
    except web.HTTPMethodNotAllowed:
        response = error_response(method_not_allowed(request.method, request.path))
    except _DropConnection as drop:
        _record(
            sim,
            request=request,
            request_json=request_json,
            status=None,
            response_json=None,
            key_id=key_id,
            fault=drop.fault,
        )
        # Closing first makes aiohttp's write fail quietly; the client sees a disconnect.
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)
    if rate is not None:
        response.headers["X-Rate-Limit"] = rate.header()
    _record(
        sim,
        request=request,
        request_json=request_json,
        status=response.status,
        response_json=response.json_body if isinstance(response, JsonResponse) else None,
        key_id=key_id,
        fault=fault_name or (response.fault if isinstance(response, JsonResponse) else None),
    )
    return response


def _fault_response(fault: Fault) -> web.StreamResponse:
    if fault.action is FaultAction.DROP:
        raise _DropConnection(str(fault.action))
    if fault.body is not None and fault.action is FaultAction.STATUS:
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
        return web.Response(status=fault.status, text=fault.body, headers=headers)
    raise fault.error()


def _record(
    sim: Simulator,
    *,
    request: web.Request,
    request_json: Any,
    status: int | None,
    response_json: Any,
    key_id: str | None,
    fault: str | None,
) -> None:
    sim.traffic.append(
        TrafficEntry(
            seq=sim.traffic.next_seq(),
            time=sim.clock.time(),
            method=request.method,
            path=request.path,
            query=dict(request.query),
            request_json=request_json,
            status=status,
            response_json=response_json,
            key_id=key_id,
            fault=fault,
        )
    )


# -- /_sim admin API (no auth: a local test tool, deliberately outside /v1) -----------------------


def _admin_error(message: str, status: int = 400) -> web.Response:
    return json_response({"error": message}, status)


async def _admin_json(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(text="body must be JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


async def admin_runs(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    workflow_id = request.query.get("workflow_id")
    now = sim.clock.time()
    runs = sim.runs.of_workflow(workflow_id) if workflow_id else sim.runs.all()
    return json_response({"runs": [r.ground_truth(now) for r in runs]})


async def admin_start_run(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    body = await _admin_json(request)
    try:
        run = sim.start_run(
            str(body["workflow_id"]),
            body.get("git_reference_id"),
            start_reason=str(body.get("start_reason", "GIT_REF_CHANGE")),
            pull_request_id=body.get("pull_request_id"),
            outcome=body.get("outcome"),
        )
    except KeyError:
        return _admin_error("workflow_id is required")
    except ValueError as exc:
        return _admin_error(str(exc))
    except ApiError as error:
        return json_response(error.body(), error.status)
    return json_response({"run": run.ground_truth(sim.clock.time())}, 201)


async def admin_faults(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    if request.method == "POST":
        try:
            fault = sim.faults.add(Fault.from_dict(await _admin_json(request)))
        except (TypeError, ValueError) as exc:
            return _admin_error(f"bad fault rule: {exc}")
        return json_response({"fault": fault.as_dict()}, 201)
    if request.method == "DELETE":
        sim.faults.clear()
    return json_response(
        {"faults": [dict(f.as_dict(), remaining=left) for f, left in sim.faults.active()]}
    )


async def admin_traffic(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    try:
        since = int(request.query.get("since", "0"))
    except ValueError:
        return _admin_error("since must be an integer")
    return json_response({"traffic": [e.as_dict() for e in sim.traffic.since(since)]})


async def admin_info(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    # Public facts only: never the private key.
    return json_response(
        {
            "base_url": str(request.url.origin()),
            "keys": [{"key_id": k.key_id, "issuer_id": k.issuer_id} for k in sim.keys.values()],
            "rate_limit": sim.rate_limiter.limit,
            "now": sim.clock.time(),
        }
    )


def build_app(sim: Simulator) -> web.Application:
    app = web.Application(middlewares=[api_middleware])
    app[SIM_KEY] = sim
    for path, spec, one in GET_ONE:
        app.router.add_get(path, _one_handler(spec, one), allow_head=False)
    for path, spec, many in GET_MANY:
        app.router.add_get(path, _many_handler(spec, many), allow_head=False)
    app.router.add_post("/v1/ciBuildRuns", create_build_run)
    app.router.add_get("/_sim/info", admin_info)
    app.router.add_get("/_sim/runs", admin_runs)
    app.router.add_post("/_sim/runs", admin_start_run)
    app.router.add_route("*", "/_sim/faults", admin_faults)
    app.router.add_get("/_sim/traffic", admin_traffic)
    return app
