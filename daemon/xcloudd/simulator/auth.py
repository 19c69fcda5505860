"""API keys and token checks the way App Store Connect does them.

Apple's rules (API-NOTES section e): ES256 only, `kid` names a key, `aud` is "appstoreconnect-v1",
team keys carry `iss` = issuer id, individual keys carry `sub` = "user" and no `iss`, lifetime
`exp - iat` at most 20 minutes (6 months for GET-only scoped tokens), and a `scope`, when present,
must match the request. Time comes from the injected Clock, so PyJWT's own time checks are off.
Failure reasons are for tests and operators; they never contain the token or key material.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from xcloudd.errors import ConfigError
from xcloudd.simulator.apierror import not_authorized

AUDIENCE = "appstoreconnect-v1"
MAX_LIFETIME_S = 20 * 60
MAX_SCOPED_GET_LIFETIME_S = 180 * 24 * 3600
MAX_IAT_SKEW_S = 60
# Apple ignores these when matching a request against a scope entry.
_SCOPE_IGNORED_PARAMS = frozenset({"limit", "cursor", "sort"})

_KEY_ID_ALPHABET = string.ascii_uppercase + string.digits


@dataclass(frozen=True)
class ApiKey:
    """One App Store Connect API key. `issuer_id` is None for an individual key."""

    key_id: str
    issuer_id: str | None
    private_key_pem: bytes = field(repr=False)

    @cached_property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        private = serialization.load_pem_private_key(self.private_key_pem, password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        return private.public_key()

    @property
    def is_individual(self) -> bool:
        return self.issuer_id is None


def generate_key(individual: bool = False) -> ApiKey:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,  # the .p8 format Apple hands out
        serialization.NoEncryption(),
    )
    key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(10))
    return ApiKey(key_id, None if individual else str(uuid.uuid4()), pem)


_KEY_FILE = "simulator-key.json"


def load_or_create_key(state_dir: Path) -> ApiKey:
    """The team key kept in `state_dir`, so a restarted simulator accepts the old config."""
    path = state_dir / _KEY_FILE
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            key = ApiKey(str(data["key_id"]), data["issuer_id"], data["private_key"].encode())
            key.public_key  # noqa: B018 - parse now, so a damaged file fails here, clearly
        except (ValueError, KeyError, TypeError, AttributeError, AssertionError):
            raise ConfigError.at(
                str(path), "", "not a simulator key file; delete it to get a new key"
            ) from None
        return key
    key = generate_key()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds the private key
    payload = json.dumps(
        {
            "key_id": key.key_id,
            "issuer_id": key.issuer_id,
            "private_key": key.private_key_pem.decode(),
        }
    )
    write_private(path, payload)
    return key


def write_private(path: Path, text: str) -> None:
    """Write a secret file that is 0600 from its first byte (no window with wider rights)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)  # when the file already existed with other rights


def mint_token(
    key: ApiKey,
    now: float,
    lifetime_s: float = 15 * 60,
    *,
    scope: Sequence[str] | None = None,
    with_iat: bool = True,
    audience: str = AUDIENCE,
    extra_claims: Mapping[str, Any] | None = None,
    signing_key: bytes | None = None,
    headers: Mapping[str, Any] | None = None,
) -> str:
    """A token like a client makes; the keyword arguments exist to make bad ones in tests."""
    payload: dict[str, Any] = {"aud": audience, "exp": int(now + lifetime_s)}
    if key.issuer_id is None:
        payload["sub"] = "user"
    else:
        payload["iss"] = key.issuer_id
    if with_iat:
        payload["iat"] = int(now)
    if scope is not None:
        payload["scope"] = list(scope)
    payload.update(extra_claims or {})
    all_headers: dict[str, Any] = {"kid": key.key_id, "typ": "JWT"}
    all_headers.update(headers or {})
    return jwt.encode(
        payload, signing_key or key.private_key_pem, algorithm="ES256", headers=all_headers
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _query_pairs(query: str) -> frozenset[tuple[str, str]]:
    return frozenset(
        (k, v)
        for k, v in parse_qsl(query, keep_blank_values=True)
        if k not in _SCOPE_IGNORED_PARAMS
    )


def scope_matches(entry: str, method: str, path: str, query: str) -> bool:
    entry_method, _, target = entry.strip().partition(" ")
    parts = urlsplit(target.strip())
    return (
        entry_method.upper() == method.upper()
        and parts.path == path
        and _query_pairs(parts.query) == _query_pairs(query)
    )


class TokenVerifier:
    """Checks `Authorization` headers against the known keys at the clock's current time."""

    def __init__(self, keys: Mapping[str, ApiKey]) -> None:
        self._keys = keys

    def verify(
        self, authorization: str | None, method: str, path: str, query: str, now: float
    ) -> ApiKey:
        """The key that signed the request's token, or ApiError 401 with the reason in meta."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise not_authorized("missing 'Authorization: Bearer <token>' header")
        token = token.strip()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise not_authorized("the token is not a well-formed JWT") from None
        if header.get("alg") != "ES256":
            raise not_authorized("the token's alg must be ES256")
        if header.get("typ", "JWT") != "JWT":
            raise not_authorized("the token's typ must be JWT")
        key = self._keys.get(str(header.get("kid")))
        if key is None:
            raise not_authorized("the token's kid names no known key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.public_key,
                algorithms=["ES256"],
                # Time and audience are checked below: time against the injected clock.
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.PyJWTError:
            raise not_authorized("the token's signature does not verify with the key") from None
        self._check_claims(key, claims, method=method, path=path, query=query, now=now)
        return key

    @staticmethod
    def _check_claims(
        key: ApiKey, claims: Mapping[str, Any], *, method: str, path: str, query: str, now: float
    ) -> None:
        if claims.get("aud") != AUDIENCE:
            raise not_authorized(f"the token's aud must be {AUDIENCE!r}")
        if key.is_individual:
            if claims.get("sub") != "user" or "iss" in claims:
                raise not_authorized("an individual key's token needs sub='user' and no iss")
        elif claims.get("iss") != key.issuer_id:
            raise not_authorized("the token's iss is not the key's issuer id")
        exp = claims.get("exp")
        if not _is_number(exp):
            raise not_authorized("the token has no numeric exp")
        assert isinstance(exp, int | float)
        if exp <= now:
            raise not_authorized("the token has expired")
        iat = claims.get("iat")
        if iat is not None:
            if not _is_number(iat):
                raise not_authorized("the token's iat is not a number")
            assert isinstance(iat, int | float)
            if iat > now + MAX_IAT_SKEW_S:
                raise not_authorized("the token's iat is in the future")
        # Without iat Apple can only measure the lifetime from now.
        lifetime = exp - (iat if iat is not None else now)
        scope = claims.get("scope")
        if scope is not None:
            if not isinstance(scope, list) or not all(isinstance(s, str) for s in scope):
                raise not_authorized("the token's scope must be a list of strings")
            if not any(scope_matches(s, method, path, query) for s in scope):
                raise not_authorized("the token's scope does not cover this request")
        get_only = bool(scope) and all(s.strip().upper().startswith("GET ") for s in scope or ())
        limit = MAX_SCOPED_GET_LIFETIME_S if get_only else MAX_LIFETIME_S
        if lifetime > limit:
            raise not_authorized(f"the token's lifetime exceeds {limit // 60} minutes")
