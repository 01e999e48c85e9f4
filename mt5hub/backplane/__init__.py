"""The Redis backplane: every hub (Hypercorn workers, hosts) sharing one Redis acts as one hub.

A hub hands its accepted publishes and presence changes to `RedisBackplane.publish` (it never
blocks). One writer task runs each through a Lua script (lua/write_batch.lua), which numbers
updates per table, stores the latest state and PUBLISHes it on one channel, all in one atomic
step: so every hub, this one included, receives every update once, in `seq` order, and
`Hub.apply` drops what it has already seen. A viewer's snapshot is then the hub's own memory: no
Redis round trip per viewer. See docs/decisions/004-redis-lua-batching.md.

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

    records.py   the format of the channel's messages (Lua writes it, Python reads it)
    scripts.py   the Lua scripts (lua/*.lua), read when a backplane is made
    redis.py     RedisBackplane: Outbound, Membership, and the connection's life
"""

from ..supervise import Backoff
from .records import parse_table, table_field
from .redis import (
    BATCH_LIMIT,
    PENDING_LIMIT,
    RedisBackplane,
    _redact,
    is_outage,
    redis_database,
)

__all__ = [
    "BATCH_LIMIT",
    "PENDING_LIMIT",
    "Backoff",
    "RedisBackplane",
    "_redact",
    "is_outage",
    "parse_table",
    "redis_database",
    "table_field",
]
