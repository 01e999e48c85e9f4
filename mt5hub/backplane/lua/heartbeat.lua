-- needs: now
-- KEYS: workers, my claims. ARGV: me, ttl ms. Returns 0 if Redis had forgotten this hub (it
-- restarted, or a reaper took this hub for dead): the hub must REGISTER again.
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], 10 * tonumber(ARGV[2]))
if known then return 1 end
return 0
