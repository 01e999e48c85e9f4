"""RedisBackplane: hub.Backplane over one Redis server (see the package's docstring).

Three parts, each a class: `Outbound` (this hub's events on their way to Redis, and those sent
but not yet seen back), `Membership` (claims, heartbeat, reaping, catching up after a
(re)connect), and `RedisBackplane` (the connection's life, and what comes in on the channel).
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import coredis
import trio
from coredis.exceptions import RedisError
from coredis.retry import NoRetryPolicy

from ..channel import open_conflating_channel
from ..hub import Event, Hub
from ..subscription import TableId
from ..supervise import Backoff
from . import scripts
from .records import UpdateRecord, parse_records, parse_table, table_field

log = logging.getLogger("mt5hub")

PENDING_LIMIT = 10_000  # events waiting for Redis before updates of one table replace each other
BATCH_LIMIT = 256  # events per script call: a backlog goes in several calls, not one huge one


def _pairs(flat: list[bytes]) -> Iterable[tuple[str, str]]:
    for i in range(0, len(flat) - 1, 2):
        yield flat[i].decode(), flat[i + 1].decode()


def redis_database(url: str) -> int:
    """The database number a Redis URL selects (`/3` or `?db=3`), as coredis reads it; 0 if none."""
    kwargs = coredis.Redis.from_url(url).connection_pool.connection_kwargs
    return int(kwargs.get("db") or 0)


def is_outage(exc: BaseException) -> bool:
    """True if this (maybe grouped) error only says Redis is unreachable, slow or refusing."""
    if isinstance(exc, BaseExceptionGroup):
        rest = exc.split((RedisError, OSError, TimeoutError, trio.TooSlowError))[1]
        return rest is None
    return isinstance(exc, RedisError | OSError | TimeoutError | trio.TooSlowError)


@attrs.frozen
class Names:
    """The Redis keys and channel of one deployment (`prefix`), and this hub's own.

    Keys live in the URL's database; the channel, which pub/sub shares across every database of
    a server, carries its number (`<prefix>:db<n>:events`; database 0 keeps `<prefix>:events`).
    """

    prefix: str
    worker: str
    database: int = 0

    @property
    def channel(self) -> str:
        if self.database:
            return f"{self.prefix}:db{self.database}:events"
        return f"{self.prefix}:events"

    @property
    def seq(self) -> str:
        return f"{self.prefix}:seq"

    @property
    def state(self) -> str:
        return f"{self.prefix}:state"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def claims_prefix(self) -> str:
        return f"{self.prefix}:claims:"

    @property
    def claims(self) -> str:
        return self.claims_prefix + self.worker


def _pending_slot(event: Event) -> object:
    return ("update", event.table) if event.kind == "update" else None


class Outbound:
    """This hub's events on their way to Redis, in order, and those written but not yet seen
    back on the channel. Past PENDING_LIMIT waiting (Redis slow, not gone) an update replaces
    its table's newest pending one in place: memory stays bounded per table."""

    def __init__(self, names: Names, script: str) -> None:
        self.names, self._script = names, script
        self._send, self._receive = open_conflating_channel(
            math.inf, _pending_slot, conflate_from=PENDING_LIMIT
        )
        self._serial = 0
        self.inflight: dict[int, Event] = {}  # updates sent, until they come back

    def queue(self, event: Event) -> bool:
        """True if it replaced a pending update of its table."""
        return self._send.send_nowait(event)

    def confirmed(self, origin: str) -> None:
        """An update of ours came back on the channel."""
        worker, _, serial = origin.rpartition("#")
        if worker == self.names.worker:
            self.inflight.pop(int(serial), None)

    def unsent(self) -> list[Event]:
        """Everything not confirmed, in order, forgotten here: Redis is gone."""
        events = [self.inflight[n] for n in sorted(self.inflight)]
        self.inflight.clear()
        while True:
            try:
                events.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                return events

    async def run(self, hub: Hub, client: coredis.Redis[bytes]) -> None:
        """Send what is pending: a batch in one script call, so one round trip and one message.

        While the hub is busy this task runs less often and each batch grows: the cost per
        update falls as the load rises, on every hub.
        """
        write = client.register_script(self._script)
        n = self.names
        keys = [n.seq, n.state, n.workers, n.claims]
        sent = hub.metrics.backplane_events.labels("out")
        while True:  # ends with the connection (cancelled) or an outage (raises)
            batch = [await self._receive.receive()]
            while len(batch) < BATCH_LIMIT:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            args: list[str | int | float] = [n.channel, n.claims_prefix, n.worker]
            for event in batch:
                field = table_field(event.table)
                if event.kind == "update":
                    self._serial += 1
                    self.inflight[self._serial] = event
                    state = hub.tables.get(event.table)
                    floor = state.seq if state is not None else 0
                    origin = f"{n.worker}#{self._serial}"
                    args += ["U", field, floor, event.text, time.time(), origin]
                else:
                    args += ["C", field, event.client_id, "1" if event.online else "0"]
            await write(keys=keys, args=args)
            sent.inc(len(batch))


