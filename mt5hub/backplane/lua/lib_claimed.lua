-- The claims of all live hubs, as table, clientId pairs.
local function claimed(workers, prefix, now)
  local online = {}
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', workers, now, '+inf')) do
    local claims = redis.call('HGETALL', prefix .. w)
    for i = 1, #claims do table.insert(online, claims[i]) end
  end
  return online
end
