"""The server-side half of the Redis backend: one Lua script per operation.

Every queue operation is one ``EVALSHA`` of a script below, so its effect is
atomic on the server (Redis runs a script to completion before any other
command, and AOF/replicas receive its effects as one ``MULTI``/``EXEC``).
``KEYS[1]`` is the queue's metadata key (so a cluster client routes the call
to the queue's slot) and ``ARGV[1]`` its key prefix ``fmq:{name}:``; every
other key a script touches carries the same ``{name}`` hash tag, so a queue
lives in one cluster slot.

Keys of a queue (prefix ``P = fmq:{name}:``):

* ``P m`` -- hash: the queue's settings and counters. Created by ``create``;
  every script fails with ``FMQNOTFOUND`` without it, so a server that lost
  its data (restart without persistence) gives ``QueueNotFound``, never a
  silent empty queue.
* ``P s`` -- stream of ready messages, oldest first. Field ``d`` is the
  payload, ``c`` (absent on a first delivery) the deliveries so far. A take
  reads the first n entries and trims them with ``XTRIM MINID`` (exact, just
  past the last one read): whole stream nodes go at once, where ``XDEL``
  would leave tombstones to skip. ``MAXLEN`` is never used (it would delete
  unread messages); ``maxsize`` is checked before ``XADD``.
* ``P L`` / ``P Lm`` / ``P Ld`` -- leased messages: payload by entry id;
  ``"<delivery_count> <consumer> <leased_at_ms> <bytes> <deadline_ms>"`` by
  id (the owner check compares its prefix, so an ack needs no other read);
  ids by lease deadline (server clock, ``TIME``), for finding the expired
  ones. An id is the message's stream id of *this* delivery: a redelivery
  re-appends the message at the back (a new id), so an old holder's ``ack``
  finds nothing and is refused.
* ``P C`` -- zset of leasing consumers by heartbeat deadline. A consumer
  whose heartbeat lapsed is gone: its leases (found by a scan of ``Lm``, a
  rare event) are given back, counted ``abandoned``, by the next script that
  reclaims.
* ``P D`` -- stream of parked dead letters, forwarded by the client to the
  dead-letter queue (another slot in a cluster, so not from a script).
* ``P sig`` / ``P fr`` -- one-entry streams that a waiting consumer /
  producer blocks on with ``XREAD BLOCK`` (from the id the failed attempt
  returned, so no wake-up is lost); ``P gw`` / ``P pw`` -- short-lived flags
  saying somebody waits, so the hot paths signal only when it matters.
* ``P seq`` -- last applied request number per producer: a ``put`` retried
  after a lost reply is applied once. ``P P`` / ``P G`` -- zsets of producers
  and consumers by last activity (for ``stats()``), pruned as they age.

Consumers never use consumer groups: raw ``XACK`` has no owner check and
``XCLAIM`` keeps an old id (a "requeued" message would jump the line); the
lease structures above give both the owner check and re-append at the back.
"""
from __future__ import annotations

