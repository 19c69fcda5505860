"""ES256 tokens for App Store Connect, re-signed before they run out and on demand after a 401."""

from __future__ import annotations

import jwt

from xcloudd.clock import Clock
from xcloudd.config import SigningKey

AUDIENCE = "appstoreconnect-v1"
# Apple rejects lifetimes over 20 minutes, and a fast local clock eats into that margin.
LIFETIME_S = 15 * 60
REFRESH_MARGIN_S = 2 * 60


class TokenSigner:
    def __init__(self, key: SigningKey, clock: Clock) -> None:
        self._key = key
        self._clock = clock
        self._token: str | None = None
        self._expires = 0.0
        self.signed = 0

    def token(self) -> str:
        now = self._clock.time()
        if self._token is None or now >= self._expires - REFRESH_MARGIN_S:
            self._token = self._sign(int(now))
            self._expires = int(now) + LIFETIME_S
            self.signed += 1
        return self._token

    def invalidate(self) -> None:
        """Forget the current token; the next request signs a fresh one."""
        self._token = None

    def _sign(self, iat: int) -> str:
        claims: dict[str, object] = {"iat": iat, "exp": iat + LIFETIME_S, "aud": AUDIENCE}
        if self._key.issuer_id is None:
            claims["sub"] = "user"
        else:
            claims["iss"] = self._key.issuer_id
        return jwt.encode(
            claims,
            self._key.private_key,
            algorithm="ES256",
            headers={"kid": self._key.key_id, "typ": "JWT"},
        )
