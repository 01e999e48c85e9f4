-- The records of channel messages: their format is mt5hub/backplane/records.py's.
local function update_record(seq, wall, origin, tid, text)
  return 'U\n' .. seq .. '\n' .. wall .. '\n' .. origin .. '\n' .. tid .. '\n'
    .. #text .. '\n' .. text
end
local function presence_record(flag, tid, client)
  return 'P\n' .. flag .. '\n' .. tid .. '\n' .. client .. '\n'
end
local function publish_records(channel, out)
  if #out > 0 then redis.call('PUBLISH', channel, table.concat(out)) end
end
