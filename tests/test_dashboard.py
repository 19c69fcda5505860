"""The Grafana dashboard in contrib/grafana: what someone importing it would notice first.

Valid JSON with the two datasource inputs, a layout Grafana does not have to rearrange, and no
query that silently shows "No data" because it names a metric, a label or a Loki stream label
xcloudd does not have.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "contrib" / "grafana" / "xcloudd-dashboard.json"

# What xcloudd exposes on /metrics: name -> its own labels.
METRICS: dict[str, frozenset[str]] = {
    "xcloudd_info": frozenset({"version"}),
    "xcloudd_builds_requested_total": frozenset({"job", "workflow"}),
    "xcloudd_builds_created_total": frozenset({"workflow", "origin"}),
    "xcloudd_builds_completed_total": frozenset({"workflow", "job", "result"}),
    "xcloudd_build_duration_seconds": frozenset({"workflow"}),
    "xcloudd_build_queue_seconds": frozenset({"workflow"}),
    "xcloudd_builds_in_flight": frozenset(),
    "xcloudd_last_successful_build_timestamp_seconds": frozenset({"job"}),
    "xcloudd_api_requests_total": frozenset({"endpoint", "status"}),
    "xcloudd_api_rate_limit_remaining": frozenset(),
    "xcloudd_api_rate_limit_limit": frozenset(),
    "xcloudd_schedule_fired_total": frozenset({"job"}),
    "xcloudd_schedule_skipped_total": frozenset({"job", "reason"}),
    "xcloudd_schedule_missed_total": frozenset({"job"}),
    "xcloudd_sink_pending_events": frozenset({"sink"}),
    "xcloudd_sink_delivered_events_total": frozenset({"sink"}),
    "xcloudd_sink_dropped_events_total": frozenset({"sink"}),
    "xcloudd_sink_failures_total": frozenset({"sink"}),
    "xcloudd_sink_up": frozenset({"sink"}),
    "xcloudd_outbox_events": frozenset(),
    "xcloudd_daemon_errors_total": frozenset({"task"}),
}
HISTOGRAMS = frozenset({"xcloudd_build_duration_seconds", "xcloudd_build_queue_seconds"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Added by the scrape itself (with honor_labels the exposed `job` wins over the target's).
TARGET_LABELS = frozenset({"instance"})

LOKI_STREAM_LABELS = frozenset({"service", "level", "event", "job"})

INPUTS = {"DS_PROMETHEUS": "prometheus", "DS_LOKI": "loki"}

GRID_COLUMNS = 24

# Variables Grafana itself provides.
BUILTIN_VARIABLES = frozenset(
    {"__interval", "__interval_ms", "__rate_interval", "__range", "__range_s", "__auto"}
)

METRIC_NAME = re.compile(r"xcloudd_[a-z_]+")
SELECTOR = re.compile(r"(xcloudd_[a-z_]+)\s*\{([^{}]*)\}")
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^()]*)\)")
LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}|([A-Za-z_][A-Za-z0-9_]*))")
LOKI_SELECTOR = re.compile(r"\{([^{}]*)\}")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # the children of a collapsed row


def walk(node: Any, path: str = "$") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def input_of(datasource: Any) -> str | None:
    """The input a datasource reference points at, e.g. DS_LOKI for {"uid": "${DS_LOKI}"}."""
    if not isinstance(datasource, dict):
        return None
    match = re.fullmatch(r"\$\{([A-Z_]+)\}", str(datasource.get("uid", "")))
    return match.group(1) if match else None


def queries(dashboard: dict[str, Any], plugin: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, target) for every query the dashboard runs against the `plugin` datasource."""
    found: list[tuple[str, dict[str, Any]]] = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            datasource = target.get("datasource", panel.get("datasource"))
            if INPUTS.get(input_of(datasource) or "") == plugin:
                found.append((f"panel {panel['id']} ({panel.get('title')!r})", target))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if INPUTS.get(input_of(annotation.get("datasource")) or "") == plugin:
            where = f"annotation {annotation.get('name')!r}"
            found.append((where, {"expr": annotation.get("expr", "")}))
            if "target" in annotation:
                found.append((where, annotation["target"]))
    for variable in dashboard["templating"]["list"]:
        if INPUTS.get(input_of(variable.get("datasource")) or "") == plugin:
            query = variable.get("query")
            expr = query.get("query", "") if isinstance(query, dict) else str(query)
            found.append((f"variable {variable['name']!r}", {"expr": expr}))
    return found


