-- needs: now, held, records
-- KEYS: workers, my claims. ARGV: channel, claims prefix, me, ttl ms, then table, clientId pairs.
-- (Re)join: heartbeat, replace my claims with the given ones, announce what that changes.
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
