"""Who may publish and who may watch, decided at the WebSocket handshake.

Refusing at the handshake (HTTP 401/403) means a bad token never costs the hub a WebSocket, and
the client sees a clear status instead of a close code.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from urllib.parse import urlsplit

import attrs

from .config import TokenGrant, configured_digest, token_digest


@attrs.frozen
class Refusal:
    status: int  # 401: no credentials; 403: credentials, but not good ones
    detail: str
    retry_after: int | None = None  # seconds, for a 429 or 503 (None: the usual RETRY_AFTER)


def bearer_token(authorization: str | None, query_token: str | None) -> str | None:
    """The token from `Authorization: Bearer …`, else `?token=` (for clients without headers)."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return query_token or None


def _find(token: str, digests: Iterable[bytes]) -> int | None:
    """Index of the matching token, comparing with every candidate so timing reveals nothing.

    Only digests are compared (and kept): hub.toml may hold nothing but hashes, and a plain token
    in it is hashed when the hub starts.
    """
    found = None
    given = token_digest(token)
    for index, candidate in enumerate(digests):
        if hmac.compare_digest(given, candidate) and found is None:
            found = index
    return found


class Authenticator:
    def __init__(
        self, grants: Iterable[TokenGrant], viewer_tokens: Iterable[str], origins: Iterable[str]
    ) -> None:
        self._grants = tuple(grants)
        self._grant_digests = tuple(configured_digest(g.token) for g in self._grants)
        self._viewer_digests = tuple(configured_digest(t) for t in viewer_tokens)
        self._origins = frozenset(o.rstrip("/").lower() for o in origins)

    def publisher(self, token: str | None) -> TokenGrant | Refusal:
        if token is None:
            return Refusal(401, "missing token: send Authorization: Bearer <token>")
        index = _find(token, self._grant_digests)
        if index is None:
            return Refusal(403, "invalid token")
        return self._grants[index]

    def viewer(self, token: str | None, origin: str | None, host: str | None) -> Refusal | None:
        if origin is not None and not self._origin_allowed(origin, host):
            return Refusal(403, f"origin {origin!r} is not allowed")
        if self._viewer_digests:
            if token is None:
                return Refusal(401, "missing viewer token: add ?token=<token>")
            if _find(token, self._viewer_digests) is None:
                return Refusal(403, "invalid viewer token")
        return None

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        """Same origin by default, which stops cross-site WebSocket hijacking from other pages."""
        if "*" in self._origins or origin.rstrip("/").lower() in self._origins:
            return True
        return host is not None and urlsplit(origin).netloc.lower() == host.lower()