PRELUDE = r"""
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function last_id(key)
  local e = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if #e == 0 then return '0-0' end
  return e[1][1]
end
local function signal(flag, key)
  if redis.call('EXISTS', P .. flag) == 1 then
    redis.call('XADD', key, 'MAXLEN', 1, '*', 'x', '1')
  end
end
local function id_less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, bm = tonumber(am), tonumber(bm)
  if am ~= bm then return am < bm end
  return tonumber(as) < tonumber(bs)
end
-- End the lease of entry `id`: back to the queue (with one more delivery
-- counted), or dead-lettered past max_deliveries / when `dead` is true.
-- `why` is the counter bumped on a requeue besides 'redelivered'.
local function give_back(id, why, dead)
  local payload = redis.call('HGET', P .. 'L', id)
  local meta = redis.call('HGET', P .. 'Lm', id)
  redis.call('ZREM', P .. 'Ld', id)
  redis.call('HDEL', P .. 'L', id)
  redis.call('HDEL', P .. 'Lm', id)
  if not payload or not meta then return 0 end
  local count = tonumber(string.match(meta, '^(%d+) '))
  local maxdel = tonumber(redis.call('HGET', P .. 'm', 'maxdel') or '20')
  if not dead and count < maxdel then
    redis.call('XADD', P .. 's', '*', 'd', payload, 'c', count)
    redis.call('HINCRBY', P .. 'm', 'redelivered', 1)
    if why then redis.call('HINCRBY', P .. 'm', why, 1) end
    signal('gw', P .. 'sig')
  else
    if redis.call('HGET', P .. 'm', 'dlq') ~= '' then
      redis.call('XADD', P .. 'D', '*', 'd', payload)
    else
      redis.call('HINCRBY', P .. 'm', 'bytes', -string.len(payload))
    end
    redis.call('HINCRBY', P .. 'm', 'dead_lettered', 1)
  end
  return 1
end
-- The ids leased by the consumers in the set `who`, oldest first.
local function leases_of(who)
  local all = redis.call('HGETALL', P .. 'Lm')
  local ids = {}
  for i = 1, #all, 2 do
    local c = string.match(all[i + 1], '^%d+ (%S+) ')
    if who[c] then ids[#ids + 1] = all[i] end
  end
  table.sort(ids, id_less)
  return ids
end
-- Give back the expired leases and the leases of consumers whose heartbeat
-- lapsed (bounded work per call; the rest goes at the next call).
local function reclaim(now)
  local n = 0
  local due = redis.call('ZRANGEBYSCORE', P .. 'Ld', '-inf', now, 'LIMIT', 0, 256)
  for _, id in ipairs(due) do n = n + give_back(id, false, false) end
  local gone = redis.call('ZRANGEBYSCORE', P .. 'C', '-inf', now, 'LIMIT', 0, 16)
  if #gone > 0 then
    local who = {}
    for _, c in ipairs(gone) do who[c] = true end
    for _, id in ipairs(leases_of(who)) do n = n + give_back(id, 'abandoned', false) end
    redis.call('ZREM', P .. 'C', unpack(gone))
  end
  return n
end
-- Take the first `n` ready entries (read, then trimmed just past the last).
local function take(n)
  local ents = redis.call('XRANGE', P .. 's', '-', '+', 'COUNT', n)
  if #ents > 0 then
    local ms, seq = string.match(ents[#ents][1], '^(%d+)-(%d+)$')
    redis.call('XTRIM', P .. 's', 'MINID', ms .. '-' .. (tonumber(seq) + 1))
  end
  return ents
end
-- The lease fields of a meta string: bytes, deadline.
local function lease_tail(meta)
  local len, dl = string.match(meta, ' (%d+) (%d+)$')
  return tonumber(len), tonumber(dl)
end
local function exists()
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return redis.error_reply('FMQNOTFOUND')
  end
end
"""

# ARGV: P, maxsize, max_message_size, max_bytes, max_deliveries, dead_letter, exist_ok
CREATE = r"""
if redis.call('EXISTS', KEYS[1]) == 1 then
  if ARGV[7] ~= '1' then return redis.error_reply('FMQEXISTS') end
else
  redis.call('HSET', KEYS[1], 'maxsize', ARGV[2], 'mms', ARGV[3], 'maxbytes', ARGV[4],
             'maxdel', ARGV[5], 'dlq', ARGV[6], 'version', 1, 'created', now_ms(),
             'enqueued', 0, 'dequeued', 0, 'redelivered', 0, 'abandoned', 0,
             'dead_lettered', 0, 'bytes', 0)
end
return redis.call('HMGET', KEYS[1], 'maxsize', 'mms', 'maxbytes', 'maxdel', 'dlq')
"""

OPEN = r"""
local e = exists() if e then return e end
return redis.call('HMGET', KEYS[1], 'maxsize', 'mms', 'maxbytes', 'maxdel', 'dlq')
"""

UNLINK = r"""
local e = exists() if e then return e end
for _, k in ipairs({'m', 's', 'L', 'Lm', 'Ld', 'C', 'D', 'sig', 'fr', 'gw', 'pw', 'seq',
                    'P', 'G'}) do
  redis.call('DEL', P .. k)
end
return 1
"""