class Membership:
    """This hub among the others: its claims and heartbeat, reaping dead hubs, catching up."""

    def __init__(self, names: Names, lua: scripts.Scripts, heartbeat: float, ttl: float) -> None:
        self.names, self.lua, self.heartbeat, self.ttl = names, lua, heartbeat, ttl
        self._unclaimed: list[TableId] = []  # see catch_up
        self._unclaimed_at = 0.0

    @property
    def ttl_ms(self) -> int:
        return int(self.ttl * 1000)

    async def catch_up(self, hub: Hub, client: coredis.Redis[bytes]) -> None:
        """Claims, then our state where it is newer, then theirs where it is newer."""
        n = self.names
        await self.register(hub, client)
        offer: list[str | int | float] = [n.channel]
        for state in hub.tables.values():
            if state.update is not None:
                offer += [table_field(state.table), state.seq, state.published_text(), time.time()]
        if len(offer) > 1:
            await client.register_script(self.lua.offer_state)(keys=[n.seq, n.state], args=offer)
        loaded: Any = await client.register_script(self.lua.load)(
            keys=[n.seq, n.state, n.workers], args=[n.claims_prefix]
        )
        seqs, states, online = loaded
        texts = dict(_pairs(states))
        for field, seq in _pairs(seqs):
            if field in texts:
                hub.apply(Event("update", parse_table(field), texts[field], seq=int(seq)))
        claims = dict(_pairs(online))
        unclaimed = []
        for state in list(hub.tables.values()):
            client_id = claims.get(table_field(state.table))
            if client_id is not None and not state.online:
                hub.apply(hub.presence_event(state.table, client_id, online=True))
            elif client_id is None and state.online:
                unclaimed.append(state.table)
        # Online here but claimed by no hub in Redis: its hub may be dead, or only not yet back
        # (Redis restarted empty and that hub reconnects after us). Look again after one `ttl`
        # before telling viewers it went offline, so that a Redis restart does not flash every
        # table offline on the dashboards.
        self._unclaimed = unclaimed
        self._unclaimed_at = trio.current_time() + self.ttl

    async def register(self, hub: Hub, client: coredis.Redis[bytes]) -> None:
        n = self.names
        args: list[str | int] = [n.channel, n.claims_prefix, n.worker, self.ttl_ms]
        for state in hub.tables.values():
            if state.publishers:
                args += [table_field(state.table), next(reversed(state.publishers.values()))]
        await client.register_script(self.lua.register)(keys=[n.workers, n.claims], args=args)

    async def keepalive(self, hub: Hub, client: coredis.Redis[bytes]) -> None:
        """Heartbeat, re-register if Redis forgot us, and reap hubs that died silently."""
        n = self.names
        heartbeat = client.register_script(self.lua.heartbeat)
        reap = client.register_script(self.lua.reap)
        while True:  # ends with the connection (cancelled) or an outage (raises)
            known: Any = await heartbeat(keys=[n.workers, n.claims], args=[n.worker, self.ttl_ms])
            if not known:
                log.warning("backplane: Redis had forgotten this hub; registering again")
                await self.register(hub, client)
            await reap(keys=[n.workers], args=[n.channel, n.claims_prefix])
            if self._unclaimed and trio.current_time() >= self._unclaimed_at:
                await self._settle_unclaimed(hub, client)
            await trio.sleep(self.heartbeat)

    async def _settle_unclaimed(self, hub: Hub, client: coredis.Redis[bytes]) -> None:
        """Tables still claimed by no live hub one `ttl` after catching up: offline now."""
        online: Any = await client.register_script(self.lua.claimed)(
            keys=[self.names.workers], args=[self.names.claims_prefix]
        )
        claimed = {field for field, _ in _pairs(online)}
        for table in self._unclaimed:
            state = hub.tables.get(table)
            if state is not None and state.online and table_field(table) not in claimed:
                hub.apply(hub.presence_event(table, state.client_id, online=False))
        self._unclaimed = []

    async def leave(self, client: coredis.Redis[bytes]) -> None:
        """On shutdown: withdraw this hub's claims at once instead of waiting for the reaper."""
        n = self.names
        await client.register_script(self.lua.reap)(
            keys=[n.workers], args=[n.channel, n.claims_prefix, n.worker]
        )


