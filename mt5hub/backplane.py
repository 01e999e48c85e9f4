"""The Redis backplane: every hub (Hypercorn workers, hosts) sharing one Redis acts as one hub.

A hub hands its accepted publishes and presence changes to `RedisBackplane.publish` (it never
blocks). One writer task runs each through a Lua script, which numbers updates per table, stores
the latest state and PUBLISHes it on one channel, all in one atomic step: so every hub, this one
included, receives every update once, in `seq` order, and `Hub.apply` drops what it has already
seen. A viewer's snapshot is then the hub's own memory: no Redis round trip per viewer.

Presence: each hub keeps its claims (tables it has a live publisher of) in a Redis hash, and a
heartbeat in a sorted set of hubs (score: expiry). A table goes offline when the last hub holding
it lets go, or is found dead by another hub's reaper (its heartbeat expired: SIGKILL, a lost host).

Redis down: the hub serves its own publishers and viewers as if it were alone (`Hub.apply`
locally), says `degraded` in /healthz and `mt5hub_backplane_connected 0` in /metrics, and
reconnects with capped, jittered backoff. Back up, it subscribes first, re-registers its claims,
offers its latest state of every table (Redis keeps the newer of the two, and PUBLISHes ours when it
is newer), and loads whatever other hubs changed meanwhile. Nothing a publisher sent is lost to a
viewer's latest state; intermediate updates of that window may be skipped, as with conflation.

Needs a single Redis server (scripts touch keys of other hubs, so not Redis Cluster).

Deployments sharing one Redis are kept apart by `backplane_prefix`, and by the URL's database
number too: keys live in their database, and the channel, which pub/sub shares across every
database of a server, is `<prefix>:db<n>:events` for a database n other than 0.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import coredis
import trio
from coredis.exceptions import RedisError
from coredis.retry import NoRetryPolicy

from .hub import Event, Hub, TableId, encode

log = logging.getLogger("mt5hub")

PENDING_LIMIT = 10_000  # events waiting for Redis before updates of one table replace each other
BATCH_LIMIT = 256  # events per script call: a backlog goes in several calls, not one huge one

# Every script reads the time from Redis, so hubs on hosts with skewed clocks agree on expiry.
_NOW = "local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

# Does a live hub other than ARGV[me] claim table `tid`? (claims hashes are `prefix .. hub`)
_HELD = """
local function held(workers, prefix, me, tid, now)
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', workers, now, '+inf')) do
    if w ~= me and redis.call('HEXISTS', prefix .. w, tid) == 1 then return true end
  end
  return false
end
"""

# Messages on the channel are one or more records, so that a batch costs one PUBLISH and one
# message to every hub. An update: "U\n<seq>\n<wall time>\n<origin>\n<table>\n<bytes>\n<text>";
# a presence change: "P\n<1|0>\n<table>\n<clientId>\n". Tables are JSON and clientIds carry no
# control characters, so neither holds a newline; the text is counted in bytes.
_RECORDS = """
local function update_record(seq, wall, origin, tid, text)
  return 'U\\n' .. seq .. '\\n' .. wall .. '\\n' .. origin .. '\\n' .. tid .. '\\n'
    .. #text .. '\\n' .. text
end
local function presence_record(flag, tid, client)
  return 'P\\n' .. flag .. '\\n' .. tid .. '\\n' .. client .. '\\n'
end
local function publish_records(channel, out)
  if #out > 0 then redis.call('PUBLISH', channel, table.concat(out)) end
end
"""

# KEYS: seq, state, workers, my claims. ARGV: channel, claims prefix, me, then operations:
#   'U', table, floor seq, text, wall time, origin: number the update after max(stored, floor),
#       store it as the table's latest state;
#   'C', table, clientId, '1'|'0': this hub's first publisher of the table came, or its last left;
#       the table's presence changes unless another live hub holds it.
# All in order, atomically, and one PUBLISH of the records for every hub.
WRITE_BATCH = (
    _NOW
    + _HELD
    + _RECORDS
    + """
local out = {}
local i = 4
while i <= #ARGV do
  local tid = ARGV[i + 1]
  if ARGV[i] == 'U' then
    local seq = tonumber(redis.call('HGET', KEYS[1], tid) or '0')
    local floor = tonumber(ARGV[i + 2])
    if floor > seq then seq = floor end
    seq = seq + 1
    redis.call('HSET', KEYS[1], tid, seq)
    redis.call('HSET', KEYS[2], tid, ARGV[i + 3])
    table.insert(out, update_record(seq, ARGV[i + 4], ARGV[i + 5], tid, ARGV[i + 3]))
    i = i + 6
  else
    local was_held = held(KEYS[3], ARGV[2], ARGV[3], tid, now)
    if ARGV[i + 3] == '1' then
      redis.call('HSET', KEYS[4], tid, ARGV[i + 2])
    else
      redis.call('HDEL', KEYS[4], tid)
    end
    if not was_held then table.insert(out, presence_record(ARGV[i + 3], tid, ARGV[i + 2])) end
    i = i + 4
  end
