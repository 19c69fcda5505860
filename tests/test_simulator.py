"""The App Store Connect simulator, seen from a real HTTP client.

Every test runs against a simulator on a local port with a fake clock; the `sim` fixture checks
all traffic against Apple's OpenAPI description when the test ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import stat
import tomllib
import tracemalloc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import asc_schema
from conftest import MakeToken
from xcloudd.clock import FakeClock
from xcloudd.errors import ConfigError
from xcloudd.simulator import (
    Fault,
    FaultAction,
    MalformedVariant,
    RunningSimulator,
    Simulator,
    generate_key,
    load_scenario,
    mint_token,
    running_simulator,
    scenario_from_dict,
    serve,
)


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any

    @property
    def error(self) -> dict[str, Any]:
        first: dict[str, Any] = self.body["errors"][0]
        return first


@dataclass
class Api:
    session: aiohttp.ClientSession
    url: str
    make_token: MakeToken

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        params: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Reply:
        headers = kwargs.pop("headers", {})
        headers.setdefault("Authorization", f"Bearer {token or self.make_token()}")
        url = path if path.startswith("http") else self.url + path
        async with self.session.request(
            method, url, params=params, headers=headers, **kwargs
        ) as resp:
            text = await resp.text()
            body = await resp.json(content_type=None) if text.startswith(("{", "[")) else text
            return Reply(resp.status, body, resp.headers)

    async def get(self, path: str, **kwargs: Any) -> Reply:
        return await self.call("GET", path, **kwargs)

    async def start(self, workflow_id: str, **relationships: str) -> Reply:
        types = {
            "sourceBranchOrTag": "scmGitReferences",
            "pullRequest": "scmPullRequests",
            "buildRun": "ciBuildRuns",
        }
        rels: dict[str, Any] = {"workflow": {"data": {"type": "ciWorkflows", "id": workflow_id}}}
        for name, rid in relationships.items():
            rels[name] = {"data": {"type": types[name], "id": rid}}
        body = {"data": {"type": "ciBuildRuns", "relationships": rels}}
        return await self.call("POST", "/v1/ciBuildRuns", json=body)


@pytest.fixture
async def api(sim: RunningSimulator, make_token: MakeToken) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, sim.url, make_token)


def wf_id(sim: RunningSimulator, name: str) -> str:
    return sim.sim.scenario.workflow_named(name).id


def ref_id(sim: RunningSimulator, workflow: str, name: str, kind: str = "BRANCH") -> str:
    wf = sim.sim.scenario.workflow_named(workflow)
    return sim.sim.scenario.reference_named(wf.repository_id, name, kind).id


# -- the world --------------------------------------------------------------------------------


async def test_products_workflows_and_repository_as_a_client_discovers_them(
    api: Api, sim: RunningSimulator
) -> None:
    products = await api.get("/v1/ciProducts", params={"limit": "50"})
    assert products.status == 200
    names = {p["attributes"]["name"]: p for p in products.body["data"]}
    assert set(names) == {"Acme Shop", "Acme Kit"}
    assert products.body["meta"]["paging"] == {"total": 2, "limit": 50}

    frameworks = await api.get("/v1/ciProducts", params={"filter[productType]": "FRAMEWORK"})
    assert [p["attributes"]["name"] for p in frameworks.body["data"]] == ["Acme Kit"]

    shop = names["Acme Shop"]["id"]
    workflows = await api.get(f"/v1/ciProducts/{shop}/workflows", params={"limit": "50"})
    by_name = {w["attributes"]["name"]: w for w in workflows.body["data"]}
    assert by_name["Legacy"]["attributes"]["isEnabled"] is False
    assert by_name["CI"]["attributes"]["isEnabled"] is True

    one = await api.get(f"/v1/ciWorkflows/{by_name['CI']['id']}")
    assert one.body["data"]["attributes"]["name"] == "CI"
    repo = await api.get(f"/v1/ciWorkflows/{by_name['CI']['id']}/repository")
    attributes = repo.body["data"]["attributes"]
    assert (attributes["ownerName"], attributes["repositoryName"]) == ("acme", "shop-ios")

    pulls = await api.get(f"/v1/scmRepositories/{repo.body['data']['id']}/pullRequests")
    open_prs = [p for p in pulls.body["data"] if not p["attributes"]["isClosed"]]
    assert open_prs
    assert open_prs[0]["attributes"]["number"] == 42
    pr = await api.get(f"/v1/scmPullRequests/{open_prs[0]['id']}", params={"include": "repository"})
    assert pr.body["included"][0]["type"] == "scmRepositories"
    repos = await api.get("/v1/scmRepositories")
    assert len(repos.body["data"]) == 2


async def test_ids_are_stable_across_simulators(sim: RunningSimulator) -> None:
    async with running_simulator() as other:
        assert other.sim.scenario.workflow_named("CI").id == wf_id(sim, "CI")


async def test_git_references_span_pages_and_next_link_finds_late_branch(
    api: Api, sim: RunningSimulator
) -> None:
    repo_id = sim.sim.scenario.workflow_named("CI").repository_id
    url: str | None = f"{sim.url}/v1/scmRepositories/{repo_id}/gitReferences?limit=200"
    pages: list[list[dict[str, Any]]] = []
    while url:
        page = await api.get(url)
        assert page.status == 200
        pages.append(page.body["data"])
        url = page.body["links"].get("next")
    assert len(pages) == 2
    assert len(pages[0]) == 200
    first_names = {r["attributes"]["name"] for r in pages[0]}
    assert "release/2026.12" not in first_names
    refs = {r["attributes"]["name"]: r["attributes"] for page in pages for r in page}
    assert refs["release/2026.12"]["canonicalName"] == "refs/heads/release/2026.12"
    assert refs["v1.2.0"] == {
        "name": "v1.2.0",
        "canonicalName": "refs/tags/v1.2.0",
        "isDeleted": False,
        "kind": "TAG",
    }
    assert refs["main"]["kind"] == "BRANCH"
    assert any(r["isDeleted"] for r in refs.values())


async def test_list_parameters_are_checked_like_apple(api: Api, sim: RunningSimulator) -> None:
    repo_id = sim.sim.scenario.workflow_named("CI").repository_id
    too_big = await api.get(f"/v1/scmRepositories/{repo_id}/gitReferences", params={"limit": "201"})
    assert too_big.status == 400
    assert too_big.error["code"] == "PARAMETER_ERROR.INVALID"
    assert too_big.error["source"] == {"parameter": "limit"}

    unknown = await api.get("/v1/ciProducts", params={"bogus": "1"})
    assert unknown.status == 400
    assert unknown.error["code"] == "PARAMETER_ERROR.ILLEGAL"

    missing = await api.get("/v1/ciBuildRuns/does-not-exist")
    assert (missing.status, missing.error["code"]) == (404, "NOT_FOUND")
    nowhere = await api.get("/v1/ciNothing")
    assert (nowhere.status, nowhere.error["code"]) == (404, "PATH_ERROR")


# -- build runs -------------------------------------------------------------------------------


async def test_build_run_goes_pending_running_complete_with_the_clock(
    api: Api, sim: RunningSimulator, fake_clock: FakeClock
) -> None:
    started = await api.start(wf_id(sim, "CI"), sourceBranchOrTag=ref_id(sim, "CI", "main"))
    assert started.status == 201
    run = started.body["data"]
    assert run["attributes"]["executionProgress"] == "PENDING"
    assert run["attributes"]["startReason"] == "MANUAL"
    assert run["attributes"]["number"] == 1
    assert run["attributes"]["sourceCommit"]["commitSha"]
    assert run["relationships"]["sourceBranchOrTag"]["data"]["id"] == ref_id(sim, "CI", "main")

    fake_clock.advance(1.5)
    running = (await api.get(f"/v1/ciBuildRuns/{run['id']}")).body["data"]["attributes"]
    assert running["executionProgress"] == "RUNNING"
    assert running["startedDate"] is not None
    assert running["finishedDate"] is None
    actions = await api.get(f"/v1/ciBuildRuns/{run['id']}/actions")
    assert [a["attributes"]["actionType"] for a in actions.body["data"]] == ["BUILD", "TEST"]
    assert actions.body["data"][0]["attributes"]["executionProgress"] == "RUNNING"

    fake_clock.advance(5)
    done = (await api.get(f"/v1/ciBuildRuns/{run['id']}")).body["data"]["attributes"]
    assert done["executionProgress"] == "COMPLETE"
    assert done["completionStatus"] == "SUCCEEDED"
    assert done["finishedDate"] > done["startedDate"] > done["createdDate"]
    assert done["issueCounts"]["errors"] == 0
    actions = await api.get(f"/v1/ciBuildRuns/{run['id']}/actions")
    assert {a["attributes"]["completionStatus"] for a in actions.body["data"]} == {"SUCCEEDED"}


@pytest.mark.parametrize(
    ("workflow", "status"),
    [
        ("CI", "SUCCEEDED"),
        ("UI Tests", "FAILED"),
        ("Archive", "ERRORED"),
        ("Superseded", "CANCELED"),
        ("Docs Only", "SKIPPED"),
    ],
)
async def test_each_workflow_ends_with_its_outcome(
    api: Api, sim: RunningSimulator, fake_clock: FakeClock, workflow: str, status: str
) -> None:
    run = (await api.start(wf_id(sim, workflow))).body["data"]
    fake_clock.advance(60)
    done = (await api.get(f"/v1/ciBuildRuns/{run['id']}")).body["data"]["attributes"]
    assert done["executionProgress"] == "COMPLETE"
    assert done["completionStatus"] == status
    assert (done["cancelReason"] is not None) == (status == "CANCELED")
    assert (done["startedDate"] is None) == (status == "SKIPPED")
    assert (done["issueCounts"]["errors"] > 0) == (status in ("FAILED", "ERRORED"))


async def test_outcomes_are_used_in_turn(
    api: Api, sim: RunningSimulator, fake_clock: FakeClock
) -> None:
    ids = [(await api.start(wf_id(sim, "Nightly"))).body["data"]["id"] for _ in range(3)]
    fake_clock.advance(60)
    statuses = [
        (await api.get(f"/v1/ciBuildRuns/{i}")).body["data"]["attributes"]["completionStatus"]
        for i in ids
    ]
    assert statuses == ["SUCCEEDED", "FAILED", "SUCCEEDED"]


async def test_build_run_lists_sort_and_paginate(api: Api, sim: RunningSimulator) -> None:
    ci = wf_id(sim, "CI")
    for _ in range(3):
        await api.start(ci)
    await api.start(wf_id(sim, "Nightly"))  # numbers are per product: this one is #4

    oldest_first = await api.get(f"/v1/ciWorkflows/{ci}/buildRuns")
    assert [r["attributes"]["number"] for r in oldest_first.body["data"]] == [1, 2, 3]
    newest = await api.get(
        f"/v1/ciWorkflows/{ci}/buildRuns", params={"sort": "-number", "limit": "2"}
    )
    assert [r["attributes"]["number"] for r in newest.body["data"]] == [3, 2]
    assert newest.body["meta"]["paging"]["total"] == 3
    rest = await api.get(newest.body["links"]["next"])
    assert [r["attributes"]["number"] for r in rest.body["data"]] == [1]
    assert "next" not in rest.body["links"]

    product = sim.sim.scenario.workflow_named("CI").product_id
    all_runs = await api.get(f"/v1/ciProducts/{product}/buildRuns", params={"sort": "-number"})
    assert [r["attributes"]["number"] for r in all_runs.body["data"]] == [4, 3, 2, 1]
    bad_sort = await api.get(f"/v1/ciWorkflows/{ci}/buildRuns", params={"sort": "createdDate"})
    assert bad_sort.status == 400


async def test_sparse_fieldsets_and_include(api: Api, sim: RunningSimulator) -> None:
    run = (await api.start(wf_id(sim, "CI"))).body["data"]
    sparse = await api.get(
        f"/v1/ciBuildRuns/{run['id']}",
        params={"fields[ciBuildRuns]": "executionProgress,completionStatus"},
    )
    assert sparse.status == 200
    assert sparse.body["data"]["attributes"] == {
        "executionProgress": "PENDING",
        "completionStatus": None,
    }
    assert "relationships" not in sparse.body["data"]

    bad = await api.get(
        f"/v1/ciBuildRuns/{run['id']}", params={"fields[ciBuildRuns]": "executionProgress,color"}
    )
    assert bad.status == 400
    assert bad.error["code"] == "PARAMETER_ERROR.INVALID"
    assert bad.error["source"] == {"parameter": "fields[ciBuildRuns]"}

    included = await api.get(
        f"/v1/ciBuildRuns/{run['id']}", params={"include": "sourceBranchOrTag,workflow"}
    )
    kinds = {(i["type"], i["attributes"].get("name")) for i in included.body["included"]}
    assert kinds == {("scmGitReferences", "main"), ("ciWorkflows", "CI")}


async def test_pull_request_build_and_rebuild(api: Api, sim: RunningSimulator) -> None:
    scenario = sim.sim.scenario
    repo = scenario.repository(scenario.workflow_named("CI").repository_id)
    assert repo is not None
    pr = next(p for p in repo.pull_requests if not p.is_closed)
    built = await api.start(wf_id(sim, "CI"), pullRequest=pr.id)
    assert built.status == 201
    attributes = built.body["data"]["attributes"]
    assert attributes["isPullRequestBuild"] is True
    assert attributes["destinationCommit"] is not None
    assert built.body["data"]["relationships"]["pullRequest"]["data"]["id"] == pr.id

    again = await api.start(wf_id(sim, "CI"), buildRun=built.body["data"]["id"])
    assert again.status == 201
    assert again.body["data"]["attributes"]["startReason"] == "MANUAL_REBUILD"
    assert again.body["data"]["relationships"]["pullRequest"]["data"]["id"] == pr.id


async def test_builds_started_behind_the_clients_back_show_up(
    api: Api, sim: RunningSimulator
) -> None:
    async with api.session.post(
        f"{sim.url}/_sim/runs",
        json={"workflow_id": wf_id(sim, "CI"), "start_reason": "GIT_REF_CHANGE"},
    ) as resp:
        assert resp.status == 201
        run_id = (await resp.json())["run"]["id"]
    sim.sim.start_run(wf_id(sim, "CI"), start_reason="SCHEDULE")
    runs = await api.get(
        f"/v1/ciWorkflows/{wf_id(sim, 'CI')}/buildRuns", params={"sort": "-number"}
    )
    reasons = [(r["id"], r["attributes"]["startReason"]) for r in runs.body["data"]]
    assert reasons[1] == (run_id, "GIT_REF_CHANGE")
    assert reasons[0][1] == "SCHEDULE"
    async with api.session.get(f"{sim.url}/_sim/runs") as resp:
        assert len((await resp.json())["runs"]) == 2


# -- POST validation --------------------------------------------------------------------------


async def test_disabled_workflow_is_refused_with_a_pointer(api: Api, sim: RunningSimulator) -> None:
    refused = await api.start(wf_id(sim, "Legacy"))
    assert refused.status == 409
    assert refused.error["status"] == "409"
    assert refused.error["code"].startswith("ENTITY_ERROR")
    assert "disabled" in refused.error["detail"]
    assert "Legacy" in refused.error["detail"]
    assert refused.error["source"] == {"pointer": "/data/relationships/workflow"}
    assert len(sim.sim.runs) == 0


async def test_bad_references_are_refused(api: Api, sim: RunningSimulator) -> None:
    ci = wf_id(sim, "CI")
    shop_repo = sim.sim.scenario.workflow_named("CI").repository_id
    deleted = next(r for r in sim.sim.scenario.repositories()[0].references if r.is_deleted)
    foreign = ref_id(sim, "Kit CI", "main")
    cases = {
        deleted.id: "deleted",
        foreign: "another repository",
        "no-such-ref": "no-such-ref",
    }
    for reference, words in cases.items():
        refused = await api.start(ci, sourceBranchOrTag=reference)
        assert refused.status == 409, reference
        assert refused.error["code"] == "ENTITY_ERROR.RELATIONSHIP.INVALID"
        assert refused.error["source"] == {"pointer": "/data/relationships/sourceBranchOrTag"}
        assert words in refused.error["detail"]
    unknown_wf = await api.start("no-such-workflow")
    assert unknown_wf.error["source"] == {"pointer": "/data/relationships/workflow"}
    repo = sim.sim.scenario.repository(shop_repo)
    assert repo is not None
    closed = next(p for p in repo.pull_requests if p.is_closed)
    refused_pr = await api.start(ci, pullRequest=closed.id)
    assert refused_pr.error["source"] == {"pointer": "/data/relationships/pullRequest"}
    assert len(sim.sim.runs) == 0


async def test_malformed_create_requests(api: Api, sim: RunningSimulator) -> None:
    no_workflow = await api.call(
        "POST", "/v1/ciBuildRuns", json={"data": {"type": "ciBuildRuns", "relationships": {}}}
    )
    assert no_workflow.status == 409
    assert no_workflow.error["code"] == "ENTITY_ERROR.RELATIONSHIP.REQUIRED"
    assert no_workflow.error["source"] == {"pointer": "/data/relationships/workflow"}

    wrong_type = await api.call("POST", "/v1/ciBuildRuns", json={"data": {"type": "ciWorkflows"}})
    assert (wrong_type.status, wrong_type.error["source"]) == (409, {"pointer": "/data/type"})

    not_json = await api.call(
        "POST",
        "/v1/ciBuildRuns",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert not_json.status == 400

    wrong_media = await api.call(
        "POST", "/v1/ciBuildRuns", data=b"{}", headers={"Content-Type": "text/plain"}
    )
    assert wrong_media.status == 415
    assert wrong_media.error["status"] == "415"
    assert len(sim.sim.runs) == 0


# -- authentication ---------------------------------------------------------------------------


async def test_token_rejections(
    api: Api, sim: RunningSimulator, make_token: MakeToken, fake_clock: FakeClock
) -> None:
    other = generate_key()
    now = fake_clock.time()
    bad_tokens = {
        "unknown kid": mint_token(other, now),
        "bad signature": make_token(signing_key=other.private_key_pem),
        "lifetime": make_token(lifetime_s=21 * 60),
        "no iat, too far": make_token(lifetime_s=21 * 60, with_iat=False),
        "aud": make_token(audience="appstoreconnect-v2"),
        "iss": make_token(extra_claims={"iss": "00000000-0000-0000-0000-000000000000"}),
        "iat future": make_token(extra_claims={"iat": int(now) + 300}),
        "typ": make_token(headers={"typ": "JWS"}),
        "scope": make_token(scope=["GET /v1/ciProducts/abc"]),
    }
    for what, token in bad_tokens.items():
        reply = await api.get("/v1/ciProducts", token=token)
        assert reply.status == 401, what
        assert reply.error["code"] == "NOT_AUTHORIZED"
        assert "X-Rate-Limit" not in reply.headers
        assert token not in str(reply.body)
    no_header = await api.get("/v1/ciProducts", headers={"Authorization": ""})
    assert no_header.status == 401


async def test_token_expires_on_the_fake_clock(
    api: Api, make_token: MakeToken, fake_clock: FakeClock
) -> None:
    token = make_token()  # 15 minutes
    assert (await api.get("/v1/ciProducts", token=token)).status == 200
    fake_clock.advance(15 * 60 + 1)
    expired = await api.get("/v1/ciProducts", token=token)
    assert expired.status == 401
    assert expired.error["meta"]["reason"] == "the token has expired"


async def test_tokens_apple_accepts(api: Api, sim: RunningSimulator, make_token: MakeToken) -> None:
    individual = sim.sim.add_key(individual=True)
    accepted = {
        "no iat (xcshot)": make_token(with_iat=False),
        "20 minutes": make_token(lifetime_s=20 * 60),
        "individual key": make_token(individual),
        "matching scope": make_token(scope=["GET /v1/ciProducts?filter[productType]=APP"]),
        "long-lived GET scope": make_token(
            lifetime_s=7 * 24 * 3600, scope=["GET /v1/ciProducts?filter[productType]=APP"]
        ),
    }
    for what, token in accepted.items():
        reply = await api.get(
            "/v1/ciProducts", token=token, params={"filter[productType]": "APP", "limit": "5"}
        )
        assert reply.status == 200, what
    with_iss = make_token(individual, extra_claims={"iss": "x"})
    assert (await api.get("/v1/ciProducts", token=with_iss)).status == 401


# -- rate limit -------------------------------------------------------------------------------


async def test_rate_limit_header_counts_down_and_429_past_the_limit(
    api: Api, sim: RunningSimulator, fake_clock: FakeClock
) -> None:
    sim.sim.rate_limiter.limit = 3
    first = await api.get("/v1/ciProducts")
    assert first.headers["X-Rate-Limit"] == "user-hour-lim:3;user-hour-rem:2;"
    missing = await api.get("/v1/ciProducts/nope")
    assert missing.status == 404
    assert missing.headers["X-Rate-Limit"] == "user-hour-lim:3;user-hour-rem:1;"
    await api.get("/v1/ciProducts")
    refused = await api.get("/v1/ciProducts")
    assert refused.status == 429
    assert refused.error["code"] == "RATE_LIMIT_EXCEEDED"
    assert refused.headers["X-Rate-Limit"] == "user-hour-lim:3;user-hour-rem:0;"
    assert 0 < int(refused.headers["Retry-After"]) <= 3600
    fake_clock.advance(3601)  # the rolling hour forgets old requests
    assert (await api.get("/v1/ciProducts")).status == 200


async def test_default_rate_limit_is_apples_3600(api: Api) -> None:
    reply = await api.get("/v1/ciProducts")
    assert reply.headers["X-Rate-Limit"] == "user-hour-lim:3600;user-hour-rem:3599;"


# -- faults -----------------------------------------------------------------------------------


async def test_status_faults_then_recovery(api: Api, sim: RunningSimulator) -> None:
    sim.sim.faults.add(Fault(method="GET", path="/v1/ciProducts", times=2, status=503))
    sim.sim.faults.add(Fault(path="/v1/ciProducts/.*", status=429, retry_after=7))
    for _ in range(2):
        failed = await api.get("/v1/ciProducts")
        assert failed.status == 503
        assert "X-Rate-Limit" in failed.headers
    assert (await api.get("/v1/ciProducts")).status == 200
    throttled = await api.get("/v1/ciProducts/x")
    assert (throttled.status, throttled.headers["Retry-After"]) == (429, "7")
    assert throttled.error["code"] == "RATE_LIMIT_EXCEEDED"

    sim.sim.faults.add(Fault(status=502, body="<html>Bad Gateway</html>"))
    plain = await api.get("/v1/ciProducts")
    assert (plain.status, plain.body) == (502, "<html>Bad Gateway</html>")


async def test_drop_and_expire_token_faults(api: Api, sim: RunningSimulator) -> None:
    # aiohttp replays an idempotent request once after a disconnect: drop both attempts.
    sim.sim.faults.add(Fault(action=FaultAction.DROP, times=2))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await api.get("/v1/ciProducts")
    sim.sim.faults.add(Fault(action=FaultAction.EXPIRE_TOKEN))
    expired = await api.get("/v1/ciProducts")
    assert (expired.status, expired.error["code"]) == (401, "NOT_AUTHORIZED")
    assert (await api.get("/v1/ciProducts")).status == 200
    assert [e.fault for e in sim.sim.traffic.entries] == ["drop", "drop", "expire_token", None]
    assert sim.sim.traffic.entries[0].status is None


async def test_faults_after_create_leave_a_run_behind(api: Api, sim: RunningSimulator) -> None:
    async with api.session.post(
        f"{sim.url}/_sim/faults",
        json={"action": "drop_after_create", "method": "POST", "path": "/v1/ciBuildRuns"},
    ) as resp:
        assert resp.status == 201
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await api.start(wf_id(sim, "CI"))
    assert len(sim.sim.runs.of_workflow(wf_id(sim, "CI"))) == 1

    sim.sim.faults.add(Fault(action=FaultAction.ERROR_AFTER_CREATE))
    failed = await api.start(wf_id(sim, "CI"))
    assert (failed.status, failed.error["code"]) == (500, "UNEXPECTED_ERROR")
    # What a reconciling client does: the newest runs show both builds.
    newest = await api.get(
        f"/v1/ciWorkflows/{wf_id(sim, 'CI')}/buildRuns", params={"sort": "-number", "limit": "5"}
    )
    assert [r["attributes"]["startReason"] for r in newest.body["data"]] == ["MANUAL", "MANUAL"]


async def test_bad_fault_rules_are_refused(api: Api, sim: RunningSimulator) -> None:
    async with api.session.post(f"{sim.url}/_sim/faults", json={"action": "explode"}) as resp:
        assert resp.status == 400
    with pytest.raises(ValueError, match="times"):
        Fault(times=0)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"action": "malformed"}, "malformed needs variant, one of: unknown_enum"),
        ({"action": "malformed", "variant": "sideways"}, "(got 'sideways')"),
        ({"variant": "naive_date"}, "variant only applies to action malformed"),
        ({"action": "hang", "delay": -1}, "delay must be a number of seconds >= 0, got -1"),
        ({"action": "hang", "delay": "soon"}, "delay must be a number of seconds"),
        ({"delay": 5}, "delay only applies to actions hang and hang_after_create"),
        ({"then_drop": True}, "then_drop only applies to action hang"),
        ({"action": "oversize", "size": 10}, "size must be an integer >= 33 bytes, got 10"),
        ({"probability": 1.5}, "probability must be a number from 0 to 1, got 1.5"),
        ({"probability": -0.1}, "probability must be a number from 0 to 1"),
        ({"probability": True}, "probability must be a number from 0 to 1"),
        ({"path": "("}, "path is not a valid regular expression"),
        ({"times": True}, "times must be an integer >= 1"),
        ({"action": "explode"}, "action must be one of: status, drop,"),
        ({"speed": 1}, "unknown fault fields: speed"),
    ],
)
async def test_bad_fault_rules_get_one_line_errors(
    api: Api, sim: RunningSimulator, rule: dict[str, Any], message: str
) -> None:
    async with api.session.post(f"{sim.url}/_sim/faults", json=rule) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error.startswith("bad fault rule: ")
    assert message in error
    assert "\n" not in error
    assert not sim.sim.faults.active()


async def test_new_fault_fields_have_documented_defaults(api: Api, sim: RunningSimulator) -> None:
    added = []
    for rule in ({"action": "hang"}, {"action": "oversize"}, {"action": "hang_after_create"}):
        async with api.session.post(f"{sim.url}/_sim/faults", json=rule) as resp:
            assert resp.status == 201
            added.append((await resp.json())["fault"])
    assert [(f["delay"], f["then_drop"], f["size"]) for f in added] == [
        (60.0, False, None),
        (None, False, 100_000_000),
        (60.0, False, None),
    ]
    assert {f["probability"] for f in added} == {1.0}
    async with api.session.get(f"{sim.url}/_sim/faults") as resp:
        listed = (await resp.json())["faults"]
    # A listed rule, posted back, is the same rule.
    assert [Fault.from_dict({k: v for k, v in f.items() if k != "remaining"}) for f in listed] == [
        Fault.from_dict(f) for f in added
    ]
    async with api.session.delete(f"{sim.url}/_sim/faults") as resp:
        assert (await resp.json())["faults"] == []


# -- 401 / 403 on demand ----------------------------------------------------------------------


async def test_status_faults_401_and_403_are_apple_error_responses(
    api: Api, sim: RunningSimulator
) -> None:
    async with api.session.post(
        f"{sim.url}/_sim/faults", json={"method": "GET", "path": "/v1/ciProducts", "status": 401}
    ) as resp:
        assert resp.status == 201
    sim.sim.faults.add(Fault(method="POST", path="/v1/ciBuildRuns", status=403))
    unauthorized = await api.get("/v1/ciProducts")
    forbidden = await api.start(wf_id(sim, "CI"))
    assert (unauthorized.status, unauthorized.error["code"]) == (401, "NOT_AUTHORIZED")
    assert unauthorized.error["status"] == "401"
    assert "properly configured and signed bearer token" in unauthorized.error["detail"]
    assert (forbidden.status, forbidden.error["code"]) == (403, "FORBIDDEN_ERROR")
    assert forbidden.error["status"] == "403"
    assert forbidden.error["title"] == "This request is forbidden for security reasons"
    assert forbidden.error["detail"] == "The API key in use does not allow this request"
    assert len(sim.sim.runs) == 0  # refused before handling
    for reply in (unauthorized, forbidden):
        asc_schema.validate_error(reply.body)

    sim.sim.faults.add(Fault(status=403, code="FORBIDDEN.REQUIRED_AGREEMENTS_MISSING_OR_EXPIRED"))
    agreements = await api.get("/v1/ciProducts")
    assert agreements.error["code"] == "FORBIDDEN.REQUIRED_AGREEMENTS_MISSING_OR_EXPIRED"
    assert (await api.get("/v1/ciProducts")).status == 200
    assert [e.fault for e in sim.sim.traffic.entries] == ["status", "status", "status", None]


# -- outage of the run lists alone --------------------------------------------------------------


async def test_outage_of_run_lists_alone(api: Api, sim: RunningSimulator) -> None:
    ci = wf_id(sim, "CI")
    product = sim.sim.scenario.workflow_named("CI").product_id
    run_id = (await api.start(ci)).body["data"]["id"]
    async with api.session.post(
        f"{sim.url}/_sim/faults",
        json={"path": "/v1/ciWorkflows/[^/]+/buildRuns", "times": None, "status": 503},
    ) as resp:
        assert resp.status == 201
    sim.sim.faults.add(Fault(path="/v1/ciProducts/[^/]+/buildRuns", times=None, status=503))

    for _ in range(3):
        assert (await api.get(f"/v1/ciWorkflows/{ci}/buildRuns")).status == 503
        assert (await api.get(f"/v1/ciProducts/{product}/buildRuns")).status == 503
        # Everything else, including polling the run itself, still works.
        assert (await api.get(f"/v1/ciBuildRuns/{run_id}")).status == 200
    for path in (
        f"/v1/ciWorkflows/{ci}",
        f"/v1/ciProducts/{product}",
        f"/v1/ciProducts/{product}/workflows",
        f"/v1/ciBuildRuns/{run_id}/actions",
    ):
        assert (await api.get(path)).status == 200, path
    assert (await api.start(ci)).status == 201
    async with api.session.get(f"{sim.url}/_sim/faults") as resp:
        assert [f["remaining"] for f in (await resp.json())["faults"]] == [None, None]

    async with api.session.delete(f"{sim.url}/_sim/faults"):
        pass
    assert (await api.get(f"/v1/ciWorkflows/{ci}/buildRuns")).status == 200


# -- malformed ----------------------------------------------------------------------------------

NAIVE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}"


def _check_unknown_enum(one: Reply, many: Reply) -> None:
    for run in (one.body["data"], *many.body["data"]):
        attributes = run["attributes"]
        assert attributes["executionProgress"] == "QUEUED_FOR_REVIEW"
        assert attributes["completionStatus"] == "PARTIALLY_SUCCEEDED"
        assert attributes["startReason"] == "EXTERNAL_TRIGGER"
        assert attributes["number"] >= 1  # the rest is untouched


def _check_naive_date(one: Reply, many: Reply) -> None:
    for run in (one.body["data"], *many.body["data"]):
        attributes = run["attributes"]
        for name in ("createdDate", "startedDate", "finishedDate"):
            assert re.fullmatch(NAIVE, attributes[name]), (name, attributes[name])


def _check_bad_relationship(one: Reply, many: Reply) -> None:
    assert isinstance(one.body["data"]["relationships"], str)
    first, second, third = many.body["data"]
    assert isinstance(first["relationships"], str)
    assert isinstance(second["relationships"]["workflow"], list)
    assert isinstance(third["relationships"]["workflow"], int)


def _check_missing_optional(one: Reply, many: Reply) -> None:
    gone = {"number", "createdDate", "startedDate", "issueCounts", "sourceCommit", "startReason"}
    for run in (one.body["data"], *many.body["data"]):
        assert not gone & run["attributes"].keys()
        assert run["attributes"]["executionProgress"] == "COMPLETE"


def _check_not_object(one: Reply, many: Reply) -> None:
    assert isinstance(one.body["data"], str)
    assert many.body["data"] == 3


def _check_bad_json(one: Reply, many: Reply) -> None:
    for reply in (one, many):
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("application/json")
        assert isinstance(reply.body, str)
        with pytest.raises(json.JSONDecodeError):
            json.loads(reply.body)


@pytest.mark.parametrize(
    ("variant", "check"),
    [
        ("unknown_enum", _check_unknown_enum),
        ("naive_date", _check_naive_date),
        ("bad_relationship", _check_bad_relationship),
        ("missing_optional", _check_missing_optional),
        ("not_object", _check_not_object),
        ("bad_json", _check_bad_json),
    ],
)
async def test_malformed_answers(
    api: Api,
    sim: RunningSimulator,
    fake_clock: FakeClock,
    variant: str,
    check: Callable[[Reply, Reply], None],
) -> None:
    ci = wf_id(sim, "CI")
    run_ids = [(await api.start(ci)).body["data"]["id"] for _ in range(3)]
    fake_clock.advance(60)  # complete, so every date is set
    async with api.session.post(
        f"{sim.url}/_sim/faults", json={"action": "malformed", "variant": variant, "times": 2}
    ) as resp:
        assert resp.status == 201
    one = await api.get(f"/v1/ciBuildRuns/{run_ids[0]}")
    many = await api.get(f"/v1/ciWorkflows/{ci}/buildRuns")
    assert (one.status, many.status) == (200, 200)
    check(one, many)
    # The rule is used up; answers are Apple-shaped again.
    again = await api.get(f"/v1/ciBuildRuns/{run_ids[0]}")
    asc_schema.validate_response("GET", f"/v1/ciBuildRuns/{run_ids[0]}", 200, again.body)
    faulted = sim.sim.traffic.entries[-3:-1]
    assert [e.fault for e in faulted] == ["malformed", "malformed"]
    assert {e.fault_rule.variant for e in faulted if e.fault_rule} == {variant}
    if variant in ("unknown_enum", "bad_relationship", "not_object"):
        # Off-schema on purpose: the sim fixture's schema check lets these through. (Apple's
        # schema leaves attributes optional and dates unchecked: the others pass it.)
        with pytest.raises(AssertionError):
            asc_schema.validate_response("GET", f"/v1/ciWorkflows/{ci}/buildRuns", 200, many.body)


async def test_malformed_waits_for_a_2xx_and_rewrites_a_create(
    api: Api, sim: RunningSimulator
) -> None:
    sim.sim.faults.add(
        Fault(action=FaultAction.MALFORMED, variant=MalformedVariant.NOT_OBJECT, times=1)
    )
    assert (await api.get("/v1/ciBuildRuns/nope")).status == 404  # not used up by an error
    started = await api.start(wf_id(sim, "CI"))
    assert started.status == 201
    run = sim.sim.runs.all()[0]
    assert started.body["data"] == run.id  # created as usual, then the answer was rewritten
    assert started.headers["Location"].endswith(f"/v1/ciBuildRuns/{run.id}")
    assert isinstance((await api.get(f"/v1/ciBuildRuns/{run.id}")).body["data"], dict)


async def test_malformed_applies_to_other_resources_too(api: Api, sim: RunningSimulator) -> None:
    sim.sim.faults.add(Fault.from_dict({"action": "malformed", "variant": "unknown_enum"}))
    products = await api.get("/v1/ciProducts")
    assert {p["attributes"]["productType"] for p in products.body["data"]} == {"APP_CLIP"}
    sim.sim.faults.add(Fault(action=FaultAction.MALFORMED, variant=MalformedVariant.NAIVE_DATE))
    workflow = await api.get(f"/v1/ciWorkflows/{wf_id(sim, 'CI')}")
    assert re.fullmatch(NAIVE, workflow.body["data"]["attributes"]["lastModifiedDate"])


# -- hang ---------------------------------------------------------------------------------------


async def test_hang_waits_real_time_then_answers(api: Api, sim: RunningSimulator) -> None:
    async with api.session.post(
        f"{sim.url}/_sim/faults",
        json={"action": "hang", "method": "GET", "path": "/v1/ciProducts", "delay": 0.3},
    ) as resp:
        assert resp.status == 201
    loop = asyncio.get_running_loop()
    began = loop.time()
    reply = await api.get("/v1/ciProducts")
    assert loop.time() - began >= 0.3
    assert reply.status == 200
    assert len(reply.body["data"]) == 2
    entry = sim.sim.traffic.entries[-1]
    assert (entry.status, entry.fault) == (200, "hang")
    assert entry.fault_rule is not None
    assert entry.fault_rule.delay == 0.3


async def test_hang_then_drop(api: Api, sim: RunningSimulator) -> None:
    # aiohttp replays an idempotent request once after a disconnect: hang and drop both.
    sim.sim.faults.add(Fault(action=FaultAction.HANG, delay=0.15, then_drop=True, times=2))
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await api.get("/v1/ciProducts")
    assert loop.time() - began >= 0.3
    assert [(e.status, e.fault) for e in sim.sim.traffic.entries] == [(None, "hang")] * 2
    assert (await api.get("/v1/ciProducts")).status == 200


async def test_hang_outlasts_a_client_timeout(api: Api, sim: RunningSimulator) -> None:
    sim.sim.faults.add(Fault(action=FaultAction.HANG, method="GET"))  # 60 s by default
    with pytest.raises(TimeoutError):
        await api.get("/v1/ciProducts", timeout=aiohttp.ClientTimeout(total=0.3))
    assert sim.sim.faults.active() == ()  # used up, though the request is still hanging
    assert (await api.get("/v1/ciProducts")).status == 200


async def test_hang_still_does_the_work_when_the_client_gave_up(
    api: Api, sim: RunningSimulator
) -> None:
    sim.sim.faults.add(Fault(action=FaultAction.HANG, method="POST", delay=0.3))
    workflow = {"data": {"type": "ciWorkflows", "id": wf_id(sim, "CI")}}
    body = {"data": {"type": "ciBuildRuns", "relationships": {"workflow": workflow}}}
    with pytest.raises(TimeoutError):
        await api.call(
            "POST", "/v1/ciBuildRuns", json=body, timeout=aiohttp.ClientTimeout(total=0.1)
        )
    assert len(sim.sim.runs) == 0
    for _ in range(200):  # the hang ends 0.2 s later; this only bounds a failure
        if sim.sim.runs.all():
            break
        await asyncio.sleep(0.01)
    # Like a slow backend: the build the client timed out on starts anyway.
    assert len(sim.sim.runs) == 1
    entry = sim.sim.traffic.matching("POST", "/v1/ciBuildRuns")[0]
    assert (entry.status, entry.fault) == (201, "hang")


async def test_hang_after_create_creates_then_hangs_then_drops(
    api: Api, sim: RunningSimulator
) -> None:
    async with api.session.post(
        f"{sim.url}/_sim/faults",
        json={
            "action": "hang_after_create",
            "method": "POST",
            "path": "/v1/ciBuildRuns",
            "delay": 0.5,
        },
    ) as resp:
        assert resp.status == 201
    loop = asyncio.get_running_loop()
    began = loop.time()
    post = asyncio.create_task(api.start(wf_id(sim, "CI")))
    while not sim.sim.runs.all():
        assert not post.done()
        await asyncio.sleep(0.01)
    # The run exists while the client is still waiting for its answer.
    assert not post.done()
    listed = await api.get(f"/v1/ciWorkflows/{wf_id(sim, 'CI')}/buildRuns")
    assert [r["id"] for r in listed.body["data"]] == [sim.sim.runs.all()[0].id]
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post
    assert loop.time() - began >= 0.5
    post_entry = sim.sim.traffic.matching("POST", "/v1/ciBuildRuns")[0]
    assert (post_entry.status, post_entry.fault) == (None, "hang_after_create")


# -- oversize -----------------------------------------------------------------------------------


async def test_oversize_answers_valid_json_of_the_given_size(
    api: Api, sim: RunningSimulator, make_token: MakeToken
) -> None:
    sim.sim.faults.add(Fault(action=FaultAction.OVERSIZE, size=1000))
    headers = {"Authorization": f"Bearer {make_token()}"}
    async with api.session.get(f"{sim.url}/v1/ciProducts", headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert resp.content_length == 1000
        assert "X-Rate-Limit" in resp.headers
        raw = await resp.read()
    assert len(raw) == 1000
    body = json.loads(raw)
    assert body["data"] == []
    assert set(body["meta"]["padding"]) == {"x"}
    entry = sim.sim.traffic.entries[-1]
    assert (entry.status, entry.fault, entry.response_json) == (200, "oversize", None)


async def test_oversize_default_is_streamed_not_held_in_memory(
    api: Api, sim: RunningSimulator, make_token: MakeToken
) -> None:
    async with api.session.post(f"{sim.url}/_sim/faults", json={"action": "oversize"}) as resp:
        assert (await resp.json())["fault"]["size"] == 100_000_000
    headers = {"Authorization": f"Bearer {make_token()}"}
    received = 0
    tracemalloc.start()
    try:
        async with api.session.get(f"{sim.url}/v1/ciBuildRuns/x", headers=headers) as resp:
            assert resp.content_length == 100_000_000
            async for chunk in resp.content.iter_chunked(1 << 16):
                received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == 100_000_000
    # Server and client share this process; both together stay far below the body's size.
    assert peak < 10_000_000


async def test_oversize_client_may_hang_up_midway(
    api: Api, sim: RunningSimulator, make_token: MakeToken
) -> None:
    sim.sim.faults.add(Fault(action=FaultAction.OVERSIZE, size=50_000_000))
    headers = {"Authorization": f"Bearer {make_token()}"}
    async with api.session.get(f"{sim.url}/v1/ciProducts", headers=headers) as resp:
        first = await resp.content.read(1 << 16)
        assert first.startswith(b'{"data":[],"meta":{"padding":"xxx')
        resp.close()  # a client with a size limit gives up here
    assert (await api.get("/v1/ciProducts")).status == 200


# -- probability and seed -----------------------------------------------------------------------


def _expected_statuses(seed: int, probability: float, times: int, requests: int) -> list[int]:
    """What a rule with this probability does to consecutive requests, per the seeded draws."""
    rng = random.Random(seed)
    out = []
    for _ in range(requests):
        if times and rng.random() < probability:
            times -= 1
            out.append(503)
        else:
            out.append(200)
    return out


async def test_probability_is_seeded_and_reproducible(api: Api, sim: RunningSimulator) -> None:
    rule = {"path": "/v1/ciProducts", "status": 503, "times": 3, "probability": 0.5}
    runs = []
    for _ in range(2):
        async with api.session.post(f"{sim.url}/_sim/seed", json={"seed": 7}) as resp:
            assert (await resp.json()) == {"seed": 7}
        async with api.session.post(f"{sim.url}/_sim/faults", json=rule) as resp:
            assert resp.status == 201
        runs.append([(await api.get("/v1/ciProducts")).status for _ in range(16)])
    assert runs[0] == runs[1] == _expected_statuses(7, 0.5, 3, 16)
    # Requests the rule let through did not use up its times: exactly 3 were hit.
    assert runs[0].count(503) == 3
    assert 200 in runs[0][: runs[0].index(503) + 3]  # and some were let through in between
    async with api.session.get(f"{sim.url}/_sim/info") as resp:
        assert (await resp.json())["seed"] == 7


async def test_probability_zero_passes_to_later_rules(api: Api, sim: RunningSimulator) -> None:
    sim.sim.faults.add(Fault(status=503, times=None, probability=0.0))
    sim.sim.faults.add(Fault(status=429, retry_after=1, times=1))
    assert (await api.get("/v1/ciProducts")).status == 429
    for _ in range(5):
        assert (await api.get("/v1/ciProducts")).status == 200
    assert [left for _, left in sim.sim.faults.active()] == [None]


async def test_seed_comes_from_the_scenario_or_the_simulator(fake_clock: FakeClock) -> None:
    data = {
        "seed": 11,
        "products": [
            {
                "name": "P",
                "repository": {"owner": "o", "name": "r"},
                "workflows": [{"name": "W"}],
            }
        ],
    }
    scenario = scenario_from_dict(data)
    assert Simulator(scenario, fake_clock).seed == 11
    assert Simulator(scenario, fake_clock, seed=3).seed == 3
    async with running_simulator(clock=fake_clock, seed=5) as running:
        assert running.sim.seed == 5
        assert running.sim.random.random() == random.Random(5).random()


def test_schema_check_catches_what_apple_would_not_send() -> None:
    good = {
        "data": {"type": "ciBuildRuns", "id": "x", "attributes": {"startedDate": None}},
        "links": {"self": "http://127.0.0.1/v1/ciBuildRuns/x"},
    }
    asc_schema.validate_response("GET", "/v1/ciBuildRuns/x", 200, good)
    bad = {"data": {"type": "ciBuildRuns", "id": "x", "attributes": {"startReason": "PUSH"}}}
    with pytest.raises(AssertionError, match="startReason"):
        asc_schema.validate_response(
            "GET", "/v1/ciBuildRuns/x", 200, bad | {"links": {"self": "/"}}
        )
    with pytest.raises(AssertionError, match="status"):
        asc_schema.validate_error(
            {"errors": [{"status": 409, "code": "X", "title": "t", "detail": "d"}]}
        )
    with pytest.raises(asc_schema.UndocumentedResponse):
        asc_schema.validate_response("POST", "/v1/ciBuildRuns", 415, {})


# -- keys, config files, scenarios, serve -----------------------------------------------------


async def test_write_client_files_gives_a_working_config(
    api: Api, sim: RunningSimulator, tmp_path: Path
) -> None:
    config_path = sim.write_client_files(tmp_path / "client")
    config = tomllib.loads(config_path.read_text())["api"]
    key = sim.sim.primary_key
    assert config == {
        "issuer_id": key.issuer_id,
        "key_id": key.key_id,
        "private_key": config["private_key"],
        "base_url": sim.url,
    }
    key_file = Path(config["private_key"])
    assert key_file.name == f"AuthKey_{key.key_id}.p8"
    private = _load_p8(key_file)
    assert len(key.key_id) == 10
    assert key.key_id.isalnum()
    assert key.key_id.upper() == key.key_id
    # The files are all a client needs: a token made from them is accepted.
    reply = await api.get(
        "/v1/ciProducts",
        token=jwt.encode(
            {
                "iss": config["issuer_id"],
                "aud": "appstoreconnect-v1",
                "exp": int(api_now(sim)) + 600,
            },
            private,
            algorithm="ES256",
            headers={"kid": config["key_id"]},
        ),
    )
    assert reply.status == 200


def api_now(sim: RunningSimulator) -> float:
    return sim.sim.clock.time()


def _load_p8(path: Path) -> ec.EllipticCurvePrivateKey:
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pem = path.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, like Apple's .p8
    private = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp256r1"
    return private


async def test_state_dir_keeps_the_key_across_restarts(tmp_path: Path) -> None:
    async with running_simulator(state_dir=tmp_path) as first:
        key_id = first.sim.primary_key.key_id
    async with running_simulator(state_dir=tmp_path) as second:
        assert second.sim.primary_key.key_id == key_id
    assert stat.S_IMODE(os.stat(tmp_path / "simulator-key.json").st_mode) == 0o600


async def test_damaged_key_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "simulator-key.json").write_text('{"key_id": "X"}')
    with pytest.raises(ConfigError, match=r"simulator-key\.json"):
        async with running_simulator(state_dir=tmp_path):
            pass


async def test_admin_traffic_log_shows_requests_and_answers(
    api: Api, sim: RunningSimulator
) -> None:
    await api.get("/v1/ciProducts")
    await api.start(wf_id(sim, "Legacy"))
    async with api.session.get(f"{sim.url}/_sim/traffic", params={"since": "1"}) as resp:
        traffic = (await resp.json())["traffic"]
    assert [(t["method"], t["path"], t["status"]) for t in traffic] == [
        ("POST", "/v1/ciBuildRuns", 409)
    ]
    assert traffic[0]["request_json"]["data"]["type"] == "ciBuildRuns"
    assert traffic[0]["response_json"]["errors"][0]["status"] == "409"


async def test_scenario_file_defines_the_world(tmp_path: Path, fake_clock: FakeClock) -> None:
    path = tmp_path / "world.toml"
    path.write_text(
        """