def matchers(selector: str) -> list[tuple[str, str, str]]:
    """The label matchers of a `{...}` selector body; fails on anything it cannot read."""
    out: list[tuple[str, str, str]] = []
    rest = selector.strip()
    while rest:
        match = MATCHER.match(rest)
        assert match, f"unreadable label matchers: {{{selector}}}"
        out.append((match.group(1), match.group(2), match.group(3)))
        rest = rest[match.end() :].strip()
    return out


def metric_of(name: str) -> str | None:
    if name in METRICS:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
            return name.removesuffix(suffix)
    return None


def overlaps(a: dict[str, int], b: dict[str, int]) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


def test_inputs_and_requires(dashboard: dict[str, Any]) -> None:
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert set(inputs) == set(INPUTS)
    for name, plugin in INPUTS.items():
        assert inputs[name]["type"] == "datasource"
        assert inputs[name]["pluginId"] == plugin

    requires = {(r["type"], r["id"]) for r in dashboard["__requires"]}
    assert ("grafana", "grafana") in requires
    assert {("datasource", p) for p in INPUTS.values()} <= requires
    used = {p["type"] for p in all_panels(dashboard)} - {"row"}
    assert {("panel", t) for t in used} <= requires, "a panel type is missing from __requires"

    assert dashboard["schemaVersion"] >= 36
    assert dashboard.get("id") is None, "an exported id would clash with the importer's dashboards"
    assert dashboard["uid"]


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p.get("id") for p in all_panels(dashboard)]
    assert all(isinstance(i, int) and i > 0 for i in ids), ids
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_grid_fits_24_columns_without_overlap(dashboard: dict[str, Any]) -> None:
    layouts = [dashboard["panels"]] + [
        p["panels"] for p in dashboard["panels"] if p["type"] == "row" and p.get("panels")
    ]
    for layout in layouts:
        for panel in layout:
            g = panel["gridPos"]
            assert all(isinstance(g[k], int) for k in "xywh"), panel["id"]
            assert min(g["x"], g["y"]) >= 0, panel["id"]
            assert min(g["w"], g["h"]) >= 1, panel["id"]
            assert g["x"] + g["w"] <= GRID_COLUMNS, f"panel {panel['id']} is wider than the grid"
            if panel["type"] == "row":
                assert (g["x"], g["w"], g["h"]) == (0, GRID_COLUMNS, 1), panel["id"]
        clashes = [
            (a["id"], b["id"])
            for i, a in enumerate(layout)
            for b in layout[i + 1 :]
            if overlaps(a["gridPos"], b["gridPos"])
        ]
        assert clashes == []


def test_panels_sit_under_their_row(dashboard: dict[str, Any]) -> None:
    """Grafana groups panels by position, so each panel must lie between its row and the next."""
    panels = dashboard["panels"]
    rows = [p for p in panels if p["type"] == "row"]
    assert [r["title"] for r in rows] == ["Builds", "Schedule", "API budget", "Sinks", "Events"]
    assert panels[0]["type"] == "row"
    row_ys = [r["gridPos"]["y"] for r in rows]
    assert row_ys == sorted(row_ys)
    current = -1
    for panel in panels:
        y = panel["gridPos"]["y"]
        if panel["type"] == "row":
            current = row_ys.index(y)
            continue
        below = row_ys[current + 1] if current + 1 < len(row_ys) else None
        assert y > row_ys[current], f"panel {panel['id']} is above its row"
        if below is not None:
            assert y + panel["gridPos"]["h"] <= below, f"panel {panel['id']} reaches the next row"


def test_every_datasource_is_one_of_the_inputs(dashboard: dict[str, Any]) -> None:
    problems = []
    for path, node in walk(dashboard):
        if isinstance(node, dict) and "datasource" in node:
            datasource = node["datasource"]
            name = input_of(datasource)
            if name not in INPUTS or datasource.get("type") != INPUTS[name]:
                problems.append(f"{path}: {datasource!r}")
        if isinstance(node, str):
            problems += [
                f"{path}: unknown input ${{{ref}}}"
                for ref in re.findall(r"\$\{(DS_[A-Z_]+)\}", node)
                if ref not in INPUTS
            ]
    assert problems == []
    # Every panel that queries something says where.
    for panel in all_panels(dashboard):
        if panel.get("targets"):
            assert input_of(panel.get("datasource")) in INPUTS, panel["id"]


