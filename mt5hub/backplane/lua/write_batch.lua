-- needs: now, held, records
-- KEYS: seq, state, workers, my claims. ARGV: channel, claims prefix, me, then operations:
--   'U', table, floor seq, text, wall time, origin: number the update after max(stored, floor),
--       store it as the table's latest state;
--   'C', table, clientId, '1'|'0': this hub's first publisher of the table came, or its last left;
--       the table's presence changes unless another live hub holds it.
-- All in order, atomically, and one PUBLISH of the records for every hub.
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