rate_limit = 100
[[products]]
name = "Tiny"
[products.repository]
owner = "me"
name = "tiny"
branches = ["trunk"]
[[products.workflows]]
name = "Only"
outcomes = ["FAILED"]
pending_seconds = 10
running_seconds = 20
"""
    )
    scenario = load_scenario(path)
    async with running_simulator(scenario=scenario, clock=fake_clock) as running:
        run = running.sim.start_run(scenario.workflow_named("Only").id)
        assert run.progress(fake_clock.time() + 9).execution_progress == "PENDING"
        assert run.progress(fake_clock.time() + 29).execution_progress == "RUNNING"
        assert run.progress(fake_clock.time() + 30).completion_status == "FAILED"
        assert running.sim.rate_limiter.limit == 100
        assert run.source_ref_id == scenario.reference_named(run_repo(scenario), "trunk").id


def run_repo(scenario: Any) -> str:
    repository_id: str = scenario.workflow_named("Only").repository_id
    return repository_id


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[[products]]\nname = 1", "products[0].name"),
        ('[[products]]\nname = "A"\nflavour = "x"', "products[0].flavour"),
        (
            '[[products]]\nname = "A"\n[products.repository]\nowner = "o"\nname = "r"\n'
            '[[products.workflows]]\nname = "W"\noutcomes = ["WON"]',
            "products[0].workflows[0].outcomes",
        ),
        ("not toml =", ""),
    ],
)
def test_bad_scenario_files_name_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_scenario(path)
    assert str(path) in str(caught.value)
    assert key in str(caught.value)


async def test_serve_prints_its_url_and_writes_client_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = asyncio.create_task(serve("127.0.0.1:0", None, tmp_path))
    config = tmp_path / "client" / "config.toml"
    for _ in range(500):  # start-up is well under a second; this only bounds a failure
        if config.exists() or task.done():
            break
        await asyncio.sleep(0.01)
    try:
        base_url = tomllib.loads(config.read_text())["api"]["base_url"]
        assert base_url in capsys.readouterr().out
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{base_url}/v1/ciProducts") as resp,
        ):
            assert resp.status == 401
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