def test_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    job = variables["job"]
    assert job["type"] == "query"
    assert job["query"]["query"] == "label_values(xcloudd_builds_completed_total, job)"
    assert job["multi"] is True
    assert job["includeAll"] is True
    assert input_of(job["datasource"]) == "DS_PROMETHEUS"
    assert "workflow" in variables
    assert variables["workflow"]["query"]["query"].startswith("label_values(")

    for panel in all_panels(dashboard):
        if "repeat" in panel:
            assert variables[panel["repeat"]].get("multi"), panel["id"]


def test_queries_use_only_defined_variables(dashboard: dict[str, Any]) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]} | BUILTIN_VARIABLES
    texts = [
        (where, t.get("expr", ""))
        for plugin in INPUTS.values()
        for where, t in queries(dashboard, plugin)
    ] + [(f"panel {p['id']} title", p.get("title", "")) for p in all_panels(dashboard)]
    problems = [
        f"{where}: ${name}"
        for where, text in texts
        for braced, bare in VARIABLE.findall(text)
        if (name := braced or bare) not in defined and not name.startswith("DS_")
    ]
    assert problems == []


def test_prometheus_queries_use_only_xcloudd_metrics_and_labels(dashboard: dict[str, Any]) -> None:
    found = queries(dashboard, "prometheus")
    assert found
    used: set[str] = set()
    problems: list[str] = []
    for where, target in found:
        expr = target.get("expr", "")
        names = METRIC_NAME.findall(expr)
        if not names:
            problems.append(f"{where}: no xcloudd metric in {expr!r}")
        metrics = set()
        for name in names:
            metric = metric_of(name)
            if metric is None:
                problems.append(f"{where}: unknown metric {name}")
            else:
                metrics.add(metric)
        used |= metrics

        for name, body in SELECTOR.findall(expr):
            metric = metric_of(name)
            if metric is None:
                continue
            allowed = (
                METRICS[metric] | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
            )
            problems += [
                f"{where}: {name} has no label {label!r}"
                for label, _, _ in matchers(body)
                if label not in allowed
            ]

        # Grouping and legend labels must come from one of the query's metrics.
        known = set().union(*(METRICS[m] for m in metrics)) | TARGET_LABELS | {"le"}
        grouped = {
            label.strip() for group in GROUPING.findall(expr) for label in group.split(",")
        } - {""}
        problems += [f"{where}: groups by unknown label {x!r}" for x in grouped - known]
        legend = set(LEGEND_LABEL.findall(target.get("legendFormat", "")))
        problems += [f"{where}: legend uses unknown label {x!r}" for x in legend - known]
    assert problems == []
    assert used == set(METRICS), f"metrics without a panel: {sorted(set(METRICS) - used)}"


def test_loki_queries_use_only_xcloudd_stream_labels(dashboard: dict[str, Any]) -> None:
    found = queries(dashboard, "loki")
    assert found
    problems: list[str] = []
    for where, target in found:
        expr = target.get("expr", "")
        selector = LOKI_SELECTOR.search(expr)
        if selector is None:
            problems.append(f"{where}: no stream selector in {expr!r}")
            continue
        stream = matchers(selector.group(1))
        labels = {label for label, _, _ in stream}
        problems += [f"{where}: unknown stream label {x!r}" for x in labels - LOKI_STREAM_LABELS]
        if ("service", "=", "xcloudd") not in stream:
            problems.append(f'{where}: does not select service="xcloudd"')
        # Metric queries aggregate over stream labels; json fields are not known up front.
        grouped = {
            label.strip() for group in GROUPING.findall(expr) for label in group.split(",")
        } - {""}
        problems += [
            f"{where}: groups by non-stream label {x!r}" for x in grouped - LOKI_STREAM_LABELS
        ]
    assert problems == []


def test_logs_panels(dashboard: dict[str, Any]) -> None:
    exprs = [t["expr"] for p in all_panels(dashboard) if p["type"] == "logs" for t in p["targets"]]
    assert any(
        e.startswith('{service="xcloudd"') and "| json" in e and "$job" in e for e in exprs
    ), exprs
    assert any(
        'event="build.completed"' in e and "| json" in e and 'result=~"failure|error"' in e
        for e in exprs
    ), exprs
