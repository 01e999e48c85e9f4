"""How many connections the hub holds, from whom, and how loudly it says no.

A public hub can be asked for thousands of WebSockets by one script. Viewers are anonymous (or
share one viewer token), so they are capped in total and per client IP: one address cannot take
every slot, and a flood of viewers can never lock out the EAs, whose connections are counted on
their own (`max_publishers`) and only once their token was accepted. A refusal is an HTTP answer
at the handshake (429 for one address over its share, 503 for a full hub), so a refused client
costs no WebSocket and no task.

Behind a reverse proxy every client has the proxy's address: `client_ip` believes
`X-Forwarded-For` only from the proxies named in `trusted_proxies`.

Per-address limits count an IPv6 /64 as one address (`address_key`): one subscriber or one
cloud host is handed a whole /64, and could otherwise pose as 2^64 clients. Handshakes refused
for a missing or wrong token are budgeted per address too (`FailedHandshakes`): each costs the
hub a request parse and a log line, so a script repeating them is answered 429 instead.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import resource
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import attrs
import trio

from .auth import Refusal

log = logging.getLogger("mt5hub")

RETRY_AFTER = 5  # seconds a refused client is told to wait (browsers and the DLL back off anyway)


class Limits:
    """Open WebSocket connections per role and per client IP, and the caps on them."""

    def __init__(self, *, max_viewers: int, max_viewers_per_ip: int, max_publishers: int) -> None:
        self.max_viewers = max_viewers
        self.max_viewers_per_ip = max_viewers_per_ip
        self.max_publishers = max_publishers
        self.viewers = 0
        self.publishers = 0
        self._viewers_by_ip: Counter[str] = Counter()

    @contextmanager
    def viewer(self, ip: str) -> Iterator[Refusal | None]:
        """Hold a viewer's slot for the block, or yield the refusal if there is none."""
        ip = address_key(ip)
        if self._viewers_by_ip[ip] >= self.max_viewers_per_ip:
            yield Refusal(429, f"{ip} holds {self.max_viewers_per_ip} viewer connections already")
            return
        if self.viewers >= self.max_viewers:
            yield Refusal(503, f"the hub holds {self.max_viewers} viewers already")
            return
        self.viewers += 1
        self._viewers_by_ip[ip] += 1
        try:
            yield None
        finally:
            self.viewers -= 1
            self._viewers_by_ip[ip] -= 1
            if not self._viewers_by_ip[ip]:
                del self._viewers_by_ip[ip]

    @contextmanager
    def publisher(self) -> Iterator[Refusal | None]:
        """Hold a publisher's slot for the block, or yield the refusal if there is none."""
        if self.publishers >= self.max_publishers:
            yield Refusal(503, f"the hub holds {self.max_publishers} publishers already")
            return
        self.publishers += 1
        try:
            yield None
        finally:
            self.publishers -= 1


class FailedHandshakes:
    """Handshakes refused 401/403, per client address: `budget` of them per `window` seconds.

    A token bucket per address, refilled evenly (`budget / window` a second): an EA with a
    mistyped token that retries every few seconds stays within it and keeps hearing 401/403,
    while a script guessing tokens is answered 429 with `Retry-After` (no hash, no parse of its
    token, no log line of its own) until its budget refills. Addresses whose bucket is full
    again are forgotten, so memory follows the addresses failing now.
    """

    def __init__(self, budget: int, window: float) -> None:
        self.budget = budget
        self.window = window
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, as of when)

    def _level(self, key: str, now: float) -> float:
        tokens, updated = self._buckets.get(key, (float(self.budget), now))
        return min(float(self.budget), tokens + (now - updated) * self.budget / self.window)

    def refusal(self, ip: str) -> Refusal | None:
        """429 if this address has spent its budget of failed handshakes; None: go on."""
        key = address_key(ip)
        if key not in self._buckets:
            return None
        level = self._level(key, trio.current_time())
        if level >= 1:
            return None
        wait = max(1, math.ceil((1 - level) * self.window / self.budget))
        return Refusal(
            429,
            f"{key} failed {self.budget} handshakes within {self.window:g} s: retry in {wait} s",
            retry_after=wait,
        )

    def failed(self, ip: str) -> None:
        """Count a handshake refused 401/403 against this address's budget."""
        key, now = address_key(ip), trio.current_time()
        self._buckets[key] = (self._level(key, now) - 1, now)
        if len(self._buckets) > 10_000:  # forget the addresses whose budget is whole again
            self._buckets = {
                k: (tokens, at)
                for k, (tokens, at) in self._buckets.items()
                if self._level(k, now) < self.budget
            }


def address_key(ip: str) -> str:
    """The address per-address limits count: an IPv4 address as it is, an IPv6 address's /64
    (as `2001:db8::/64`); an IPv4-mapped IPv6 address as the IPv4 address it is."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip  # not an address (a unix socket's peer): counted as given
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return ip


def client_ip(peer: str, forwarded_for: str | None, trusted_proxies: Iterable[str]) -> str:
    """The client's address: the peer's, or the last hop a trusted proxy added before itself.

    Only the rightmost X-Forwarded-For entry is the proxy's own observation; anything left of it
    came from the client and may be forged.
    """
    if not forwarded_for or not _in_any(peer, trusted_proxies):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    return hops[-1] if hops else peer


def _in_any(ip: str, networks: Iterable[str]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n, strict=False) for n in networks)


@attrs.define
class _Burst:
    logged_at: float
    suppressed: int = 0


class LogThrottle:
    """One log line per (reason, address) per `every` seconds, saying how many it held back.

    A refused flood of 5,000 handshakes is one story, not 5,000 lines; the first line of each
    burst still comes at once.
    """

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._bursts: dict[tuple[str, str], _Burst] = {}

    def warning(self, reason: str, address: str, message: str, *args: object) -> None:
        now = trio.current_time()
        burst = self._bursts.get((reason, address))
        if burst is not None and now - burst.logged_at < self.every:
            burst.suppressed += 1
            return
        held = f" (and {burst.suppressed} more like it)" if burst and burst.suppressed else ""
        self._bursts[(reason, address)] = _Burst(now)
        if len(self._bursts) > 10_000:  # many addresses: forget the quiet ones
            self._bursts = {k: b for k, b in self._bursts.items() if now - b.logged_at < self.every}
        log.warning(message + held, *args)


def raise_open_files_limit(wanted: int) -> tuple[int, int]:
    """Lift this process's soft limit on open files towards `wanted` (each connection is one).

    The usual soft limit is 1024, well under `max_viewers`: past it, accept() fails and new
    clients wait in the kernel's backlog. Returns (soft, hard) as they are afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft, hard
