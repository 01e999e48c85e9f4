-- needs: records
-- KEYS: seq, state. ARGV: channel, then table, seq, text, wall time per table.
-- After an outage: keep this hub's state of a table where it is newer than Redis's, and tell all.
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