end
publish_records(ARGV[1], out)
return #out
"""
)

# KEYS: seq, state. ARGV: channel, then table, seq, text, wall time per table.
# After an outage: keep this hub's state of a table where it is newer than Redis's, and tell all.
OFFER_STATE = (
    _RECORDS
    + """
local out = {}
for i = 2, #ARGV, 4 do
  local stored = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if stored < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
    table.insert(out, update_record(ARGV[i + 1], ARGV[i + 3], '', ARGV[i], ARGV[i + 2]))
  end
end
publish_records(ARGV[1], out)
return #out
"""
)

# KEYS: workers, my claims. ARGV: channel, claims prefix, me, ttl ms, then table, clientId pairs.
# (Re)join: heartbeat, replace my claims with the given ones, announce what that changes.
REGISTER = (
    _NOW
    + _HELD
    + _RECORDS
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[3])
local old = redis.call('HGETALL', KEYS[2])
redis.call('DEL', KEYS[2])
local mine, out = {}, {}
for i = 5, #ARGV, 2 do
  mine[ARGV[i]] = true
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  if not held(KEYS[1], ARGV[2], ARGV[3], ARGV[i], now) then
    table.insert(out, presence_record('1', ARGV[i], ARGV[i + 1]))
  end
end
for i = 1, #old, 2 do
  if not mine[old[i]] and not held(KEYS[1], ARGV[2], ARGV[3], old[i], now) then
    table.insert(out, presence_record('0', old[i], old[i + 1]))
  end
end
publish_records(ARGV[1], out)
redis.call('PEXPIRE', KEYS[2], 10 * tonumber(ARGV[4]))
return 1
"""
)

# KEYS: workers, my claims. ARGV: me, ttl ms. Returns 0 if Redis had forgotten this hub (it
# restarted, or a reaper took this hub for dead): the hub must REGISTER again.
HEARTBEAT = (
    _NOW
    + """
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], 10 * tonumber(ARGV[2]))
if known then return 1 end
return 0
"""
)

# KEYS: workers. ARGV: channel, claims prefix, and optionally a hub leaving now.
# Drop hubs whose heartbeat expired: their tables held by no live hub go offline.
REAP = (
    _NOW
    + _HELD
    + _RECORDS
    + """
if ARGV[3] then redis.call('ZADD', KEYS[1], 0, ARGV[3]) end
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
if #dead == 0 then return 0 end
for _, d in ipairs(dead) do redis.call('ZREM', KEYS[1], d) end
local out = {}
for _, d in ipairs(dead) do
  local claims = redis.call('HGETALL', ARGV[2] .. d)
  for i = 1, #claims, 2 do
    if not held(KEYS[1], ARGV[2], '', claims[i], now) then
      table.insert(out, presence_record('0', claims[i], claims[i + 1]))
    end
  end
  redis.call('DEL', ARGV[2] .. d)
end
publish_records(ARGV[1], out)
return #dead
"""
)

# The claims of all live hubs, as table, clientId pairs.
_CLAIMED = """
local function claimed(workers, prefix, now)
  local online = {}
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', workers, now, '+inf')) do
    local claims = redis.call('HGETALL', prefix .. w)
    for i = 1, #claims do table.insert(online, claims[i]) end
  end
  return online
end
"""

# KEYS: seq, state, workers. ARGV: claims prefix.
# Everything a hub needs to catch up: seqs, states, and the claims of live hubs.
LOAD = (
    _NOW
    + _CLAIMED
    + """
local seqs, states = redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])
return {seqs, states, claimed(KEYS[3], ARGV[1], now)}
"""
)

# KEYS: workers. ARGV: claims prefix. The claims of live hubs (table, clientId pairs).
CLAIMED = _NOW + _CLAIMED + "return claimed(KEYS[1], ARGV[1], now)\n"


def table_field(table: TableId) -> str:
    """A table's name in Redis hashes and messages: `["key","src"]` (no raw newlines in it)."""
    return encode(list(table))


def parse_table(field: str) -> TableId:
    key, src = json.loads(field)
    return (str(key), str(src))


def _pairs(flat: list[bytes]) -> Iterable[tuple[str, str]]:
    for i in range(0, len(flat) - 1, 2):
        yield flat[i].decode(), flat[i + 1].decode()


