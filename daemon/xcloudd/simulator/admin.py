"""The /_sim admin API: ground truth, fault rules, traffic and builds behind the client's back.

No auth: it is a local test tool, and deliberately outside /v1 so nobody takes it for Apple's.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from xcloudd.simulator.answers import SIM_KEY, json_response
from xcloudd.simulator.apierror import ApiError
from xcloudd.simulator.faults import Fault
from xcloudd.simulator.webhooks import WebhookSettings


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


async def admin_seed(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    seed = (await _admin_json(request)).get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        return _admin_error("seed must be an integer")
    sim.reseed(seed)
    return json_response({"seed": sim.seed})


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
            "seed": sim.seed,
            # Which workflow gives which outcome (in turn, when it lists several).
            "workflows": [
                {
                    "id": w.id,
                    "product": p.name,
                    "name": w.name,
                    "enabled": w.is_enabled,
                    "outcomes": list(w.behaviour.outcomes),
                    "description": w.description,
                }
                for p in sim.scenario.products
                for w in p.workflows
            ],
        }
    )


async def admin_webhooks(request: web.Request) -> web.Response:
    """POST starts sending webhooks (records cleared), DELETE stops; all answer the report."""
    sim = request.app[SIM_KEY]
    if request.method == "POST":
        try:
            settings = WebhookSettings.from_dict(await _admin_json(request), sim.seed)
        except ValueError as exc:
            return _admin_error(f"bad webhook settings: {exc}")
        await sim.webhooks.configure(settings)
        return json_response({"webhooks": sim.webhooks.report()}, 201)
    if request.method == "DELETE":
        await sim.webhooks.stop()
    elif request.method != "GET":
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST", "DELETE"])
    return json_response({"webhooks": sim.webhooks.report()})


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/_sim/info", admin_info)
    app.router.add_get("/_sim/runs", admin_runs)
    app.router.add_post("/_sim/runs", admin_start_run)
    app.router.add_route("*", "/_sim/faults", admin_faults)
    app.router.add_post("/_sim/seed", admin_seed)
    app.router.add_get("/_sim/traffic", admin_traffic)
    app.router.add_route("*", "/_sim/webhooks", admin_webhooks)
