-- The time from Redis (ms), so that hubs on hosts with skewed clocks agree on expiry.
local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)
