"""Query parameters the way Apple checks them, and cursor pagination.

Each route declares what it accepts (a QuerySpec, mirroring its OpenAPI parameters); anything else
is a 400 like Apple's. Lists default to `DEFAULT_LIMIT` items per page and accept at most
`MAX_LIMIT`. `links.next` carries an opaque `cursor`; clients must follow it verbatim.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from yarl import URL

from xcloudd.simulator.apierror import parameter_illegal, parameter_invalid
from xcloudd.simulator.resources import FIELDS

DEFAULT_LIMIT = 50
MAX_LIMIT = 200

T = TypeVar("T")


@dataclass(frozen=True)
class QuerySpec:
    fields: tuple[str, ...] = ()  # resource types accepted in fields[...]
    include: tuple[str, ...] = ()
    paged: bool = False
    sort: tuple[str, ...] = ()
    filters: Mapping[str, tuple[str, ...] | None] = field(default_factory=dict)  # None: any value
    extra: tuple[str, ...] = ()  # accepted and ignored (e.g. limit[builds])


@dataclass(frozen=True)
class Query:
    fields: Mapping[str, frozenset[str]]
    include: tuple[str, ...]
    limit: int
    offset: int
    sort: str | None
    filters: Mapping[str, tuple[str, ...]]


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v for v in (p.strip() for p in value.split(",")) if v)


def encode_cursor(offset: int) -> str:
    raw = json.dumps({"offset": str(offset)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        offset = int(json.loads(raw)["offset"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise parameter_invalid("cursor", f"The cursor '{cursor}' is not valid") from None
    if offset < 0:
        raise parameter_invalid("cursor", f"The cursor '{cursor}' is not valid")
    return offset


def parse_query(params: Mapping[str, str], keys: Sequence[str], spec: QuerySpec) -> Query:
    """`keys` lists every parameter as sent (with repeats), so duplicates can be refused."""
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise parameter_invalid(key, f"The parameter '{key}' can only be specified once")
        seen.add(key)
    fields: dict[str, frozenset[str]] = {}
    filters: dict[str, tuple[str, ...]] = {}
    include: tuple[str, ...] = ()
    limit, offset, sort = DEFAULT_LIMIT, 0, None
    for key, value in params.items():
        if key.startswith("fields[") and key.endswith("]") and key[7:-1] in spec.fields:
            kind = key[7:-1]
            names = _csv(value)
            known = FIELDS.get(kind)
            for name in names:
                if known is not None and name not in known:
                    raise parameter_invalid(
                        key, f"The parameter '{key}' contains an invalid field name '{name}'"
                    )
            fields[kind] = frozenset(names)
        elif key == "include" and spec.include:
            include = _csv(value)
            for name in include:
                if name not in spec.include:
                    raise parameter_invalid(
                        key, f"'{name}' is not a valid relationship name for 'include'"
                    )
        elif key == "limit" and spec.paged:
            try:
                limit = int(value)
            except ValueError:
                raise parameter_invalid(key, f"'{value}' is not a valid integer") from None
            if limit < 1 or limit > MAX_LIMIT:
                raise parameter_invalid(
                    key, f"The parameter 'limit' must be between 1 and {MAX_LIMIT}, got {limit}"
                )
        elif key == "cursor" and spec.paged:
            offset = decode_cursor(value)
        elif key == "sort" and spec.sort:
            if value not in spec.sort:
                raise parameter_invalid(
                    key, f"'{value}' is not a valid sort; allowed: {', '.join(spec.sort)}"
                )
            sort = value
        elif key.startswith("filter[") and key.endswith("]") and key[7:-1] in spec.filters:
            name = key[7:-1]
            values = _csv(value)
            allowed = spec.filters[name]
            for v in values:
                if allowed is not None and v not in allowed:
                    raise parameter_invalid(key, f"'{v}' is not a valid value for '{key}'")
            filters[name] = values
        elif key not in spec.extra:
            raise parameter_illegal(key)
    return Query(fields, include, limit, offset, sort, filters)


def paginate(
    items: Sequence[T], query: Query, url: URL
) -> tuple[Sequence[T], dict[str, str], dict[str, Any]]:
    """One page of `items`: the slice, `links` and `meta` for a list response."""
    page = items[query.offset : query.offset + query.limit]
    links = {"self": str(url)}
    end = query.offset + len(page)
    if end < len(items):
        links["next"] = str(url.update_query(cursor=encode_cursor(end), limit=str(query.limit)))
    meta = {"paging": {"total": len(items), "limit": query.limit}}
    return page, links, meta