# ARGV: P, producer, seq, atomic, wait_ms, payload...
# -> {count put, id to wait from (when not all went in)}
PUT = r"""
local m = redis.call('HMGET', KEYS[1], 'maxsize', 'maxbytes')
if not m[1] then return redis.error_reply('FMQNOTFOUND') end
local producer, seq = ARGV[2], tonumber(ARGV[3])
local now = now_ms()
if producer ~= '' then
  local last = redis.call('HGET', P .. 'seq', producer)
  if last then
    local lseq, lcount = string.match(last, '^(%d+):(%d+)$')
    if tonumber(lseq) == seq then return {tonumber(lcount), '0-0'} end
  end
end
local n = #ARGV - 5
local maxsize, maxbytes = tonumber(m[1]), tonumber(m[2])
local room = n
if maxsize > 0 then
  room = maxsize - redis.call('XLEN', P .. 's')
  if room > n then room = n end
  if room < 0 then room = 0 end
end
if ARGV[4] == '1' and room < n then room = 0 end
local total = 0
if maxbytes > 0 then
  local used = tonumber(redis.call('HGET', KEYS[1], 'bytes'))
  local fit = 0
  for i = 1, room do
    local len = string.len(ARGV[5 + i])
    if used + total + len > maxbytes then break end
    total = total + len
    fit = i
  end
  if ARGV[4] == '1' and fit < n then fit = 0 total = 0 end
  room = fit
else
  for i = 1, room do total = total + string.len(ARGV[5 + i]) end
end
local s = P .. 's'
for i = 1, room do redis.call('XADD', s, '*', 'd', ARGV[5 + i]) end
if room > 0 then
  redis.call('HINCRBY', KEYS[1], 'enqueued', room)
  redis.call('HINCRBY', KEYS[1], 'bytes', total)
  signal('gw', P .. 'sig')
end
if producer ~= '' then
  redis.call('HSET', P .. 'seq', producer, ARGV[3] .. ':' .. room)
  redis.call('ZADD', P .. 'P', now, producer)
  local old = redis.call('ZRANGEBYSCORE', P .. 'P', '-inf', now - 3600000, 'LIMIT', 0, 8)
  for _, p in ipairs(old) do
    redis.call('HDEL', P .. 'seq', p)
    redis.call('ZREM', P .. 'P', p)
  end
end
if room < n and tonumber(ARGV[5]) > 0 then
  redis.call('SET', P .. 'pw', '1', 'PX', ARGV[5])
  return {room, last_id(P .. 'fr')}
end
return {room, '0-0'}
"""

# ARGV: P, max, getter, wait_ms -> {n, payload...} or {0, id to wait from}
GET = r"""
local e = exists() if e then return e end
local now = now_ms()
reclaim(now)
local ents = take(ARGV[2])
if #ents == 0 then
  if tonumber(ARGV[4]) > 0 then redis.call('SET', P .. 'gw', '1', 'PX', ARGV[4]) end
  redis.call('ZADD', P .. 'G', now, ARGV[3])
  return {0, last_id(P .. 'sig')}
end
local out, total = {#ents}, 0
for i, ent in ipairs(ents) do
  local payload = ent[2][2]
  out[i + 1] = payload
  total = total + string.len(payload)
end
redis.call('HINCRBY', KEYS[1], 'dequeued', #ents)
redis.call('HINCRBY', KEYS[1], 'bytes', -total)
redis.call('ZADD', P .. 'G', now, ARGV[3])
signal('pw', P .. 'fr')
return out
"""

# ARGV: P, max, consumer, lease_ms, heartbeat_ms, wait_ms
# -> {n, now, id, count, payload, ...} or {0, id to wait from}
LEASE = r"""
local e = exists() if e then return e end
local now = now_ms()
reclaim(now)
local ents = take(ARGV[2])
local consumer = ARGV[3]
if #ents == 0 then
  if tonumber(ARGV[6]) > 0 then redis.call('SET', P .. 'gw', '1', 'PX', ARGV[6]) end
  redis.call('ZADD', P .. 'G', now, consumer)
  return {0, last_id(P .. 'sig')}
end
local deadline = now + tonumber(ARGV[4])
local out, L, Lm, Ld = {#ents, now}, {}, {}, {}
local mid = ' ' .. consumer .. ' ' .. now .. ' '
local tail = ' ' .. deadline
for i, ent in ipairs(ents) do
  local id, f = ent[1], ent[2]
  local count = 1
  if f[4] then count = tonumber(f[4]) + 1 end
  L[2 * i - 1], L[2 * i] = id, f[2]
  Lm[2 * i - 1], Lm[2 * i] = id, count .. mid .. string.len(f[2]) .. tail
  Ld[2 * i - 1], Ld[2 * i] = deadline, id
  out[3 * i], out[3 * i + 1], out[3 * i + 2] = id, count, f[2]
end
redis.call('HSET', P .. 'L', unpack(L))
redis.call('HSET', P .. 'Lm', unpack(Lm))
redis.call('ZADD', P .. 'Ld', unpack(Ld))
redis.call('ZADD', P .. 'C', now + tonumber(ARGV[5]), consumer)
redis.call('ZADD', P .. 'G', now, consumer)
signal('pw', P .. 'fr')
return out
"""

