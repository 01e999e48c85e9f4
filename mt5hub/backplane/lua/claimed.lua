-- needs: now, claimed
-- KEYS: workers. ARGV: claims prefix. The claims of live hubs (table, clientId pairs).
return claimed(KEYS[1], ARGV[1], now)
