"""Who may publish and who may watch, decided at the WebSocket handshake.

Refusing at the handshake (HTTP 401/403) means a bad token never costs the hub a WebSocket, and
the client sees a clear status instead of a close code.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

import attrs

from .config import ALL, TokenGrant, ViewerGrant, configured_digest, token_digest


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
        self,
        grants: Iterable[TokenGrant],
        viewer_grants: Iterable[ViewerGrant],
        origins: Iterable[str],
    ) -> None:
        self._grants = tuple(grants)
        self._grant_digests = tuple(configured_digest(g.token) for g in self._grants)
        self._viewer_grants = tuple(viewer_grants)
        self._viewer_digests = tuple(configured_digest(g.token) for g in self._viewer_grants)
        self._origins = frozenset(o.rstrip("/").lower() for o in origins)

    def publisher(self, token: str | None) -> TokenGrant | Refusal:
        if token is None:
            return Refusal(401, "missing token: send Authorization: Bearer <token>")
        index = _find(token, self._grant_digests)
        if index is None:
            return Refusal(403, "invalid token")
        return self._grants[index]

    def viewer(
        self, token: str | None, origin: str | None, host: str | None
    ) -> Refusal | ViewerGrant:
        """The grant of the viewer's token (ALL on a hub without viewer tokens), or why not."""
        if origin is not None and not self._origin_allowed(origin, host):
            return Refusal(403, f"origin {origin!r} is not allowed")
        if not self._viewer_digests:
            return ALL
        if token is None:
            return Refusal(401, "missing viewer token: add ?token=<token>")
        index = _find(token, self._viewer_digests)
        if index is None:
            return Refusal(403, "invalid viewer token")
        return self._viewer_grants[index]

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        """Same origin by default, which stops cross-site WebSocket hijacking from other pages."""
        if "*" in self._origins or origin.rstrip("/").lower() in self._origins:
            return True
        return host is not None and urlsplit(origin).netloc.lower() == host.lower()


# Where the example proxies (deploy/) let /metrics through: loopback and private networks.
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
LOOPBACK_NETWORKS = PRIVATE_NETWORKS[:2]


class StatusAccess:
    """Who may read /healthz and /metrics: by the client's address, or by `status_token`.

    `access` is "any", "private", "loopback" or "token" (config.status_access decides "auto").
    The address is the client's as `trusted_proxies` name it (limits.client_ip); a request that
    a proxy not trusted forwarded is never local, or every client of a proxy on loopback would be.
    """

    def __init__(self, access: str, token: str) -> None:
        self.access = access
        self._digests = (configured_digest(token),) if token else ()
        self._networks = {"private": PRIVATE_NETWORKS, "loopback": LOOPBACK_NETWORKS}.get(
            access, ()
        )

    def check(self, token: str | None, client: str, untrusted_proxy: bool) -> Refusal | None:
        """None if this request may read the status routes, else the refusal (401/403)."""
        if self.access == "any" or (not untrusted_proxy and self._near(client)):
            return None
        if not self._digests:
            return Refusal(403, f"status routes answer {self.access} addresses only")
        if token is None:
            return Refusal(401, "missing status token: send Authorization: Bearer <token>")
        if _find(token, self._digests) is None:
            return Refusal(403, "invalid status token")
        return None

    def _near(self, client: str) -> bool:
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return bool(self._networks) and not client  # no address: a unix socket, this host
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)