# ARGV: P, consumer, id, count, id, count, ... -> {1 acked | 0 lost, ...}
ACK = r"""
local now = now_ms()
local consumer = ARGV[2]
local ids, want = {}, {}
for i = 3, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
  want[#want + 1] = ARGV[i + 1] .. ' ' .. consumer .. ' '
end
local metas = redis.call('HMGET', P .. 'Lm', unpack(ids))
local res, ok, total = {}, {}, 0
for i, id in ipairs(ids) do
  local meta = metas[i]
  res[i] = 0
  if meta and string.sub(meta, 1, #want[i]) == want[i] then
    local len, dl = lease_tail(meta)
    if dl >= now then
      res[i] = 1
      ok[#ok + 1] = id
      total = total + len
    else
      give_back(id, false, false)      -- expired: it goes back now
    end
  end
end
if #ok > 0 then
  redis.call('HDEL', P .. 'L', unpack(ok))
  redis.call('HDEL', P .. 'Lm', unpack(ok))
  redis.call('ZREM', P .. 'Ld', unpack(ok))
  redis.call('HINCRBY', KEYS[1], 'dequeued', #ok)
  redis.call('HINCRBY', KEYS[1], 'bytes', -total)
  signal('pw', P .. 'fr')
end
return res
"""

# ARGV: P, consumer, id, count, what ('nack' | 'dead' | 'touch'), touch_ms -> 1 | 0 lost
SETTLE = r"""
local now = now_ms()
local id = ARGV[3]
local want = ARGV[4] .. ' ' .. ARGV[2] .. ' '
local meta = redis.call('HGET', P .. 'Lm', id)
if not meta or string.sub(meta, 1, #want) ~= want then return 0 end
local _, dl = lease_tail(meta)
if dl < now then
  give_back(id, false, false)
  return 0
end
if ARGV[5] == 'touch' then
  local deadline = now + tonumber(ARGV[6])
  redis.call('HSET', P .. 'Lm', id, string.match(meta, '^(.* )%d+$') .. deadline)
  redis.call('ZADD', P .. 'Ld', 'XX', deadline, id)
  return 1
end
give_back(id, false, ARGV[5] == 'dead')
return 1
"""

# ARGV: P, consumer, heartbeat_ms, depart ('1': give every lease back, forget it)
# -> how many leases were given back
HEARTBEAT = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local now = now_ms()
local consumer = ARGV[2]
if ARGV[4] == '1' then
  for _, id in ipairs(leases_of({[consumer] = true})) do give_back(id, false, false) end
  redis.call('ZREM', P .. 'C', consumer)
else
  redis.call('ZADD', P .. 'C', 'XX', now + tonumber(ARGV[3]), consumer)
end
return reclaim(now)
"""

# -> {now, {field, value...} of Lm, {id, deadline...}}
PENDING = r"""
local e = exists() if e then return e end
local now = now_ms()
reclaim(now)
return {now, redis.call('HGETALL', P .. 'Lm'), redis.call('ZRANGE', P .. 'Ld', 0, -1, 'WITHSCORES')}
"""

# -> {meta fields/values, depth, in flight, consumers leasing, producers, getters, parked}
STATS = r"""
local e = exists() if e then return e end
local now = now_ms()
reclaim(now)
return {redis.call('HGETALL', KEYS[1]), redis.call('XLEN', P .. 's'), redis.call('HLEN', P .. 'L'),
        redis.call('ZCOUNT', P .. 'C', now, '+inf'),
        redis.call('ZCOUNT', P .. 'P', now - 60000, '+inf'),
        redis.call('ZCOUNT', P .. 'G', now - 60000, '+inf'),
        redis.call('XLEN', P .. 'D'), now}
