-- needs: now, claimed
-- KEYS: seq, state, workers. ARGV: claims prefix.
-- Everything a hub needs to catch up: seqs, states, and the claims of live hubs.
local seqs, states = redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])
return {seqs, states, claimed(KEYS[3], ARGV[1], now)}
