-- needs: now, held, records
-- KEYS: workers. ARGV: channel, claims prefix, and optionally a hub leaving now.
-- Drop hubs whose heartbeat expired: their tables held by no live hub go offline.
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