class Backoff:
    """Capped exponential backoff with full jitter: spread the reconnects of many hubs."""

    def __init__(
        self, initial: float = 0.1, maximum: float = 5.0, rng: random.Random | None = None
    ) -> None:
        self.initial, self.maximum = initial, maximum
        self._rng = rng or random.Random()
        self._attempt = 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * 2**self._attempt)
        self._attempt += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0


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


class RedisBackplane:
    """hub.Backplane over one Redis server: see the module docstring for the design."""

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
        # Pub/sub ignores database numbers: the channel carries it (0 keeps the plain name).
        database = redis_database(url)
        self.channel = f"{prefix}:db{database}:events" if database else f"{prefix}:events"
        self._keys_seq, self._keys_state = f"{prefix}:seq", f"{prefix}:state"
        self._keys_workers = f"{prefix}:workers"
        self._claims_prefix = f"{prefix}:claims:"
        self._claims = self._claims_prefix + self.worker
        self.connected = False
        self.since = time.time()  # when `connected` last changed
        self.last_error = ""
        self._up = False  # publishes go to Redis (connected, or catching up) rather than local
        # Events on their way to Redis, in order. Past PENDING_LIMIT (Redis slow, not gone) an
        # update replaces its table's pending one in place: memory stays bounded per table.
        self._pending: list[Event] = []
        self._pending_update: dict[TableId, int] = {}  # table -> index of its pending update
        self._wake = trio.Event()
        self._serial = 0
        self._inflight: dict[int, Event] = {}  # updates sent, until they come back on the channel
        self._unclaimed: list[TableId] = []  # see _catch_up
        self._unclaimed_at = 0.0

    # -- hub.Backplane ------------------------------------------------------------------------

    def publish(self, hub: Hub, event: Event) -> None:
        if not self._up:
            hub.apply(event)  # alone until Redis is back: local viewers still get everything
            return
        if event.kind == "update":
            index = self._pending_update.get(event.table)
            if index is not None and len(self._pending) >= PENDING_LIMIT:
                self._pending[index] = event
                hub.metrics.backplane_conflated.inc()
                return
            self._pending_update[event.table] = len(self._pending)
        self._pending.append(event)
        self._wake.set()

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
                await self._catch_up(hub, client)
            self._set_connected(hub, True, "")
            backoff.reset()
            ready()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive, hub, subscription)
                nursery.start_soon(self._write, hub, client)
                nursery.start_soon(self._keepalive, hub, client)

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
        unseen = [self._inflight[n] for n in sorted(self._inflight)]
        unseen += self._pending
        self._inflight.clear()
        self._pending, self._pending_update = [], {}
        for event in unseen:
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

    # -- catching up after (re)connecting -----------------------------------------------------

    async def _catch_up(self, hub: Hub, client: coredis.Redis[bytes]) -> None:
        """Claims, then our state where it is newer, then theirs where it is newer."""
        await self._register(hub, client)
        offer: list[str | int | float] = [self.channel]
        for state in hub.tables.values():
            if state.update is not None:
                offer += [table_field(state.table), state.seq, state.published_text(), time.time()]
        if len(offer) > 1:
            await client.register_script(OFFER_STATE)(
                keys=[self._keys_seq, self._keys_state], args=offer
            )
        load = client.register_script(LOAD)
        loaded: Any = await load(
            keys=[self._keys_seq, self._keys_state, self._keys_workers],
            args=[self._claims_prefix],
        )
        seqs, states, online = loaded
        texts = dict(_pairs(states))
        for field, seq in _pairs(seqs):
            if field in texts:
                event = Event("update", parse_table(field), texts[field], seq=int(seq))
                hub.apply(event)
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

    async def _register(self, hub: Hub, client: coredis.Redis[bytes]) -> None:
        args: list[str | int] = [self.channel, self._claims_prefix, self.worker, self._ttl_ms]
        for state in hub.tables.values():
            if state.publishers:
                args += [table_field(state.table), next(reversed(state.publishers.values()))]
        await client.register_script(REGISTER)(keys=[self._keys_workers, self._claims], args=args)

    # -- the three tasks of a connection ------------------------------------------------------

    async def _write(self, hub: Hub, client: coredis.Redis[bytes]) -> None:
        """Send what is pending: all of it in one script call, so one round trip and one message.

        While the hub is busy this task runs less often and each batch grows: the cost per
        update falls as the load rises, on every hub.
        """
        write = client.register_script(WRITE_BATCH)
        keys = [self._keys_seq, self._keys_state, self._keys_workers, self._claims]
        sent = hub.metrics.backplane_events.labels("out")
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            batch, self._pending = self._pending[:BATCH_LIMIT], self._pending[BATCH_LIMIT:]
            self._pending_update = {
                e.table: i for i, e in enumerate(self._pending) if e.kind == "update"
            }
            if self._pending:
                self._wake.set()  # the rest goes in the next call
            args: list[str | int | float] = [self.channel, self._claims_prefix, self.worker]
            for event in batch:
                field = table_field(event.table)
                if event.kind == "update":
                    self._serial += 1
                    self._inflight[self._serial] = event
                    state = hub.tables.get(event.table)
                    floor = state.seq if state is not None else 0
                    origin = f"{self.worker}#{self._serial}"
                    args += ["U", field, floor, event.text, time.time(), origin]
                else:
                    args += ["C", field, event.client_id, "1" if event.online else "0"]
            await write(keys=keys, args=args)
            sent.inc(len(batch))

    async def _receive(self, hub: Hub, subscription: Any) -> None:
        received = hub.metrics.backplane_events.labels("in")
        async for message in subscription:
            received.inc(self.deliver(hub, message["data"]))
        raise coredis.exceptions.ConnectionError("subscription ended")

    def deliver(self, hub: Hub, data: bytes) -> int:
        """Apply the events of one channel message to the hub; how many there were."""
        count = 0
        for event in self._events(hub, data):
            hub.apply(event)
            count += 1
        return count

    def _events(self, hub: Hub, data: bytes) -> Iterator[Event]:
        """The events of one channel message (see _RECORDS for the format)."""
        pos = 0

        def line() -> str:
            nonlocal pos
            end = data.index(b"\n", pos)
            text, pos = data[pos:end].decode(), end + 1
            return text

        while pos < len(data):
            kind = line()
            if kind == "U":
                seq, wall, origin, field, size = line(), line(), line(), line(), int(line())
                text, pos = data[pos : pos + size].decode(), pos + size
                worker, _, serial = origin.rpartition("#")
                if worker == self.worker:
                    self._inflight.pop(int(serial), None)
                # the publish's arrival on this hub's trio clock, for the latency metric (wall
                # clocks of one deployment's hosts agree well enough for it)
                received = trio.current_time() - max(0.0, time.time() - float(wall))
                yield Event("update", parse_table(field), text, received, seq=int(seq))
            elif kind == "P":
                online, field, client_id = line(), line(), line()
                yield hub.presence_event(parse_table(field), client_id, online=online == "1")
            else:
                raise ValueError(f"backplane: unknown record {kind!r}")

    async def _keepalive(self, hub: Hub, client: coredis.Redis[bytes]) -> None:
        """Heartbeat, re-register if Redis forgot us, and reap hubs that died silently."""
        heartbeat = client.register_script(HEARTBEAT)
        reap = client.register_script(REAP)
        while True:  # ends with the connection (cancelled) or an outage (raises)
            known: Any = await heartbeat(
                keys=[self._keys_workers, self._claims], args=[self.worker, self._ttl_ms]
            )
            if not known:
                log.warning("backplane: Redis had forgotten this hub; registering again")
                await self._register(hub, client)
            await reap(keys=[self._keys_workers], args=[self.channel, self._claims_prefix])
            if self._unclaimed and trio.current_time() >= self._unclaimed_at:
                await self._settle_unclaimed(hub, client)
            await trio.sleep(self.heartbeat)

    async def _settle_unclaimed(self, hub: Hub, client: coredis.Redis[bytes]) -> None:
        """Tables still claimed by no live hub one `ttl` after catching up: offline now."""
        online: Any = await client.register_script(CLAIMED)(
            keys=[self._keys_workers], args=[self._claims_prefix]
        )
        claimed = {field for field, _ in _pairs(online)}
        for table in self._unclaimed:
            state = hub.tables.get(table)
            if state is not None and state.online and table_field(table) not in claimed:
                hub.apply(hub.presence_event(table, state.client_id, online=False))
        self._unclaimed = []

    async def _leave(self) -> None:
        """On shutdown: withdraw this hub's claims at once instead of waiting for the reaper."""
        if not self.connected:
            return
        try:
            async with self._client() as client:
                await client.register_script(REAP)(
                    keys=[self._keys_workers],
                    args=[self.channel, self._claims_prefix, self.worker],
                )
        except Exception as exc:  # Redis went away meanwhile: the reaper will do it
            log.info("backplane: could not withdraw claims on shutdown: %s", _describe(exc))

    @property
    def _ttl_ms(self) -> int:
        return int(self.ttl * 1000)


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
