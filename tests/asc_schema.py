"""Validate requests and responses against Apple's OpenAPI description of the Xcode Cloud API.

The description is Apple's data and lives beside the repository (`../shared/asc/openapi-ci.json`),
never inside it. Without it the tests that need it are skipped, except under CI (CI=true), where
a missing file is a failure.

OpenAPI 3.0 is not JSON Schema: `nullable: true` becomes `type: [..., "null"]` (or an `anyOf`
with `{"type": "null"}` around enums, `$ref` and combinators). Apple's resources also leave every
attribute optional and, in practice, send `null` for unknown ones (its own create example does,
API-NOTES section b) without declaring them nullable, so attributes are treated as nullable.
"""

from __future__ import annotations

import copy
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "asc" / "openapi-ci.json"
_SPEC_URI = "urn:apple:asc:openapi-ci"


class UndocumentedResponse(LookupError):
    """The spec does not describe this method, path or status: nothing to validate against."""


def _require_spec() -> Path:
    if SPEC_PATH.exists():
        return SPEC_PATH
    reason = f"Apple's OpenAPI description is missing: {SPEC_PATH}"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """One OpenAPI 3.0 schema node made to accept null, in JSON Schema terms."""
    node = {k: v for k, v in schema.items() if k != "nullable"}
    if "type" in node and "enum" not in node and isinstance(node["type"], str):
        node["type"] = [node["type"], "null"]
        return node
    return {"anyOf": [node, {"type": "null"}]}


def _convert(node: Any) -> Any:
    if isinstance(node, list):
        return [_convert(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _convert(v) for k, v in node.items()}
    # The discriminator is OpenAPI-only; oneOf over typed resources works without it.
    out.pop("discriminator", None)
    if out.get("nullable") is True:
        return _nullable(out)
    out.pop("nullable", None)
    return out


def _attributes_nullable(schemas: dict[str, Any]) -> None:
    for schema in schemas.values():
        attributes = schema.get("properties", {}).get("attributes", {})
        for name, prop in list(attributes.get("properties", {}).items()):
            attributes["properties"][name] = dict(prop, nullable=True)


@cache
def _spec() -> dict[str, Any]:
    raw = orjson.loads(_require_spec().read_bytes())
    spec = copy.deepcopy(raw)
    _attributes_nullable(spec["components"]["schemas"])
    converted: dict[str, Any] = _convert(spec)
    return converted


@cache
def _registry() -> Registry[Any]:
    resource: Resource[Any] = DRAFT202012.create_resource(_spec())
    return Registry().with_resource(_SPEC_URI, resource)


@cache
def _path_patterns() -> list[tuple[re.Pattern[str], str]]:
    patterns = []
    for template in _spec()["paths"]:
        regex = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        patterns.append((re.compile(regex), template))
    # Literal paths first: /v1/ciBuildRuns must not be taken for a templated sibling.
    patterns.sort(key=lambda p: p[1].count("{"))
    return patterns


def _operation(method: str, path: str) -> dict[str, Any]:
    for pattern, template in _path_patterns():
        if pattern.match(path):
            operation = _spec()["paths"][template].get(method.lower())
            if operation is None:
                raise UndocumentedResponse(f"{method} {template} is not in the spec")
            result: dict[str, Any] = operation
            return result
    raise UndocumentedResponse(f"no path in the spec matches {path}")


def _validate(schema_ref: dict[str, Any], instance: Any) -> None:
    ref = schema_ref["$ref"]
    if not ref.startswith("#/"):
        raise AssertionError(f"unexpected schema reference {ref}")
    validator = Draft202012Validator({"$ref": _SPEC_URI + ref}, registry=_registry())
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [
            f"  at /{'/'.join(str(p) for p in e.absolute_path)}: {e.message[:300]}"
            for e in errors[:10]
        ]
        raise AssertionError(f"does not match {ref}:\n" + "\n".join(lines))


def validate_request(method: str, path: str, body: Any) -> None:
    """Raise AssertionError when `body` is not a valid request body for the operation."""
    operation = _operation(method, path)
    content = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if content is None:
        raise UndocumentedResponse(f"{method} {path} takes no JSON body")
    _validate(content["schema"], body)


def error_schema() -> dict[str, Any]:
    return {"$ref": "#/components/schemas/ErrorResponse"}


def validate_response(method: str, path: str, status: int, body: Any) -> None:
    """Raise AssertionError when `body` does not match the schema declared for `status`;
    UndocumentedResponse when the spec declares nothing for it."""
    operation = _operation(method, path)
    response = operation.get("responses", {}).get(str(status))
    if response is None:
        raise UndocumentedResponse(f"{method} {path} declares no {status} response")
    content = response.get("content", {}).get("application/json")
    if content is None:
        raise UndocumentedResponse(f"{method} {path} {status} has no JSON body")
    _validate(content["schema"], body)


def validate_error(body: Any) -> None:
    """Any error body, documented status or not, must be Apple's ErrorResponse."""
    _validate(error_schema(), body)
