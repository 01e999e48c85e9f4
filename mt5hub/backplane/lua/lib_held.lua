-- Does a live hub other than `me` claim table `tid`? (claims hashes are `prefix .. hub`)
local function held(workers, prefix, me, tid, now)
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', workers, now, '+inf')) do
    if w ~= me and redis.call('HEXISTS', prefix .. w, tid) == 1 then return true end
  end
  return false
end