class RedisBackplane:
    """hub.Backplane over one Redis server: see the package's docstring for the design."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "mt5hub",
        heartbeat: float = 2.0,
        ttl: float = 10.0,
        timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.heartbeat, self.ttl, self.timeout = heartbeat, ttl, timeout
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self.names = Names(prefix, self.worker, redis_database(url))
        self.channel = self.names.channel
        lua = scripts.load()
        self.outbound = Outbound(self.names, lua.write_batch)
        self.membership = Membership(self.names, lua, heartbeat, ttl)
        self.connected = False
        self.since = time.time()  # when `connected` last changed
        self.last_error = ""
        self._up = False  # publishes go to Redis (connected, or catching up) rather than local

    # -- hub.Backplane ------------------------------------------------------------------------

    def publish(self, hub: Hub, event: Event) -> None:
        if not self._up:
            hub.apply(event)  # alone until Redis is back: local viewers still get everything
        elif self.outbound.queue(event):
            hub.metrics.backplane_conflated.inc()

    def status(self) -> dict[str, Any]:
        return {
            "kind": "redis",
            "connected": self.connected,
            "since": round(self.since, 3),
            "worker": self.worker,
            "error": self.last_error,
        }

    # -- the connection's life ----------------------------------------------------------------

    async def run(self, hub: Hub, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected until cancelled (the app's lifespan ends), reconnecting with backoff.

        `task_status.started()` comes after the first attempt, successful or not, so that the
        app serves its first viewer with the shared state when Redis is there, and serves anyway
        (degraded) when it is not.
        """
        backoff = Backoff(maximum=max(self.heartbeat, 1.0))
        started = False

        def ready() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        try:
            while True:  # ends when the lifespan nursery is cancelled
                try:
                    await self._connection(hub, ready, backoff)
                except Exception as exc:
                    if not is_outage(exc):  # our bug: say so loudly, but keep the hub serving
                        log.exception("backplane: unexpected error; reconnecting")
                    self._down(hub, exc)
                ready()
                await trio.sleep(backoff.next())
        finally:
            self._up = False
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await self._leave()
            self.connected = False

    async def _connection(self, hub: Hub, ready: Callable[[], None], backoff: Backoff) -> None:
        async with (
            self._client() as client,
            client.pubsub(
                channels=[self.channel],
                ignore_subscribe_messages=True,
                retry_policy=NoRetryPolicy(),
            ) as subscription,
        ):
            self._up = True  # from now on publishes queue for Redis; the writer starts below
            with trio.fail_after(self.timeout * 4):
                await self.membership.catch_up(hub, client)
            self._set_connected(hub, True, "")
            backoff.reset()
            ready()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive, hub, subscription)
                nursery.start_soon(self.outbound.run, hub, client)
                nursery.start_soon(self.membership.keepalive, hub, client)

    def _client(self) -> coredis.Redis[bytes]:
        return coredis.Redis.from_url(
            self.url,
            connect_timeout=self.timeout,
            stream_timeout=self.timeout,
            retry_policy=NoRetryPolicy(),
        )

    def _down(self, hub: Hub, exc: BaseException) -> None:
        """Redis is gone: what did not make it there is applied here, and we go on alone."""
        self._up = False
        for event in self.outbound.unsent():
            hub.apply(event)
        error = _describe(exc)
        if self.connected or error != self.last_error:
            log.warning(
                "backplane %s unreachable (%s): serving local clients only, retrying",
                _redact(self.url),
                error,
            )
        self._set_connected(hub, False, error)

    def _set_connected(self, hub: Hub, connected: bool, error: str) -> None:
        if connected != self.connected:
            self.since = time.time()
            if connected:
                hub.metrics.backplane_connects.inc()
                log.info("backplane %s connected as %s", _redact(self.url), self.worker)
        self.connected, self.last_error = connected, error
        hub.metrics.backplane_connected.set(1 if connected else 0)

    async def _receive(self, hub: Hub, subscription: Any) -> None:
        received = hub.metrics.backplane_events.labels("in")
        async for message in subscription:
            received.inc(self.deliver(hub, message["data"]))
        raise coredis.exceptions.ConnectionError("subscription ended")

    def deliver(self, hub: Hub, data: bytes) -> int:
        """Apply the records of one channel message to the hub; how many there were."""
        count = 0
        for record in parse_records(data):
            if isinstance(record, UpdateRecord):
                self.outbound.confirmed(record.origin)
                # the publish's arrival on this hub's trio clock, for the latency metric (wall
                # clocks of one deployment's hosts agree well enough for it)
                received = trio.current_time() - max(0.0, time.time() - record.wall)
                hub.apply(Event("update", record.table, record.text, received, seq=record.seq))
            else:
                online = record.online
                hub.apply(hub.presence_event(record.table, record.client_id, online=online))
            count += 1
        return count

    async def _leave(self) -> None:
        if not self.connected:
            return
        try:
            async with self._client() as client:
                await self.membership.leave(client)
        except Exception as exc:  # Redis went away meanwhile: the reaper will do it
            log.info("backplane: could not withdraw claims on shutdown: %s", _describe(exc))


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def _redact(url: str) -> str:
    """The URL without a password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest
