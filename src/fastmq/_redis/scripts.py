"""The server-side half of the Redis backend: one Lua script per operation.

Every queue operation is one ``EVALSHA`` of a script below, so its effect is
atomic on the server (Redis runs a script to completion before any other
command, and AOF/replicas receive its effects as one ``MULTI``/``EXEC``).
``KEYS[1]`` is the queue's metadata key (so a cluster client routes the call
to the queue's slot) and ``ARGV[1]`` its key prefix ``fmq:{name}:``; every
other key a script touches carries the same ``{name}`` hash tag, so a queue
lives in one cluster slot.

Keys of a queue (prefix ``P = fmq:{name}:``):

* ``P m`` -- hash: the queue's settings and counters, and ``wake``: no lease
  or consumer deadline is earlier (a lower bound: every added deadline
  lowers it, a reclaim that ran sets it to the earliest one left), so the
  scripts that reclaim read one field while nothing is due. Created by ``create``;
  every script fails with ``FMQNOTFOUND`` without it, so a server that lost
  its data (restart without persistence) gives ``QueueNotFound``, never a
  silent empty queue.
* ``P q`` -- list of ready messages, oldest first, each ``"<c>:<payload>"``
  where ``c`` counts the deliveries so far (``0`` for a new message; the
  client adds the ``0:`` on put and strips the header on get). A list, not a
  stream, for the data: ``RPUSH``/``LPOP`` move a whole batch in one command
  and hand Lua flat strings, where ``XADD`` per message and ``XRANGE``
  (nested entries) cost about three times as much server time per message
  here; the stream features (ids, consumer groups) are not used anyway (see
  the end of this note). ``maxsize`` is checked before the push, so nothing
  is ever trimmed.
* ``P L:b<number>`` -- the messages leased by one call (lease batch
  ``b<number>``; numbers come from the counter ``lseq`` in ``P m``): a list
  of the elements as they were taken from ``q``, in order, moved there by
  one ``RPUSH``. The i-th one's lease id is ``"<number>.<i>"`` (the client
  derives the ids, so neither the lease nor the reply carries them); a member
  settled on its own (single ack, nack, touch, redelivery) becomes ``''``,
  and the list goes with its batch. A lease id names *this* delivery: a
  redelivery re-appends the message at the back and the next lease gets a
  new id, so an old holder's ``ack`` finds nothing and is refused.
* ``P L`` -- hash of touched leases by id: ``touch`` moves a message out of
  its batch to a batch of its own, ``t<id>``.
* ``P Ld`` / ``P Lb`` / ``P Lbc`` / ``P Lbb`` / ``P Lo:<consumer>`` -- per
  lease batch: one deadline (zset ``Ld``, server clock from ``TIME``), one
  record ``"<consumer> <leased_at_ms>"`` (``Lb``), the count and payload
  bytes of the members not settled yet (``Lbc``, ``Lbb``; in flight is the
  sum of ``Lbc``) and one entry in the consumer's set of batches
  (``Lo:<consumer>``). So a lease or an ack checks owner and deadline once
  per batch, and the ack of a whole batch (``ACK_BATCHES``) is a few hash
  operations and one ``DEL``, with no per-message work on the server; a due
  batch gives back the members still in it.
* ``P C`` -- zset of leasing consumers by heartbeat deadline. A consumer
  whose heartbeat lapsed is gone: its leases are given back, counted
  ``abandoned``, by the next script that reclaims.
* ``P D`` -- list of parked dead letters, forwarded by the client to the
  dead-letter queue (another slot in a cluster, so not from a script) under
  the short lock ``P fwd``: one forwarder at a time, and a batch leaves
  ``D`` only after it is in the dead-letter queue (a forwarder that dies
  between the two forwards that batch twice; nothing is lost).
* ``P sig`` / ``P fr`` -- one-entry streams (the one use of streams) that a waiting consumer /
  producer blocks on with ``XREAD BLOCK`` (from the id the failed attempt
  returned, so no wake-up is lost); ``P gw`` / ``P pw`` -- short-lived flags
  saying somebody waits, so the hot paths signal only when it matters.
* ``P seq`` -- last applied request number per producer: a ``put`` retried
  after a lost reply is applied once. ``P P`` / ``P G`` -- zsets of producers
  and consumers by last activity (for ``stats()``), pruned as they age.

No consumer groups: raw ``XACK`` has no owner check and ``XCLAIM`` keeps an
old id (a "requeued" message would jump the line); the lease structures
above give both the owner check and re-append at the back.

A decrement is written ``0 - x``, never ``-x``: for ``x == 0`` (an empty
payload) Lua's ``-x`` is negative zero, which reaches the server as "-0",
and HINCRBY rejects that as not an integer.
"""
from __future__ import annotations

PRELUDE = r"""
local P = ARGV[1]
-- RPUSH of a[first..last] in slices: Lua's unpack() has a C-stack limit of
-- about 8000 values, and an atomic put or a lease may carry more.
local function rpush_range(key, a, first, last)
  local i = first
  while i <= last do
    local j = i + 999
    if j > last then j = last end
    redis.call('RPUSH', key, unpack(a, i, j))
    i = j + 1
  end
end
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
local function exists()
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return redis.error_reply('FMQNOTFOUND')
  end
end
"""

# Lease handling, for the scripts that reclaim or settle leases.
LEASES = r"""
-- The deliveries so far and the payload of a queue element "<c>:<payload>".
local function unpack_element(e)
  local c, at = string.match(e, '^(%d+):()')
  return tonumber(c), string.sub(e, at)
end
local function payload_len(e)
  return string.len(e) - string.find(e, ':', 1, true)
end
-- The element of lease `id` in batch `b` (nil: not there any more). A batch
-- 'b<n>' keeps its elements in the list 'L:b<n>' (id "<n>.<i>" at index
-- i - 1; '' once settled on its own); a touched message, batch 't<id>', in
-- the hash 'L'.
local function locate(id, b)
  if string.byte(b, 1) == 116 then
    if b ~= 't' .. id then return nil end
    return redis.call('HGET', P .. 'L', id) or nil
  end
  local num, i = string.match(id, '^(%d+)%.(%d+)$')
  if not num or b ~= 'b' .. num then return nil end
  local v = redis.call('LINDEX', P .. 'L:' .. b, tonumber(i) - 1)
  if not v or v == '' then return nil end
  return v
end
-- Take the located lease `id` out of batch `b`.
local function drop(id, b)
  if string.byte(b, 1) == 116 then
    redis.call('HDEL', P .. 'L', id)
  else
    redis.call('LSET', P .. 'L:' .. b, tonumber(string.match(id, '%.(%d+)$')) - 1, '')
  end
end
-- The owner and leased_at of batch `b` (record "<consumer> <leased_at_ms>").
local function batch_record(b)
  local v = redis.call('HGET', P .. 'Lb', b)
  if not v then return nil, nil end
  return string.match(v, '^(%S+) (%S+)')
end
-- `k` members (`bytes` payload bytes) of batch `b` were settled; the batch
-- goes with its last member (or now, with `force`).
local function release(b, k, bytes, force)
  local left = 0
  if not force then
    left = redis.call('HINCRBY', P .. 'Lbc', b, 0 - k)
    redis.call('HINCRBY', P .. 'Lbb', b, 0 - bytes)
  end
  if left <= 0 then
    local v = redis.call('HGET', P .. 'Lb', b)
    if v then redis.call('SREM', P .. 'Lo:' .. string.match(v, '^(%S+)'), b) end
    redis.call('ZREM', P .. 'Ld', b)
    redis.call('HDEL', P .. 'Lb', b)
    redis.call('HDEL', P .. 'Lbc', b)
    redis.call('HDEL', P .. 'Lbb', b)
    if string.byte(b, 1) == 98 then redis.call('DEL', P .. 'L:' .. b) end
  end
end
-- 'wake' in the meta hash: no deadline in Ld or C is earlier (a lower
-- bound, so removing a deadline needs no update), and reclaim reads just
-- it while nothing is due. Every deadline added goes through here.
local function lower_wake(t)
  local w = redis.call('HGET', KEYS[1], 'wake')
  if not w or t < tonumber(w) then redis.call('HSET', KEYS[1], 'wake', t) end
end
local function new_batch(b, consumer, deadline, now, count, bytes)
  lower_wake(deadline)
  redis.call('ZADD', P .. 'Ld', deadline, b)
  redis.call('HSET', P .. 'Lb', b, consumer .. ' ' .. now)
  redis.call('HSET', P .. 'Lbc', b, count)
  redis.call('HSET', P .. 'Lbb', b, bytes)
  redis.call('SADD', P .. 'Lo:' .. consumer, b)
end
-- End the lease of `id` (in batch `b`): back to the queue (with one more
-- delivery counted), or dead-lettered past max_deliveries / when `dead` is
-- true. `why` is the counter bumped on a requeue besides 'redelivered'.
local function give_back(id, b, why, dead)
  local v = locate(id, b)
  if not v then return 0 end
  local c, payload = unpack_element(v)
  local count = c + 1                       -- deliveries, this one included
  drop(id, b)
  release(b, 1, string.len(payload))
  local maxdel = tonumber(redis.call('HGET', P .. 'm', 'maxdel') or '20')
  if not dead and count < maxdel then
    redis.call('RPUSH', P .. 'q', count .. ':' .. payload)
    redis.call('HINCRBY', P .. 'm', 'redelivered', 1)
    if why then redis.call('HINCRBY', P .. 'm', why, 1) end
    signal('gw', P .. 'sig')
  else
    if redis.call('HGET', P .. 'm', 'dlq') ~= '' then
      redis.call('RPUSH', P .. 'D', payload)
    else
      redis.call('HINCRBY', P .. 'm', 'bytes', 0 - string.len(payload))
    end
    redis.call('HINCRBY', P .. 'm', 'dead_lettered', 1)
  end
  return 1
end
-- The members of batch `b` still in it: ids, elements, owner, leased_at.
local function members(b)
  local consumer, lat = batch_record(b)
  local ids, vals = {}, {}
  if string.byte(b, 1) == 116 then
    local id = string.sub(b, 2)
    local v = redis.call('HGET', P .. 'L', id)
    if v then ids[1], vals[1] = id, v end
  else
    local pre = string.sub(b, 2) .. '.'
    for i, v in ipairs(redis.call('LRANGE', P .. 'L:' .. b, 0, -1)) do
      if v ~= '' then
        ids[#ids + 1] = pre .. i
        vals[#vals + 1] = v
      end
    end
  end
  return ids, consumer, vals, lat
end
-- Give back every message of consumer `c` (heartbeat lapsed, or departing),
-- in lease order.
local function give_back_all(c, why)
  local n, all = 0, {}
  local batches = redis.call('SMEMBERS', P .. 'Lo:' .. c)
  for _, b in ipairs(batches) do
    for _, id in ipairs(members(b)) do
      local num, i = string.match(id, '^(%d+)%.(%d+)$')
      all[#all + 1] = {tonumber(num), tonumber(i), id, b}
    end
  end
  table.sort(all, function(x, y)
    if x[1] ~= y[1] then return x[1] < y[1] end
    return x[2] < y[2]
  end)
  for _, e in ipairs(all) do n = n + give_back(e[3], e[4], why, false) end
  for _, b in ipairs(batches) do release(b, 0, 0, true) end
  redis.call('DEL', P .. 'Lo:' .. c)
  return n
end
-- Give back the expired leases and the leases of consumers whose heartbeat
-- lapsed (bounded work per call; the rest goes at the next call).
local function reclaim(now)
  local w = redis.call('HGET', KEYS[1], 'wake')
  if w and now < tonumber(w) then return 0 end
  local n = 0
  local due = redis.call('ZRANGEBYSCORE', P .. 'Ld', '-inf', now, 'LIMIT', 0, 64)
  for _, b in ipairs(due) do
    for _, id in ipairs(members(b)) do n = n + give_back(id, b, false, false) end
    release(b, 0, 0, true)
  end
  local gone = redis.call('ZRANGEBYSCORE', P .. 'C', '-inf', now, 'LIMIT', 0, 16)
  for _, c in ipairs(gone) do
    n = n + give_back_all(c, 'abandoned')
    redis.call('ZREM', P .. 'C', c)
  end
  -- The earliest deadline left (still due when the work above was bounded).
  local nxt = '9999999999999999'
  local a = redis.call('ZRANGE', P .. 'Ld', 0, 0, 'WITHSCORES')
  local c = redis.call('ZRANGE', P .. 'C', 0, 0, 'WITHSCORES')
  if a[2] then nxt = a[2] end
  if c[2] and tonumber(c[2]) < tonumber(nxt) then nxt = c[2] end
  redis.call('HSET', KEYS[1], 'wake', nxt)
  return n
end
-- Take the first `n` ready messages.
local function take(n)
  return redis.call('LPOP', P .. 'q', n) or {}
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
for _, c in ipairs(redis.call('ZRANGE', P .. 'C', 0, -1)) do
  redis.call('DEL', P .. 'Lo:' .. c)
end
for _, b in ipairs(redis.call('ZRANGE', P .. 'Ld', 0, -1)) do
  redis.call('DEL', P .. 'L:' .. b)
end
for _, k in ipairs({'m', 'q', 'L', 'Ld', 'Lb', 'Lbc', 'Lbb', 'C', 'D', 'sig', 'fr', 'gw', 'pw', 'seq',
                    'P', 'G', 'fwd'}) do
  redis.call('DEL', P .. k)
end
return 1
"""

# ARGV: P, producer, seq, atomic, wait_ms, activity, "0:"payload...
# -> {count put, id to wait from (when not all went in)}
PUT = r"""
local m = redis.call('HMGET', KEYS[1], 'maxsize', 'maxbytes', 'enqueued', 'bytes')
if not m[1] then return redis.error_reply('FMQNOTFOUND') end
local producer, seq = ARGV[2], tonumber(ARGV[3])
if producer ~= '' then
  local last = redis.call('HGET', P .. 'seq', producer)
  if last then
    local lseq, lcount = string.match(last, '^(%d+):(%d+)$')
    if tonumber(lseq) == seq then return {tonumber(lcount), '0-0'} end
  end
end
local first = 7
local n = #ARGV - first + 1
local maxsize, maxbytes = tonumber(m[1]), tonumber(m[2])
local room = n
if maxsize > 0 then
  room = maxsize - redis.call('LLEN', P .. 'q')
  if room > n then room = n end
  if room < 0 then room = 0 end
end
if ARGV[4] == '1' and room < n then room = 0 end
local total = 0
if maxbytes > 0 then
  local used = tonumber(m[4])
  local fit = 0
  for i = 1, room do
    local len = string.len(ARGV[first - 1 + i]) - 2
    if used + total + len > maxbytes then break end
    total = total + len
    fit = i
  end
  if ARGV[4] == '1' and fit < n then fit = 0 total = 0 end
  room = fit
else
  for i = 1, room do total = total + string.len(ARGV[first - 1 + i]) end
  total = total - 2 * room
end
if room > 0 then
  rpush_range(P .. 'q', ARGV, first, first - 1 + room)
  -- Both counters in one write (read above, in this same script).
  redis.call('HSET', KEYS[1], 'enqueued', string.format('%d', tonumber(m[3]) + room),
             'bytes', string.format('%d', tonumber(m[4]) + total))
  signal('gw', P .. 'sig')
end
if producer ~= '' then
  redis.call('HSET', P .. 'seq', producer, ARGV[3] .. ':' .. room)
  if ARGV[6] == '1' then
    local now = now_ms()
    redis.call('ZADD', P .. 'P', now, producer)
    local old = redis.call('ZRANGEBYSCORE', P .. 'P', '-inf', now - 3600000, 'LIMIT', 0, 8)
    for _, p in ipairs(old) do
      redis.call('HDEL', P .. 'seq', p)
      redis.call('ZREM', P .. 'P', p)
    end
  end
end
if room < n and tonumber(ARGV[5]) > 0 then
  redis.call('SET', P .. 'pw', '1', 'PX', ARGV[5])
  return {room, last_id(P .. 'fr')}
end
return {room, '0-0'}
"""

# ARGV: P, max, getter, wait_ms, activity -> {n, "c:"payload...} or {0, id to wait from}
GET = r"""
local h = redis.call('HMGET', KEYS[1], 'dequeued', 'wake')
if not h[1] then return redis.error_reply('FMQNOTFOUND') end
local now = now_ms()
if not h[2] or now >= tonumber(h[2]) then reclaim(now) end
if ARGV[5] == '1' then redis.call('ZADD', P .. 'G', now, ARGV[3]) end
local ents = take(ARGV[2])
if #ents == 0 then
  if tonumber(ARGV[4]) > 0 then redis.call('SET', P .. 'gw', '1', 'PX', ARGV[4]) end
  return {0, last_id(P .. 'sig')}
end
local total = 0
for i, ent in ipairs(ents) do
  total = total + string.len(ent) - string.find(ent, ':', 1, true)
end
table.insert(ents, 1, #ents)
redis.call('HINCRBY', KEYS[1], 'dequeued', #ents - 1)
redis.call('HINCRBY', KEYS[1], 'bytes', 0 - total)
signal('pw', P .. 'fr')
return ents
"""

# ARGV: P, max, consumer, lease_ms, heartbeat_ms, wait_ms, activity
# -> {n, now, batch "b<number>", element...} (the i-th element's lease id is
# "<number>.<i>") or {0, id to wait from}
LEASE = r"""
local e = exists() if e then return e end
local now = now_ms()
reclaim(now)
local consumer = ARGV[3]
if ARGV[7] == '1' then redis.call('ZADD', P .. 'G', now, consumer) end
local ents = take(ARGV[2])
local n = #ents
if n == 0 then
  if tonumber(ARGV[6]) > 0 then redis.call('SET', P .. 'gw', '1', 'PX', ARGV[6]) end
  return {0, last_id(P .. 'sig')}
end
local b = 'b' .. redis.call('HINCRBY', KEYS[1], 'lseq', 1)
local bytes, find = 0, string.find
for i = 1, n do
  local ent = ents[i]
  bytes = bytes + #ent - find(ent, ':', 1, true)
end
rpush_range(P .. 'L:' .. b, ents, 1, n)
new_batch(b, consumer, now + tonumber(ARGV[4]), now, n, bytes)
redis.call('ZADD', P .. 'C', now + tonumber(ARGV[5]), consumer)
lower_wake(now + tonumber(ARGV[5]))
signal('pw', P .. 'fr')
table.insert(ents, 1, b)
table.insert(ents, 1, now)
table.insert(ents, 1, n)
return ents
"""

# The end of both acks (ACK, ACK_BATCHES): `n` messages of `bytes` payload bytes
# were acked, so they leave the queue's counters and a waiting producer is woken.
# Only these two scripts carry it (each ``local function`` is a closure made
# again on every call).
_ACKED_LEAVE = r"""
local function acked_leave(n, bytes)
  if n > 0 then
    redis.call('HINCRBY', KEYS[1], 'dequeued', n)
    redis.call('HINCRBY', KEYS[1], 'bytes', 0 - bytes)
    signal('pw', P .. 'fr')
  end
end
"""

# ARGV: P, consumer, id, batch, id, batch, ... -> {1 acked | 0 lost, ...}
ACK = _ACKED_LEAVE + r"""
local now = now_ms()
local consumer = ARGV[2]
local res, vals, groups, order = {}, {}, {}, {}
for i = 3, #ARGV, 2 do
  local k = (i - 1) / 2
  local id, b = ARGV[i], ARGV[i + 1]
  res[k] = 0
  local v = locate(id, b)
  if v then
    vals[k] = v
    local g = groups[b]
    if not g then g = {} groups[b] = g order[#order + 1] = b end
    g[#g + 1] = k
  end
end
local acked, total = 0, 0
for _, b in ipairs(order) do
  local g = groups[b]
  if batch_record(b) == consumer then
    if tonumber(redis.call('ZSCORE', P .. 'Ld', b) or '0') >= now then
      local bytes = 0
      for _, k in ipairs(g) do
        bytes = bytes + payload_len(vals[k])
        drop(ARGV[2 * k + 1], b)
        res[k] = 1
      end
      release(b, #g, bytes)
      acked, total = acked + #g, total + bytes
    else
      for _, k in ipairs(g) do give_back(ARGV[2 * k + 1], b, false, false) end   -- expired: back now
    end
  end
end
acked_leave(acked, total)
return res
"""

# ARGV: P, consumer, batch, size, batch, size, ... -> per batch: 1 acked whole |
# 0 lost (expired or not this consumer's) | -1 not whole any more (some member
# was settled on its own: ack its members with ACK)
ACK_BATCHES = _ACKED_LEAVE + r"""
local now = now_ms()
local consumer = ARGV[2]
local res, acked, total = {}, 0, 0
for i = 3, #ARGV, 2 do
  local b, size = ARGV[i], tonumber(ARGV[i + 1])
  local r = 0
  if batch_record(b) == consumer then
    if tonumber(redis.call('HGET', P .. 'Lbc', b)) ~= size then
      r = -1
    elseif tonumber(redis.call('ZSCORE', P .. 'Ld', b) or '0') >= now then
      total = total + tonumber(redis.call('HGET', P .. 'Lbb', b))
      release(b, 0, 0, true)
      acked = acked + size
      r = 1
    else
      for _, id in ipairs(members(b)) do give_back(id, b, false, false) end
    end
  end
  res[#res + 1] = r
end
acked_leave(acked, total)
return res
"""

# ARGV: P, consumer, id, batch, what ('nack' | 'dead' | 'touch'), touch_ms -> 1 | 0 lost
SETTLE = r"""
local now = now_ms()
local consumer, id, b = ARGV[2], ARGV[3], ARGV[4]
local v = locate(id, b)
if not v then return 0 end
if batch_record(b) ~= consumer then return 0 end
if tonumber(redis.call('ZSCORE', P .. 'Ld', b) or '0') < now then
  give_back(id, b, false, false)
  return 0
end
if ARGV[5] == 'touch' then
  local t, bytes = 't' .. id, payload_len(v)
  drop(id, b)
  release(b, 1, bytes)
  redis.call('HSET', P .. 'L', id, v)
  new_batch(t, consumer, now + tonumber(ARGV[6]), now, 1, bytes)
  return 1
end
give_back(id, b, false, ARGV[5] == 'dead')
return 1
"""

# ARGV: P, consumer, heartbeat_ms, depart ('1': give every lease back, forget it)
# -> how many leases were given back
HEARTBEAT = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local now = now_ms()
local consumer = ARGV[2]
if ARGV[4] == '1' then
  give_back_all(consumer, false)
  redis.call('ZREM', P .. 'C', consumer)
else
  redis.call('ZADD', P .. 'C', 'XX', now + tonumber(ARGV[3]), consumer)
end
return reclaim(now)
"""

# -> {now, {id, "<delivery_count> <consumer> <leased_at_ms> <deadline_ms>", ...}}
PENDING = r"""
local e = exists() if e then return e end
local now = now_ms()
reclaim(now)
local out = {}
local all = redis.call('ZRANGE', P .. 'Ld', 0, -1, 'WITHSCORES')
for i = 1, #all, 2 do
  local b, dl = all[i], all[i + 1]
  local ids, consumer, vals, lat = members(b)
  for j, id in ipairs(ids) do
    local c = unpack_element(vals[j])
    out[#out + 1] = id
    out[#out + 1] = (c + 1) .. ' ' .. consumer .. ' ' .. lat .. ' ' .. dl
  end
end
return {now, out}
"""

# -> {meta fields/values, depth, in flight, consumers leasing, producers, getters, parked}
STATS = r"""
local e = exists() if e then return e end
local now = now_ms()
reclaim(now)
local in_flight = 0
for _, k in ipairs(redis.call('HVALS', P .. 'Lbc')) do in_flight = in_flight + tonumber(k) end
return {redis.call('HGETALL', KEYS[1]), redis.call('LLEN', P .. 'q'), in_flight,
        redis.call('ZCOUNT', P .. 'C', now, '+inf'),
        redis.call('ZCOUNT', P .. 'P', now - 60000, '+inf'),
        redis.call('ZCOUNT', P .. 'G', now - 60000, '+inf'),
        redis.call('LLEN', P .. 'D'), now}
"""

# ARGV: P, max, token -> parked dead letters (not removed), under the lock
PARKED = r"""
if redis.call('LLEN', P .. 'D') == 0 then return {} end
if not redis.call('SET', P .. 'fwd', ARGV[3], 'NX', 'PX', 10000) and
   redis.call('GET', P .. 'fwd') ~= ARGV[3] then
  return {}
end
return redis.call('LRANGE', P .. 'D', 0, tonumber(ARGV[2]) - 1)
"""

# ARGV: P, token, n -> the first n parked dead letters leave (they were forwarded)
UNPARK = r"""
if redis.call('GET', P .. 'fwd') ~= ARGV[2] then return 0 end
redis.call('DEL', P .. 'fwd')
local gone = redis.call('LPOP', P .. 'D', ARGV[3]) or {}
local total = 0
for _, d in ipairs(gone) do total = total + string.len(d) end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'bytes', 0 - total)
end
return #gone
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

# ARGV: version, pick ('all' | 'turn'), "0:"payload, queue prefix...
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
    if len - 2 > tonumber(m[4]) then return {-3, q} end
    local maxsize, maxbytes = tonumber(m[1]), tonumber(m[2])
    if (maxsize > 0 and redis.call('LLEN', q .. 'q') >= maxsize)
       or (maxbytes > 0 and tonumber(m[3]) + len - 2 > maxbytes) then
      redis.call('SET', q .. 'pw', '1', 'PX', 5000)
      return {-2, q, last_id(q .. 'fr')}
    end
    go[#go + 1] = q
  end
end
for _, q in ipairs(go) do
  redis.call('RPUSH', q .. 'q', payload)
  redis.call('HINCRBY', q .. 'm', 'enqueued', 1)
  redis.call('HINCRBY', q .. 'm', 'bytes', len - 2)
  if redis.call('EXISTS', q .. 'gw') == 1 then
    redis.call('XADD', q .. 'sig', 'MAXLEN', 1, '*', 'x', '1')
  end
end
if ARGV[2] == 'turn' then redis.call('HINCRBY', KEYS[1], 'turn', 1) end
return {#go}
"""

QUEUE_SCRIPTS = {
    "create": CREATE, "open": OPEN, "unlink": UNLINK, "put": PUT, "get": GET,
    "lease": LEASE, "ack": ACK, "ack_batches": ACK_BATCHES, "settle": SETTLE,
    "heartbeat": HEARTBEAT,
    "pending": PENDING, "stats": STATS, "parked": PARKED, "unpark": UNPARK,
}
EXCHANGE_SCRIPTS = {
    "x_create": X_CREATE, "x_read": X_READ, "x_bind": X_BIND, "x_unlink": X_UNLINK,
    "x_publish": X_PUBLISH,
}


_NEED_LEASES = {"lease", "ack", "ack_batches", "settle", "heartbeat", "pending", "stats"}

# An auto-ack get touches leases only when some are due: the lease helpers
# (a dozen closures, made again on every call) are made only then. Nothing
# due (the common case) costs one read of the meta hash's 'wake'.
LAZY_RECLAIM = r"""
local function reclaim(now)
  local w = redis.call('HGET', KEYS[1], 'wake')
  if w and now < tonumber(w) then return 0 end
  local full = (function()
""" + LEASES + r"""
    return reclaim
  end)()
  return full(now)
end
local function take(n)
  return redis.call('LPOP', P .. 'q', n) or {}
end
"""


def sources():
    """name -> full Lua source: the queue scripts get the shared prelude, and
    those that touch leases the lease helpers too (each ``local function``
    is a closure made again on every call, so the others go without; ``get``
    makes them only when a lease is due)."""
    out = {name: PRELUDE + (LEASES if name in _NEED_LEASES else
                            LAZY_RECLAIM if name == "get" else "") + body
           for name, body in QUEUE_SCRIPTS.items()}
    out.update(EXCHANGE_SCRIPTS)
    return out