"""

# ARGV: P, max -> {id, payload, ...} of parked dead letters (not removed)
PARKED = r"""
local ents = redis.call('XRANGE', P .. 'D', '-', '+', 'COUNT', ARGV[2])
local out = {}
for _, ent in ipairs(ents) do
  out[#out + 1] = ent[1]
  out[#out + 1] = ent[2][2]
end
return out
"""

# ARGV: P, id... -> forwarded parked dead letters leave this queue
UNPARK = r"""
local total = 0
for i = 2, #ARGV do
  local ent = redis.call('XRANGE', P .. 'D', ARGV[i], ARGV[i])
  if #ent == 1 then total = total + string.len(ent[1][2][2]) end
end
local n = redis.call('XDEL', P .. 'D', unpack(ARGV, 2))
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'bytes', -total)
end
return n
"""

# ---------------------------------------------------------------- exchanges
#
# Keys of an exchange: ``fmq:x:{name}`` (hash: kind, version, turn) and
# ``fmq:x:{name}:b`` (zset of "key\nqueue" by binding order).

# ARGV: kind, exist_ok
X_CREATE = r"""
if redis.call('EXISTS', KEYS[1]) == 1 then
  if ARGV[2] ~= '1' then return redis.error_reply('FMQEXISTS') end
else
  redis.call('HSET', KEYS[1], 'kind', ARGV[1], 'version', 1, 'turn', 0, 'seq', 0)
end
return redis.call('HGET', KEYS[1], 'kind')
"""

# -> {kind, version, member, member, ...}
X_READ = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('FMQNOTFOUND') end
local h = redis.call('HMGET', KEYS[1], 'kind', 'version')
local out = {h[1], h[2]}
for _, b in ipairs(redis.call('ZRANGE', KEYS[1] .. ':b', 0, -1)) do out[#out + 1] = b end
return out
"""

# ARGV: 'bind' | 'unbind', member, queue meta key (bind: must exist)
X_BIND = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('FMQNOTFOUND') end
if ARGV[1] == 'bind' then
  if redis.call('EXISTS', ARGV[3]) == 0 then return redis.error_reply('FMQNOQUEUE') end
  if redis.call('ZSCORE', KEYS[1] .. ':b', ARGV[2]) then return 0 end
  local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  redis.call('ZADD', KEYS[1] .. ':b', seq, ARGV[2])
else
  if redis.call('ZREM', KEYS[1] .. ':b', ARGV[2]) == 0 then return 0 end
end
redis.call('HINCRBY', KEYS[1], 'version', 1)
return 1
"""

X_UNLINK = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('FMQNOTFOUND') end
redis.call('DEL', KEYS[1], KEYS[1] .. ':b')
return 1
"""

# ARGV: version, pick ('all' | 'turn'), payload, queue prefix...
# -> {delivered} | {-1} bindings changed | {-2, queue} a target is full (nothing sent)
X_PUBLISH = r"""
local function last_id(key)
  local e = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if #e == 0 then return '0-0' end
  return e[1][1]
end
local h = redis.call('HMGET', KEYS[1], 'version', 'turn')
if not h[1] then return redis.error_reply('FMQNOTFOUND') end
if h[1] ~= ARGV[1] then return {-1} end
local targets = {}
for i = 4, #ARGV do targets[#targets + 1] = ARGV[i] end
if ARGV[2] == 'turn' then
  local live = {}
  for _, q in ipairs(targets) do
    if redis.call('EXISTS', q .. 'm') == 1 then live[#live + 1] = q end
  end
  if #live == 0 then return {0} end
  targets = {live[(tonumber(h[2]) % #live) + 1]}
end
local payload = ARGV[3]
local len = string.len(payload)
local go = {}
for _, q in ipairs(targets) do
  local m = redis.call('HMGET', q .. 'm', 'maxsize', 'maxbytes', 'bytes', 'mms')
  if m[1] then
    if len > tonumber(m[4]) then return {-3, q} end
    local maxsize, maxbytes = tonumber(m[1]), tonumber(m[2])
    if (maxsize > 0 and redis.call('XLEN', q .. 's') >= maxsize)
       or (maxbytes > 0 and tonumber(m[3]) + len > maxbytes) then
      redis.call('SET', q .. 'pw', '1', 'PX', 5000)
      return {-2, q, last_id(q .. 'fr')}
    end
    go[#go + 1] = q
  end
end
for _, q in ipairs(go) do
  redis.call('XADD', q .. 's', '*', 'd', payload)
  redis.call('HINCRBY', q .. 'm', 'enqueued', 1)
  redis.call('HINCRBY', q .. 'm', 'bytes', len)
  if redis.call('EXISTS', q .. 'gw') == 1 then
    redis.call('XADD', q .. 'sig', 'MAXLEN', 1, '*', 'x', '1')
  end
end
if ARGV[2] == 'turn' then redis.call('HINCRBY', KEYS[1], 'turn', 1) end
return {#go}
"""

QUEUE_SCRIPTS = {
    "create": CREATE, "open": OPEN, "unlink": UNLINK, "put": PUT, "get": GET,
    "lease": LEASE, "ack": ACK, "settle": SETTLE, "heartbeat": HEARTBEAT,
    "pending": PENDING, "stats": STATS, "parked": PARKED, "unpark": UNPARK,
}
EXCHANGE_SCRIPTS = {
    "x_create": X_CREATE, "x_read": X_READ, "x_bind": X_BIND, "x_unlink": X_UNLINK,
    "x_publish": X_PUBLISH,
}


def sources():
    """name -> full Lua source (the queue scripts get the shared prelude)."""
    out = {name: PRELUDE + body for name, body in QUEUE_SCRIPTS.items()}
    out.update(EXCHANGE_SCRIPTS)
    return out
